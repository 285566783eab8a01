"""What is specific to each student family, in one place: one small object per family.

A family knows its diffusers scheduler (class and the defaults its released checkpoints use), how its
timesteps are set, the level (a, s) of each step's model input (``x_in = a x0 + s e``), ``next_level``,
the next-step coefficients of the uniform form ``x_next = A x0 + B e + C z``, which steps draw fresh
noise, the initial noise scale, its options and its lam default. :func:`distpp.schedules.build_schedule`
composes these into device tables and never branches on a family's name; adding a family touches this
file and its tests. All arrays here are float64 numpy over the N steps of one set scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .errors import ConfigError

VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PREDICTION_TYPES = VP_PREDICTION_TYPES + ("flow",)

# SD / SDXL training schedule (ALGORITHM.md): scaled-linear betas 0.00085 -> 0.012 over 1000 steps.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def prediction_maps(a, s, prediction_type: str):
    """(p_x, p_m, q_x, q_m) with x0 = p_x z + p_m m and e = q_x z + q_m m, for a model input
    z = a x0 + s e and its prediction m. a, s: float64 numpy arrays or torch tensors of one shape.

    v_prediction is the VP velocity a e - s x0 (a^2 + s^2 = 1); flow is the rectified-flow velocity
    e - x0 (a + s = 1 in flow models; written for any a + s > 0, so sig = 1, a = 0 is defined)."""
    one, zero = a * 0 + 1, a * 0
    if prediction_type == "epsilon":
        return 1 / a, -s / a, zero, one
    if prediction_type == "v_prediction":
        return a, -s, s, a
    if prediction_type == "sample":
        return zero, one, 1 / s, -a / s
    if prediction_type == "flow":
        d = a + s
        return 1 / d, -s / d, 1 / d, a / d
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; pass one of {', '.join(PREDICTION_TYPES)}")


def predict_x0_eps(m, z, a, s, prediction_type: str):
    """(x0, e) from a model's prediction ``m`` at input ``z = a x0 + s e`` (any broadcastable shapes)."""
    px, pm, qx, qm = prediction_maps(a, s, prediction_type)
    return px * z + pm * m, qx * z + qm * m


def teacher_rows(a_s: torch.Tensor, s_s: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Guidance-table rows (a_s, s_s, tp_x, tp_m) [..., 4] for teacher levels (a_s, s_s) (float64, any
    shape): the teacher input is x_s = a_s x0 + s_s n and its clean estimate x0_T = tp_x x_s + tp_m m_T."""
    tpx, tpm, _, _ = prediction_maps(a_s, s_s, prediction_type)
    return torch.stack([a_s, s_s, tpx, tpm], dim=-1)


def lcm_boundary_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's consistency boundary condition at timestep t: (c_skip, c_out), x0 = c_out x0_pred + c_skip x."""
    tt = t * timestep_scaling
    return sigma_data**2 / (tt**2 + sigma_data**2), tt / (tt**2 + sigma_data**2) ** 0.5


@dataclass(frozen=True)
class Levels:
    """The levels of a set scheduler's N steps (float64 [N] arrays unless noted).

    t: the scheduler's timesteps; t_model: the model's timestep input; a, s: the level of the model input
    (x_in = a x0 + s e); c_in: x_in = c_in * state; a_next, s_next, t_next: the same at next_level(k);
    bounds: the "random" teacher rule's closed draw range per step (host floats)."""

    t: np.ndarray
    t_model: np.ndarray
    a: np.ndarray
    s: np.ndarray
    c_in: np.ndarray
    a_next: np.ndarray
    s_next: np.ndarray
    t_next: np.ndarray
    bounds: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Step:
    """Next-step coefficients x_next = A x0 + B e + C z ([N] float64 each) and which steps draw z."""

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    draws: tuple[bool, ...]


@dataclass(frozen=True)
class Option:
    """A family option (``SamplerConfig.family_options``): its default and what it accepts."""

    default: Any
    doc: str
    check: Any  # (name, value) -> normalized value, or raises ConfigError


def _quiet(fn):
    """Run fn with diffusers' warnings silenced (DMD2's timesteps are off LCM's grid on purpose)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return fn()
    finally:
        dlogging.set_verbosity(level)


class Family:
    """Base: a family stepping with one diffusers scheduler class. Subclasses set the class attributes and
    override what differs (levels, next-step coefficients, x0 maps, timesteps)."""

    name: str = ""
    scheduler_class: str = ""
    defaults: Mapping[str, Any] = {}
    default_lam: float = 0.01
    prediction_types: tuple[str, ...] = VP_PREDICTION_TYPES
    explicit_timesteps: bool = False  # whether SamplerConfig.timesteps is accepted
    scheduler_has_prediction_type: bool = True  # a prediction_type entry in the scheduler config
    options: Mapping[str, Option] = {}

    # --- configuration ------------------------------------------------------------------------------
    def default_prediction_type(self) -> str:
        return self.prediction_types[0]

    def check_prediction_type(self, prediction_type: str | None, who: str = "prediction_type") -> str:
        pt = self.default_prediction_type() if prediction_type is None else prediction_type
        if pt not in PREDICTION_TYPES:
            raise ConfigError(f"unknown {who} {pt!r}; pass one of {', '.join(PREDICTION_TYPES)}")
        if pt not in self.prediction_types:
            raise ConfigError(f"{who} {pt!r} does not fit family {self.name!r}; pass one of "
                              f"{', '.join(self.prediction_types)}")
        return pt

    def resolve_options(self, options: Mapping[str, Any] | None,
                        scheduler_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The family's options, defaults filled in, each checked (ConfigError naming what to pass)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ConfigError(f"family {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                              f"its options: {known}")
        out = {k: opt.default for k, opt in self.options.items()}
        for k, v in options.items():
            out[k] = self.options[k].check(k, v)
        self.check_combination(out, self.scheduler_settings(scheduler_config, out))
        return out

    def check_combination(self, options: dict[str, Any], settings: Mapping[str, Any]) -> None:
        """Cross-checks of options against the merged scheduler settings (none by default)."""

    def scheduler_settings(self, scheduler_config: Mapping[str, Any] | None, options: Mapping[str, Any]) -> dict:
        """The scheduler config: family defaults, then ``scheduler_config`` (private keys dropped)."""
        cfg = dict(self.defaults)
        if scheduler_config:
            cfg.update({k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")})
        return cfg

    def check_scheduler_settings(self, cfg: Mapping[str, Any]) -> None:
        for flag in ("clip_sample", "thresholding"):
            if cfg.get(flag):
                raise ConfigError(f"scheduler config sets {flag}=True, which distpp does not support; set it False")

    def make_scheduler(self, scheduler_config: Mapping[str, Any] | None = None, prediction_type: str | None = None,
                       options: Mapping[str, Any] | None = None):
        """A fresh diffusers scheduler of this family: the defaults, updated with ``scheduler_config``."""
        import diffusers

        options = self.resolve_options(options, scheduler_config) if options is None else options
        cfg = self.scheduler_settings(scheduler_config, options)
        if prediction_type is not None:
            pt = self.check_prediction_type(prediction_type)
            if self.scheduler_has_prediction_type:
                cfg["prediction_type"] = pt
        self.check_scheduler_settings(cfg)
        return getattr(diffusers, self.scheduler_class).from_config(cfg)

    # --- timesteps ----------------------------------------------------------------------------------
    def default_timesteps(self, steps: int) -> list[int] | None:
        """Explicit timesteps this family uses by default, or None to let the scheduler space them."""
        return None

    def set_timesteps(self, sched, steps: int, timesteps: list[int] | None, options: Mapping[str, Any]) -> None:
        T = int(sched.config.num_train_timesteps)
        if timesteps is None:
            timesteps = self.default_timesteps(steps)
        if timesteps is not None:
            if any(not (0 <= t < T) for t in timesteps) or any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ConfigError(f"timesteps must be strictly decreasing integers in [0, {T}), got {timesteps}")
            if not self.explicit_timesteps:
                raise ConfigError(f"family {self.name!r} does not take explicit timesteps; pass steps instead")
            self._call(lambda: _quiet(lambda: sched.set_timesteps(timesteps=timesteps)))
        else:
            if steps > T:
                raise ConfigError(f"steps={steps} exceeds the {T} training timesteps")
            self._call(lambda: sched.set_timesteps(steps))

    def _call(self, fn):
        """diffusers' own refusals (e.g. LCM steps > original_inference_steps) become ConfigError."""
        try:
            return fn()
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"the {self.name} scheduler refused this config: {e}") from e

    # --- the step -----------------------------------------------------------------------------------
    def levels(self, sched, options: Mapping[str, Any]) -> Levels:
        raise NotImplementedError

    def next_step(self, sched, lv: Levels, options: Mapping[str, Any]) -> Step:
        raise NotImplementedError

    def x0_maps(self, sched, lv: Levels, prediction_type: str):
        """(P_x, P_m, Q_x, Q_m) on the sampler state (x_in = c_in * x)."""
        px, pm, qx, qm = prediction_maps(lv.a, lv.s, prediction_type)
        return px * lv.c_in, pm, qx * lv.c_in, qm

    def init_noise_sigma(self, sched) -> float:
        return float(getattr(sched, "init_noise_sigma", 1.0))

    def timestep_scale(self, options: Mapping[str, Any]) -> float:
        """t_model = level * timestep_scale for the "random" rule's continuous levels (1: integer timesteps)."""
        return 1.0

    # --- the "random" teacher rule ------------------------------------------------------------------
    def draw_level(self, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
        """One level from [lo, hi] with the guidance generator: a uniform integer timestep (0-d tensor)."""
        return torch.randint(int(lo), int(hi) + 1, (1,), generator=generator, device=generator.device)[0]

    def level_rows(self, levels: torch.Tensor, schedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, s, t_teacher) float64 for drawn levels (any shape, on the schedule's device)."""
        abar = schedule.alphas_cumprod.double()[levels.long()]
        return abar.sqrt(), (1.0 - abar).sqrt(), levels.double()


class _VPFamily(Family):
    """State in VP variables: the step's level is alphas_cumprod at the integer timestep."""

    def next_index(self, t_int: np.ndarray, sched) -> np.ndarray:
        """next_level(k) as integer timesteps: the next listed timestep; the last step: t itself."""
        return np.append(t_int[1:], t_int[-1])

    def levels(self, sched, options) -> Levels:
        acp = sched.alphas_cumprod.double().numpy()
        ts = sched.timesteps.double().numpy()
        t_int = np.rint(ts).astype(np.int64)
        nxt = self.next_index(t_int, sched)
        abar, abar_n = acp[t_int], acp[nxt]
        return Levels(t=ts, t_model=ts, a=np.sqrt(abar), s=np.sqrt(1.0 - abar), c_in=np.ones(len(ts)),
                      a_next=np.sqrt(abar_n), s_next=np.sqrt(1.0 - abar_n), t_next=nxt.astype(np.float64),
                      bounds=tuple((float(lo), float(hi)) for lo, hi in zip(nxt, t_int)))


class LCM(_VPFamily):
    """LCM / LCM-LoRA: consistency boundary c_skip/c_out; re-noises x0 to the next timestep with fresh z."""

    name = "lcm"
    scheduler_class = "LCMScheduler"
    defaults = dict(SD_SCHEDULE, original_inference_steps=50, set_alpha_to_one=True, timestep_scaling=10.0,
                    clip_sample=False)
    default_lam = 0.01  # ALGORITHM.md: the LCM family
    explicit_timesteps = True

    def x0_maps(self, sched, lv, prediction_type):
        px, pm, qx, qm = super().x0_maps(sched, lv, prediction_type)
        sd = float(getattr(sched.config, "sigma_data", 0.5) or 0.5)
        c_skip, c_out = lcm_boundary_scalings(np.rint(lv.t), float(sched.config.timestep_scaling), sd)
        return c_out * px + c_skip, c_out * pm, qx, qm

    def next_step(self, sched, lv, options) -> Step:
        N = len(lv.t)
        last = np.arange(N) == N - 1
        return Step(A=np.where(last, 1.0, lv.a_next), B=np.zeros(N), C=np.where(last, 0.0, lv.s_next),
                    draws=tuple(k != N - 1 for k in range(N)))


class DMD2(LCM):
    """DMD2: LCMScheduler with explicit timesteps (4 steps [999, 749, 499, 249]; 1 step [399])."""

    name = "dmd2"
    default_lam = 0.01  # ALGORITHM.md
    TIMESTEPS = {4: [999, 749, 499, 249], 1: [399]}

    def default_timesteps(self, steps):
        if steps in self.TIMESTEPS:
            return list(self.TIMESTEPS[steps])
        return [int(t) for t in np.round(np.linspace(999, 999 - (steps - 1) * (1000 // steps), steps))]


class DDIM(_VPFamily):
    """DDIM, eta = 0: steps to p = t - T//N (NOT the next listed timestep); final alpha when p < 0."""

    name = "ddim"
    scheduler_class = "DDIMScheduler"
    defaults = dict(SD_SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False,
                    steps_offset=1)
    default_lam = 0.01  # not in the paper: the VP families' value

    def check_scheduler_settings(self, cfg):
        super().check_scheduler_settings(cfg)
        if cfg.get("eta", 0) not in (0, 0.0, None):
            raise ConfigError("distpp's DDIM family is deterministic (eta=0); use euler_a for ancestral sampling")

    def _prev(self, t_int, sched):
        return t_int - int(sched.config.num_train_timesteps) // len(t_int)

    def next_index(self, t_int, sched):
        prev = self._prev(t_int, sched)
        return np.where(prev >= 0, prev, t_int)

    def next_step(self, sched, lv, options) -> Step:
        t_int = np.rint(lv.t).astype(np.int64)
        prev = self._prev(t_int, sched)
        acp = sched.alphas_cumprod.double().numpy()
        abar_prev = np.where(prev >= 0, acp[np.clip(prev, 0, None)], float(sched.final_alpha_cumprod))
        N = len(t_int)
        return Step(A=np.sqrt(abar_prev), B=np.sqrt(1.0 - abar_prev), C=np.zeros(N), draws=(False,) * N)


def _sigma_levels(sched):
    """(timesteps, sigma_k, sigma at next_level(k)) of a sigma-based scheduler, float64 [N] each: next_level
    is the next listed sigma, the last step's its own."""
    ts = sched.timesteps.double().numpy()
    N = len(ts)
    sig = sched.sigmas.double().numpy()  # [N + 1], the last is 0
    return ts, sig[:N], np.append(sig[1:N], sig[N - 1])


class Euler(Family):
    """SDXL-Lightning: Euler (VE variables x = x0 + k e; the model sees x / sqrt(k^2 + 1)), trailing."""

    name = "euler"
    scheduler_class = "EulerDiscreteScheduler"
    defaults = dict(SD_SCHEDULE, timestep_spacing="trailing")
    default_lam = 0.1  # ALGORITHM.md: SDXL-Lightning
    explicit_timesteps = True

    def levels(self, sched, options) -> Levels:
        ts, sigma, sigma_n = _sigma_levels(sched)
        a, a_n = 1.0 / np.sqrt(sigma**2 + 1.0), 1.0 / np.sqrt(sigma_n**2 + 1.0)
        t_next = np.append(ts[1:], ts[-1])
        return Levels(t=ts, t_model=ts, a=a, s=sigma * a, c_in=a, a_next=a_n, s_next=sigma_n * a_n, t_next=t_next,
                      bounds=tuple((float(lo), float(hi)) for lo, hi in zip(np.rint(t_next), np.rint(ts))))

    def _sigmas(self, sched, N):
        sig = sched.sigmas.double().numpy()
        return sig[:N], sig[1:N + 1]

    def next_step(self, sched, lv, options) -> Step:
        N = len(lv.t)
        _, sigma_next = self._sigmas(sched, N)
        return Step(A=np.ones(N), B=sigma_next, C=np.zeros(N), draws=(False,) * N)


class EulerAncestral(Euler):
    """SDXL-Turbo: Euler ancestral; diffusers draws fresh noise at every step, the last included."""

    name = "euler_a"
    scheduler_class = "EulerAncestralDiscreteScheduler"
    default_lam = 0.05  # ALGORITHM.md: SDXL-Turbo
    explicit_timesteps = False

    def next_step(self, sched, lv, options) -> Step:
        N = len(lv.t)
        sigma, sigma_next = self._sigmas(sched, N)
        up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        down = np.sqrt(np.maximum(sigma_next**2 - up**2, 0.0))
        return Step(A=np.ones(N), B=down, C=up, draws=(True,) * N)


def _unit_interval(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
        raise ConfigError(f"family option {name} must be a number in [0, 1], got {v!r}")
    return float(v)


class TCD(_VPFamily):
    """TCD / Hyper-SD (TCDScheduler): steps x0 to u = floor((1 - gamma) t_prev), then re-noises it to t_prev
    with fresh noise (t_prev = 0 at the last step, which draws none; gamma = 0 draws none at all)."""

    name = "tcd"
    scheduler_class = "TCDScheduler"
    defaults = dict(SD_SCHEDULE, original_inference_steps=50, clip_sample=False)
    # Not in the paper; consistency-distilled like LCM, so LCM's 0.01 (unmeasured for TCD).
    default_lam = 0.01
    explicit_timesteps = True  # Hyper-SD's 1-step checkpoints run at a chosen timestep, e.g. [800]
    options = {"gamma": Option(0.3, "TCDScheduler.step's eta ('gamma') in [0, 1]; 0.3 as TCD's pipelines use",
                               _unit_interval)}

    def next_step(self, sched, lv, options) -> Step:
        gamma = options["gamma"]
        t_int = np.rint(lv.t).astype(np.int64)
        N = len(t_int)
        prev = np.append(t_int[1:], 0)
        # floor((1 - gamma) * t_prev) in float32, as TCDScheduler.step computes it on its long timesteps
        u = torch.floor((1 - gamma) * torch.from_numpy(prev)).long().numpy()
        acp = sched.alphas_cumprod.double().numpy()
        renoise = np.array([gamma > 0 and k != N - 1 for k in range(N)])
        ratio = np.where(renoise, acp[prev] / acp[u], 1.0)
        r = np.sqrt(ratio)
        return Step(A=r * np.sqrt(acp[u]), B=r * np.sqrt(1.0 - acp[u]), C=np.sqrt(1.0 - ratio),
                    draws=tuple(bool(v) for v in renoise))


def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"family option {name} must be True or False, got {v!r}")
    return v


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"family option {name} must be a finite number > 0, got {v!r}")
    return float(v)


def _finite(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"family option {name} must be a finite number, got {v!r}")
    return float(v)


def _seq_len(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"family option {name} must be an int >= 1 (latent tokens: (H/2) * (W/2) for FLUX's "
                          f"2x2 packing), got {v!r}")
    return v


def _sigma_spacing(name: str, v) -> str:
    if v not in ("scheduler", "linspace"):
        raise ConfigError(f"family option {name} must be 'scheduler' (the scheduler's own spacing, as "
                          f"StableDiffusion3Pipeline) or 'linspace' (linspace(1, 1/N, N), as FluxPipeline), got {v!r}")
    return v


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift mu: linear in the image sequence length, base_shift at base_seq_len
    and max_shift at max_seq_len (the line FluxPipeline evaluates, in the same order of operations)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


class Flow(Family):
    """Rectified-flow students (SD3.5, FLUX): FlowMatchEulerDiscreteScheduler, x = (1 - sig) x0 + sig e, the
    model predicts v = e - x0. a = 1 - sig, s = sig (continuous; sig = 1 is a real first level, a = 0)."""

    name = "flow"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    defaults = dict(num_train_timesteps=1000, shift=3.0)  # SD3.5's scheduler config
    # Not published for flow students: ALGORITHM.md says start from Lightning/Turbo's 0.05-0.1; Turbo's 0.05
    # (SD3.5-Large-Turbo is adversarially distilled like SDXL-Turbo). Unmeasured.
    default_lam = 0.05
    prediction_types = ("flow",)
    scheduler_has_prediction_type = False  # FlowMatchEulerDiscreteScheduler knows only velocities
    options = {
        "shift": Option(None, "the scheduler's sigma shift (None: the scheduler config's; default 3.0, SD3.5's)",
                        _positive),
        "use_dynamic_shifting": Option(None, "resolution-dependent shift (FLUX.1-dev); needs mu or image_seq_len",
                                       _flag),
        "mu": Option(None, "the dynamic shift's mu, as passed to set_timesteps", _finite),
        "image_seq_len": Option(None, "latent tokens; mu computed from it as FluxPipeline does", _seq_len),
        "sigmas": Option("scheduler", "'scheduler' (StableDiffusion3Pipeline) or 'linspace' (FluxPipeline)",
                         _sigma_spacing),
        "stochastic_sampling": Option(None, "re-noise x0 to sig_next with fresh noise at every step", _flag),
        "timestep_scale": Option(1000.0, "the model's timestep input is sig * timestep_scale: 1000 as "
                                 "StableDiffusion3Pipeline passes it, 1 as FluxPipeline", _positive),
    }
    _SCHEDULER_KEYS = ("shift", "use_dynamic_shifting", "stochastic_sampling")

    def scheduler_settings(self, scheduler_config, options):
        cfg = super().scheduler_settings(scheduler_config, options)
        cfg.update({k: options[k] for k in self._SCHEDULER_KEYS if options.get(k) is not None})
        return cfg

    def check_combination(self, options, settings):
        dynamic = bool(settings.get("use_dynamic_shifting", False))
        given = [k for k in ("mu", "image_seq_len") if options[k] is not None]
        if dynamic and len(given) != 1:
            raise ConfigError("use_dynamic_shifting=True needs exactly one of family_options mu=... or "
                              f"image_seq_len=... (FLUX at 1024x1024: image_seq_len=4096), got {given or 'neither'}")
        if not dynamic and given:
            raise ConfigError(f"family option {given[0]} only applies with use_dynamic_shifting=True; set it or "
                              f"drop {given[0]}")
        if settings.get("invert_sigmas"):
            raise ConfigError("invert_sigmas=True (Mochi's schedule) is not supported by the flow family; set it False")

    def set_timesteps(self, sched, steps, timesteps, options):
        if timesteps is not None:
            raise ConfigError("family 'flow' does not take explicit timesteps; pass steps (and family_options "
                              "sigmas='scheduler' or 'linspace') instead")
        kw = {}
        if options["mu"] is not None:
            kw["mu"] = options["mu"]
        elif options["image_seq_len"] is not None:
            c = sched.config
            kw["mu"] = calculate_shift(options["image_seq_len"], c.get("base_image_seq_len", 256),
                                       c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                       c.get("max_shift", 1.15))
        if options["sigmas"] == "linspace":
            self._call(lambda: sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kw))
        else:
            self._call(lambda: sched.set_timesteps(steps, **kw))

    def levels(self, sched, options) -> Levels:
        ts, sigma, sigma_n = _sigma_levels(sched)
        N = len(ts)
        # The model's timestep in float32, as the pipelines compute it: SD3 passes t, FLUX t / 1000.
        per_unit = float(sched.config.num_train_timesteps) / options["timestep_scale"]
        t_model = (sched.timesteps.float() / per_unit).double().numpy()
        return Levels(t=ts, t_model=t_model, a=1.0 - sigma, s=sigma, c_in=np.ones(N), a_next=1.0 - sigma_n,
                      s_next=sigma_n, t_next=np.append(t_model[1:], t_model[-1]),
                      bounds=tuple((float(lo), float(hi)) for lo, hi in zip(sigma_n, sigma)))

    def next_step(self, sched, lv, options) -> Step:
        N = len(lv.t)
        sig_next = sched.sigmas.double().numpy()[1:N + 1]
        if sched.config.stochastic_sampling:  # x_next = (1 - sig_next) x0 + sig_next z, z drawn every step
            return Step(A=1.0 - sig_next, B=np.zeros(N), C=sig_next, draws=(True,) * N)
        return Step(A=1.0 - sig_next, B=sig_next, C=np.zeros(N), draws=(False,) * N)

    def init_noise_sigma(self, sched) -> float:
        return 1.0  # the SD3 / FLUX pipelines use unit-variance latents

    def timestep_scale(self, options) -> float:
        return options["timestep_scale"]

    def draw_level(self, lo, hi, generator):
        """A real sigma uniformly in [lo, hi] = [sig_next, sig_k] (float64) from the guidance generator."""
        u = torch.rand((1,), generator=generator, device=generator.device, dtype=torch.float64)[0]
        return lo + (hi - lo) * u

    def level_rows(self, levels, schedule):
        sig = levels.double()
        return 1.0 - sig, sig, sig * schedule.timestep_scale


_REGISTRY: dict[str, Family] = {f.name: f for f in (LCM(), DMD2(), Euler(), EulerAncestral(), DDIM(), TCD(), Flow())}
FAMILIES = tuple(_REGISTRY)
# ALGORITHM.md defaults per family (see each family's default_lam).
DEFAULT_LAM = {name: fam.default_lam for name, fam in _REGISTRY.items()}


def get_family(name: str) -> Family:
    """The family object of ``name`` (ConfigError naming the known families otherwise)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown family {name!r}; pass one of {', '.join(FAMILIES)}")
    return _REGISTRY[name]

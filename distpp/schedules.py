"""Device-resident schedule tables for each student family.

A :class:`Schedule` is built once from a diffusers scheduler (``from_config`` or the family default),
with the math done in float64 on the host and stored as float32 tensors on the sampler's device. The
sampling loop only indexes these tables by step; it never does schedule math in Python.

Uniform step form (every family). The sampler state ``x`` is float32; the model sees
``x_in = c_in[k] * x`` (the VP variable ``a_t x0 + s_t e``), and its prediction ``m`` gives::

    x0     = P_x[k] * x + P_m[k] * m          # family x0, incl. LCM c_skip/c_out
    e      = Q_x[k] * x + Q_m[k] * m          # the student's noise estimate
    x_next = A[k] * x0 + B[k] * e + C[k] * z  # z: the step's fresh noise (C = 0 where none is drawn)

See docs/ARCHITECTURE.md for the column layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import ConfigError

FAMILIES = ("lcm", "dmd2", "euler", "euler_a", "ddim")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Column indices of Schedule.coef ([N, NUM_COLS] float32).
COL_PX, COL_PM, COL_QX, COL_QM, COL_A, COL_B, COL_C, COL_CIN_NEXT = range(8)
NUM_COLS = 8
# Column indices of a guidance table ([G, B, NUM_GCOLS] float32): teacher re-noise and teacher x0 map.
GCOL_A, GCOL_S, GCOL_TPX, GCOL_TPM = range(4)
NUM_GCOLS = 4

# SD / SDXL training schedule (ALGORITHM.md): scaled-linear betas 0.00085 -> 0.012 over 1000 steps.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Family defaults: the diffusers scheduler class and the config the released checkpoints use.
_FAMILY_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lcm": ("LCMScheduler", dict(SD_SCHEDULE, original_inference_steps=50, set_alpha_to_one=True,
                                 timestep_scaling=10.0, clip_sample=False)),
    "dmd2": ("LCMScheduler", dict(SD_SCHEDULE, original_inference_steps=50, set_alpha_to_one=True,
                                  timestep_scaling=10.0, clip_sample=False)),
    "euler": ("EulerDiscreteScheduler", dict(SD_SCHEDULE, timestep_spacing="trailing")),
    "euler_a": ("EulerAncestralDiscreteScheduler", dict(SD_SCHEDULE, timestep_spacing="trailing")),
    "ddim": ("DDIMScheduler", dict(SD_SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=False,
                                   clip_sample=False, steps_offset=1)),
}
# DMD2's released 4-step schedule; its 1-step model uses [399].
DMD2_TIMESTEPS = {4: [999, 749, 499, 249], 1: [399]}


def family_scheduler_class(family: str):
    """The diffusers scheduler class a family steps with."""
    import diffusers

    check_family(family)
    return getattr(diffusers, _FAMILY_DEFAULTS[family][0])


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; pass one of {', '.join(FAMILIES)}")


def check_prediction_type(prediction_type: str, who: str = "prediction_type") -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown {who} {prediction_type!r}; pass one of {', '.join(PREDICTION_TYPES)}")


def make_scheduler(family: str, config: Mapping[str, Any] | None = None, prediction_type: str | None = None):
    """A fresh diffusers scheduler of ``family``: the family default, updated with ``config``."""
    check_family(family)
    cls = family_scheduler_class(family)
    cfg = dict(_FAMILY_DEFAULTS[family][1])
    if config:
        cfg.update({k: v for k, v in dict(config).items() if not k.startswith("_")})
    if prediction_type is not None:
        check_prediction_type(prediction_type)
        cfg["prediction_type"] = prediction_type
    for flag in ("clip_sample", "thresholding"):
        if cfg.get(flag):
            raise ConfigError(f"scheduler config sets {flag}=True, which distpp does not support; set it False")
    if family == "ddim" and cfg.get("eta", 0) not in (0, 0.0, None):
        raise ConfigError("distpp's DDIM family is deterministic (eta=0); use euler_a for ancestral sampling")
    return cls.from_config(cfg)


def default_timesteps(family: str, steps: int) -> list[int] | None:
    """Explicit timesteps a family uses by default (DMD2), or None to let the scheduler space them."""
    if family == "dmd2":
        if steps in DMD2_TIMESTEPS:
            return list(DMD2_TIMESTEPS[steps])
        return [int(t) for t in np.round(np.linspace(999, 999 - (steps - 1) * (1000 // steps), steps))]
    return None


def _pred_to_x0_vp(abar: np.ndarray, prediction_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(p_x, p_m) with x0 = p_x * z + p_m * m for a VP model input z at level abar."""
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return 1.0 / a, -s / a
    if prediction_type == "v_prediction":
        return a, -s
    return np.zeros_like(a), np.ones_like(a)


def _pred_to_eps_vp(abar: np.ndarray, prediction_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(q_x, q_m) with e = q_x * z + q_m * m for a VP model input z at level abar."""
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return np.zeros_like(a), np.ones_like(a)
    if prediction_type == "v_prediction":
        return s, a
    return 1.0 / s, -a / s


def teacher_coefficients(abar_s: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Guidance-table rows (a_s, s_s, tp_x, tp_m) for teacher levels ``abar_s`` (any shape, float64).

    The teacher input is x_s = a_s * x0 + s_s * n and its clean estimate x0_T = tp_x * x_s + tp_m * m_T.
    """
    check_prediction_type(prediction_type, "teacher prediction_type")
    a, s = abar_s.sqrt(), (1.0 - abar_s).sqrt()
    if prediction_type == "epsilon":
        tpx, tpm = 1.0 / a, -s / a
    elif prediction_type == "v_prediction":
        tpx, tpm = a, -s
    else:
        tpx, tpm = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, s, tpx, tpm], dim=-1)


@dataclass(frozen=True)
class Schedule:
    """Everything a sampling step needs, precomputed once.

    Device tensors (float32 unless noted), indexed by step k in [0, N):
      coef:          [N, 8]  columns COL_PX .. COL_CIN_NEXT (see module docstring).
      c_in:          [N]     model input scaling at step k (1 for VP families, 1/sqrt(k_t^2+1) for Euler).
      t_model:       [N]     timestep value the student is called with.
      abar:          [N]     abar of the student's level at step k.
      abar_next:     [N]     abar of next_level(k) (the teacher's level under the "next" rule).
      t_next:        [N]     timestep value of next_level(k).
      alphas_cumprod:[T]     the training schedule (T = num_train_timesteps).
    Host metadata (static per schedule): family, prediction_type, steps, draws_noise (which steps consume
    a fresh-noise draw, in diffusers' order), level_bounds ((next_level, t) integer pairs per step: the
    "random" teacher rule draws its level uniformly from this closed range), init_noise_sigma.
    """

    family: str
    prediction_type: str
    steps: int
    timesteps: tuple[float, ...]
    draws_noise: tuple[bool, ...]
    level_bounds: tuple[tuple[int, int], ...]
    init_noise_sigma: float
    coef: torch.Tensor
    c_in: torch.Tensor
    t_model: torch.Tensor
    abar: torch.Tensor
    abar_next: torch.Tensor
    t_next: torch.Tensor
    alphas_cumprod: torch.Tensor
    scheduler_config: dict = field(repr=False, default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.coef.device


def _set_timesteps(sched, family: str, steps: int | None = None, timesteps: list[int] | None = None) -> None:
    """diffusers' own refusals (e.g. LCM steps > original_inference_steps) become ConfigError."""
    try:
        if timesteps is not None:
            sched.set_timesteps(timesteps=timesteps)
        else:
            sched.set_timesteps(steps)
    except ValueError as e:  # diffusers' own checks
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"the {family} scheduler refused this config: {e}") from e


def build_schedule(
    family: str,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    prediction_type: str = "epsilon",
    scheduler_config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> Schedule:
    """Build the schedule tables of ``family`` for ``steps`` steps (or explicit ``timesteps``).

    ``scheduler_config`` is a diffusers scheduler config (e.g. ``pipe.scheduler.config``) that overrides
    the family defaults; ``prediction_type`` is the student's (epsilon, v_prediction or sample).
    """
    check_family(family)
    check_prediction_type(prediction_type)
    if timesteps is not None:
        timesteps = [int(t) for t in timesteps]
        if not timesteps:
            raise ConfigError("timesteps must be a non-empty list, e.g. [999, 749, 499, 249]")
        if steps is not None and steps != len(timesteps):
            raise ConfigError(f"steps={steps} disagrees with {len(timesteps)} explicit timesteps; pass one of them")
        steps = len(timesteps)
    if steps is None:
        steps = 4
    if int(steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    steps = int(steps)
    if timesteps is None:
        timesteps = default_timesteps(family, steps)

    sched = make_scheduler(family, scheduler_config, prediction_type)
    T = int(sched.config.num_train_timesteps)
    if timesteps is not None:
        if any(not (0 <= t < T) for t in timesteps) or any(b >= a for a, b in zip(timesteps, timesteps[1:])):
            raise ConfigError(f"timesteps must be strictly decreasing integers in [0, {T}), got {timesteps}")
        if family in ("lcm", "dmd2", "euler"):
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # DMD2's timesteps are off LCM's grid on purpose: silence that warning
            try:
                _set_timesteps(sched, family, timesteps=timesteps)
            finally:
                dlogging.set_verbosity(level)
        else:
            raise ConfigError(f"family {family!r} does not take explicit timesteps; pass steps instead")
    else:
        if steps > T:
            raise ConfigError(f"steps={steps} exceeds the {T} training timesteps")
        _set_timesteps(sched, family, steps)

    acp = sched.alphas_cumprod.double().numpy()
    ts = sched.timesteps.double().numpy()
    N = len(ts)
    if N != steps:
        raise ConfigError(f"the {family} scheduler produced {N} timesteps for steps={steps}")
    coef = np.zeros((N, NUM_COLS))
    draws = [False] * N
    t_int = np.rint(ts).astype(np.int64)

    if family in ("lcm", "dmd2", "ddim"):
        abar = acp[t_int]
        c_in = np.ones(N)
        px, pm = _pred_to_x0_vp(abar, prediction_type)
        qx, qm = _pred_to_eps_vp(abar, prediction_type)
        if family == "ddim":
            step_ratio = T // N
            prev = t_int - step_ratio
            final = float(sched.final_alpha_cumprod)
            abar_prev = np.where(prev >= 0, acp[np.clip(prev, 0, None)], final)
            coef[:, COL_A], coef[:, COL_B] = np.sqrt(abar_prev), np.sqrt(1.0 - abar_prev)
            nxt_int = np.where(prev >= 0, prev, t_int)
        else:
            scale = float(sched.config.timestep_scaling)
            sd = float(getattr(sched.config, "sigma_data", 0.5) or 0.5)
            tt = t_int * scale
            c_skip = sd**2 / (tt**2 + sd**2)
            c_out = tt / np.sqrt(tt**2 + sd**2)
            px, pm = c_out * px + c_skip, c_out * pm
            nxt_int = np.append(t_int[1:], t_int[-1])
            abar_prev = acp[nxt_int]
            last = np.arange(N) == N - 1
            coef[:, COL_A] = np.where(last, 1.0, np.sqrt(abar_prev))
            coef[:, COL_C] = np.where(last, 0.0, np.sqrt(1.0 - abar_prev))
            draws = [k != N - 1 for k in range(N)]
        abar_next = acp[nxt_int]
        t_next = nxt_int.astype(np.float64)
        init_sigma = 1.0
    else:  # euler, euler_a: VE state x = x0 + k_t e
        sig = sched.sigmas.double().numpy()  # [N + 1], last is 0
        sigma, sigma_next = sig[:N], sig[1:N + 1]
        c_in = 1.0 / np.sqrt(sigma**2 + 1.0)
        abar = 1.0 / (1.0 + sigma**2)
        if prediction_type == "epsilon":
            px, pm = np.ones(N), -sigma
        elif prediction_type == "v_prediction":
            px, pm = 1.0 / (sigma**2 + 1.0), -sigma / np.sqrt(sigma**2 + 1.0)
        else:
            px, pm = np.zeros(N), np.ones(N)
        qx, qm = (1.0 - px) / sigma, -pm / sigma
        coef[:, COL_A] = 1.0
        if family == "euler":
            coef[:, COL_B] = sigma_next
        else:
            up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            coef[:, COL_B] = np.sqrt(np.maximum(sigma_next**2 - up**2, 0.0))
            coef[:, COL_C] = up
            draws = [True] * N  # diffusers' Euler-ancestral step draws at every step, the last included
        last = np.arange(N) == N - 1
        abar_next = np.where(last, abar, 1.0 / (1.0 + np.append(sigma_next[:-1], 0.0) ** 2))
        t_next = np.append(ts[1:], ts[-1])
        nxt_int = np.rint(t_next).astype(np.int64)
        init_sigma = float(sched.init_noise_sigma)

    coef[:, COL_PX], coef[:, COL_PM], coef[:, COL_QX], coef[:, COL_QM] = px, pm, qx, qm
    coef[:, COL_CIN_NEXT] = np.append(c_in[1:], 0.0)

    f32 = dict(dtype=torch.float32, device=device)
    return Schedule(
        family=family,
        prediction_type=prediction_type,
        steps=N,
        timesteps=tuple(float(t) for t in ts),
        draws_noise=tuple(draws),
        level_bounds=tuple((int(a), int(b)) for a, b in zip(nxt_int, t_int)),
        init_noise_sigma=float(init_sigma),
        coef=torch.tensor(coef, **f32),
        c_in=torch.tensor(c_in, **f32),
        t_model=torch.tensor(ts, **f32),
        abar=torch.tensor(abar, **f32),
        abar_next=torch.tensor(abar_next, **f32),
        t_next=torch.tensor(t_next, **f32),
        alphas_cumprod=torch.tensor(acp, **f32),
        scheduler_config=dict(sched.config),
    )


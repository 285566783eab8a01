"""SamplerConfig: the settings of a guided sampler, validated when built."""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import ConfigError
from .ops import KERNEL_IMPLS
from .families import DEFAULT_LAM, get_family  # noqa: F401 (DEFAULT_LAM re-exported: each family's lam default)

TEACHER_RULES = ("next", "same", "random")
# How the teacher applies the guidance scale w (cfg): "cfg" = classifier-free guidance over one batch-2B
# forward on [uncond; cond]; "embedded" = a guidance-distilled teacher taking w as an input (Cond.guidance).
TEACHER_GUIDANCE = ("cfg", "embedded")


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of a guided sampler (defaults from ALGORITHM.md).

    family:          student family: lcm, dmd2, euler (SDXL-Lightning), euler_a (SDXL-Turbo), ddim, tcd
                     (TCD / Hyper-SD; option gamma, default 0.3), flow (SD3.5 / FLUX rectified flow,
                     prediction type flow) (see distpp.families).
    steps:           student steps N (default 4; or len(timesteps)).
    timesteps:       explicit student timesteps (lcm, dmd2, euler), e.g. (399,) for DMD2 1-step.
    guided_steps:    G, teacher-guided steps at the start, 0..N (default 1; 0 = plain student).
    lam:             proximal weight in [0, 1]; None = the family default (DEFAULT_LAM). Python, numpy or
                     0-d tensor numbers are taken and stored as a float (likewise cfg).
    cfg:             teacher CFG scale w, 0 <= w <= FLOAT32_MAX (default 7.5; the guidance is float32). With
                     teacher_guidance="embedded" it is the teacher's guidance input instead.
    teacher_guidance: how the teacher guides, fixed per sampler (a captured graph has one form):
                     "cfg" (default): classifier-free guidance, one batch-2B teacher forward on
                     [uncond; cond] combined as m_u + w (m_c - m_u); needs uncond.
                     "embedded": a guidance-distilled teacher (FLUX.1-dev) that takes w as an input: one
                     batch-B forward with Cond.guidance = the call's per-sample cfg (device-resident, so a
                     graph replays with a new w); no uncond (passing one is an error). The default w of
                     such a teacher (3.5 for FLUX.1-dev) is set by its pipeline, not here.
    teacher_rule:    teacher timestep: "next" (the level the student's update moves to; default),
                     "same" (the student's t) or "random" (uniform in [next, t]: an integer timestep; a
                     real sigma in [sig_next, sig_k] for flow).
    prediction_type: the student's: epsilon, v_prediction or sample (flow family: flow); None = the
                     family's default (epsilon; flow for the flow family).
    teacher_prediction_type: the teacher's (None likewise).
    scheduler_config: a diffusers scheduler config overriding the family defaults.
    family_options:  the family's own options, checked here (docs/ARCHITECTURE.md "Families"). tcd: gamma.
                     flow: shift (SD3.5: 3), use_dynamic_shifting with mu or image_seq_len (FLUX.1-dev),
                     sigmas ("scheduler" as StableDiffusion3Pipeline, "linspace" as FluxPipeline),
                     stochastic_sampling, timestep_scale (the model's timestep is sigma * timestep_scale:
                     1000 for SD3 (default), 1 for FLUX).
    kernel_impl:     fused ops: auto (triton on CUDA, torch on CPU), torch, triton or cuda.
    check_finite:    check for NaN/inf: the inputs as the loop uses them (noise after its cast to float32
                     and scaling by init_noise_sigma, conditioning after its cast to the model dtype)
                     before the loop, and the result after it (cfg near FLOAT32_MAX or a diverging model
                     overflow inside the math): InputError saying what to lower. Costs two host syncs
                     per call (one before the loop, one after), so it is off by default.
    """

    family: str = "lcm"
    steps: int | None = None
    timesteps: tuple[int, ...] | None = None
    guided_steps: int = 1
    lam: float | None = None
    cfg: float = 7.5
    teacher_rule: str = "next"
    teacher_guidance: str = "cfg"
    prediction_type: str | None = None
    teacher_prediction_type: str | None = None
    scheduler_config: Mapping[str, Any] | None = field(default=None, hash=False)
    family_options: Mapping[str, Any] | None = field(default=None, hash=False)
    kernel_impl: str = "auto"
    check_finite: bool = False

    def __post_init__(self):
        fam = get_family(self.family)
        for name in ("prediction_type", "teacher_prediction_type"):  # None -> the family's default
            object.__setattr__(self, name, fam.check_prediction_type(getattr(self, name), name))
        if self.family_options is not None and not isinstance(self.family_options, Mapping):
            raise ConfigError(f"family_options must be a mapping of option name to value, got {self.family_options!r}")
        if self.scheduler_config is not None and not isinstance(self.scheduler_config, Mapping):
            raise ConfigError(f"scheduler_config must be a mapping (e.g. pipe.scheduler.config), "
                              f"got {type(self.scheduler_config).__name__}")
        fam.resolve_options(self.family_options, self.scheduler_config)  # checked before any weights load
        try:  # operator.index: 2.5 steps or "999" is an error, not silently truncated or parsed
            if self.timesteps is not None:
                object.__setattr__(self, "timesteps", tuple(operator.index(t) for t in self.timesteps))
            if self.steps is not None:
                object.__setattr__(self, "steps", operator.index(self.steps))
            object.__setattr__(self, "guided_steps", operator.index(self.guided_steps))  # False -> 0: torch sizes
        except TypeError as e:
            raise ConfigError(f"steps and guided_steps must be ints and timesteps a sequence of ints (e.g. "
                              f"(999, 749, 499, 249)), got steps={self.steps!r}, guided_steps={self.guided_steps!r}, "
                              f"timesteps={self.timesteps!r}") from e
        n = self.num_steps
        if n < 1:
            raise ConfigError(f"steps must be >= 1, got {n}")
        if not isinstance(self.guided_steps, int) or not (0 <= self.guided_steps <= n):
            raise ConfigError(f"guided_steps must be an integer in [0, {n}] (the number of steps), "
                              f"got {self.guided_steps!r}")
        if self.lam is not None:  # stored as a float: numpy / 0-d tensor values are taken, the config stays hashable
            object.__setattr__(self, "lam", check_lam(self.lam))
        check_lam(self.resolved_lam)
        object.__setattr__(self, "cfg", check_cfg(self.cfg))
        if self.teacher_rule not in TEACHER_RULES:
            raise ConfigError(f"unknown teacher_rule {self.teacher_rule!r}; pass one of {', '.join(TEACHER_RULES)}")
        if self.teacher_guidance not in TEACHER_GUIDANCE:
            raise ConfigError(f"unknown teacher_guidance {self.teacher_guidance!r}; pass 'cfg' (classifier-free "
                              "guidance over [uncond; cond]) or 'embedded' (a guidance-distilled teacher taking w "
                              "as an input, e.g. FLUX.1-dev)")
        if self.kernel_impl not in KERNEL_IMPLS:
            raise ConfigError(f"unknown kernel_impl {self.kernel_impl!r}; pass one of {', '.join(KERNEL_IMPLS)}")

    @property
    def num_steps(self) -> int:
        if self.timesteps is not None:
            if self.steps is not None and self.steps != len(self.timesteps):
                raise ConfigError(f"steps={self.steps} disagrees with {len(self.timesteps)} timesteps; pass one")
            return len(self.timesteps)
        return 4 if self.steps is None else int(self.steps)

    @property
    def resolved_lam(self) -> float:
        return DEFAULT_LAM[self.family] if self.lam is None else float(self.lam)


# The sampler's lam/cfg buffers and guidance math are float32: a larger value would become inf there.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.4028234663852886e38


def is_real_scalar(a: Any) -> bool:
    """A real number: Python, numpy or a 0-d tensor/array (bools are not numbers here)."""
    if isinstance(a, bool):
        return False
    return isinstance(a, numbers.Real) or (isinstance(a, torch.Tensor) and a.dim() == 0
                                           and not a.dtype.is_complex and a.dtype != torch.bool) \
        or (type(a).__module__ == "numpy" and getattr(a, "ndim", None) == 0 and getattr(a, "dtype", None) is not None
            and a.dtype.kind in "iuf")


def _real(a: Any) -> float | int | None:
    """``a`` as a Python int (kept exact: 10**400 compares without overflow) or float, None if not a number."""
    if not is_real_scalar(a):
        return None
    if isinstance(a, int):
        return a
    try:
        return float(a)
    except (OverflowError, TypeError, ValueError, RuntimeError):  # RuntimeError: a meta tensor
        return None


def _shown(a: Any) -> str:
    """``repr(a)``, shortened: a 400-digit int would otherwise fill the message."""
    r = repr(a)
    return r if len(r) <= 40 else f"{r[:20]}...{r[-8:]} ({len(r)} characters)"


def check_lam(lam: Any) -> float:
    """``lam`` as a float; ConfigError unless it is a real number (Python, numpy or 0-d tensor) in [0, 1].
    The one place this rule lives (SamplerConfig, Sampler.sample's per-call values and the service use it)."""
    v = _real(lam)
    if v is None or not (0 <= v <= 1):  # NaN fails both comparisons
        raise ConfigError(f"lam must be a number in [0, 1] (0 = no guidance; paper defaults 0.01-0.1), "
                          f"got {_shown(lam)}")
    return float(v)


def check_cfg(cfg: Any) -> float:
    """``cfg`` as a float; ConfigError unless it is a real number in [0, FLOAT32_MAX] (the guidance runs in
    float32: a larger value, finite as a float64, would be inf there). Values near the bound can still
    overflow inside the guidance math; SamplerConfig(check_finite=True) checks the result for that."""
    v = _real(cfg)
    if v is None or not (0 <= v <= FLOAT32_MAX):
        raise ConfigError(f"cfg (the teacher's CFG scale) must be a number >= 0 and at most {FLOAT32_MAX:.4g} "
                          f"(float32's largest; default 7.5, typical 1-15), got {_shown(cfg)}")
    return float(v)

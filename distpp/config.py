"""SamplerConfig: the settings of a guided sampler, validated when built."""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import ConfigError
from .ops import KERNEL_IMPLS
from .schedules import FAMILIES, PREDICTION_TYPES

TEACHER_RULES = ("next", "same", "random")
# ALGORITHM.md defaults: 0.01 for the LCM family and DMD2, 0.1 for SDXL-Lightning (euler), 0.05 for
# SDXL-Turbo (euler_a); DDIM students are not in the paper: the VP families' 0.01.
DEFAULT_LAM = {"lcm": 0.01, "dmd2": 0.01, "euler": 0.1, "euler_a": 0.05, "ddim": 0.01}


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of a guided sampler (defaults from ALGORITHM.md).

    family:          student family: lcm, dmd2, euler (SDXL-Lightning), euler_a (SDXL-Turbo), ddim.
    steps:           student steps N (default 4; or len(timesteps)).
    timesteps:       explicit student timesteps (lcm, dmd2, euler), e.g. (399,) for DMD2 1-step.
    guided_steps:    G, teacher-guided steps at the start, 0..N (default 1; 0 = plain student).
    lam:             proximal weight in [0, 1]; None = the family default (DEFAULT_LAM). Python, numpy or
                     0-d tensor numbers are taken and stored as a float (likewise cfg).
    cfg:             teacher CFG scale w, 0 <= w <= FLOAT32_MAX (default 7.5; the guidance is float32).
    teacher_rule:    teacher timestep: "next" (the level the student's update moves to; default),
                     "same" (the student's t) or "random" (uniform integer in [next, t]).
    prediction_type: the student's: epsilon, v_prediction or sample.
    teacher_prediction_type: the teacher's.
    scheduler_config: a diffusers scheduler config overriding the family defaults.
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
    prediction_type: str = "epsilon"
    teacher_prediction_type: str = "epsilon"
    scheduler_config: Mapping[str, Any] | None = field(default=None, hash=False)
    kernel_impl: str = "auto"
    check_finite: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; pass one of {', '.join(FAMILIES)}")
        for name in ("prediction_type", "teacher_prediction_type"):
            if getattr(self, name) not in PREDICTION_TYPES:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; pass one of {', '.join(PREDICTION_TYPES)}")
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

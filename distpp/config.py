"""SamplerConfig: the settings of a guided sampler, validated when built."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .ops import KERNEL_IMPLS
from .families import DEFAULT_LAM, get_family  # noqa: F401 (DEFAULT_LAM re-exported: each family's lam default)

TEACHER_RULES = ("next", "same", "random")


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of a guided sampler (defaults from ALGORITHM.md).

    family:          student family: lcm, dmd2, euler (SDXL-Lightning), euler_a (SDXL-Turbo), ddim, tcd
                     (TCD / Hyper-SD; option gamma, default 0.3), flow (SD3.5 / FLUX rectified flow,
                     prediction type flow) (see distpp.families).
    steps:           student steps N (default 4; or len(timesteps)).
    timesteps:       explicit student timesteps (lcm, dmd2, euler), e.g. (399,) for DMD2 1-step.
    guided_steps:    G, teacher-guided steps at the start, 0..N (default 1; 0 = plain student).
    lam:             proximal weight in [0, 1]; None = the family default (DEFAULT_LAM).
    cfg:             teacher CFG scale w >= 0 (default 7.5).
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
    check_finite:    check inputs for NaN/inf before sampling (one host sync per call; default off).
    """

    family: str = "lcm"
    steps: int | None = None
    timesteps: tuple[int, ...] | None = None
    guided_steps: int = 1
    lam: float | None = None
    cfg: float = 7.5
    teacher_rule: str = "next"
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
        if self.lam is not None:
            check_lam(self.lam)  # before resolved_lam's float(), which would raise a raw error on junk
        check_lam(self.resolved_lam)
        check_cfg(self.cfg)
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


def check_lam(lam: float) -> float:
    if not isinstance(lam, (int, float)) or not (0.0 <= float(lam) <= 1.0):
        raise ConfigError(f"lam must be in [0, 1] (0 = no guidance; paper defaults 0.01-0.1), got {lam!r}")
    return float(lam)


def check_cfg(cfg: float) -> float:
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ConfigError(f"cfg (the teacher's CFG scale) must be a finite number >= 0 (default 7.5), got {cfg!r}")
    return float(cfg)

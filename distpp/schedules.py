"""Device-resident schedule tables for each student family.

A :class:`Schedule` is built once from a diffusers scheduler (``from_config`` or the family default),
with the math done in float64 on the host and stored as float32 tensors on the sampler's device. The
sampling loop only indexes these tables by step; it never does schedule math in Python. What differs
between families lives in :mod:`distpp.families`; ``build_schedule`` only composes it.

Uniform step form (every family). The sampler state ``x`` is float32; the model sees
``x_in = c_in[k] * x`` (``a x0 + s e`` at the step's level (a, s)), and its prediction ``m`` gives::

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
from .families import FAMILIES, PREDICTION_TYPES, SD_SCHEDULE, get_family, teacher_rows  # noqa: F401 (re-exported)

# Column indices of Schedule.coef ([N, NUM_COLS] float32).
COL_PX, COL_PM, COL_QX, COL_QM, COL_A, COL_B, COL_C, COL_CIN_NEXT = range(8)
NUM_COLS = 8
# Column indices of a guidance table ([G, B, NUM_GCOLS] float32): teacher re-noise and teacher x0 map.
GCOL_A, GCOL_S, GCOL_TPX, GCOL_TPM = range(4)
NUM_GCOLS = 4


def family_scheduler_class(family: str):
    """The diffusers scheduler class a family steps with."""
    import diffusers

    return getattr(diffusers, get_family(family).scheduler_class)


def check_family(family: str) -> None:
    get_family(family)


def check_prediction_type(prediction_type: str, who: str = "prediction_type") -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown {who} {prediction_type!r}; pass one of {', '.join(PREDICTION_TYPES)}")


def make_scheduler(family: str, config: Mapping[str, Any] | None = None, prediction_type: str | None = None,
                   family_options: Mapping[str, Any] | None = None):
    """A fresh diffusers scheduler of ``family``: the family default, updated with ``config``."""
    return get_family(family).make_scheduler(config, prediction_type, family_options)


def teacher_coefficients(abar_s: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Guidance-table rows (a_s, s_s, tp_x, tp_m) for VP teacher levels ``abar_s`` (any shape, float64);
    see :func:`distpp.families.teacher_rows` for levels given as (a, s)."""
    check_prediction_type(prediction_type, "teacher prediction_type")
    return teacher_rows(abar_s.sqrt(), (1.0 - abar_s).sqrt(), prediction_type)


@dataclass(frozen=True)
class Schedule:
    """Everything a sampling step needs, precomputed once.

    Device tensors (float32 unless noted), indexed by step k in [0, N):
      coef:          [N, 8]  columns COL_PX .. COL_CIN_NEXT (see module docstring).
      c_in:          [N]     model input scaling at step k (1 for VP and flow, 1/sqrt(k_t^2+1) for Euler).
      t_model:       [N]     timestep value the student is called with.
      a, s:          [N]     level of the student's model input at step k (x_in = a x0 + s e).
      a_next, s_next:[N]     level of next_level(k) (the teacher's level under the "next" rule).
      t_next:        [N]     timestep value of next_level(k).
      abar, abar_next:[N]    a^2 / (a^2 + s^2) at those levels (abar itself for VP and Euler families).
      alphas_cumprod:[T]     the training schedule (T = num_train_timesteps); empty for flow.
    Host metadata (static per schedule): family, prediction_type, steps, draws_noise (which steps consume
    a fresh-noise draw, in diffusers' order), level_bounds ((lo, hi) per step: the "random" teacher rule
    draws its level from this closed range, integer timesteps or flow sigmas), init_noise_sigma,
    timestep_scale (flow: t_model = sigma * timestep_scale), family_options (resolved).
    """

    family: str
    prediction_type: str
    steps: int
    timesteps: tuple[float, ...]
    draws_noise: tuple[bool, ...]
    level_bounds: tuple[tuple[float, float], ...]
    init_noise_sigma: float
    coef: torch.Tensor
    c_in: torch.Tensor
    t_model: torch.Tensor
    a: torch.Tensor
    s: torch.Tensor
    a_next: torch.Tensor
    s_next: torch.Tensor
    abar: torch.Tensor
    abar_next: torch.Tensor
    t_next: torch.Tensor
    alphas_cumprod: torch.Tensor
    scheduler_config: dict = field(repr=False, default_factory=dict)
    timestep_scale: float = 1.0
    family_options: dict = field(repr=False, default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.coef.device


def build_schedule(
    family: str,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    prediction_type: str | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    family_options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> Schedule:
    """Build the schedule tables of ``family`` for ``steps`` steps (or explicit ``timesteps``).

    ``scheduler_config`` is a diffusers scheduler config (e.g. ``pipe.scheduler.config``) that overrides
    the family defaults; ``prediction_type`` is the student's (None: the family's default, epsilon or
    flow); ``family_options`` are the family's options (see distpp.families, e.g. flow's shift).
    """
    fam = get_family(family)
    prediction_type = fam.check_prediction_type(prediction_type)
    options = fam.resolve_options(family_options, scheduler_config)
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

    sched = fam.make_scheduler(scheduler_config, prediction_type, options)
    fam.set_timesteps(sched, steps, timesteps, options)
    lv = fam.levels(sched, options)
    N = len(lv.t)
    if N != steps:
        raise ConfigError(f"the {family} scheduler produced {N} timesteps for steps={steps}")
    step = fam.next_step(sched, lv, options)
    coef = np.zeros((N, NUM_COLS))
    coef[:, COL_PX], coef[:, COL_PM], coef[:, COL_QX], coef[:, COL_QM] = fam.x0_maps(sched, lv, prediction_type)
    coef[:, COL_A], coef[:, COL_B], coef[:, COL_C] = step.A, step.B, step.C
    coef[:, COL_CIN_NEXT] = np.append(lv.c_in[1:], 0.0)
    acp = getattr(sched, "alphas_cumprod", None)
    acp = np.zeros(0) if acp is None else acp.double().numpy()

    f32 = dict(dtype=torch.float32, device=device)
    return Schedule(
        family=family,
        prediction_type=prediction_type,
        steps=N,
        timesteps=tuple(float(t) for t in lv.t),
        draws_noise=tuple(step.draws),
        level_bounds=tuple(lv.bounds),
        init_noise_sigma=fam.init_noise_sigma(sched),
        coef=torch.tensor(coef, **f32),
        c_in=torch.tensor(lv.c_in, **f32),
        t_model=torch.tensor(lv.t_model, **f32),
        a=torch.tensor(lv.a, **f32),
        s=torch.tensor(lv.s, **f32),
        a_next=torch.tensor(lv.a_next, **f32),
        s_next=torch.tensor(lv.s_next, **f32),
        abar=torch.tensor(lv.a**2 / (lv.a**2 + lv.s**2), **f32),
        abar_next=torch.tensor(lv.a_next**2 / (lv.a_next**2 + lv.s_next**2), **f32),
        t_next=torch.tensor(lv.t_next, **f32),
        alphas_cumprod=torch.tensor(acp, **f32),
        scheduler_config=dict(sched.config),
        timestep_scale=fam.timestep_scale(options),
        family_options=options,
    )

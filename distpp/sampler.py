"""The Distillation++ guided sampler (ALGORITHM.md), built from small pure step functions.

``Sampler.sample`` = ``prepare`` (validate everything, draw all noise, build per-call tables and
buffers; nothing runs half-way) + ``run_loop`` (the loop: model forwards and fused ops only, no host
math, no syncs, no allocations of its own). The graph runner captures ``run_loop`` over a ``Plan``.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import SamplerConfig, check_cfg, check_lam
from .config import is_real_scalar as _is_scalar
from .denoiser import Cond, ModelSpec, as_denoiser, check_cond
from .dtypes import dtype_name
from .errors import ConfigError, InputError
from .ops import FusedOps, resolve_ops
from .schedules import NUM_GCOLS, Schedule, build_schedule, teacher_coefficients

# Base-seed offset of the guidance generator: sample seed s uses Generator(s) for the initial and
# fresh noise and Generator(s + GUIDANCE_SEED_OFFSET) for the teacher re-noise (and random levels).
GUIDANCE_SEED_OFFSET = 2**32
# Largest latent per sample, in elements: the Triton kernels index within a sample with int32 offsets
# (which the last block overhangs by up to 1023), so < 2**31 is a hard limit; 2**30 leaves margin and is
# 16384x an SDXL 1024x1024 latent (4 x 128 x 128).
MAX_LATENT_NUMEL = 2**30


@dataclass
class Plan:
    """Static buffers of one sampling call (B samples, latent [C, H, W], N steps, G guided).

    x:        [B, C, H, W] float32 sampler state (initial noise * init_noise_sigma; final result).
    x_in:     [B, C, H, W] student input (model dtype), c_in[0] * x to start.
    z:        [N, B, C, H, W] float32 fresh noise per step (rows of steps that draw none are unused).
    n:        [G, B, C, H, W] float32 guidance re-noise.
    t_in:     [2B, C, H, W] teacher input (teacher dtype), written by student_update.
    gcoef:    [G, B, 4] float32 guidance table (a_s, s_s, tp_x, tp_m).
    t_student:[N, B] float32 student timesteps; t_teacher: [G, 2B] float32 teacher timesteps.
    lam, cfg: [B] float32 (device-resident: a captured graph reads them at replay).
    cond_s:   prepared student Cond [B]; cond_t: prepared teacher Cond [2B] (uncond rows first).
    m_s, m_t: [B, C, H, W] and [2B, C, H, W] float32 contiguous buffers: a prediction that is not contiguous
              (a UNet in channels_last) is copied into them before the fused ops, which index contiguous
              memory; float32 holds every prediction dtype exactly. None (a Plan built by hand): such a
              prediction is made contiguous per step instead, which allocates.
    """

    x: torch.Tensor
    x_in: torch.Tensor
    z: torch.Tensor
    n: torch.Tensor
    t_in: torch.Tensor | None
    gcoef: torch.Tensor
    t_student: torch.Tensor
    t_teacher: torch.Tensor
    lam: torch.Tensor
    cfg: torch.Tensor
    cond_s: Cond
    cond_t: Cond | None
    guided_steps: int
    m_s: torch.Tensor | None = None
    m_t: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def run_loop(student, teacher, ops: FusedOps, schedule: Schedule, plan: Plan, timer=None) -> torch.Tensor:
    """The guided sampling loop over ``plan``'s buffers; returns ``plan.x`` (final latents, float32).

    Per step: one student forward; on guided steps (k < G) student_update -> one batch-2B teacher
    forward -> guided_update; else plain_update. Python branches only on host ints fixed per schedule.
    """
    N, G, coef = schedule.steps, plan.guided_steps, schedule.coef
    if timer is not None:
        timer.lap("other")  # what came before the loop (prepare) counts as "other"
    for k in range(N):
        m_s = _contiguous(_checked("student", student(plan.x_in, plan.t_student[k], plan.cond_s), plan.x), plan.m_s)
        if timer is not None:
            timer.lap("student")
        z = plan.z[k] if schedule.draws_noise[k] else None
        xin_out = plan.x_in if k + 1 < N else None
        if k < G:
            ops.student_update(plan.x, m_s, plan.n[k], coef, plan.gcoef, k, plan.t_in)
            if timer is not None:
                timer.lap("guidance")
            m_t = _contiguous(_checked("teacher", teacher(plan.t_in, plan.t_teacher[k], plan.cond_t), plan.t_in),
                              plan.m_t)
            if timer is not None:
                timer.lap("teacher")
            ops.guided_update(plan.x, m_s, plan.n[k], m_t, z, coef, plan.gcoef, plan.lam, plan.cfg, k,
                              plan.x, xin_out)
            if timer is not None:
                timer.lap("guidance")
        else:
            ops.plain_update(plan.x, m_s, z, coef, k, plan.x, xin_out)
            if timer is not None:
                timer.lap("scheduler")
    return plan.x


def _checked(who: str, m, like: torch.Tensor) -> torch.Tensor:
    """``m`` if it is a float prediction shaped like the model input ``like`` on its device (host metadata
    only, no sync); a wrong shape would otherwise broadcast silently in the torch ops (e.g. [1, C, H, W]),
    and a meta or other-device tensor fail inside them."""
    if not isinstance(m, torch.Tensor) or m.shape != like.shape or not m.is_floating_point() \
            or m.device != like.device:
        raise InputError(f"the {who} model returned {getattr(m, 'shape', type(m).__name__)} "
                         f"{getattr(m, 'dtype', '')} on {getattr(m, 'device', '-')} for an input of shape "
                         f"{tuple(like.shape)} on {like.device}; a Denoiser must return a float prediction of its "
                         "input's shape on its device")
    return m


def _contiguous(m: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """``m`` itself when contiguous (no copy), else ``m`` copied into the plan's buffer ``buf``. Checks host
    metadata only; in a captured graph the branch taken at capture holds, as the model's layout does."""
    if m.is_contiguous():
        return m
    if buf is None:
        return m.contiguous()
    buf.copy_(m)
    return buf


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the block: Triton launches, the C library's stream and
    graph captures all follow the current device, not the tensors' (a no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def make_generators(seeds: Sequence[int], device: torch.device | str, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s) + offset) for s in seeds]


class Sampler:
    """A guided (or plain) few-step sampler for one student/teacher pair.

    student, teacher: Denoisers (see distpp.denoiser); teacher may be None when guided_steps = 0.
    config:           SamplerConfig.
    device:           where sampling runs (default: the student's spec device, else CPU).
    dtype:            model-input dtype of the student (default: its spec dtype, else float32);
                      teacher_dtype likewise for the teacher.
    """

    def __init__(self, student, teacher=None, config: SamplerConfig | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 teacher_dtype: torch.dtype | None = None):
        self.config = config = config or SamplerConfig()
        if not callable(student):
            raise ConfigError("student must be a Denoiser: a callable (x, t, cond) -> prediction")
        if teacher is not None and not callable(teacher):
            raise ConfigError("teacher must be a Denoiser: a callable (x, t, cond) -> prediction")
        if teacher is None and config.guided_steps > 0:
            raise ConfigError("guided_steps > 0 needs a teacher; pass teacher=... or guided_steps=0")
        if teacher is student and as_denoiser(student).reuses_output:
            raise ConfigError(f"one {type(student).__name__} as both student and teacher: it returns a buffer it "
                              "reuses on its next call, so the teacher's forward would overwrite the student's "
                              "prediction; build a second instance for the teacher")
        # Wrapped once (a DenoiserBase is kept as is): capabilities are attributes from here on.
        self.student = student = as_denoiser(student)
        self.teacher = teacher = as_denoiser(teacher) if teacher is not student else student
        s_spec, t_spec = student.spec, teacher.spec if teacher is not None else ModelSpec()
        try:
            self.device = torch.device(device if device is not None else (s_spec.device or "cpu"))
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {device!r} is not a torch device ({e}); pass 'cpu' or 'cuda'") from e
        self.dtype = dtype or s_spec.dtype or torch.float32
        self.teacher_dtype = teacher_dtype or t_spec.dtype or self.dtype
        for who, spec, dt in (("student", s_spec, self.dtype), ("teacher", t_spec, self.teacher_dtype)):
            _check_device_dtype(who, spec, self.device, dt)
        for who, spec, pt in (("student", s_spec, config.prediction_type),
                              ("teacher", t_spec, config.teacher_prediction_type)):
            if spec.prediction_type is not None and spec.prediction_type != pt:
                raise ConfigError(f"the {who} predicts {spec.prediction_type!r} but the config says {pt!r}; "
                                  f"set SamplerConfig({'teacher_' if who == 'teacher' else ''}prediction_type=...)")
        if teacher is not None and None not in (s_spec.in_channels, t_spec.in_channels) \
                and s_spec.in_channels != t_spec.in_channels:
            raise ConfigError(f"student takes {s_spec.in_channels} latent channels but the teacher "
                              f"{t_spec.in_channels}: they must share a latent space")
        try:
            self.schedule = build_schedule(config.family, config.steps, timesteps=config.timesteps,
                                           prediction_type=config.prediction_type,
                                           scheduler_config=config.scheduler_config, device=self.device)
        except ValueError as e:  # diffusers' own checks, e.g. LCM steps > original_inference_steps
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"the {config.family} scheduler refused this config: {e}") from e
        self.ops = resolve_ops(config.kernel_impl, self.device)
        # Guidance rows for the fixed teacher rules, [N, 4] float32: computed once, indexed per call.
        sch = self.schedule
        self._grows = {
            "next": teacher_coefficients(sch.abar_next.double(), config.teacher_prediction_type).float(),
            "same": teacher_coefficients(sch.abar.double(), config.teacher_prediction_type).float(),
        }
        self._gtimes = {"next": sch.t_next, "same": sch.t_model}

    # ------------------------------------------------------------------------------------------------
    def sample(self, cond: Cond, *, uncond: Cond | None = None, teacher_cond: Cond | None = None,
               teacher_uncond: Cond | None = None, latent_shape: Sequence[int] | None = None,
               noise: torch.Tensor | None = None, seeds: Sequence[int] | None = None,
               generators: Sequence[torch.Generator] | None = None,
               guidance_generators: Sequence[torch.Generator] | None = None,
               lam: float | Sequence[float] | None = None, cfg: float | Sequence[float] | None = None,
               timer=None) -> torch.Tensor:
        """Sample B latents; returns [B, C, H, W] float32 on the sampler's device.

        cond:          student conditioning, B rows (B = the batch).
        uncond:        the negative/empty-prompt conditioning for the teacher's CFG (1 or B rows); needed
                       when guided_steps > 0. teacher_cond / teacher_uncond override cond / uncond for a
                       teacher with other encoders.
        latent_shape:  (C, H, W) of the latents; or noise: [B, C, H, W] unit-variance initial noise.
        seeds:         one int per sample (default 0..B-1); or generators / guidance_generators, one per
                       sample (see the randomness contract in docs/ARCHITECTURE.md).
        lam, cfg:      per-call overrides, a float or one per sample.
        timer:         optional StageTimer for per-stage timings.
        """
        with device_guard(self.device):
            plan = self.prepare(cond, uncond=uncond, teacher_cond=teacher_cond, teacher_uncond=teacher_uncond,
                                latent_shape=latent_shape, noise=noise, seeds=seeds, generators=generators,
                                guidance_generators=guidance_generators, lam=lam, cfg=cfg)
            with torch.inference_mode():
                return self.check_result(run_loop(self.student, self.teacher, self.ops, self.schedule, plan, timer),
                                         plan)

    def check_result(self, out: torch.Tensor, plan: Plan) -> torch.Tensor:
        """``out`` unless ``check_finite`` is on and it holds NaN or inf (one host sync): then InputError
        naming the settings to lower. cfg near FLOAT32_MAX passes check_cfg yet overflows inside the
        guidance (m_u + cfg (m_c - m_u)); a non-finite result is never returned as a success."""
        if not self.config.check_finite or bool(torch.isfinite(out).all()):
            return out
        if plan.guided_steps == 0:
            what = "no step was guided, so check the student's predictions"
        else:
            what = (f"lower cfg (up to {plan.cfg.max().item():.3g} in this call; typical 1-15) or lam (up to "
                    f"{plan.lam.max().item():.3g}), or check the models' predictions")
        raise InputError(f"the sampled latents contain NaN or inf although the inputs were finite: the guidance "
                         f"overflowed float32 or a model's prediction was not finite; {what}")

    # ------------------------------------------------------------------------------------------------
    def prepare(self, cond: Cond, *, uncond=None, teacher_cond=None, teacher_uncond=None, latent_shape=None,
                noise=None, seeds=None, generators=None, guidance_generators=None, lam=None, cfg=None) -> Plan:
        """Validate the inputs, draw all noise, and build the buffers of one call (see Plan)."""
        cfgs, sch, dev = self.config, self.schedule, self.device
        G, N = cfgs.guided_steps, sch.steps
        if not isinstance(cond, Cond):
            raise InputError(f"cond must be a distpp.Cond, got {type(cond).__name__}")
        s_spec = self.student.spec
        t_spec = self.teacher.spec if self.teacher is not None else ModelSpec()
        check_cond("student", s_spec, cond, None)
        B = cond.batch
        shape = self._latent_shape(B, latent_shape, noise, s_spec)
        lam_v = _per_sample("lam", cfgs.resolved_lam if lam is None else lam, B, check_lam)
        cfg_v = _per_sample("cfg", cfgs.cfg if cfg is None else cfg, B, check_cfg)
        cond_t = None
        if G > 0:
            tc = teacher_cond if teacher_cond is not None else cond
            tu = teacher_uncond if teacher_uncond is not None else uncond
            if tu is None:
                raise InputError("guided steps run the teacher with CFG: pass uncond=Cond(...) (the negative-"
                                 "prompt conditioning, 1 or B rows), or set guided_steps=0")
            if not isinstance(tu, Cond) or not isinstance(tc, Cond):
                raise InputError("uncond / teacher_cond must be distpp.Cond objects")
            check_cond("teacher", t_spec, tc, B)
            tu = tu.expand(B)
            check_cond("teacher uncond", t_spec, tu, B)
            cond_t = Cond.cat(tu, tc)
        gens, ggens = self._generators(B, seeds, generators, guidance_generators)

        # --- everything validated: draw noise and build the per-call buffers -----------------------
        per = (1,) + tuple(shape[1:])
        f32 = dict(dtype=torch.float32, device=dev)
        x = torch.empty(shape, **f32)
        z = torch.empty((N,) + tuple(shape), **f32)
        n = torch.empty((G,) + tuple(shape), **f32)
        levels = torch.empty((G, B), dtype=torch.int64, device=dev)  # on the device: no host read of a draw
        for b in range(B):
            g = gens[b]
            if noise is None:
                x[b] = torch.randn(per, generator=g, device=g.device, dtype=torch.float32)[0].to(dev)
            for k in range(N):
                if sch.draws_noise[k]:
                    z[k, b] = torch.randn(per, generator=g, device=g.device, dtype=torch.float32)[0].to(dev)
            gg = ggens[b]
            for k in range(G):
                if cfgs.teacher_rule == "random":
                    lo, hi = sch.level_bounds[k]
                    levels[k, b] = torch.randint(lo, hi + 1, (1,), generator=gg, device=gg.device)[0].to(dev)
                n[k, b] = torch.randn(per, generator=gg, device=gg.device, dtype=torch.float32)[0].to(dev)
        if noise is not None:
            x.copy_(noise)
        x.mul_(sch.init_noise_sigma)
        x_in = (x * sch.c_in[0]).to(self.dtype)

        if cfgs.teacher_rule == "random" and G > 0:
            lv = levels
            abar = sch.alphas_cumprod.double()[lv]
            gcoef = teacher_coefficients(abar, cfgs.teacher_prediction_type).float().contiguous()
            t_teacher = lv.float()
        else:
            gcoef = self._grows[cfgs.teacher_rule][:G, None, :].expand(G, B, NUM_GCOLS).contiguous()
            t_teacher = self._gtimes[cfgs.teacher_rule][:G, None].expand(G, B)
        t_teacher = torch.cat([t_teacher, t_teacher], dim=1).contiguous()
        t_student = sch.t_model[:, None].expand(N, B).contiguous()
        t_in = torch.empty((2 * B,) + tuple(shape[1:]), dtype=self.teacher_dtype, device=dev) if G > 0 else None
        cond_s = self.student.prepare(cond.to(dev, self.dtype))
        if cond_t is not None:
            cond_t = self.teacher.prepare(cond_t.to(dev, self.teacher_dtype))
        if cfgs.check_finite:  # on the buffers the loop reads, i.e. after every cast and scaling
            self._check_finite(x if noise is not None else None, x_in, cond_s, cond_t, B)
        m_s = torch.empty(shape, **f32)
        m_t = torch.empty((2 * B,) + tuple(shape[1:]), **f32) if G > 0 else None
        return Plan(x=x, x_in=x_in, z=z, n=n, t_in=t_in, gcoef=gcoef, t_student=t_student, t_teacher=t_teacher,
                    lam=_to_device(lam_v, dev), cfg=_to_device(cfg_v, dev), cond_s=cond_s, cond_t=cond_t, guided_steps=G,
                    m_s=m_s, m_t=m_t)

    def _check_finite(self, x, x_in, cond_s: Cond, cond_t: Cond | None, B: int) -> None:
        """InputError naming the first buffer that holds NaN or inf (one host sync when all are finite).
        x: the given noise as float32 times init_noise_sigma, x_in: the student's input (None: drawn noise)."""
        checks = []
        if x is not None:
            sigma = self.schedule.init_noise_sigma
            checks += [(f"noise contains NaN or inf after its cast to float32 and the scaling by init_noise_sigma "
                        f"= {sigma:.4g}", x),
                       ("noise contains NaN or inf after its scaling to the student's input", x_in)]
        rows = [("cond", cond_s, slice(None))]
        if cond_t is not None:
            rows += [("uncond", cond_t, slice(0, B)), ("teacher cond", cond_t, slice(B, 2 * B))]
        checks += [(f"{who} {k} contains NaN or inf after the cast to the model dtype", v[r])
                   for who, c, r in rows for k, v in c.tensors().items()]
        ok = torch.stack([torch.isfinite(t).all() for _, t in checks])
        if bool(ok.all()):
            return
        msg, t = next(c for c, good in zip(checks, ok.tolist()) if not good)
        raise InputError(f"{msg} ({dtype_name(t.dtype)}); pass finite values within its range "
                         f"(|v| <= {torch.finfo(t.dtype).max:.4g})")

    # ------------------------------------------------------------------------------------------------
    def _latent_shape(self, B, latent_shape, noise, spec: ModelSpec) -> tuple[int, ...]:
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or not noise.is_floating_point() \
                    or noise.device.type == "meta":
                raise InputError(f"noise must be a float [B, C, H, W] tensor, got "
                                 f"{getattr(noise, 'shape', type(noise).__name__)}")
            if noise.shape[0] != B:
                raise InputError(f"noise has batch {noise.shape[0]} but cond has {B} rows; they must match")
            given = None if latent_shape is None else _as_tuple(latent_shape)
            if latent_shape is not None and given is None:
                raise InputError(f"latent_shape must be (C, H, W), got {latent_shape!r}")
            if given is not None and given != tuple(noise.shape[1:]):
                raise InputError(f"latent_shape {latent_shape!r} disagrees with noise of shape {tuple(noise.shape)}; "
                                 "pass one of them")
            shape = tuple(noise.shape)
        else:
            if latent_shape is None:
                raise InputError("pass latent_shape=(C, H, W) (latent channels and size) or noise=[B, C, H, W]")
            try:  # operator.index: a float or str size is an error, not silently truncated
                ls = tuple(operator.index(v) for v in latent_shape)
            except TypeError:
                ls = ()
            if len(ls) != 3:
                raise InputError(f"latent_shape must be (C, H, W), got {latent_shape!r}")
            shape = (B,) + ls
        if any(v < 1 for v in shape):
            raise InputError(f"latent shape {shape} has an empty dimension")
        if spec.in_channels is not None and shape[1] != spec.in_channels:
            raise InputError(f"latents have {shape[1]} channels but the student takes {spec.in_channels}; "
                             f"pass latent_shape=({spec.in_channels}, H, W)")
        self._check_size(shape)
        return shape

    def _check_size(self, shape: tuple[int, ...]) -> None:
        """InputError for latents the fused ops cannot index, or whose buffers alone would exceed the device's
        memory: host arithmetic on Python ints (no overflow), before anything is allocated."""
        B, per = shape[0], math.prod(shape[1:])
        if per > MAX_LATENT_NUMEL:
            raise InputError(f"latent shape {shape[1:]} has {per} elements per sample; distpp takes at most "
                             f"{MAX_LATENT_NUMEL} (2**30) elements per sample (the fused ops index a sample with "
                             "32-bit offsets): pass a smaller latent_shape")
        N, G = self.schedule.steps, self.config.guided_steps
        # bytes per latent element of one sample: x, z [N], n [G], m_s (float32); x_in; with guidance
        # m_t and t_in (2 rows each)
        each = 4 * (2 + N + G) + _itemsize(self.dtype) + (2 * (4 + _itemsize(self.teacher_dtype)) if G else 0)
        cap = device_memory_bytes(self.device)
        if cap is not None and B * per * each > cap:
            most = cap // (B * each)
            raise InputError(f"latents {shape[1:]} for {B} samples need {_size(B * per * each)} of sampler buffers "
                             f"({N} steps, {G} guided) but {self.device} has {_size(cap)} in all; at this batch and "
                             f"step count pass at most {most} elements per sample (a smaller latent_shape)"
                             + ("" if most else " or fewer samples"))

    def _generators(self, B, seeds, generators, guidance_generators):
        if generators is not None or guidance_generators is not None:
            if seeds is not None:
                raise InputError("pass either seeds or generators, not both")
            if generators is None or guidance_generators is None:
                raise InputError("pass both generators and guidance_generators (one pair per sample), or seeds")
            gens, ggens = list(generators), list(guidance_generators)
            if len(gens) != B or len(ggens) != B or \
                    not all(isinstance(g, torch.Generator) for g in gens + ggens):
                raise InputError(f"need one generator and one guidance generator per sample ({B}), "
                                 f"got {len(gens)} and {len(ggens)} (pass torch.Generator objects)")
            return gens, ggens
        if seeds is None:
            seeds = list(range(B))
        seeds = list(seeds) if isinstance(seeds, (list, tuple, range)) else [seeds]
        # manual_seed takes < 2**64, and the guidance generator adds GUIDANCE_SEED_OFFSET.
        if len(seeds) != B or not all(isinstance(s, int) and 0 <= s < 2**64 - GUIDANCE_SEED_OFFSET for s in seeds):
            raise InputError(f"seeds must be {B} non-negative ints below 2**64 - 2**32 (one per sample), "
                             f"got {seeds!r}")
        return make_generators(seeds, self.device), make_generators(seeds, self.device, GUIDANCE_SEED_OFFSET)


def _as_tuple(v: Any) -> tuple | None:
    """``tuple(v)``, or None when ``v`` is not iterable (a latent_shape of 4)."""
    try:
        return tuple(v)
    except TypeError:
        return None


def _per_sample(name: str, v: Any, B: int, check) -> torch.Tensor:
    """[B] float32 host tensor of checked per-sample values from a number or one value per sample."""
    if _is_scalar(v):
        vals = [v] * B
    elif isinstance(v, (str, bytes)):
        raise InputError(f"{name} must be a number or one value per sample ({B}), got the string {v!r}")
    else:
        try:
            vals = list(v)
        except TypeError:
            raise InputError(f"{name} must be a number or one value per sample ({B}), got {type(v).__name__}") \
                from None
    if len(vals) != B:
        raise InputError(f"{name} must be a number or one value per sample ({B}), got {len(vals)} values")
    return torch.tensor([check(a) for a in vals], dtype=torch.float32)  # check: numbers of any form -> float


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes, from host metadata (the CUDA device's properties; for CPU the
    host's physical memory); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index if device.index is not None
                                                else torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else None
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or no such name
        return None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _size(nbytes: int) -> str:
    if nbytes >= 2**20:
        return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes} bytes"


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host tensor -> ``dev`` without waiting on the stream (a pageable copy would synchronize it, so a
    call could not be prepared while the previous one still runs)."""
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _check_device_dtype(who: str, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "meta":
        raise ConfigError("the meta device holds no data and cannot sample; pass device='cpu' or 'cuda'")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"{who} dtype {dtype} is not supported; pass float32, float16 or bfloat16")
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError(f"{who}: float16 is not supported on CPU; pass dtype=torch.float32 or torch.bfloat16")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} requested but CUDA is not available; pass device='cpu'")
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{who}: this GPU cannot run bfloat16; pass dtype=torch.float16")
    if spec.dtype is not None and spec.dtype != dtype:
        raise ConfigError(f"the {who} model is {spec.dtype} but the sampler dtype is {dtype}; "
                          f"cast the model (.to({dtype})) or pass the matching dtype")
    if spec.device is not None and torch.device(spec.device).type != device.type:
        raise ConfigError(f"the {who} model is on {spec.device} but the sampler device is {device}; "
                          "move the model or pass the matching device")

"""Baselines of the same guided algorithm, for the benchmark (and as a cross-check in tests).

``eager``: the idiomatic diffusers way. The student's scheduler object is stepped one call at a time
(``scale_model_input`` / ``step``); on guided steps the x0, re-noise, CFG, proximal step and the
family's update are unfused torch ops on values indexed from the scheduler on the host; inference
mode; the student at batch B. This is the fair baseline speed targets are measured against.

``research``: the research code's way: additionally the student at batch 2B with half discarded,
autograd left on, schedule values pulled to the host with ``.item()`` each step, and the teacher's
conditioning re-concatenated every step.

Both use the same per-sample (base, guidance) generators as distpp, so with the "next"/"same" rules
their results equal distpp's on the same seeds (up to float rounding). ``BaselineSampler`` builds the
scheduler and its timesteps once, outside the timed call, as distpp's Sampler holds its tables (the
bench times ``sample`` only); ``baseline_sample`` is one build + call.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.utils.torch_utils import randn_tensor

from .config import SamplerConfig
from .denoiser import Cond, as_denoiser
from .sampler import GUIDANCE_SEED_OFFSET, make_generators
from .families import predict_x0_eps
from .schedules import COL_A, COL_B, COL_C, build_schedule, make_scheduler


def _x0_eps(m, x, abar, pt):
    return predict_x0_eps(m, x, abar**0.5, (1 - abar) ** 0.5, pt)


class BaselineSampler:
    """The eager (or research) guided loop with its scheduler and schedule built once, outside the timed
    call (as distpp's Sampler holds its tables); ``sample`` only resets the scheduler's step counter.

    student, teacher: Denoisers (or callables) of the eager UNets; config: the SamplerConfig to follow.
    """

    def __init__(self, student, teacher, config: SamplerConfig, *, device, dtype, teacher_dtype=None,
                 research: bool = False):
        if config.teacher_rule == "random":
            raise NotImplementedError("the baselines implement the 'next' and 'same' teacher rules")
        if config.teacher_guidance != "cfg":
            raise NotImplementedError("the baselines implement the CFG teacher (teacher_guidance='cfg') only")
        if config.family == "flow":
            raise NotImplementedError("the baselines implement the VP families (alphas_cumprod schedules); family "
                                      "'flow' has none")
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.teacher_dtype, self.research = teacher_dtype or dtype, research
        self.student, self.teacher = as_denoiser(student), as_denoiser(teacher)
        fam, pt = config.family, config.prediction_type
        self.sched = sched = make_scheduler(fam, config.scheduler_config, pt)
        self.table = table = build_schedule(fam, config.steps, timesteps=config.timesteps, prediction_type=pt,
                                            scheduler_config=config.scheduler_config)  # timesteps, next levels, rows
        if config.timesteps is not None or fam == "dmd2":
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # DMD2's timesteps are off LCM's grid on purpose
            try:
                sched.set_timesteps(timesteps=[int(t) for t in table.timesteps], device=device)
            finally:
                dlogging.set_verbosity(level)
        else:
            sched.set_timesteps(table.steps, device=device)
        self.acp = sched.alphas_cumprod.to(device)

    def sample(self, cond: Cond, uncond: Cond | None, latent_shape, seeds, *, timer=None) -> torch.Tensor:
        """Guided sampling the eager (or research) way; returns float32 latents [B, C, H, W]."""
        if hasattr(self.sched, "_step_index"):  # a new call starts at step 0 (what set_timesteps resets)
            self.sched._step_index = None
        return _sample(self, cond, uncond, latent_shape, seeds, timer)


def baseline_sample(student, teacher, config: SamplerConfig, cond: Cond, uncond: Cond | None, latent_shape,
                    seeds, *, device, dtype, teacher_dtype=None, research: bool = False, timer=None) -> torch.Tensor:
    """One call of :class:`BaselineSampler` (built, then sampled); returns float32 latents [B, C, H, W]."""
    return BaselineSampler(student, teacher, config, device=device, dtype=dtype, teacher_dtype=teacher_dtype,
                           research=research).sample(cond, uncond, latent_shape, seeds, timer=timer)


def _sample(bs: BaselineSampler, cond: Cond, uncond: Cond | None, latent_shape, seeds, timer) -> torch.Tensor:
    config, sched, acp, table, research = bs.config, bs.sched, bs.acp, bs.table, bs.research
    device, dtype, teacher_dtype = bs.device, bs.dtype, bs.teacher_dtype
    fam, pt, tpt = config.family, config.prediction_type, config.teacher_prediction_type
    student, teacher = bs.student, bs.teacher
    B = cond.batch
    G, lam, w = config.guided_steps, config.resolved_lam, config.cfg
    gens = make_generators(seeds, device)
    ggens = make_generators(seeds, device, GUIDANCE_SEED_OFFSET)
    shape = (B,) + tuple(latent_shape)
    per = (1,) + tuple(latent_shape)
    euler = fam in ("euler", "euler_a")
    cond_s = student.prepare(cond.to(device, dtype))
    cond_t = None
    if G > 0:
        cond_t = teacher.prepare(Cond.cat(uncond.expand(B), cond).to(device, teacher_dtype))
    mode = contextlib.nullcontext() if research else torch.inference_mode()
    lap = timer.lap if timer is not None else (lambda stage: None)
    with mode:
        lap("other")
        x = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32) * sched.init_noise_sigma
        for k, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(x, t).to(dtype)
            tb = t.float().expand(B)
            if research:  # batch 2B, half discarded (the research code's CFG-shaped student call)
                m = student(torch.cat([inp, inp]), torch.cat([tb, tb]), Cond.cat(cond_s, cond_s))[B:]
            else:
                m = student(inp, tb, cond_s)
            lap("student")
            if k >= G:
                x = sched.step(m, t, x, generator=gens).prev_sample.float()
                lap("scheduler")
                continue
            m = m.float()
            ti = int(t.round()) if not research else int(round(t.item()))
            if euler:
                sigma = sched.sigmas[k]
                abar_t = 1.0 / (1.0 + sigma**2)
                z_vp = x / (sigma**2 + 1) ** 0.5
                x0, e_vp = _x0_eps(m, z_vp, abar_t, pt)
                e = (x - x0) / sigma
            else:
                abar_t = acp[ti]
                x0, e = _x0_eps(m, x, abar_t, pt)
                if fam in ("lcm", "dmd2"):
                    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
                    x0 = c_out * x0 + c_skip * x
            s_lv = ti if config.teacher_rule == "same" else int(round(float(table.t_next[k])))  # next_level(k)
            abar_s = acp[s_lv] if not research else torch.tensor(acp[s_lv].item(), device=device)
            n = torch.cat([torch.randn(per, generator=g, device=g.device, dtype=torch.float32).to(device)
                           for g in ggens])
            xs = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * n
            lap("guidance")
            ct = Cond.cat(cond_t.map(lambda v: v[:B]), cond_t.map(lambda v: v[B:])) if research else cond_t
            mt = teacher(torch.cat([xs, xs]).to(teacher_dtype), torch.full((2 * B,), float(s_lv), device=device), ct)
            lap("teacher")
            mu, mc = mt.float().chunk(2)
            mT = mu + w * (mc - mu)
            x0T, _ = _x0_eps(mT, xs, abar_s, tpt)
            x0 = (1 - lam) * x0 + lam * x0T
            lap("guidance")
            # The family's native update from the guided x0 (what sched.step would do with it).
            c = table.coef[k].tolist()
            x = c[COL_A] * x0 + c[COL_B] * e
            if table.draws_noise[k]:
                x = x + c[COL_C] * randn_tensor(shape, generator=gens, device=device, dtype=torch.float32)
            if hasattr(sched, "_step_index"):  # keep the scheduler's own counter in step
                sched._step_index = k + 1
            lap("scheduler")
    return x.detach().float()

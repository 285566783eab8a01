"""Baselines of the same guided algorithm, for the benchmark (and as a cross-check in tests).

``eager``: the idiomatic diffusers way. The student's scheduler object is stepped one call at a time
(``scale_model_input`` / ``step``); on guided steps the x0, re-noise, CFG, proximal step and the
family's update are unfused torch ops on values indexed from the scheduler on the host; inference
mode; the student at batch B. This is the fair baseline speed targets are measured against.

``research``: the research code's way: additionally the student at batch 2B with half discarded,
autograd left on, schedule values pulled to the host with ``.item()`` each step, and the teacher's
conditioning re-concatenated every step.

Both use the same per-sample (base, guidance) generators as distpp, so with the "next"/"same" rules
their results equal distpp's on the same seeds (up to float rounding).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.utils.torch_utils import randn_tensor

from .config import SamplerConfig
from .denoiser import Cond, as_denoiser
from .sampler import GUIDANCE_SEED_OFFSET, make_generators
from .schedules import build_schedule, make_scheduler


def _x0_eps(m, x, abar, pt):
    a, s = abar**0.5, (1 - abar) ** 0.5
    if pt == "epsilon":
        return (x - s * m) / a, m
    if pt == "v_prediction":
        return a * x - s * m, a * m + s * x
    return m, (x - a * m) / s


def baseline_sample(student, teacher, config: SamplerConfig, cond: Cond, uncond: Cond | None, latent_shape,
                    seeds, *, device, dtype, teacher_dtype=None, research: bool = False, timer=None) -> torch.Tensor:
    """Guided sampling the eager (or research) way; returns float32 latents [B, C, H, W]."""
    if config.teacher_rule == "random":
        raise NotImplementedError("the baselines implement the 'next' and 'same' teacher rules")
    teacher_dtype = teacher_dtype or dtype
    fam, pt, tpt = config.family, config.prediction_type, config.teacher_prediction_type
    sched = make_scheduler(fam, config.scheduler_config, pt)
    table = build_schedule(fam, config.steps, timesteps=config.timesteps, prediction_type=pt,
                           scheduler_config=config.scheduler_config)  # only for its timesteps
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
    B = cond.batch
    G, lam, w = config.guided_steps, config.resolved_lam, config.cfg
    gens = make_generators(seeds, device)
    ggens = make_generators(seeds, device, GUIDANCE_SEED_OFFSET)
    shape = (B,) + tuple(latent_shape)
    per = (1,) + tuple(latent_shape)
    acp = sched.alphas_cumprod.to(device)
    T, N = sched.config.num_train_timesteps, len(sched.timesteps)
    euler = fam in ("euler", "euler_a")
    student, teacher = as_denoiser(student), as_denoiser(teacher)
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
            if config.teacher_rule == "same":
                s_lv = ti
            elif fam == "ddim":
                s_lv = ti - T // N if ti - T // N >= 0 else ti
            else:
                s_lv = int(round(float(sched.timesteps[k + 1]))) if k + 1 < N else ti
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
            if fam in ("lcm", "dmd2"):
                if k + 1 < N:
                    an = acp[int(round(float(sched.timesteps[k + 1])))]
                    z = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32)
                    x = an.sqrt() * x0 + (1 - an).sqrt() * z
                else:
                    x = x0
            elif fam == "ddim":
                p = ti - T // N
                ap = acp[p] if p >= 0 else sched.final_alpha_cumprod.to(device)
                x = ap.sqrt() * x0 + (1 - ap).sqrt() * e
            elif fam == "euler":
                x = x0 + sched.sigmas[k + 1] * e
            else:
                sf, st = sched.sigmas[k], sched.sigmas[k + 1]
                up = (st**2 * (sf**2 - st**2) / sf**2) ** 0.5
                down = (st**2 - up**2) ** 0.5
                z = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32)
                x = x0 + down * e + up * z
            if hasattr(sched, "_step_index"):  # keep the scheduler's own counter in step
                sched._step_index = k + 1
            lap("scheduler")
    return x.detach().float()

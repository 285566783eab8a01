"""A float64 transcription of ALGORITHM.md's guided loop, written from the spec, independent of the
schedule tables and fused ops it checks. Noise comes from a sampler Plan so both see the same draws."""

from __future__ import annotations

from dataclasses import replace

import torch

from distpp.schedules import make_scheduler


def _x0_eps_vp(m, z, abar, pt):
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if pt == "epsilon":
        return (z - s * m) / a, m
    if pt == "v_prediction":
        return a * z - s * m, a * m + s * z
    return m, (z - a * m) / s


def reference_sample(family, student, teacher, *, steps=None, timesteps=None, pt="epsilon", tpt="epsilon",
                     x_init, z, n, G, lam, w, rule, cond, cond_t, levels=None, embedded=False, gamma=0.3):
    """x_init: [B, ...] initial noise already scaled by init_noise_sigma; z: [N, B, ...]; n: [G, B, ...];
    lam, w: [B]; levels: [G, B] teacher levels for the random rule; gamma: TCD's. Returns float64 final
    latents.

    The teacher's guidance (ALGORITHM.md): CFG (default) runs the teacher on [x_s; x_s] with cond_t's
    [uncond B; cond B] rows and combines m_u + w (m_c - m_u); ``embedded=True`` (a guidance-distilled
    teacher, "Embedded guidance") runs it once on x_s with cond_t's B rows and guidance = w, and takes its
    prediction as the guided one."""
    sched = make_scheduler(family, prediction_type=pt)
    if timesteps is not None:
        sched.set_timesteps(timesteps=list(timesteps))
    else:
        sched.set_timesteps(steps)
    ts = [float(t) for t in sched.timesteps]
    N, T = len(ts), sched.config.num_train_timesteps
    acp = sched.alphas_cumprod.double()
    x = x_init.double().clone()
    B = x.shape[0]
    view = (B,) + (1,) * (x.dim() - 1)
    lam, w = lam.double().view(view), w.double().view(view)
    euler = family in ("euler", "euler_a")
    sig = sched.sigmas.double() if euler else None
    with torch.inference_mode():
        for k, t in enumerate(ts):
            ti = int(round(t))
            tv = torch.full((B,), t)
            if euler:
                sigma = sig[k]
                zin = x / (sigma**2 + 1).sqrt()
                m = student(zin.float(), tv, cond).double()
                if pt == "epsilon":
                    x0 = x - sigma * m
                elif pt == "v_prediction":
                    x0 = m * (-sigma / (sigma**2 + 1).sqrt()) + x / (sigma**2 + 1)
                else:
                    x0 = m
                e = (x - x0) / sigma
            else:
                abar = acp[ti]
                m = student(x.float(), tv, cond).double()
                x0, e = _x0_eps_vp(m, x, abar, pt)
                if family in ("lcm", "dmd2"):
                    sd, tt = 0.5, ti * 10.0
                    c_skip, c_out = sd**2 / (tt**2 + sd**2), tt / (tt**2 + sd**2) ** 0.5
                    x0 = c_out * x0 + c_skip * x
            if k < G:
                if family == "ddim":
                    nxt = ti - T // N
                    nxt = nxt if nxt >= 0 else ti
                else:
                    nxt = int(round(ts[k + 1])) if k + 1 < N else ti
                if rule == "random":
                    s_lv = levels[k].long()
                elif rule == "same":
                    s_lv = torch.full((B,), ti)
                else:
                    s_lv = torch.full((B,), nxt)
                abar_s = acp[s_lv].view(view)
                a_s, s_s = abar_s.sqrt(), (1 - abar_s).sqrt()
                xs = a_s * x0 + s_s * n[k].double()
                st = s_lv.float()
                if embedded:
                    mT = teacher(xs.float(), st, replace(cond_t, guidance=w.flatten().float())).double()
                else:
                    mt = teacher(torch.cat([xs, xs]).float(), torch.cat([st, st]), cond_t).double()
                    mu, mc = mt[:B], mt[B:]
                    mT = mu + w * (mc - mu)
                x0T, _ = _x0_eps_vp(mT, xs, abar_s, tpt)
                x0 = (1 - lam) * x0 + lam * x0T
            if family in ("lcm", "dmd2"):
                if k + 1 < N:
                    an = acp[int(round(ts[k + 1]))]
                    x = an.sqrt() * x0 + (1 - an).sqrt() * z[k].double()
                else:
                    x = x0
            elif family == "ddim":
                p = ti - T // N
                ap = acp[p] if p >= 0 else torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
                x = ap.sqrt() * x0 + (1 - ap).sqrt() * e
            elif family == "tcd":  # to u = floor((1 - gamma) t_prev) (TCDScheduler's float32 floor), re-noise to t_prev
                prev = int(round(ts[k + 1])) if k + 1 < N else 0
                u = int(torch.floor((1 - gamma) * torch.tensor(prev)))
                x = acp[u].sqrt() * x0 + (1 - acp[u]).sqrt() * e
                if gamma > 0 and k + 1 < N:
                    r = acp[prev] / acp[u]
                    x = r.sqrt() * x + (1 - r).sqrt() * z[k].double()
            elif family == "euler":
                x = x0 + sig[k + 1] * e
            else:
                sf, st_ = sig[k], sig[k + 1]
                up = (st_**2 * (sf**2 - st_**2) / sf**2).sqrt()
                down = (st_**2 - up**2).sqrt()
                x = x0 + down * e + up * z[k].double()
    return x


def reference_flow_sample(student, teacher, *, sigmas, t_model, timestep_scale, stochastic=False, x_init, z, n, G,
                          lam, w, rule, cond, cond_t, levels=None):
    """ALGORITHM.md's "Flow-matching students" in float64, written from the spec.

    sigmas: [N + 1] the scheduler's sigmas (last 0); t_model: [N] the student's timestep input per step (as
    the pipeline passes it); timestep_scale: the model's timestep = sigma * timestep_scale (random levels);
    x_init: [B, ...] initial noise; z: [N, B, ...] fresh noise (stochastic sampling); n: [G, B, ...];
    lam, w: [B]; levels: [G, B] teacher sigmas for the random rule. Returns float64 final latents."""
    sig = [float(v) for v in sigmas]
    N = len(sig) - 1
    x = x_init.double().clone()
    B = x.shape[0]
    view = (B,) + (1,) * (x.dim() - 1)
    lam, w = lam.double().view(view), w.double().view(view)
    with torch.inference_mode():
        for k in range(N):
            s_k, s_n = sig[k], sig[k + 1]
            v = student(x.float(), torch.full((B,), float(t_model[k])), cond).double()
            x0, e = x - s_k * v, x + (1 - s_k) * v  # x = (1 - s) x0 + s e, v = e - x0
            if k < G:
                if rule == "random":
                    s_s = levels[k].double().view(view)
                    ts = (levels[k].double() * timestep_scale).float()
                else:
                    nxt = k + 1 if (rule == "next" and k + 1 < N) else k
                    s_s = torch.full(view, sig[nxt], dtype=torch.float64)
                    ts = torch.full((B,), float(t_model[nxt]))
                xs = (1 - s_s) * x0 + s_s * n[k].double()
                vt = teacher(torch.cat([xs, xs]).float(), torch.cat([ts, ts]), cond_t).double()
                vT = vt[:B] + w * (vt[B:] - vt[:B])
                x0T = xs - s_s * vT
                x0 = (1 - lam) * x0 + lam * x0T
            if stochastic:
                x = (1 - s_n) * x0 + s_n * z[k].double()
            else:
                x = (1 - s_n) * x0 + s_n * e
    return x

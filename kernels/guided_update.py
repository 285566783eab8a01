"""guided_update: teacher CFG combine, teacher x0, the proximal step and the student's native update in
one pass over the latent; also writes the next model input.

    x0      = P_x[k] * x + P_m[k] * m_s ;  e = Q_x[k] * x + Q_m[k] * m_s
    x_s     = a_s * x0 + s_s * n                        (recomputed: cheaper than storing it)
    m_T     = m_t[b] + cfg[b] * (m_t[B + b] - m_t[b])   (uncond half first)
    x0_T    = tp_x * x_s + tp_m * m_T
    x0'     = x0 + lam[b] * (x0_T - x0)                 (= (1 - lam) x0 + lam x0_T)
    x_next  = A[k] * x0' + B[k] * e + C[k] * z
    xin_out = c_in[k + 1] * x_next
"""

from __future__ import annotations

import torch

from distpp.schedules import (COL_CIN_NEXT, COL_PM, COL_PX, COL_QM, COL_QX, GCOL_A, GCOL_S, GCOL_TPM,
                              GCOL_TPX, NUM_COLS, NUM_GCOLS)

from ._common import bcast, check_latent, check_step, check_table
from .plain_update import native_next


def check_guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out) -> None:
    from distpp.errors import InputError

    check_latent("x", x, x, dtypes=(torch.float32,))
    check_latent("m_s", m_s, x)
    check_latent("n", n, x, dtypes=(torch.float32,))
    check_latent("m_t", m_t, x, batch=2 * x.shape[0])
    if z is not None:
        check_latent("z", z, x, dtypes=(torch.float32,))
    check_latent("x_out", x_out, x, dtypes=(torch.float32,))
    if xin_out is not None:
        check_latent("xin_out", xin_out, x)
    check_table("coef", coef, x, NUM_COLS)
    check_table("gcoef", gcoef, x, NUM_GCOLS)
    check_step(k, coef, "coef")
    check_step(k, gcoef, "gcoef")
    for name, v in (("lam", lam), ("cfg", cfg)):
        if v.dtype != torch.float32 or v.device != x.device or tuple(v.shape) != (x.shape[0],):
            raise InputError(f"{name} must be a float32 [{x.shape[0]}] tensor on {x.device}, "
                             f"got {tuple(v.shape)} {v.dtype} on {v.device}")


def guided_update_ref(x: torch.Tensor, m_s: torch.Tensor, n: torch.Tensor, m_t: torch.Tensor,
                      z: torch.Tensor | None, coef: torch.Tensor, gcoef: torch.Tensor, lam: torch.Tensor,
                      cfg: torch.Tensor, k: int, x_out: torch.Tensor, xin_out: torch.Tensor | None) -> torch.Tensor:
    """Pure-torch reference and CPU fallback.

    x: [B, ...] float32 state; m_s: [B, ...] student prediction; n: [B, ...] float32 guidance re-noise;
    m_t: [2B, ...] teacher prediction (uncond half first); z: [B, ...] float32 fresh noise or None;
    coef: [N, 8]; gcoef: [G, B, 4]; lam, cfg: [B] float32 device tensors; k: host int; x_out: [B, ...]
    float32 (may be ``x``); xin_out: next model input or None. Returns ``x_out``.
    """
    B, nd = x.shape[0], x.dim()
    c, g = coef[k], gcoef[k]
    m = m_s.float()
    x0 = c[COL_PX] * x + c[COL_PM] * m
    e = c[COL_QX] * x + c[COL_QM] * m
    xs = bcast(g[:, GCOL_A], nd) * x0 + bcast(g[:, GCOL_S], nd) * n
    mu, mc = m_t[:B].float(), m_t[B:].float()
    mT = mu + bcast(cfg, nd) * (mc - mu)
    x0T = bcast(g[:, GCOL_TPX], nd) * xs + bcast(g[:, GCOL_TPM], nd) * mT
    x0 = x0 + bcast(lam, nd) * (x0T - x0)
    nxt = native_next(c, x0, e, z)
    x_out.copy_(nxt)
    if xin_out is not None:
        xin_out.copy_(c[COL_CIN_NEXT] * nxt)
    return x_out


def guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out):
    """Triton launcher (CUDA tensors); same contract as :func:`guided_update_ref`."""
    from ._triton import launch_guided_update

    check_guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out)
    return launch_guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out)

"""guided_update: teacher CFG combine, teacher x0, the proximal step and the student's native update in
one pass over the latent; also writes the next model input. The teacher form is read from ``m_t``'s
rows (``teacher_halves``): 2B rows are a CFG teacher's [uncond; cond] pair, B rows an embedded-guidance
teacher's prediction, whose guidance scale went into the teacher (``cfg`` is then not read).

    x0      = P_x[k] * x + P_m[k] * m_s ;  e = Q_x[k] * x + Q_m[k] * m_s
    x_s     = a_s * x0 + s_s * n                        (recomputed: cheaper than storing it)
    m_T     = m_t[b] + cfg[b] * (m_t[B + b] - m_t[b])   (CFG, 2B rows: uncond half first)
    m_T     = m_t[b]                                    (embedded guidance, B rows)
    x0_T    = tp_x * x_s + tp_m * m_T
    x0'     = x0 + lam[b] * (x0_T - x0)                 (= (1 - lam) x0 + lam x0_T)
    x_next  = A[k] * x0' + B[k] * e + C[k] * z
    xin_out = c_in[k + 1] * x_next
"""

from __future__ import annotations

import functools

import torch

from distpp.schedules import (COL_CIN_NEXT, COL_PM, COL_PX, COL_QM, COL_QX, GCOL_A, GCOL_S, GCOL_TPM,
                              GCOL_TPX, NUM_COLS, NUM_GCOLS)

from ._common import (bcast, bind_table_columns, check_gcoef, check_latent, check_step, check_table, launch_block,
                      teacher_halves, triton_cdiv)
from .plain_update import native_next


def check_guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out) -> int:
    """Raise InputError for bad arguments; returns the teacher form (2: CFG pair, 1: embedded guidance)."""
    from distpp.errors import InputError

    check_latent("x", x, x, dtypes=(torch.float32,))
    check_latent("m_s", m_s, x)
    check_latent("n", n, x, dtypes=(torch.float32,))
    halves = teacher_halves("m_t", m_t, x)
    if z is not None:
        check_latent("z", z, x, dtypes=(torch.float32,))
    check_latent("x_out", x_out, x, dtypes=(torch.float32,))
    if xin_out is not None:
        check_latent("xin_out", xin_out, x)
    check_table("coef", coef, x, NUM_COLS)
    check_gcoef(gcoef, x, NUM_GCOLS)
    check_step(k, coef, "coef")
    check_step(k, gcoef, "gcoef")
    for name, v in (("lam", lam), ("cfg", cfg)):
        if v.dtype != torch.float32 or v.device != x.device or tuple(v.shape) != (x.shape[0],) \
                or not v.is_contiguous():
            raise InputError(f"{name} must be a contiguous float32 [{x.shape[0]}] tensor on {x.device}, "
                             f"got {tuple(v.shape)} {v.dtype} on {v.device}")
    return halves


def guided_update_ref(x: torch.Tensor, m_s: torch.Tensor, n: torch.Tensor, m_t: torch.Tensor,
                      z: torch.Tensor | None, coef: torch.Tensor, gcoef: torch.Tensor, lam: torch.Tensor,
                      cfg: torch.Tensor, k: int, x_out: torch.Tensor, xin_out: torch.Tensor | None) -> torch.Tensor:
    """Pure-torch reference and CPU fallback.

    x: [B, ...] float32 state; m_s: [B, ...] student prediction; n: [B, ...] float32 guidance re-noise;
    m_t: [2B, ...] CFG teacher prediction (uncond half first) or [B, ...] embedded-guidance teacher
    prediction (used as is; cfg not read); z: [B, ...] float32 fresh noise or None;
    coef: [N, 8]; gcoef: [G, B, 4]; lam, cfg: [B] float32 device tensors; k: host int; x_out: [B, ...]
    float32 (may be ``x``); xin_out: next model input or None. Returns ``x_out``.
    """
    B, nd = x.shape[0], x.dim()
    c, g = coef[k], gcoef[k]
    m = m_s.float()
    x0 = c[COL_PX] * x + c[COL_PM] * m
    e = c[COL_QX] * x + c[COL_QM] * m
    xs = bcast(g[:, GCOL_A], nd) * x0 + bcast(g[:, GCOL_S], nd) * n
    if m_t.shape[0] == 2 * B:
        mu, mc = m_t[:B].float(), m_t[B:].float()
        mT = mu + bcast(cfg, nd) * (mc - mu)
    else:
        mT = m_t.float()
    x0T = bcast(g[:, GCOL_TPX], nd) * xs + bcast(g[:, GCOL_TPM], nd) * mT
    x0 = x0 + bcast(lam, nd) * (x0T - x0)
    nxt = native_next(c, x0, e, z)
    x_out.copy_(nxt)
    if xin_out is not None:
        xin_out.copy_(c[COL_CIN_NEXT] * nxt)
    return x_out


@functools.cache
def _kernel():
    """The jitted Triton kernel, built on first use so that importing distpp.kernels never imports triton.

    ``tl`` is bound as a module global (not a closure variable) because triton < 3.3 resolves the names
    a kernel uses from its module's globals only.
    """
    global tl
    import triton
    import triton.language as tl

    bind_table_columns(globals())

    @triton.jit
    def _guided_update_kernel(x_ptr, m_ptr, n_ptr, mt_ptr, z_ptr, c_ptr, g_ptr, lam_ptr, cfg_ptr, xo_ptr, xin_ptr,
                              per_sample, half_numel, HAS_Z: tl.constexpr, HAS_XIN: tl.constexpr,
                              CFG_PAIR: tl.constexpr, BLOCK: tl.constexpr):
        # Grid (blocks per sample, B). c_ptr: row k of coef; g_ptr: gcoef[k] [B, _NG]; columns by the
        # constexpr names bind_table_columns gives them; m_t rows: uncond b, cond B + b when CFG_PAIR,
        # else row b is the embedded-guidance teacher's prediction (cfg_ptr not read).
        b = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = j < per_sample
        offs = b * per_sample + j
        x = tl.load(x_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        n = tl.load(n_ptr + offs, mask=mask)
        mu = tl.load(mt_ptr + offs, mask=mask).to(tl.float32)
        x0 = tl.load(c_ptr + _PX) * x + tl.load(c_ptr + _PM) * m
        e = tl.load(c_ptr + _QX) * x + tl.load(c_ptr + _QM) * m
        xs = tl.load(g_ptr + _NG * b + _GA) * x0 + tl.load(g_ptr + _NG * b + _GS) * n
        if CFG_PAIR:
            mc = tl.load(mt_ptr + half_numel + offs, mask=mask).to(tl.float32)
            m_teacher = mu + tl.load(cfg_ptr + b) * (mc - mu)
        else:
            m_teacher = mu
        x0_teacher = tl.load(g_ptr + _NG * b + _GTPX) * xs + tl.load(g_ptr + _NG * b + _GTPM) * m_teacher
        x0 = x0 + tl.load(lam_ptr + b) * (x0_teacher - x0)
        nxt = tl.load(c_ptr + _A) * x0 + tl.load(c_ptr + _B) * e
        if HAS_Z:
            nxt += tl.load(c_ptr + _C) * tl.load(z_ptr + offs, mask=mask)
        tl.store(xo_ptr + offs, nxt, mask=mask)
        if HAS_XIN:
            xin = tl.load(c_ptr + _CIN) * nxt
            tl.store(xin_ptr + offs, xin.to(xin_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    return _guided_update_kernel


def guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out):
    """Triton launcher (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract as
    :func:`guided_update_ref`. One launch; lam and cfg are read on the device (no host sync)."""
    halves = check_guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out)
    B = x.shape[0]
    per = x.numel() // B
    block = launch_block(per)
    _kernel()[(triton_cdiv(per, block), B)](
        x, m_s, n, m_t, x if z is None else z, coef[k], gcoef[k], lam, cfg, x_out,
        x_out if xin_out is None else xin_out, per, x.numel(),
        HAS_Z=z is not None, HAS_XIN=xin_out is not None, CFG_PAIR=halves == 2, BLOCK=block)
    return x_out

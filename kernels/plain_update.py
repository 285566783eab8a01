"""plain_update: an unguided step. x0 and the student's noise estimate from its prediction, then the
family's native update; also writes the next model input.

    x0      = P_x[k] * x + P_m[k] * m_s
    e       = Q_x[k] * x + Q_m[k] * m_s
    x_next  = A[k] * x0 + B[k] * e + C[k] * z         (z only where the step draws fresh noise)
    xin_out = c_in[k + 1] * x_next                     (cast to the model dtype; skipped when None)
"""

from __future__ import annotations

import functools

import torch

from distpp.schedules import COL_A, COL_B, COL_C, COL_CIN_NEXT, COL_PM, COL_PX, COL_QM, COL_QX, NUM_COLS

from ._common import bind_table_columns, check_latent, check_step, check_table, launch_block, triton_cdiv


def check_plain_update(x, m_s, z, coef, k, x_out, xin_out) -> None:
    check_latent("x", x, x, dtypes=(torch.float32,))
    check_latent("m_s", m_s, x)
    if z is not None:
        check_latent("z", z, x, dtypes=(torch.float32,))
    check_latent("x_out", x_out, x, dtypes=(torch.float32,))
    if xin_out is not None:
        check_latent("xin_out", xin_out, x)
    check_table("coef", coef, x, NUM_COLS)
    check_step(k, coef, "coef")


def native_next(c: torch.Tensor, x0: torch.Tensor, e: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """The family's native update from a (possibly guided) x0: A*x0 + B*e (+ C*z)."""
    nxt = c[COL_A] * x0 + c[COL_B] * e
    if z is not None:
        nxt = nxt + c[COL_C] * z
    return nxt


def plain_update_ref(x: torch.Tensor, m_s: torch.Tensor, z: torch.Tensor | None, coef: torch.Tensor, k: int,
                     x_out: torch.Tensor, xin_out: torch.Tensor | None) -> torch.Tensor:
    """Pure-torch reference and CPU fallback.

    x: [B, ...] float32 state; m_s: [B, ...] student prediction; z: [B, ...] float32 fresh noise of
    step k or None; coef: [N, 8] float32; k: host int; x_out: [B, ...] float32 (may be ``x``);
    xin_out: [B, ...] next model input (model dtype) or None. Returns ``x_out``.
    """
    c = coef[k]
    m = m_s.float()
    x0 = c[COL_PX] * x + c[COL_PM] * m
    e = c[COL_QX] * x + c[COL_QM] * m
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
    def _plain_update_kernel(x_ptr, m_ptr, z_ptr, c_ptr, xo_ptr, xin_ptr, per_sample,
                             HAS_Z: tl.constexpr, HAS_XIN: tl.constexpr, BLOCK: tl.constexpr):
        # Grid (blocks per sample, B). c_ptr points at row k of coef; columns by the constexpr names
        # bind_table_columns gives distpp.schedules' COL_* indices.
        b = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = j < per_sample
        offs = b * per_sample + j
        x = tl.load(x_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        x0 = tl.load(c_ptr + _PX) * x + tl.load(c_ptr + _PM) * m
        e = tl.load(c_ptr + _QX) * x + tl.load(c_ptr + _QM) * m
        nxt = tl.load(c_ptr + _A) * x0 + tl.load(c_ptr + _B) * e
        if HAS_Z:
            nxt += tl.load(c_ptr + _C) * tl.load(z_ptr + offs, mask=mask)
        tl.store(xo_ptr + offs, nxt, mask=mask)
        if HAS_XIN:
            xin = tl.load(c_ptr + _CIN) * nxt
            tl.store(xin_ptr + offs, xin.to(xin_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    return _plain_update_kernel


def plain_update(x, m_s, z, coef, k, x_out, xin_out):
    """Triton launcher (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract as
    :func:`plain_update_ref`. One launch; no host sync."""
    check_plain_update(x, m_s, z, coef, k, x_out, xin_out)
    B = x.shape[0]
    per = x.numel() // B
    block = launch_block(per)
    _kernel()[(triton_cdiv(per, block), B)](
        x, m_s, x if z is None else z, coef[k], x_out, x_out if xin_out is None else xin_out, per,
        HAS_Z=z is not None, HAS_XIN=xin_out is not None, BLOCK=block)
    return x_out

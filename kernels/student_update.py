"""student_update: on a guided step, the student's x0 re-noised to the teacher's level, written into
the teacher's input buffer: both halves of a CFG teacher's batch-2B input, or the B rows of an
embedded-guidance teacher's (the form is read from ``out``'s rows, see ``teacher_halves``).

    x0         = P_x[k] * x + P_m[k] * m_s            (family x0, incl. LCM c_skip/c_out)
    x_s        = a_s[k, b] * x0 + s_s[k, b] * n       (VP variables: what a diffusers UNet takes)
    out[b]     = out[B + b] = x_s                     (CFG, 2B rows: uncond half, cond half)
    out[b]     = x_s                                  (embedded guidance, B rows)
"""

from __future__ import annotations

import functools

import torch

from distpp.schedules import COL_PM, COL_PX, GCOL_A, GCOL_S, NUM_COLS, NUM_GCOLS

from ._common import (bcast, bind_table_columns, check_gcoef, check_latent, check_step, check_table, launch_block,
                      teacher_halves, triton_cdiv)


def check_student_update(x, m_s, n, coef, gcoef, k, out) -> int:
    """Raise InputError for bad arguments; returns the teacher form (2: CFG pair, 1: embedded guidance)."""
    check_latent("x", x, x, dtypes=(torch.float32,))
    check_latent("m_s", m_s, x)
    check_latent("n", n, x, dtypes=(torch.float32,))
    halves = teacher_halves("out", out, x)
    check_table("coef", coef, x, NUM_COLS)
    check_gcoef(gcoef, x, NUM_GCOLS)
    check_step(k, coef, "coef")
    check_step(k, gcoef, "gcoef")
    return halves


def student_update_ref(x: torch.Tensor, m_s: torch.Tensor, n: torch.Tensor, coef: torch.Tensor,
                       gcoef: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference and CPU fallback.

    x: [B, ...] float32 state; m_s: [B, ...] student prediction (fp32/fp16/bf16); n: [B, ...] float32
    guidance re-noise of step k; coef: [N, 8] float32 schedule table; gcoef: [G, B, 4] float32 guidance
    table; k: host int step index; out: teacher input buffer (its own dtype), [2B, ...] for a CFG teacher
    (both halves get x_s) or [B, ...] for an embedded-guidance teacher. Returns ``out``.
    """
    B = x.shape[0]
    c, g = coef[k], gcoef[k]
    x0 = c[COL_PX] * x + c[COL_PM] * m_s.float()
    xs = bcast(g[:, GCOL_A], x.dim()) * x0 + bcast(g[:, GCOL_S], x.dim()) * n
    out[:B].copy_(xs)
    if out.shape[0] == 2 * B:
        out[B:].copy_(xs)
    return out


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
    def _student_update_kernel(x_ptr, m_ptr, n_ptr, c_ptr, g_ptr, out_ptr, per_sample, half_numel,
                               CFG_PAIR: tl.constexpr, BLOCK: tl.constexpr):
        # Grid (blocks per sample, B). c_ptr: row k of coef; g_ptr: gcoef[k] [B, _NG]; columns by the
        # constexpr names bind_table_columns gives them. CFG_PAIR: out is [2B, ...] and the same x_s goes
        # to rows b and B + b; else out is [B, ...] (embedded-guidance teacher).
        b = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = j < per_sample
        offs = b * per_sample + j
        x = tl.load(x_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        n = tl.load(n_ptr + offs, mask=mask)
        x0 = tl.load(c_ptr + _PX) * x + tl.load(c_ptr + _PM) * m
        xs = tl.load(g_ptr + _NG * b + _GA) * x0 + tl.load(g_ptr + _NG * b + _GS) * n
        xs = xs.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_ptr + offs, xs, mask=mask)
        if CFG_PAIR:
            tl.store(out_ptr + half_numel + offs, xs, mask=mask)

    return _student_update_kernel


def student_update(x, m_s, n, coef, gcoef, k, out):
    """Triton launcher (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract as
    :func:`student_update_ref`. One launch; no host sync."""
    halves = check_student_update(x, m_s, n, coef, gcoef, k, out)
    B = x.shape[0]
    per = x.numel() // B
    block = launch_block(per)
    _kernel()[(triton_cdiv(per, block), B)](x, m_s, n, coef[k], gcoef[k], out, per, x.numel(),
                                            CFG_PAIR=halves == 2, BLOCK=block)
    return out

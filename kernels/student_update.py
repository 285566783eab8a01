"""student_update: on a guided step, the student's x0 re-noised to the teacher's level, written into
both halves of the teacher's batch-2B input buffer.

    x0         = P_x[k] * x + P_m[k] * m_s            (family x0, incl. LCM c_skip/c_out)
    x_s        = a_s[k, b] * x0 + s_s[k, b] * n       (VP variables: what a diffusers UNet takes)
    out[b]     = out[B + b] = x_s                     (uncond half, cond half)
"""

from __future__ import annotations

import torch

from distpp.schedules import COL_PM, COL_PX, GCOL_A, GCOL_S, NUM_COLS, NUM_GCOLS

from ._common import bcast, check_latent, check_step, check_table


def check_student_update(x, m_s, n, coef, gcoef, k, out) -> None:
    check_latent("x", x, x, dtypes=(torch.float32,))
    check_latent("m_s", m_s, x)
    check_latent("n", n, x, dtypes=(torch.float32,))
    check_latent("out", out, x, batch=2 * x.shape[0])
    check_table("coef", coef, x, NUM_COLS)
    check_table("gcoef", gcoef, x, NUM_GCOLS)
    check_step(k, coef, "coef")
    check_step(k, gcoef, "gcoef")
    if gcoef.shape[1] != x.shape[0]:
        from distpp.errors import InputError

        raise InputError(f"gcoef has {gcoef.shape[1]} samples per step; the latents have {x.shape[0]}")


def student_update_ref(x: torch.Tensor, m_s: torch.Tensor, n: torch.Tensor, coef: torch.Tensor,
                       gcoef: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference and CPU fallback.

    x: [B, ...] float32 state; m_s: [B, ...] student prediction (fp32/fp16/bf16); n: [B, ...] float32
    guidance re-noise of step k; coef: [N, 8] float32 schedule table; gcoef: [G, B, 4] float32 guidance
    table; k: host int step index; out: [2B, ...] teacher input buffer (its own dtype). Returns ``out``.
    """
    B = x.shape[0]
    c, g = coef[k], gcoef[k]
    x0 = c[COL_PX] * x + c[COL_PM] * m_s.float()
    xs = bcast(g[:, GCOL_A], x.dim()) * x0 + bcast(g[:, GCOL_S], x.dim()) * n
    out[:B].copy_(xs)
    out[B:].copy_(xs)
    return out


def student_update(x, m_s, n, coef, gcoef, k, out):
    """Triton launcher (CUDA tensors); same contract as :func:`student_update_ref`."""
    from ._triton import launch_student_update

    check_student_update(x, m_s, n, coef, gcoef, k, out)
    return launch_student_update(x, m_s, n, coef, gcoef, k, out)

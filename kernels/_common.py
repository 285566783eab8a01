"""Shared checks for the fused ops' Python launchers and references."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_latent(name: str, t: torch.Tensor, like: torch.Tensor, batch: int | None = None,
                 dtypes=FLOAT_DTYPES) -> None:
    """Raise InputError unless ``t`` is a contiguous float latent on ``like``'s device with ``like``'s
    per-sample shape (and ``batch`` samples when given)."""
    from distpp.errors import InputError

    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise InputError(f"{name} has dtype {t.dtype}; pass one of {', '.join(str(d) for d in dtypes)}")
    if t.device != like.device:
        raise InputError(f"{name} is on {t.device} but the latents are on {like.device}; move it there")
    b = like.shape[0] if batch is None else batch
    if tuple(t.shape) != (b,) + tuple(like.shape[1:]):
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected {(b,) + tuple(like.shape[1:])}")
    if not t.is_contiguous():
        raise InputError(f"{name} must be contiguous; call .contiguous() first")


def check_table(name: str, t: torch.Tensor, like: torch.Tensor, ncols: int) -> None:
    from distpp.errors import InputError

    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a float32 torch.Tensor table [..., {ncols}], got {type(t).__name__}")
    if t.dtype != torch.float32 or t.device != like.device or t.shape[-1] != ncols or not t.is_contiguous():
        raise InputError(f"{name} must be a contiguous float32 table [..., {ncols}] on {like.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def check_gcoef(gcoef: torch.Tensor, like: torch.Tensor, ncols: int) -> None:
    """gcoef must be a contiguous float32 [G, B, ncols] table with B = the latents' batch."""
    from distpp.errors import InputError

    check_table("gcoef", gcoef, like, ncols)
    if gcoef.dim() != 3 or gcoef.shape[1] != like.shape[0]:
        raise InputError(f"gcoef must be [G, {like.shape[0]}, {ncols}] (one row per sample), "
                         f"got {tuple(gcoef.shape)}")


def check_step(k: int, table: torch.Tensor, name: str) -> None:
    from distpp.errors import InputError

    if not (0 <= int(k) < table.shape[0]):
        raise InputError(f"step index {k} is outside {name}'s {table.shape[0]} rows")


def bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-sample [B] vector viewed for broadcasting against a [B, ...] latent."""
    return v.view((v.shape[0],) + (1,) * (ndim - 1))


def launch_block(per_sample: int) -> int:
    """Elements per Triton program: 1024 (4 warps x 32 lanes x 8 elements, i.e. two 16-byte fp32
    accesses per lane) for real latents; for tiny ones the smallest power of two >= per_sample, so an
    8x8 test latent is one program instead of 1024 mostly masked lanes (the interpreter's cost is per
    lane)."""
    if per_sample >= 1024:
        return 1024
    return max(16, 1 << (int(per_sample) - 1).bit_length())


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def teacher_halves(name: str, t: torch.Tensor, like: torch.Tensor, dtypes=FLOAT_DTYPES) -> int:
    """The teacher form read from the rows of ``t`` (the teacher's input ``out`` or prediction ``m_t``)
    against the B latents ``like``: 2 for the CFG pair ([uncond B; cond B], 2B rows), 1 for an
    embedded-guidance teacher (B rows, guidance inside the teacher). InputError for any other shape,
    else the checks of :func:`check_latent` at that row count."""
    from distpp.errors import InputError

    if not isinstance(t, torch.Tensor):
        check_latent(name, t, like)  # raises: not a tensor
    B = like.shape[0]
    rows = t.shape[0] if t.dim() >= 1 else None
    if rows not in (B, 2 * B):
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected "
                         f"{(2 * B,) + tuple(like.shape[1:])} (a CFG teacher: uncond rows, then cond) or "
                         f"{(B,) + tuple(like.shape[1:])} (an embedded-guidance teacher)")
    check_latent(name, t, like, batch=rows, dtypes=dtypes)
    return rows // B


def bind_table_columns(namespace: dict) -> None:
    """Bind the schedule tables' column indices as Triton constexpr globals in a kernel module's
    ``namespace``: coef columns ``_PX, _PM, _QX, _QM, _A, _B, _C, _CIN`` (distpp.schedules.COL_*), gcoef
    columns ``_GA, _GS, _GTPX, _GTPM`` (GCOL_*) and its row stride ``_NG`` (NUM_GCOLS). Kernels then read
    a column by the name the references use, so a layout change reaches every implementation at once.
    (Triton lets a kernel read a global only when it is a ``tl.constexpr``; called from ``_kernel()`` so
    importing distpp.kernels never imports triton.)"""
    import triton.language as tl

    from distpp import schedules as s

    cols = dict(_PX=s.COL_PX, _PM=s.COL_PM, _QX=s.COL_QX, _QM=s.COL_QM, _A=s.COL_A, _B=s.COL_B, _C=s.COL_C,
                _CIN=s.COL_CIN_NEXT, _GA=s.GCOL_A, _GS=s.GCOL_S, _GTPX=s.GCOL_TPX, _GTPM=s.GCOL_TPM, _NG=s.NUM_GCOLS)
    namespace.update({name: tl.constexpr(v) for name, v in cols.items()})

"""Random inputs of the three fused ops and their float64 ground truth, shared by the op tests.

Coefficients are random but of the sizes real schedules have (|c| <= ~2), the latents are unit normal,
so float32 arithmetic sits near 1e-7 relative and the low-precision inputs dominate their dtype's error.
"""

from __future__ import annotations

import torch

from distpp.schedules import NUM_COLS, NUM_GCOLS

# rel-norm tolerance vs float64 for the dtype of m_s / m_t / out / xin_out. Each is ~2x the error of
# the plain torch op in that dtype (fp16: 2^-11 ~ 4.9e-4 rounding of inputs and outputs; bf16: 2^-8).
TOLS = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Odd sizes (not multiples of 16 or of the block), batch 1, and one tile-crossing per-sample size.
SHAPES = [(1, 4, 8, 8), (2, 3, 5, 7), (3, 1, 1, 17), (1, 4, 33, 35)]


def seed_of(*parts) -> int:
    """A seed fixed by the test parameters (str hashes are salted per process; crc32 is not)."""
    import zlib

    return zlib.crc32(repr(parts).encode()) % 10000


# Teacher forms of student_update's out / guided_update's m_t: rows per sample (CFG pair, embedded guidance).
FORMS = {"cfg": 2, "embedded": 1}


def make_case(shape, dtype, device="cpu", seed=0, steps=5, guided=3, with_z=True, with_xin=True, form="cfg"):
    """Random op inputs; ``form`` "embedded" gives m_t B rows (an embedded-guidance teacher), "cfg" 2B."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]

    def randn(*s, dt=torch.float32):
        return torch.randn(*s, generator=g).to(dt).to(device)

    coef = (torch.rand(steps, NUM_COLS, generator=g) * 2 - 0.5).to(device)
    gcoef = (torch.rand(guided, B, NUM_GCOLS, generator=g) * 1.5 + 0.1).to(device)
    return dict(
        x=randn(*shape), m_s=randn(*shape, dt=dtype), n=randn(*shape),
        m_t=randn(FORMS[form] * B, *shape[1:], dt=dtype), z=randn(*shape) if with_z else None,
        coef=coef, gcoef=gcoef,
        lam=(torch.rand(B, generator=g) * 0.5 + 0.05).to(device),
        cfg=(torch.rand(B, generator=g) * 7 + 1).to(device),
        k=guided - 1, xin_dtype=dtype if with_xin else None,
    )


def poisoned(shape, dtype, device):
    """An output buffer filled with NaN, so an element the kernel misses shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def f64(case):
    """The case's tensors as float64 (ground truth inputs), tables included."""
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _bc(v, ndim):
    return v.view((v.shape[0],) + (1,) * (ndim - 1))


def truth_plain(c):
    """float64 x_next and xin_out of plain_update (docstring math of kernels/plain_update.py)."""
    d = f64(c)
    row = d["coef"][d["k"]]
    x0 = row[0] * d["x"] + row[1] * d["m_s"]
    e = row[2] * d["x"] + row[3] * d["m_s"]
    nxt = row[4] * x0 + row[5] * e + (row[6] * d["z"] if d["z"] is not None else 0)
    return nxt, row[7] * nxt


def truth_student(c, rows=None):
    """float64 teacher input of student_update: [2B, ...] (CFG pair, both halves x_s), or [B, ...] when
    ``rows`` is B (embedded guidance); default: the case's teacher form (m_t's rows)."""
    d = f64(c)
    row, g = d["coef"][d["k"]], d["gcoef"][d["k"]]
    x0 = row[0] * d["x"] + row[1] * d["m_s"]
    xs = _bc(g[:, 0], x0.dim()) * x0 + _bc(g[:, 1], x0.dim()) * d["n"]
    rows = d["m_t"].shape[0] if rows is None else rows
    return xs if rows == d["x"].shape[0] else torch.cat([xs, xs])


def truth_guided(c):
    """float64 x_next and xin_out of guided_update."""
    d = f64(c)
    row, g, B, nd = d["coef"][d["k"]], d["gcoef"][d["k"]], d["x"].shape[0], d["x"].dim()
    x0 = row[0] * d["x"] + row[1] * d["m_s"]
    e = row[2] * d["x"] + row[3] * d["m_s"]
    xs = _bc(g[:, 0], nd) * x0 + _bc(g[:, 1], nd) * d["n"]
    if d["m_t"].shape[0] == B:  # embedded-guidance teacher: its prediction is already guided
        mT = d["m_t"]
    else:
        mu, mc = d["m_t"][:B], d["m_t"][B:]
        mT = mu + _bc(d["cfg"], nd) * (mc - mu)
    x0T = _bc(g[:, 2], nd) * xs + _bc(g[:, 3], nd) * mT
    x0g = (1 - _bc(d["lam"], nd)) * x0 + _bc(d["lam"], nd) * x0T
    nxt = row[4] * x0g + row[5] * e + (row[6] * d["z"] if d["z"] is not None else 0)
    return nxt, row[7] * nxt


def interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_against(out, ref_out, truth, tol, what):
    """out (kernel) and ref_out (torch reference) vs float64 truth: within tol, and at most ~2x the
    reference's own error (plus a float32 floor) so a kernel cannot hide behind a loose tolerance."""
    from helpers import rel_err

    e_k, e_r = rel_err(out, truth), rel_err(ref_out, truth)
    assert e_k <= tol, f"{what}: kernel relative error {e_k:.3e} > {tol:.1e}"
    # Triton's interpreter (3.9) truncates float32 -> bfloat16 whatever rounding is asked for, which is
    # 2x the RMS error of round-to-nearest-even (what the GPU does, and torch) plus a bias; with 51-element
    # cases the ratio spreads, so allow 3x there.
    factor = 3.0 if out.dtype == torch.bfloat16 and interpreted() else 2.0
    assert e_k <= factor * e_r + 1e-6, f"{what}: kernel error {e_k:.3e} > {factor}x the torch reference's {e_r:.3e}"

"""plain_update: the Triton kernel (interpreted on CPU) vs the torch reference vs float64 truth."""

import pytest
import torch

from distpp.errors import InputError
from distpp.kernels import plain_update as op
from op_cases import SHAPES, TOLS, check_against, make_case, poisoned, seed_of, truth_plain

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, c):
    x = c["x"]
    x_out = poisoned(x.shape, torch.float32, x.device)
    xin = poisoned(x.shape, c["xin_dtype"], x.device) if c["xin_dtype"] is not None else None
    fn(x, c["m_s"], c["z"], c["coef"], c["k"], x_out, xin)
    return x_out, xin


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_z,with_xin", [(True, True), (False, False)])
def test_matches_reference_and_float64(dtype, shape, with_z, with_xin):
    c = make_case(shape, dtype, DEV, seed=seed_of(shape, dtype), with_z=with_z, with_xin=with_xin)
    (xo, xi), (xo_r, xi_r) = _run(op.plain_update, c), _run(op.plain_update_ref, c)
    nxt, xin = truth_plain(c)
    check_against(xo, xo_r, nxt, TOLS[torch.float32], "x_out")
    if with_xin:
        assert xi.dtype == dtype
        check_against(xi, xi_r, xin, TOLS[dtype], "xin_out")


def test_in_place_x_out():
    c = make_case((2, 4, 8, 8), torch.float16, DEV, seed=3)
    nxt, _ = truth_plain(c)
    x = c["x"].clone()
    op.plain_update(x, c["m_s"], c["z"], c["coef"], c["k"], x, None)
    ref = c["x"].clone()
    op.plain_update_ref(ref, c["m_s"], c["z"], c["coef"], c["k"], ref, None)
    check_against(x, ref, nxt, TOLS[torch.float32], "in-place x")


@pytest.mark.parametrize("bad,match", [
    (dict(x=lambda c: c["x"].half()), "x has dtype"),
    (dict(m_s=lambda c: c["m_s"][:, :, :, :-1].contiguous()), "m_s has shape"),
    (dict(m_s=lambda c: c["m_s"].transpose(2, 3)), "m_s has shape|contiguous"),
    (dict(z=lambda c: c["z"].double()), "z has dtype"),
    (dict(coef=lambda c: c["coef"][:, :7].contiguous()), "coef must be"),
    (dict(k=lambda c: 99), "step index 99"),
])
def test_bad_input_raises_clear_error(bad, match):
    c = make_case((2, 4, 8, 8), torch.float32, DEV)
    for name, f in bad.items():
        c[name] = f(c)
    with pytest.raises(InputError, match=match):
        _run(op.plain_update, c)

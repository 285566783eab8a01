"""The three fused ops on flow tables (P_x = 1, P_m = -sig, Q_x = 1, Q_m = 1 - sig, A = 1 - sig_next,
B = sig_next or C = sig_next with stochastic sampling; guidance rows (1 - sig_s, sig_s, 1, -sig_s), sig_s = 1
included): every implementation (torch, Triton, the C++ host library) agrees with float64 truth and the
torch reference."""

import pytest
import torch

from distpp.families import teacher_rows
from distpp.kernels import guided_update as gu_op
from distpp.kernels import guided_update_ref, plain_update_ref, student_update_ref
from distpp.kernels import plain_update as pu_op
from distpp.kernels import student_update as su_op
from distpp.schedules import build_schedule
from op_cases import TOLS, check_against, make_case, poisoned, seed_of, truth_guided, truth_plain, truth_student
from test_csrc_host import host_lib  # noqa: F401 (the compiled host library, a fixture)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def flow_case(shape, stochastic):
    """Random latents (make_case) on a 4-step SD3-style flow schedule; guidance rows at sigma 1 (the
    "same" rule's first level), the next sigmas and one drawn in between."""
    N, B = 4, shape[0]
    c = make_case(shape, torch.float32, DEV, seed=seed_of(shape, stochastic, "flow"), steps=N, guided=N,
                  with_z=stochastic)
    sch = build_schedule("flow", N, family_options=dict(stochastic_sampling=stochastic), device=DEV)
    sig = torch.cat([torch.ones(1, B, dtype=torch.float64),
                     sch.s_next.double()[:N - 1, None].expand(N - 1, B).cpu().clone()])
    sig[1, -1] = 0.5 * (float(sch.s[1]) + float(sch.s_next[1]))
    c["coef"] = sch.coef
    c["gcoef"] = teacher_rows(1 - sig, sig, "flow").float().contiguous().to(DEV)
    return c, sch


def _ops(impl, lib):
    if impl == "ref":
        return student_update_ref, plain_update_ref, guided_update_ref
    if impl == "triton":
        return su_op.student_update, pu_op.plain_update, gu_op.guided_update
    return lib.student_update, lib.plain_update, lib.guided_update


def _run(ops, c, k):
    su, pu, gu = ops
    x, B, shape = c["x"], c["x"].shape[0], tuple(c["x"].shape)
    s_out = poisoned((2 * B,) + shape[1:], torch.float32, DEV)
    p_out, p_xin = poisoned(shape, torch.float32, DEV), poisoned(shape, torch.float32, DEV)
    g_out, g_xin = poisoned(shape, torch.float32, DEV), poisoned(shape, torch.float32, DEV)
    su(x, c["m_s"], c["n"], c["coef"], c["gcoef"], k, s_out)
    pu(x, c["m_s"], c["z"], c["coef"], k, p_out, p_xin)
    gu(x, c["m_s"], c["n"], c["m_t"], c["z"], c["coef"], c["gcoef"], c["lam"], c["cfg"], k, g_out, g_xin)
    return s_out, p_out, p_xin, g_out, g_xin


@pytest.mark.parametrize("impl", ["triton", "host"])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 1, 1, 17)])
def test_fused_ops_on_flow_tables(request, impl, stochastic, shape):
    lib = request.getfixturevalue("host_lib") if impl == "host" else None
    if impl == "host" and DEV != "cpu":
        pytest.skip("the host library takes host pointers (the CUDA build is checked in test_ops_cuda.py)")
    c, sch = flow_case(shape, stochastic)
    assert sch.coef[0, :4].tolist() == [1.0, -1.0, 1.0, 0.0]  # sig = 1: x0 = x - v, e = x
    tol = TOLS[torch.float32]
    for k in range(sch.steps):
        c["k"] = k
        s_o, p_o, p_x, g_o, g_x = _run(_ops(impl, lib), c, k)
        s_r, p_r, px_r, g_r, gx_r = _run(_ops("ref", None), c, k)
        check_against(s_o, s_r, truth_student(c), tol, f"student_update k={k}")
        nxt, xin = truth_plain(c)
        check_against(p_o, p_r, nxt, tol, f"plain_update k={k}")
        check_against(p_x, px_r, xin, tol, f"plain_update xin k={k}")
        nxt, xin = truth_guided(c)
        check_against(g_o, g_r, nxt, tol, f"guided_update k={k}")
        check_against(g_x, gx_r, xin, tol, f"guided_update xin k={k}")

"""GPU tier: the compiled Triton ops and the CUDA library (csrc/) vs the torch references and float64
truth, on the vectorized path (SD1.5 latents) and the scalar path (odd sizes, offset buffers)."""

import pytest
import torch

from distpp.kernels import guided_update, plain_update, student_update
from op_cases import FORMS, TOLS, check_against, make_case, poisoned, seed_of, truth_guided, truth_plain, truth_student

pytestmark = pytest.mark.cuda

SHAPES = [(1, 4, 64, 64), (3, 4, 64, 64), (2, 3, 5, 7), (1, 4, 33, 35)]


def _impls():
    from distpp import csrc_ops

    impls = {"triton": (student_update.student_update, guided_update.guided_update, plain_update.plain_update)}
    lib = csrc_ops.load()  # on a GPU machine the CUDA build is expected (benchmarks/gpu_check.sh builds it)
    impls["cuda"] = (lib.student_update, lib.guided_update, lib.plain_update)
    return impls


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_ops_match_reference(impl, dtype, shape, form):
    """Both teacher forms: CFG (m_t / out 2B rows) and embedded guidance (B rows)."""
    su, gu, pu = _impls()[impl]
    c = make_case(shape, dtype, "cuda", seed=seed_of(shape, dtype), form=form)
    x, B = c["x"], shape[0]
    res = {}
    for name, (s_fn, g_fn, p_fn) in (("k", (su, gu, pu)), ("r", (student_update.student_update_ref,
                                                                   guided_update.guided_update_ref,
                                                                   plain_update.plain_update_ref))):
        s_out = poisoned((FORMS[form] * B,) + shape[1:], dtype, "cuda")
        g_out, g_xin = poisoned(shape, torch.float32, "cuda"), poisoned(shape, dtype, "cuda")
        p_out, p_xin = poisoned(shape, torch.float32, "cuda"), poisoned(shape, dtype, "cuda")
        s_fn(x, c["m_s"], c["n"], c["coef"], c["gcoef"], c["k"], s_out)
        g_fn(x, c["m_s"], c["n"], c["m_t"], c["z"], c["coef"], c["gcoef"], c["lam"], c["cfg"], c["k"], g_out, g_xin)
        p_fn(x, c["m_s"], None, c["coef"], c["k"], p_out, p_xin)
        res[name] = (s_out, g_out, g_xin, p_out, p_xin)
    torch.cuda.synchronize()
    (s, g, gi, p, pi), (s_r, g_r, gi_r, p_r, pi_r) = res["k"], res["r"]
    c_noz = dict(c, z=None)
    check_against(s, s_r, truth_student(c), TOLS[dtype], f"{impl} student out")
    check_against(g, g_r, truth_guided(c)[0], TOLS[torch.float32], f"{impl} guided x_out")
    check_against(gi, gi_r, truth_guided(c)[1], TOLS[dtype], f"{impl} guided xin_out")
    check_against(p, p_r, truth_plain(c_noz)[0], TOLS[torch.float32], f"{impl} plain x_out")
    check_against(pi, pi_r, truth_plain(c_noz)[1], TOLS[dtype], f"{impl} plain xin_out")


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_unaligned_buffers_take_the_scalar_path(impl):
    """Buffers offset by one element (4-byte, not 16-byte aligned) still give the right answer."""
    _, _, pu = _impls()[impl]
    c = make_case((2, 4, 16, 16), torch.float16, "cuda", seed=4)
    x = torch.empty(c["x"].numel() + 1, device="cuda")[1:].view_as(c["x"]).copy_(c["x"])
    c["x"] = x
    out = torch.empty(x.numel() + 1, device="cuda")[1:].view_as(x).fill_(float("nan"))
    pu(x, c["m_s"], c["z"], c["coef"], c["k"], out, None)
    ref = torch.empty_like(out)
    plain_update.plain_update_ref(x, c["m_s"], c["z"], c["coef"], c["k"], ref, None)
    check_against(out, ref, truth_plain(c)[0], TOLS[torch.float32], f"{impl} unaligned")


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_sampler_matches_torch(impl):
    from distpp import Sampler, SamplerConfig
    from distpp.presets import build_preset
    from helpers import rel_err

    # cuDNN convolutions default to TF32 on Ampere+; the ops' fp32 rounding differences (FMA order) would be
    # amplified by TF32 UNet forwards over 4 steps (measured 6e-5 on an H100 with TF32 left on). Full fp32 here.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        pair = build_preset("tiny", device="cuda")
        cond, uncond = pair.random_cond(2, seed=3)
        outs = {}
        for name in ("torch", impl):
            s = Sampler(pair.student, pair.teacher, SamplerConfig(family="lcm", steps=4, guided_steps=2, lam=0.3,
                                                                   kernel_impl=name))
            outs[name] = s.sample(cond, uncond=uncond, latent_shape=(4, 16, 16), seeds=[1, 2])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert rel_err(outs[impl], outs["torch"]) <= 2e-5

"""channels_last UNets (issue 13 item 8): a UNet moved to ``memory_format=torch.channels_last`` returns
predictions that are not contiguous; every fused-op implementation must take them and give the result
of the same UNet in the default layout. The loop copies such a prediction into the plan's contiguous
buffer (allocated once per call in prepare, or once per key by the graph runner), never per step.
The csrc host library's twin of these tests is in tests/kernels/test_csrc_host.py."""

import pytest
import torch

from distpp import GraphRunner, Sampler, SamplerConfig, run_loop
from distpp.ops import FusedOps
from helpers import channels_last_pair, rel_err

LATENT = (4, 8, 8)
CASES = [("lcm", 2), ("euler_a", 1)]  # guided + plain steps; euler_a also draws fresh noise


@pytest.fixture(scope="module")
def cl_pair(tiny_pair):
    return channels_last_pair(tiny_pair)


def sample(student, teacher, impl, cond, uncond, family, G, runner=False):
    cfg = SamplerConfig(family=family, steps=3, guided_steps=G, lam=0.3, cfg=5.0, kernel_impl=impl)
    s = Sampler(student, teacher, cfg)
    call = GraphRunner(s, graphs=False).sample if runner else s.sample
    return call(cond, uncond=uncond, latent_shape=LATENT, seeds=[7, 8])


def test_channels_last_unet_predictions_are_not_contiguous(tiny_pair, cl_pair):
    """The premise of the tests below (a diffusers UNet in channels_last returns channels_last)."""
    cond, _ = tiny_pair.random_cond(2, seed=3)
    x, t = torch.randn((2,) + LATENT), torch.full((2,), 500.0)
    st = cl_pair[0]
    with torch.inference_mode():
        out = st(x, t, st.prepare(cond))
        ref = tiny_pair.student(x, t, tiny_pair.student.prepare(cond))
    assert not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("family,G", CASES)
def test_channels_last_unets_sample_like_contiguous_ones(tiny_pair, cl_pair, impl, family, G):
    cond, uncond = tiny_pair.random_cond(2, seed=11)
    ref = sample(tiny_pair.student, tiny_pair.teacher, "torch", cond, uncond, family, G)
    out = sample(*cl_pair, impl, cond, uncond, family, G)
    # fp32 throughout: the channels_last convolutions and the fused kernel differ from the reference
    # only in rounding order, amplified a little by the UNet over 3 steps.
    assert rel_err(out, ref) <= 1e-5
    assert ref.std() > 0.1


@pytest.mark.parametrize("family,G", CASES)
def test_graph_runner_takes_channels_last_unets(tiny_pair, cl_pair, family, G):
    """The runner's static buffers (alloc_static) include the prediction buffers too."""
    cond, uncond = tiny_pair.random_cond(2, seed=5)
    ref = sample(tiny_pair.student, tiny_pair.teacher, "torch", cond, uncond, family, G)
    out = sample(*cl_pair, "triton", cond, uncond, family, G, runner=True)
    assert rel_err(out, ref) <= 1e-5


def test_loop_copies_into_the_plan_buffers_without_allocating(tiny_pair, cl_pair):
    """Every op gets the plan's own contiguous prediction buffers for a channels_last model (one copy per
    forward, no allocation), and the model's output itself for a contiguous one (no copy)."""
    cond, uncond = tiny_pair.random_cond(2, seed=2)
    for (student, teacher), copied in ((cl_pair, True), ((tiny_pair.student, tiny_pair.teacher), False)):
        s = Sampler(student, teacher, SamplerConfig(steps=3, guided_steps=2, kernel_impl="torch"))
        seen = []

        def spy(name, fn):
            def op(x, m_s, *a):
                seen.append((name, m_s.data_ptr(), m_s.is_contiguous()) if name != "guided" else
                            (name, m_s.data_ptr(), m_s.is_contiguous(), a[1].data_ptr(), a[1].is_contiguous()))
                return fn(x, m_s, *a)
            return op

        ops = FusedOps("spy", spy("student", s.ops.student_update), spy("guided", s.ops.guided_update),
                       spy("plain", s.ops.plain_update))
        plan = s.prepare(cond, uncond=uncond, latent_shape=LATENT)
        with torch.inference_mode():
            run_loop(s.student, s.teacher, ops, s.schedule, plan)
        assert [r[0] for r in seen] == ["student", "guided", "student", "guided", "plain"]
        assert all(all(r[2::2]) for r in seen), "an op got a non-contiguous prediction"
        s_ptrs = {r[1] for r in seen}
        t_ptrs = {r[3] for r in seen if r[0] == "guided"}
        if copied:
            assert s_ptrs == {plan.m_s.data_ptr()} and t_ptrs == {plan.m_t.data_ptr()}
        else:
            assert plan.m_s.data_ptr() not in s_ptrs and plan.m_t.data_ptr() not in t_ptrs

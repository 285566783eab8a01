"""Embedded-guidance teachers (SamplerConfig(teacher_guidance="embedded"), issue 15 item 3): one batch-B
teacher forward with w as its input (Cond.guidance, filled from the call's cfg), against the CFG form on the
same math, a float64 transcription of the spec, the unguided student, and the GraphRunner's static buffers."""

import pytest
import torch

from distpp import Cond, Sampler, SamplerConfig, run_loop
from distpp.errors import ConfigError, InputError
from distpp.graphs import GraphRunner
from distpp.schedules import build_schedule
from helpers import EmbeddedCFGDenoiser, GaussianDenoiser, assert_close, gaussian_conds
from reference import reference_sample

SHAPE = (4, 5, 3)  # odd sizes on purpose
W = [2.5, 3.5, 6.0]  # per-sample guidance scales
FP32_TOL = 1e-5


def models(family, device="cpu", tpt="epsilon"):
    """(student, CFG teacher, embedded teacher computing the same CFG inside, uncond)."""
    acp = build_schedule(family, 4, device=device).alphas_cumprod
    student = GaussianDenoiser(acp, mu=0.1, sigma=0.8, shift=0.5)
    teacher = GaussianDenoiser(acp, mu=-0.2, sigma=0.6, shift=1.5, prediction_type=tpt)
    uncond = gaussian_conds(1)[1]
    return student, teacher, EmbeddedCFGDenoiser(teacher, uncond), uncond


def config(family, mode, **kw):
    base = dict(family=family, steps=4, guided_steps=2, lam=0.4, kernel_impl="torch", teacher_guidance=mode)
    base.update(kw)
    return SamplerConfig(**base)


@pytest.mark.parametrize("family,rule,impl", [
    ("lcm", "next", "torch"), ("dmd2", "random", "torch"), ("euler", "same", "torch"), ("lcm", "random", "triton"),
])
def test_embedded_teacher_equals_cfg_teacher_on_the_same_math(family, rule, impl):
    """A CFG teacher over [uncond; cond] with scale w and an embedded teacher computing that combine inside
    (w from Cond.guidance) give the same samples, per-sample w included (fp32 rounding apart)."""
    student, teacher, embedded, uncond = models(family)
    cond = gaussian_conds(3)[0]
    kw = dict(latent_shape=SHAPE, seeds=[1, 2, 3], cfg=W, lam=[0.3, 0.6, 0.9])
    cfg_out = Sampler(student, teacher, config(family, "cfg", teacher_rule=rule, kernel_impl=impl)).sample(
        cond, uncond=uncond, **kw)
    emb_out = Sampler(student, embedded, config(family, "embedded", teacher_rule=rule, kernel_impl=impl)).sample(
        cond, **kw)
    assert_close(emb_out, cfg_out, FP32_TOL, f"{family} {rule} {impl} embedded vs cfg")
    # one batch-B forward per guided step, with the call's per-sample w as its input
    assert [c[0] for c in embedded.calls] == [3, 3]
    assert all(torch.equal(c[2], torch.tensor(W)) for c in embedded.calls)
    plain = Sampler(student, None, config(family, "embedded", guided_steps=0)).sample(cond, **kw)
    assert (emb_out - plain).abs().max() > 1e-3  # guidance changed the result


@pytest.mark.parametrize("family,tpt,rule,G", [
    ("lcm", "epsilon", "next", 1), ("dmd2", "v_prediction", "random", 2), ("euler", "sample", "same", 2),
])
def test_embedded_guided_step_matches_float64_spec(family, tpt, rule, G):
    """The sampler in embedded mode vs tests/reference.py's float64 transcription of ALGORITHM.md
    ("Embedded guidance": one teacher forward on x_s with guidance = w, its prediction taken as guided)."""
    student, _, embedded, _ = models(family, tpt=tpt)
    ts = (999, 749, 499, 249) if family == "dmd2" else None  # DMD2's explicit timesteps (the reference's too)
    s = Sampler(student, embedded, config(family, "embedded", guided_steps=G, teacher_rule=rule,
                                          teacher_prediction_type=tpt, steps=None if ts else 4, timesteps=ts))
    cond = gaussian_conds(3)[0]
    lam = [0.3, 0.05, 0.9]
    plan = s.prepare(cond, latent_shape=SHAPE, seeds=[4, 5, 6], lam=lam, cfg=W)
    assert plan.t_teacher.shape == (G, 3) and plan.t_in.shape == (3,) + SHAPE and plan.m_t.shape == (3,) + SHAPE
    assert plan.cond_t.batch == 3 and plan.cond_t.guidance is plan.cfg  # w is read from the device tensor
    x_init, z, n, levels = plan.x.clone(), plan.z.clone(), plan.n.clone(), plan.t_teacher.clone()
    with torch.inference_mode():
        ours = run_loop(s.student, s.teacher, s.ops, s.schedule, plan)
    ref = reference_sample(family, student, embedded, steps=None if ts else 4, timesteps=ts, pt="epsilon", tpt=tpt, x_init=x_init, z=z, n=n, G=G,
                           lam=torch.tensor(lam), w=torch.tensor(W), rule=rule, cond=plan.cond_s,
                           cond_t=plan.cond_t, levels=levels, embedded=True)
    assert_close(ours, ref, 2e-5, f"{family} {rule} embedded")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_lam0_and_G0_reproduce_unguided_exactly(impl):
    student, _, embedded, _ = models("lcm")
    cond = gaussian_conds(2)[0]
    kw = dict(latent_shape=SHAPE, seeds=[4, 5], cfg=3.5)
    plain = Sampler(student, embedded, config("lcm", "embedded", guided_steps=0, kernel_impl=impl)).sample(cond, **kw)
    lam0 = Sampler(student, embedded, config("lcm", "embedded", lam=0.0, kernel_impl=impl)).sample(cond, **kw)
    assert torch.equal(plain, lam0)
    no_teacher = Sampler(student, None, config("lcm", "embedded", guided_steps=0, kernel_impl=impl)).sample(cond, **kw)
    assert torch.equal(plain, no_teacher)


def test_config_and_inputs_of_the_embedded_mode():
    with pytest.raises(ConfigError, match="teacher_guidance 'flux'.*'embedded'"):
        SamplerConfig(teacher_guidance="flux")
    assert SamplerConfig().teacher_guidance == "cfg"
    student, teacher, embedded, uncond = models("lcm")
    cond = gaussian_conds(2)[0]
    s = Sampler(student, embedded, config("lcm", "embedded"))
    with pytest.raises(InputError, match="embedded guidance.*uncond"):
        s.sample(cond, uncond=uncond, latent_shape=SHAPE)
    with pytest.raises(InputError, match="embedded guidance.*uncond"):
        s.sample(cond, teacher_uncond=uncond, latent_shape=SHAPE)
    with pytest.raises(InputError, match="already has a guidance field.*cfg="):
        s.sample(Cond(cond.encoder_hidden_states, guidance=torch.ones(2)), latent_shape=SHAPE)
    with pytest.raises(InputError, match="teacher encoder_hidden_states has batch 1"):
        s.sample(cond, teacher_cond=Cond(cond.encoder_hidden_states[:1]), latent_shape=SHAPE)
    # the CFG mode's error points at the embedded mode
    with pytest.raises(InputError, match="teacher_guidance='embedded'"):
        Sampler(student, teacher, config("lcm", "cfg")).sample(cond, latent_shape=SHAPE)
    # check_finite covers the embedded teacher's rows (its B rows, no uncond half)
    sf = Sampler(student, embedded, config("lcm", "embedded", check_finite=True))
    bad = Cond(cond.encoder_hidden_states[:1].clone().fill_(float("nan")))
    with pytest.raises(InputError, match="teacher cond encoder_hidden_states contains NaN"):
        sf.sample(cond, teacher_cond=Cond(torch.cat([cond.encoder_hidden_states[:1], bad.encoder_hidden_states])),
                  latent_shape=SHAPE)


def test_graph_runner_static_buffers_replay_with_a_new_w():
    """CPU: the GraphRunner's eager loop over one key's static buffers, refilled with a new w (plan.cfg and
    the static cond_t.guidance), equals a fresh eager Sampler run with that w; padding a smaller batch
    into the key replicates guidance rows like any other (B-row teacher table)."""
    student, _, embedded, _ = models("euler")
    s = Sampler(student, embedded, config("euler", "embedded"))
    r = GraphRunner(s, graphs=False)
    cond = gaussian_conds(3)[0]
    kw = dict(latent_shape=SHAPE, seeds=[7, 8, 9])
    first = r.sample(cond, cfg=2.0, **kw)
    assert_close(first, s.sample(cond, cfg=2.0, **kw), FP32_TOL, "first call")
    (key,) = r.keys()
    assert key.teacher_guidance == "embedded"
    static = r.static_plan(key)
    assert static.teacher_halves == 1 and static.t_in.shape[0] == 3 and static.t_teacher.shape == (2, 3)
    assert static.cond_t.guidance.shape == (3,)
    again = r.sample(cond, cfg=W, **kw)
    assert r.keys() == [key] and r.stats.static_runs == 2  # the same static buffers, a new w
    assert torch.equal(static.cond_t.guidance, torch.tensor(W))
    assert_close(again, s.sample(cond, cfg=W, **kw), FP32_TOL, "replay with a new w")
    assert (again - first).abs().max() > 1e-3
    small = r.sample(Cond(cond.encoder_hidden_states[:2]), cfg=[5.0, 1.5], latent_shape=SHAPE, seeds=[7, 8])
    assert r.stats.padded_calls == 1 and torch.equal(static.cond_t.guidance, torch.tensor([5.0, 1.5, 1.5]))
    assert_close(small, s.sample(Cond(cond.encoder_hidden_states[:2]), cfg=[5.0, 1.5], latent_shape=SHAPE,
                                 seeds=[7, 8]), FP32_TOL, "padded")


def test_graph_key_distinguishes_the_teacher_form():
    student, teacher, embedded, uncond = models("lcm")
    cond = gaussian_conds(2)[0]
    kw = dict(latent_shape=SHAPE, seeds=[1, 2])
    r_cfg = GraphRunner(Sampler(student, teacher, config("lcm", "cfg")), graphs=False)
    r_emb = GraphRunner(Sampler(student, embedded, config("lcm", "embedded")), graphs=False)
    r_cfg.sample(cond, uncond=uncond, **kw)
    r_emb.sample(cond, **kw)
    (k_cfg,), (k_emb,) = r_cfg.keys(), r_emb.keys()
    assert (k_cfg.teacher_guidance, k_emb.teacher_guidance) == ("cfg", "embedded") and k_cfg != k_emb
    assert r_cfg.static_plan(k_cfg).t_in.shape[0] == 4 and r_emb.static_plan(k_emb).t_in.shape[0] == 2


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_captured_graph_replayed_with_a_new_w_equals_eager(impl):
    """GPU: a captured whole-loop graph replayed with a new w (no re-capture) equals an eager run with it."""
    student, _, embedded, _ = models("lcm", device="cuda")
    cond = Cond(gaussian_conds(3)[0].encoder_hidden_states.cuda())
    s = Sampler(student, embedded, config("lcm", "embedded", kernel_impl=impl), device="cuda")
    r = GraphRunner(s)
    kw = dict(latent_shape=SHAPE, seeds=[7, 8, 9])
    first = r.sample(cond, cfg=2.0, **kw)
    (key,) = r.keys()
    assert r.is_captured(key) and r.stats.captures == 1
    assert_close(first, s.sample(cond, cfg=2.0, **kw), FP32_TOL, "first replay")
    again = r.sample(cond, cfg=W, **kw)
    assert r.stats.captures == 1 and r.stats.replays == 2
    assert_close(again, s.sample(cond, cfg=W, **kw), FP32_TOL, "replay with a new w")
    assert (again - first).abs().max() > 1e-3


def test_runtime_warms_up_and_serves_the_embedded_mode():
    """Runtime.warmup builds no uncond stand-in for an embedded-guidance teacher; its graph path (CPU: the
    runner's static buffers) equals the Sampler with per-call w."""
    from distpp.runtime import CondSpec, Runtime

    student, _, embedded, _ = models("lcm")
    cfg = config("lcm", "embedded", cfg=3.5)
    cond = gaussian_conds(3)[0]
    with Runtime(student, embedded, cond_spec=CondSpec(3, 8), config=cfg, graphs=True, batch_sizes=(3,),
                 resolutions=(SHAPE[1:],)) as rt:
        assert [r.batch for r in rt.warmup(progress=False)] == [3]
        out = rt.sample(None, cond, latent_shape=SHAPE, seeds=[1, 2, 3], cfg=W)
        assert rt.stats.static_runs >= 2
    assert_close(out, Sampler(student, embedded, cfg).sample(cond, latent_shape=SHAPE, seeds=[1, 2, 3], cfg=W),
                 FP32_TOL, "runtime")

"""Families through the one place (distpp.families): tcd and flow step for step against diffusers' own
loops, guided tcd against the float64 transcription, their options checked, and build_schedule free of
per-family branches. (The guided flow step: tests/test_flow.py.)"""

import inspect

import pytest
import torch
from diffusers import TCDScheduler
from diffusers.utils.torch_utils import randn_tensor

from distpp import Sampler, SamplerConfig, run_loop
from distpp.errors import ConfigError
from distpp.families import FAMILIES
from distpp.schedules import build_schedule
from helpers import (FLOW_SHAPE, FLUX_CONFIG, FlowGaussianDenoiser, GaussianDenoiser, assert_close, flow_config,
                     flow_scheduler, gaussian_conds)
from reference import reference_sample

SHAPE = (4, 6, 5)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_build_schedule_has_no_family_branches():
    src = inspect.getsource(build_schedule)
    assert not [f for f in FAMILIES if f'"{f}"' in src or f"'{f}'" in src]


# --- tcd ------------------------------------------------------------------------------------------
def scheduler_loop(sched, call, shape, seeds, **step_kw):
    """A diffusers scheduler stepped one call at a time (as the pipelines do), per-sample generators;
    call(latents, t) -> the model's prediction."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn_tensor(shape, generator=gens, dtype=torch.float32) * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        latents = sched.step(call(latents, t), t, latents, generator=gens, **step_kw).prev_sample
    return latents


def tcd_loop(model, pt, steps, timesteps, gamma, cond, shape, seeds):
    """TCD's loop as its pipelines run it: TCDScheduler stepped with eta=gamma."""
    sched = TCDScheduler(**SD_BETAS, prediction_type=pt)
    if timesteps is not None:
        sched.set_timesteps(timesteps=list(timesteps))
    else:
        sched.set_timesteps(steps)
    out = scheduler_loop(sched, lambda x, t: model(x, t.float().expand(shape[0]), cond), shape, seeds, eta=gamma)
    return out, sched


@pytest.mark.parametrize("pt,steps,timesteps,gamma,B", [
    ("epsilon", 4, None, 0.3, 3),
    ("epsilon", 1, None, 0.3, 1),
    ("epsilon", 8, None, 0.0, 3),
    ("v_prediction", 2, None, 1.0, 1),
    ("sample", 4, None, 0.5, 3),
    ("epsilon", None, (800,), 1.0, 3),  # Hyper-SD's 1-step setting
])
def test_tcd_unguided_matches_tcd_scheduler(pt, steps, timesteps, gamma, B):
    acp = TCDScheduler(**SD_BETAS).alphas_cumprod
    model = GaussianDenoiser(acp, mu=0.2, sigma=0.8, shift=0.7, prediction_type=pt)
    cond, _ = gaussian_conds(B)
    seeds = [5, 9, 13][:B]
    cfg = SamplerConfig(family="tcd", steps=steps, timesteps=timesteps, guided_steps=0, prediction_type=pt,
                        family_options={"gamma": gamma}, kernel_impl="torch")
    ours = Sampler(model, None, cfg).sample(cond, latent_shape=SHAPE, seeds=seeds)
    ours_t = [t for _, t in model.calls]
    model.calls.clear()
    ref, sched = tcd_loop(model, pt, steps, timesteps, gamma, cond, (B,) + SHAPE, seeds)
    assert [t.tolist() for t in ours_t] == [t.tolist() for _, t in model.calls]  # the same timesteps, step by step
    assert ours_t[0].tolist() == [float(sched.timesteps[0])] * B
    assert_close(ours, ref, 1e-5, f"tcd {pt} gamma={gamma}")


def test_tcd_lam0_reproduces_plain_and_guidance_acts():
    acp = TCDScheduler(**SD_BETAS).alphas_cumprod
    cond, uncond = gaussian_conds(2)

    def run(**kw):
        student, teacher = GaussianDenoiser(acp, mu=0.1), GaussianDenoiser(acp, mu=-0.3, shift=1.5)
        cfg = SamplerConfig(family="tcd", kernel_impl="torch", **kw)
        return Sampler(student, teacher, cfg).sample(cond, uncond=uncond, latent_shape=SHAPE, seeds=[4, 5])

    plain = run(guided_steps=0)
    assert torch.equal(plain, run(guided_steps=2, lam=0.0))
    assert not torch.allclose(plain, run(guided_steps=2, lam=0.2))


@pytest.mark.parametrize("pt,tpt,rule,G,steps,gamma", [
    ("epsilon", "epsilon", "next", 1, 4, 0.3),
    ("v_prediction", "epsilon", "same", 2, 4, 0.0),
    ("epsilon", "v_prediction", "random", 4, 4, 1.0),
    ("sample", "epsilon", "next", 2, 3, 0.5),
])
def test_tcd_guided_matches_float64_spec(pt, tpt, rule, G, steps, gamma):
    acp = TCDScheduler(**SD_BETAS).alphas_cumprod
    student = GaussianDenoiser(acp, mu=0.1, sigma=0.8, shift=0.5, prediction_type=pt)
    teacher = GaussianDenoiser(acp, mu=-0.2, sigma=0.6, shift=1.5, prediction_type=tpt)
    cfg = SamplerConfig(family="tcd", steps=steps, guided_steps=G, lam=0.3, cfg=4.0, teacher_rule=rule,
                        prediction_type=pt, teacher_prediction_type=tpt, family_options={"gamma": gamma},
                        kernel_impl="torch")
    s, B, lam = Sampler(student, teacher, cfg), 3, [0.3, 0.05, 0.9]
    cond, uncond = gaussian_conds(B)
    plan = s.prepare(cond, uncond=uncond, latent_shape=SHAPE, seeds=[1, 2, 3], lam=lam)
    x_init, z, n, levels = plan.x.clone(), plan.z.clone(), plan.n.clone(), plan.t_teacher[:, :B].clone()
    with torch.inference_mode():
        ours = run_loop(s.student, s.teacher, s.ops, s.schedule, plan)
    ref = reference_sample("tcd", student, teacher, steps=steps, pt=pt, tpt=tpt, x_init=x_init, z=z, n=n, G=G,
                           lam=torch.tensor(lam), w=torch.full((B,), 4.0), rule=rule, cond=plan.cond_s,
                           cond_t=plan.cond_t, levels=levels, gamma=gamma)
    assert_close(ours, ref, 2e-5, f"tcd {rule} gamma={gamma}")


@pytest.mark.parametrize("opts,match", [
    ({"gamma": 1.5}, r"gamma must be a number in \[0, 1\]"),
    ({"gamma": "0.3"}, "gamma must be a number"),
    ({"eta": 0.3}, "family 'tcd' has no option 'eta'; its options: gamma"),
])
def test_tcd_options_checked_in_config(opts, match):
    with pytest.raises(ConfigError, match=match):
        SamplerConfig(family="tcd", family_options=opts)


def test_options_of_other_families_refused():
    with pytest.raises(ConfigError, match="family 'lcm' has no option 'gamma'; its options: none"):
        SamplerConfig(family="lcm", family_options={"gamma": 0.3})


# --- flow -----------------------------------------------------------------------------------------
def flow_diffusers_loop(style, model, steps, stochastic, mu, cond, shape, seeds):
    """StableDiffusion3Pipeline's / FluxPipeline's denoising loop (see helpers.flow_scheduler)."""
    sched, timestep = flow_scheduler(style, steps, stochastic, mu)
    return scheduler_loop(sched, lambda x, t: model(x, timestep(t, x), cond), shape, seeds)


@pytest.mark.parametrize("style,steps,B,stochastic,mu", [
    ("sd3", 1, 1, False, None),
    ("sd3", 4, 3, False, None),
    ("sd3", 8, 1, True, None),
    ("sd3", 2, 3, True, None),
    ("flux", 1, 3, False, None),
    ("flux", 4, 1, False, None),
    ("flux", 8, 3, False, None),
    ("flux", 4, 3, True, None),
    ("flux", 2, 1, False, 1.15),  # mu given directly (FLUX at 1024x1024)
])
def test_flow_unguided_matches_diffusers_step_for_step(style, steps, B, stochastic, mu):
    model = FlowGaussianDenoiser(timestep_scale=1000.0 if style == "sd3" else 1.0, mu=0.2, sigma=0.8, shift=0.7)
    cond, _ = gaussian_conds(B)
    seeds = [21, 4, 8][:B]
    cfg = flow_config(style, steps, stochastic, mu, guided_steps=0, kernel_impl="torch")
    ours = Sampler(model, None, cfg).sample(cond, latent_shape=FLOW_SHAPE, seeds=seeds)
    ours_calls = list(model.calls)
    model.calls.clear()
    ref = flow_diffusers_loop(style, model, steps, stochastic, mu, cond, (B,) + FLOW_SHAPE, seeds)
    assert len(ours_calls) == len(model.calls) == steps
    for k, ((x_o, t_o), (x_r, t_r)) in enumerate(zip(ours_calls, model.calls)):
        assert torch.equal(t_o, t_r), f"step {k}: timestep {t_o.tolist()} vs diffusers' {t_r.tolist()}"
        assert_close(x_o, x_r, 1e-5, f"{style} step {k} model input")
    assert_close(ours, ref, 1e-5, f"{style} final")


@pytest.mark.parametrize("opts,sched_cfg,match", [
    ({"shift": -1.0}, None, "shift must be a finite number > 0"),
    ({"use_dynamic_shifting": True}, None, "needs exactly one of family_options mu=... or image_seq_len=..."),
    ({"mu": 0.5, "image_seq_len": 64}, FLUX_CONFIG, "needs exactly one of"),
    ({"mu": 0.5}, None, "mu only applies with use_dynamic_shifting=True"),
    ({"image_seq_len": 0}, FLUX_CONFIG, "image_seq_len must be an int >= 1"),
    ({"sigmas": "karras"}, None, "sigmas must be 'scheduler'"),
    ({"stochastic_sampling": 1}, None, "stochastic_sampling must be True or False"),
    ({"timestep_scale": 0}, None, "timestep_scale must be a finite number > 0"),
    ({"gamma": 0.3}, None, "family 'flow' has no option 'gamma'"),
    ({}, dict(invert_sigmas=True), "invert_sigmas"),
])
def test_flow_options_checked_in_config(opts, sched_cfg, match):
    with pytest.raises(ConfigError, match=match):
        SamplerConfig(family="flow", family_options=opts, scheduler_config=sched_cfg)


@pytest.mark.parametrize("kw,match", [
    (dict(prediction_type="epsilon"), "prediction_type 'epsilon' does not fit family 'flow'; pass one of flow"),
    (dict(teacher_prediction_type="v_prediction"), "teacher_prediction_type 'v_prediction' does not fit"),
    (dict(timesteps=(999, 500)), "does not take explicit timesteps"),
])
def test_flow_refusals(kw, match):
    with pytest.raises(ConfigError, match=match):
        Sampler(FlowGaussianDenoiser(), FlowGaussianDenoiser(), SamplerConfig(family="flow", **kw))


def test_flow_defaults():
    cfg = SamplerConfig(family="flow")
    assert (cfg.prediction_type, cfg.teacher_prediction_type, cfg.resolved_lam) == ("flow", "flow", 0.05)
    with pytest.raises(ConfigError, match="prediction_type 'flow' does not fit family 'lcm'"):
        SamplerConfig(family="lcm", prediction_type="flow")


@pytest.mark.parametrize("style", ["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 3, 17, 50])
def test_flow_tables_are_the_rectified_flow_form(style, steps):
    sch = Sampler(FlowGaussianDenoiser(), None, flow_config(style, steps, guided_steps=0)).schedule
    sig, sig_next = sch.s.double(), torch.cat([sch.s_next.double()[:-1], torch.zeros(1, dtype=torch.float64)])
    for name in ("coef", "a", "s", "a_next", "s_next", "t_model", "t_next"):
        assert torch.isfinite(getattr(sch, name)).all(), name
    torch.testing.assert_close(sch.a.double() + sig, torch.ones_like(sig), rtol=0, atol=1e-7)
    assert float(sig[0]) == 1.0 and float(sch.a[0]) == 0.0  # sigma = 1 is the first level
    c = sch.coef.double()
    torch.testing.assert_close(c[:, 1], -sig, rtol=0, atol=1e-7)  # P_m = -sig
    torch.testing.assert_close(c[:, 3], 1 - sig, rtol=0, atol=1e-7)  # Q_m = 1 - sig
    torch.testing.assert_close(c[:, 5], sig_next, rtol=0, atol=1e-7)  # B = sig_next
    assert all(lo <= hi for lo, hi in sch.level_bounds) and sch.init_noise_sigma == 1.0
    assert (sch.t_model[1:] < sch.t_model[:-1]).all()

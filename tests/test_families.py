"""Families through the one place (distpp.families): tcd and flow step for step against diffusers' own
loops, their options checked, and build_schedule free of per-family branches."""

import inspect

import pytest
import torch
from diffusers import TCDScheduler
from diffusers.utils.torch_utils import randn_tensor

from distpp import Sampler, SamplerConfig
from distpp.errors import ConfigError
from distpp.families import FAMILIES
from distpp.schedules import build_schedule
from helpers import GaussianDenoiser, assert_close, gaussian_conds

SHAPE = (4, 6, 5)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_build_schedule_has_no_family_branches():
    src = inspect.getsource(build_schedule)
    assert not [f for f in FAMILIES if f'"{f}"' in src or f"'{f}'" in src]


# --- tcd ------------------------------------------------------------------------------------------
def tcd_loop(model, pt, steps, timesteps, gamma, cond, shape, seeds):
    """TCD's loop as its pipelines run it: TCDScheduler stepped with eta=gamma and per-sample generators."""
    sched = TCDScheduler(**SD_BETAS, prediction_type=pt)
    if timesteps is not None:
        sched.set_timesteps(timesteps=list(timesteps))
    else:
        sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn_tensor(shape, generator=gens, dtype=torch.float32) * sched.init_noise_sigma
    for t in sched.timesteps:
        m = model(latents, t.float().expand(shape[0]), cond)
        latents = sched.step(m, t, latents, eta=gamma, generator=gens).prev_sample
    return latents, sched


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

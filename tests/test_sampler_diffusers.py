"""The unguided sampler matches a step-by-step loop of each family's diffusers scheduler."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from distpp import Sampler, SamplerConfig
from distpp.schedules import make_scheduler
from helpers import assert_close

CASES = [
    ("lcm", "epsilon", None, 4),
    ("lcm", "v_prediction", None, 2),
    ("lcm", "sample", None, 3),
    ("dmd2", "epsilon", (999, 749, 499, 249), None),
    ("dmd2", "epsilon", (399,), None),
    ("euler", "epsilon", None, 4),
    ("euler", "v_prediction", None, 4),
    ("euler", "sample", (999,), None),
    ("euler_a", "epsilon", None, 4),
    ("euler_a", "v_prediction", None, 1),
    ("ddim", "epsilon", None, 4),
    ("ddim", "v_prediction", None, 3),
    ("ddim", "sample", None, 2),
]


def diffusers_loop(model, family, prediction_type, steps, timesteps, cond, shape, seeds):
    """The idiomatic diffusers loop: scheduler object stepped one call at a time."""
    sched = make_scheduler(family, prediction_type=prediction_type)
    if timesteps is not None:
        sched.set_timesteps(timesteps=list(timesteps))
    else:
        sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn_tensor(shape, generator=gens, dtype=torch.float32) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        m = model(inp, t.float().expand(shape[0]), cond)
        latents = sched.step(m, t, latents, generator=gens).prev_sample
    return latents


@pytest.mark.parametrize("family,prediction_type,timesteps,steps", CASES)
def test_unguided_matches_diffusers(tiny_pair, family, prediction_type, timesteps, steps):
    cond, _ = tiny_pair.random_cond(2, seed=3)
    shape = (2,) + tiny_pair.info.latent_shape
    seeds = [11, 12]
    cfg = SamplerConfig(family=family, steps=steps, timesteps=timesteps, guided_steps=0,
                        prediction_type=prediction_type, kernel_impl="torch")
    ours = Sampler(tiny_pair.student, None, cfg).sample(cond, latent_shape=shape[1:], seeds=seeds)
    with torch.inference_mode():
        prepared = tiny_pair.student.prepare(cond)
        ref = diffusers_loop(tiny_pair.student, family, prediction_type, steps, timesteps, prepared, shape, seeds)
    assert_close(ours, ref, 1e-5, f"{family}/{prediction_type}")


def test_batch_matches_single(tiny_pair):
    """Per-sample seeds: a batch of 3 equals three single-sample calls within fp32 tolerance."""
    cond, uncond = tiny_pair.random_cond(3, seed=5)
    s = Sampler(tiny_pair.student, tiny_pair.teacher, SamplerConfig(family="lcm", guided_steps=2, lam=0.2))
    shape = tiny_pair.info.latent_shape
    batch = s.sample(cond, uncond=uncond, latent_shape=shape, seeds=[7, 8, 9])
    for b, seed in enumerate([7, 8, 9]):
        one = s.sample(cond.map(lambda v: v[b:b + 1]), uncond=uncond, latent_shape=shape, seeds=[seed])
        assert_close(one[0], batch[b], 1e-5, f"sample {b}")

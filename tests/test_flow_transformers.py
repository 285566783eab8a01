"""Unguided flow sampling on tiny random SD3 / FLUX transformers equals diffusers' own loop step for step
(issue 15): the scheduler set as StableDiffusion3Pipeline / FluxPipeline set it, the transformer called as
each pipeline calls it (SD3: timestep sigma*1000; FLUX: packed latents, image/text ids, timestep sigma), the
initial noise drawn per sample in diffusers' shape and order ([1, C, H, W] per generator; FLUX packs after
drawing). 1-8 steps, batch 1 and 3, float32, 1e-5 relative."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from distpp import Cond, Sampler, SamplerConfig
from distpp.presets import _TINY_FLUX, _TINY_SD3
from distpp.transformer import FluxDenoiser, SD3Denoiser
from helpers import assert_close

FP32_TOL = 1e-5
TOKENS, WIDTH, POOLED = 8, 32, 32
C, H, W = 4, 8, 12  # non-square on purpose
FLUX_SCHED = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)


@pytest.fixture(scope="module")
def transformers():
    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(**_TINY_SD3).eval().requires_grad_(False)
    torch.manual_seed(1)
    flux = FluxTransformer2DModel(**_TINY_FLUX).eval().requires_grad_(False)
    return {"sd3": sd3, "flux": flux}


def _cond(b):
    g = torch.Generator().manual_seed(5)
    return Cond(torch.randn(b, TOKENS, WIDTH, generator=g), torch.randn(b, POOLED, generator=g))


@torch.inference_mode()
def _diffusers_loop(kind, transformer, steps, seeds, cond):
    """The pipelines' denoising loops, written from their sources (no text encoders or VAE)."""
    b = len(seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = randn_tensor((b, C, H, W), generator=gens, dtype=torch.float32)
    if kind == "sd3":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            v = transformer(hidden_states=x, timestep=t.expand(b), encoder_hidden_states=cond.encoder_hidden_states,
                            pooled_projections=cond.text_embeds, return_dict=False)[0]
            x = sched.step(v, t, x).prev_sample
        return x
    seq = (H // 2) * (W // 2)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHED)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    packed = FluxPipeline._pack_latents(x, b, C, H, W)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, H // 2, W // 2, x.device, x.dtype)
    txt_ids = torch.zeros(TOKENS, 3)
    for t in sched.timesteps:
        v = transformer(hidden_states=packed, timestep=t.expand(b) / 1000, guidance=None,
                        pooled_projections=cond.text_embeds, encoder_hidden_states=cond.encoder_hidden_states,
                        txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        packed = sched.step(v, t, packed).prev_sample
    return FluxPipeline._unpack_latents(packed, H * 8, W * 8, 8)


def _config(kind, steps):
    if kind == "sd3":
        return SamplerConfig(family="flow", steps=steps, guided_steps=0, kernel_impl="torch")
    return SamplerConfig(family="flow", steps=steps, guided_steps=0, kernel_impl="torch", scheduler_config=FLUX_SCHED,
                         family_options=dict(sigmas="linspace", timestep_scale=1.0,
                                             image_seq_len=(H // 2) * (W // 2)))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("steps,seeds", [(1, [3]), (4, [3, 4, 5]), (8, [6])])
def test_unguided_flow_on_tiny_transformers_equals_diffusers_loop(transformers, kind, steps, seeds):
    model = transformers[kind]
    den = SD3Denoiser(model) if kind == "sd3" else FluxDenoiser(model)
    cond = _cond(len(seeds))
    ours = Sampler(den, None, _config(kind, steps)).sample(cond, latent_shape=(C, H, W), seeds=seeds)
    ref = _diffusers_loop(kind, model, steps, seeds, cond)
    assert ref.abs().max() > 0.1
    assert_close(ours, ref, FP32_TOL, f"{kind} {steps} steps batch {len(seeds)}")

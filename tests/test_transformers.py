"""SD3 / FLUX transformer Denoisers: equal to the diffusers pipelines' own calls (FluxPipeline's packing
helpers as the oracle), input and config errors, the FLUX position-ids cache, guidance from cond.guidance,
a Sampler and a GraphRunner over them, and ONNX export refused clearly."""

from dataclasses import replace

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from helpers import assert_close

from distpp import Cond
from distpp.cache import ArtifactCache
from distpp.config import SamplerConfig
from distpp.denoiser import CallableDenoiser, ModelSpec, check_cond
from distpp.errors import ConfigError, InputError
from distpp.export import cached_export, dynamic_axes, export_inputs
from distpp.graphs import GraphRunner
from distpp.runtime import CondSpec, Runtime
from distpp.presets import _TINY_FLUX, _TINY_SD3
from distpp.sampler import Sampler
from distpp.transformer import FluxDenoiser, SD3Denoiser, pack_latents, unpack_latents

FP32_TOL = 1e-5
TOKENS, WIDTH, POOLED = 8, 32, 32


def _build(cls, seed, **overrides):
    torch.manual_seed(seed)
    return cls(**{**(_TINY_FLUX if cls is FluxTransformer2DModel else _TINY_SD3), **overrides}).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models():
    return {"sd3": _build(SD3Transformer2DModel, 0), "schnell": _build(FluxTransformer2DModel, 1),
            "dev": _build(FluxTransformer2DModel, 2, guidance_embeds=True)}


def _cond(b, seed=0, guidance=None):
    g = torch.Generator().manual_seed(seed)
    return Cond(torch.randn(b, TOKENS, WIDTH, generator=g), torch.randn(b, POOLED, generator=g),
                guidance=None if guidance is None else torch.tensor(guidance, dtype=torch.float32))


def _latents(b, h, w, seed=1):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _flux_oracle(transformer, x, sigma, cond):
    """FluxPipeline's own layout: its pack, ids and unpack helpers around one transformer call."""
    b, c, h, w = x.shape
    vae_scale = 8
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, dtype=x.dtype)
    guidance = cond.guidance if transformer.config.guidance_embeds else None
    out = transformer(hidden_states=packed, timestep=sigma, guidance=guidance, pooled_projections=cond.text_embeds,
                      encoder_hidden_states=cond.encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids,
                      return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)


@pytest.mark.parametrize("b", [1, 3])
def test_sd3_equals_the_pipeline_call(models, b):
    tr = models["sd3"]
    x, cond = _latents(b, 16, 12), _cond(b)
    t = torch.linspace(1000.0, 250.0, b)  # sigma * 1000, as StableDiffusion3Pipeline passes it
    with torch.no_grad():
        out = SD3Denoiser(tr)(x, t, cond)
        ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=cond.encoder_hidden_states,
                 pooled_projections=cond.text_embeds, return_dict=False)[0]
    assert out.shape == x.shape
    assert_close(out, ref, FP32_TOL, f"SD3 batch {b}")


@pytest.mark.parametrize("kind", ["schnell", "dev"])
@pytest.mark.parametrize("b", [1, 3])
def test_flux_equals_the_pipeline_layout(models, kind, b):
    tr = models[kind]
    x = _latents(b, 8, 12)  # not square: a swapped height/width in the packing shows up
    cond = _cond(b, guidance=[3.5, 1.0, 5.0][:b])
    sigma = torch.linspace(1.0, 0.3, b)
    with torch.no_grad():
        out = FluxDenoiser(tr)(x, sigma, cond)
        ref = _flux_oracle(tr, x, sigma, cond)
    assert out.shape == x.shape
    assert_close(out, ref, FP32_TOL, f"FLUX {kind} batch {b}")


def test_packing_is_fluxpipelines_layout_and_inverts():
    x = _latents(3, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 4, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)


def test_spec_and_capabilities(models):
    for den in (SD3Denoiser(models["sd3"]), FluxDenoiser(models["schnell"])):
        s = den.spec
        assert (s.in_channels, s.cross_attention_dim, s.text_embeds_dim, s.time_ids_dim) == (4, WIDTH, POOLED, None)
        assert (s.dtype, s.device.type, s.prediction_type) == (torch.float32, "cpu", "flow")
        assert den.capturable and not den.reuses_output and den.onnx_inputs() is None


def test_odd_or_oversized_latents_refused(models):
    flux, sd3 = FluxDenoiser(models["schnell"]), SD3Denoiser(models["sd3"])
    cond, t = _cond(1), torch.ones(1)
    with pytest.raises(InputError, match=r"FluxDenoiser needs latent height and width divisible by 2, got 9x8"):
        flux(_latents(1, 9, 8), t, cond)
    with pytest.raises(InputError, match=r"divisible by 2, got 8x7"):
        sd3(_latents(1, 8, 7), t, cond)
    with pytest.raises(InputError, match=r"exceed the transformer's position table \(16 patches of 2"):
        sd3(_latents(1, 34, 8), t, cond)
    with pytest.raises(InputError, match=r"takes latents \[b, 4, H, W\], got \(1, 3, 8, 8\)"):
        flux(torch.zeros(1, 3, 8, 8), t, cond)
    with pytest.raises(InputError, match=r"pass Cond\(text_embeds=\[b, 32\]\)"):
        sd3(_latents(1, 8, 8), t, Cond(cond.encoder_hidden_states))


def test_unsupported_configs_refused(models):
    with pytest.raises(ConfigError, match="SD3Denoiser wraps a diffusers SD3Transformer2DModel, got "
                                          "FluxTransformer2DModel"):
        SD3Denoiser(models["schnell"])
    with pytest.raises(ConfigError, match="FluxDenoiser wraps a diffusers FluxTransformer2DModel"):
        FluxDenoiser(models["sd3"])
    with pytest.raises(ConfigError, match="in_channels=6"):
        FluxDenoiser(_build(FluxTransformer2DModel, 0, in_channels=6, out_channels=6))
    with pytest.raises(ConfigError, match="in_channels=4, out_channels=8"):
        SD3Denoiser(_build(SD3Transformer2DModel, 0, out_channels=8))


def test_flux_ids_built_once_per_shape(models):
    den = FluxDenoiser(models["schnell"])
    seen = []
    hook = den.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["img_ids"], kw["txt_ids"])), with_kwargs=True)
    try:
        with torch.no_grad():
            for b in (1, 3, 2):
                den(_latents(b, 8, 12), torch.ones(b), _cond(b))
            den(_latents(1, 12, 8), torch.ones(1), _cond(1))
    finally:
        hook.remove()
    assert den.ids_builds == 2  # one per latent shape, whatever the batch
    assert all(ids[0] is seen[0][0] and ids[1] is seen[0][1] for ids in seen[:3])
    assert seen[3][0] is not seen[0][0] and seen[3][0].shape == (24, 3)
    assert torch.equal(seen[0][0], FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))
    assert torch.equal(seen[0][1], torch.zeros(TOKENS, 3))


def test_guidance_read_from_cond(models):
    dev, schnell = FluxDenoiser(models["dev"]), FluxDenoiser(models["schnell"])
    x, sigma = _latents(2, 8, 8), torch.full((2,), 0.7)
    with pytest.raises(InputError, match=r"guidance_embeds.*pass Cond\(guidance=\[b\]\)"):
        dev(x, sigma, _cond(2))
    with torch.no_grad():
        a, b = dev(x, sigma, _cond(2, guidance=[3.5, 3.5])), dev(x, sigma, _cond(2, guidance=[1.0, 3.5]))
        assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])  # per-row scale, read each call
        # schnell has no guidance input: a guidance field is ignored, as FluxPipeline passes none
        assert torch.equal(schnell(x, sigma, _cond(2, guidance=[3.5, 1.0])), schnell(x, sigma, _cond(2)))


def test_pooled_only_spec_needs_text_embeds_not_time_ids():
    spec = ModelSpec(cross_attention_dim=WIDTH, text_embeds_dim=POOLED)
    check_cond("teacher", spec, _cond(2), 2)
    with pytest.raises(InputError, match=r"teacher takes a pooled text projection: pass Cond\(text_embeds=\[B, 32\]\)"):
        check_cond("teacher", spec, Cond(torch.zeros(2, TOKENS, WIDTH)), 2)
    with pytest.raises(InputError, match=r"text_embeds has shape \(2, 5\); expected \[B, 32\]"):
        check_cond("teacher", spec, Cond(torch.zeros(2, TOKENS, WIDTH), torch.zeros(2, 5)), 2)


def _pair(kind, device="cpu"):
    """A fresh student/teacher pair of one kind, the adapters' "flow" prediction type lifted for the lcm
    family (the flow family is another item's work; this is plumbing), counting the rows of each forward."""
    cls, model = (SD3Denoiser, SD3Transformer2DModel) if kind == "sd3" else (FluxDenoiser, FluxTransformer2DModel)
    calls = []
    pair = []
    for seed in (4, 5):
        tr = _build(model, seed).to(device)
        den = cls(tr)
        den.spec = replace(den.spec, prediction_type=None)
        tr.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        pair.append(den)
    return pair[0], pair[1], calls


PLUMBING = SamplerConfig(family="lcm", steps=2, guided_steps=1)


@pytest.mark.parametrize("kind", ["sd3", "schnell"])
def test_sampler_and_graph_runner_take_transformers(kind):
    """The same Sampler / GraphRunner code runs a transformer pair."""
    student, teacher, calls = _pair(kind)
    sampler = Sampler(student, teacher, PLUMBING)
    cond, uncond, shape = _cond(3), _cond(1, seed=9), (4, 8, 12)
    with torch.no_grad():
        out = sampler.sample(cond, uncond=uncond, latent_shape=shape, seeds=[1, 2, 3])
        plain = sampler.sample(cond, uncond=uncond, latent_shape=shape, seeds=[1, 2, 3], lam=0.0)
        again = GraphRunner(sampler).sample(cond, uncond=uncond, latent_shape=shape, seeds=[1, 2, 3])
    assert out.shape == (3,) + shape and torch.isfinite(out).all()
    assert calls[:3] == [3, 6, 3]  # student, teacher on [uncond; cond], student
    assert not torch.allclose(out, plain)  # the teacher's guidance reached the result
    assert_close(again, out, FP32_TOL, f"GraphRunner vs Sampler ({kind})")


def test_runtime_warms_up_and_serves_a_transformer_pair():
    student, teacher, _ = _pair("schnell")
    shape = (4, 8, 12)
    cond, uncond = _cond(2), _cond(1, seed=9)
    with Runtime(student, teacher, cond_spec=CondSpec(TOKENS, WIDTH, pooled=POOLED), config=PLUMBING, graphs=True,
                 batch_sizes=(2,), resolutions=(shape[1:],)) as rt:
        assert len(rt.warmup(progress=False)) == 1
        got = rt.sample(None, cond, uncond=uncond, latent_shape=shape, seeds=[3, 4])
        ref = rt.sampler().sample(cond, uncond=uncond, latent_shape=shape, seeds=[3, 4])
        assert rt.stats.calls == 1 and rt.stats.static_runs == 2  # warm-up's loop and the call, one bucket
    assert_close(got, ref, FP32_TOL, "Runtime vs Sampler")
    assert student.ids_builds == 1 and teacher.ids_builds == 1  # built in warm-up, reused by the call


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["sd3", "schnell"])
def test_cuda_graph_replay_of_transformers_equals_eager(kind):
    student, teacher, _ = _pair(kind, device="cuda")
    sampler = Sampler(student, teacher, PLUMBING, device="cuda")
    cond, uncond, shape = _cond(2).to("cuda"), _cond(1, seed=9).to("cuda"), (4, 8, 12)
    r = GraphRunner(sampler)
    with torch.no_grad():
        out = r.sample(cond, uncond=uncond, latent_shape=shape, seeds=[3, 4])
        assert r.use_cuda_graphs and r.stats.captures == 1
        ref = sampler.sample(cond, uncond=uncond, latent_shape=shape, seeds=[3, 4])
    assert_close(out, ref, 1e-4, f"graph replay vs eager ({kind})")


def test_onnx_export_refused_for_transformers(models, tmp_path):
    cache = ArtifactCache(tmp_path)
    for den in (SD3Denoiser(models["sd3"]), FluxDenoiser(models["dev"])):
        name = type(den).__name__
        with pytest.raises(ConfigError, match=f"export of {name} is not supported: it declares no ONNX input spec"):
            cached_export(den, latent_hw=(8, 8), tokens=TOKENS, cache=cache)
    assert not any(tmp_path.rglob("*.onnx"))
    with pytest.raises(ConfigError, match="export of function is not supported"):
        export_inputs(CallableDenoiser(lambda x, t, c: x))


def test_unet_declares_its_onnx_inputs(tiny_pair):
    inputs = tiny_pair.student.onnx_inputs()
    assert tuple(inputs) == ("sample", "timestep", "encoder_hidden_states", "timestep_cond")
    spatial = {0: "batch", 2: "height", 3: "width"}
    assert dynamic_axes(inputs, True) == {"sample": spatial, "timestep": {0: "batch"},
                                          "encoder_hidden_states": {0: "batch"}, "timestep_cond": {0: "batch"},
                                          "out_sample": spatial}
    assert all(a == {0: "batch"} for a in dynamic_axes(inputs, False).values())

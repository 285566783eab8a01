"""Flow-matching transformer presets (issue 15 item 5): tiny_sd3 / tiny_flux build and sample on a CPU
with their family settings and teachers; sd35 / flux state their memory, are refused on a CPU and are
built directly on the target device in the target dtype (checked on the meta device: no host copy)."""

import re

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from distpp.errors import ConfigError
from distpp.presets import PRESETS, build_preset, build_transformer
from distpp.sampler import Sampler
from distpp.transformer import FluxDenoiser, SD3Denoiser

KINDS = {"tiny_sd3": (SD3Denoiser, SD3Transformer2DModel), "tiny_flux": (FluxDenoiser, FluxTransformer2DModel)}


@pytest.fixture(scope="module")
def pairs():
    return {name: build_preset(name) for name in KINDS}


def _teacher_calls(pair):
    """Record (rows, guidance) of every teacher transformer forward."""
    calls = []
    pair.teacher.transformer.register_forward_pre_hook(
        lambda mod, args, kw: calls.append((kw["hidden_states"].shape[0], kw.get("guidance"),
                                            kw["encoder_hidden_states"].shape[1])), with_kwargs=True)
    return calls


@pytest.mark.parametrize("name", list(KINDS))
def test_tiny_flow_preset_builds_and_samples(pairs, name):
    pair, (adapter, model) = pairs[name], KINDS[name]
    info = pair.info
    assert isinstance(pair.student, adapter) and isinstance(pair.teacher, adapter)
    assert isinstance(pair.student.transformer, model)
    assert pair.student.spec.cross_attention_dim == info.width == info.unet_config["joint_attention_dim"]
    assert pair.student.spec.text_embeds_dim == info.pooled == info.unet_config["pooled_projection_dim"]
    B = 2
    cond, uncond = pair.random_cond(B)
    assert cond.encoder_hidden_states.shape == (B, info.tokens, info.width)
    assert cond.text_embeds.shape == (B, info.pooled) and cond.time_ids is None
    spec = info.cond_spec()
    assert (spec.tokens, spec.width, spec.pooled, spec.time_ids) == (info.tokens, info.width, info.pooled, None)
    embedded = name == "tiny_flux"
    assert (uncond is None) == embedded
    cfg = pair.sampler_config(steps=3, guided_steps=1)
    assert cfg.family == "flow" and cfg.teacher_guidance == ("embedded" if embedded else "cfg")
    calls = _teacher_calls(pair)
    teacher_cond, teacher_uncond = pair.random_cond(B, teacher=True)
    if embedded:  # FLUX.1-dev style: the teacher reads a longer text sequence of its own, no uncond
        assert teacher_cond.encoder_hidden_states.shape == (B, info.teacher_tokens, info.width)
        assert teacher_uncond is None and info.cond_spec(teacher=True).tokens == info.teacher_tokens
    else:
        assert teacher_cond is None and info.cond_spec(teacher=True) is None
    kw = dict(uncond=uncond, teacher_cond=teacher_cond, latent_shape=info.latent_shape, seeds=[3, 4])
    with torch.no_grad():
        guided = Sampler(pair.student, pair.teacher, cfg).sample(cond, **kw)
        plain = Sampler(pair.student, None, pair.sampler_config(steps=3, guided_steps=0)).sample(
            cond, latent_shape=info.latent_shape, seeds=[3, 4])
        lam0 = Sampler(pair.student, pair.teacher, cfg).sample(cond, lam=0.0, **kw)
    assert guided.shape == (B,) + info.latent_shape and torch.isfinite(guided).all()
    assert torch.equal(lam0, plain)  # lam = 0 reproduces the plain student exactly
    assert not torch.allclose(guided, plain)  # the teacher's guidance reached the result
    if embedded:  # one batch-B forward with guidance = w per row, no unconditional half
        assert [c[0] for c in calls] == [B, B] and {c[2] for c in calls} == {info.teacher_tokens}
        assert all(torch.equal(c[1], torch.full((B,), 3.5)) for c in calls)
    else:  # CFG: [uncond; cond], 2B rows
        assert [c[0] for c in calls] == [2 * B, 2 * B]


def test_flow_preset_defaults():
    sd3, flux = PRESETS["tiny_sd3"], PRESETS["tiny_flux"]
    s, f = sd3.sampler_config(), flux.sampler_config()
    assert s.family_options == {"shift": 3.0, "timestep_scale": 1000.0} and s.cfg == 4.0 and s.lam == 0.05
    h, w = flux.latent_shape[1:]
    assert f.family_options == {"use_dynamic_shifting": True, "image_seq_len": h * w // 4, "sigmas": "linspace",
                                "timestep_scale": 1.0}
    assert f.teacher_guidance == "embedded" and f.cfg == 3.5 and f.lam == 0.05
    assert PRESETS["flux"].sampler_config().family_options["image_seq_len"] == 4096  # 1024 x 1024
    assert flux.teacher_config == {"guidance_embeds": True} and not flux.unet_config["guidance_embeds"]
    # the command line's options win; an unset (None) option keeps the preset's; another family drops its options
    assert flux.sampler_config(cfg=2.0, lam=None).cfg == 2.0 and flux.sampler_config(lam=None).lam == 0.05
    with pytest.raises(ConfigError, match="preset 'tiny_sd3' holds flow-matching transformers .* got 'lcm'"):
        sd3.sampler_config(family="lcm")
    assert PRESETS["tiny"].sampler_config(family="euler", cfg=None).family == "euler"
    assert (PRESETS["flux"].tokens, PRESETS["flux"].teacher_tokens) == (256, 512)  # schnell's and dev's T5 caps
    for name in ("tiny", "tiny_xl", "sd15", "sdxl"):  # the UNet presets are unchanged
        assert PRESETS[name].kind == "unet" and PRESETS[name].sampler_defaults == {}
    assert PRESETS["tiny_xl"].time_ids and not sd3.time_ids


@pytest.mark.parametrize("name,figures", [("sd35", "65 GB for its two transformers in float32 (33 GB in bfloat16)"),
                                          ("flux", "95 GB for its two transformers in float32 (48 GB in bfloat16)")])
def test_large_flow_presets_refused_on_cpu(name, figures):
    with pytest.raises(ConfigError, match=rf"preset '{name}' needs about {re.escape(figures)}; refused on CPU .*--force"):
        build_preset(name)
    with pytest.raises(ConfigError, match="random weights only"):
        build_preset("tiny_flux", weights="/nowhere")


def test_large_presets_built_on_the_target_device_in_dtype():
    """The GPU path's construction, on the meta device: every parameter and buffer is created on the
    target device in bfloat16 (a host or float32 copy would show as another device or dtype), and the
    stated memory figures match the parameter counts."""
    pair = build_preset("sd35", device="meta", dtype=torch.bfloat16)
    tensors = [t for m in (pair.student.transformer, pair.teacher.transformer)
               for t in (*m.parameters(), *m.buffers())]
    assert {t.device.type for t in tensors} == {"meta"} and {t.dtype for t in tensors} == {torch.bfloat16}
    info = pair.info
    assert sum(t.numel() for t in tensors) * 2 / 1e9 == pytest.approx(info.bf16_gb, abs=0.05)
    assert sum(t.numel() for t in tensors) * 4 / 1e9 == pytest.approx(info.fp32_gb, abs=0.1)
    flux = PRESETS["flux"]
    dev = build_transformer(flux, teacher=True, device=torch.device("meta"), dtype=torch.bfloat16, seed=0)
    ps = list(dev.parameters())
    assert dev.config.guidance_embeds and {p.device.type for p in ps} == {"meta"}
    assert {p.dtype for p in ps} == {torch.bfloat16}
    assert sum(p.numel() for p in ps) * 2 / 1e9 == pytest.approx(flux.bf16_gb / 2, abs=0.05)

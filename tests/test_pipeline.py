"""distpp.Pipeline on tiny random-weight models saved like diffusers repos and loaded through
from_pretrained (offline): SD1.5-style and SDXL-style conditioning, LoRA / UNet-file / pipeline
students, seed pairing, the prompt cache, errors raised before any weights load, unguided images equal
to diffusers' own pipelines, and the Runtime underneath (graphs, padded buckets, timers, lifecycle)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from distpp import ConfigError, InputError, Pipeline, WeightsNotFoundError
from helpers import assert_close, rel_err
from tiny_repos import VOCAB_MAX_LEN, _has_peft, tiny_repos_for


@pytest.fixture(scope="session")
def repos(tmp_path_factory):
    return tiny_repos_for(tmp_path_factory)


@pytest.fixture
def no_weights(monkeypatch):
    """Any weights load fails the test: configs and file headers may be read, tensors may not."""
    import diffusers
    import safetensors.torch
    import transformers

    def loaded(*a, **k):
        raise AssertionError("weights were loaded for a config that cannot run")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTextModel,
                transformers.CLIPTextModelWithProjection):
        monkeypatch.setattr(cls, "from_pretrained", loaded)
    monkeypatch.setattr(safetensors.torch, "load_file", loaded)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: real_load(*a, **k) if k.get("mmap") else loaded())


@pytest.fixture(scope="module")
def sd_pipe(repos):
    return Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                    local_files_only=True, lam=0.3, guided_steps=1, steps=2)


@pytest.fixture(scope="module")
def xl_pipe(repos):
    return Pipeline.from_pretrained(student=repos["xl_lcm"], teacher=repos["xl_teacher"], family="lcm",
                                    local_files_only=True, lam=0.3, guided_steps=1, steps=2)


# ------------------------------------------------------------------------------------------------------
# Images and conditioning.
# ------------------------------------------------------------------------------------------------------
def test_sd15_style_images_have_the_requested_size(sd_pipe):
    assert sd_pipe.report.student_kind == "unet" and not sd_pipe.report.sdxl
    assert sd_pipe.teacher_text is None and sd_pipe.report.shared_text_encoders
    images = sd_pipe(["a cat", "a dog on a mat"], height=32, width=48, seeds=[3, 4])
    assert [im.size for im in images] == [(48, 32), (48, 32)]
    assert all(im.mode == "RGB" for im in images)
    pt = sd_pipe(["a cat"], output_type="pt", seeds=[3])
    assert pt.shape == (1, 3, 32, 32) and pt.dtype == torch.float32
    assert torch.isfinite(pt).all() and pt.min() >= 0 and pt.max() <= 1 and pt.std() > 0


def test_sdxl_style_images_and_conditioning(xl_pipe):
    assert xl_pipe.report.sdxl and xl_pipe.student_text.sdxl
    c = xl_pipe.encode(["a cat", "a mat"], ["", "blurry"], 32, 48)
    assert c["cond"].encoder_hidden_states.shape == (2, VOCAB_MAX_LEN, 32)
    assert c["cond"].text_embeds.shape == (2, 32)
    assert c["cond"].time_ids.tolist() == [[32, 48, 0, 0, 32, 48]] * 2
    # force_zeros_for_empty_prompt: the empty negative prompt is zeros, the other is encoded.
    assert float(c["uncond"].encoder_hidden_states[0].abs().max()) == 0.0
    assert float(c["uncond"].text_embeds[0].abs().max()) == 0.0
    assert float(c["uncond"].encoder_hidden_states[1].abs().max()) > 0.0
    images = xl_pipe(["a cat", "a mat"], negative_prompt=["", "blurry"], height=32, width=48, output_type="pt")
    assert images.shape == (2, 3, 32, 48) and torch.isfinite(images).all()


def test_sdxl_states_match_a_direct_encoder_call(xl_pipe):
    enc = xl_pipe.student_text
    tok1, tok2 = enc.tokenizers
    e1, e2 = enc.encoders
    ids1 = tok1(["a cat"], padding="max_length", max_length=VOCAB_MAX_LEN, return_tensors="pt").input_ids
    ids2 = tok2(["a cat"], padding="max_length", max_length=VOCAB_MAX_LEN, return_tensors="pt").input_ids
    with torch.no_grad():
        o1, o2 = e1(ids1, output_hidden_states=True), e2(ids2, output_hidden_states=True)
    ref = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    states, pooled = enc.encode(["a cat"])
    assert_close(states, ref, 1e-6, "SDXL states")
    assert_close(pooled, o2.text_embeds, 1e-6, "pooled")


def test_prompts_are_encoded_once_and_cached(sd_pipe):
    enc = sd_pipe.student_text
    before = enc.encoder_calls
    a = enc.encode(["cache me", "also me", "cache me"])[0]
    assert enc.encoder_calls == before + 1  # one batch for the two unseen prompts
    b = enc.encode(["also me", "cache me"])[0]
    assert enc.encoder_calls == before + 1  # served from the cache
    assert torch.equal(a[1], b[0]) and torch.equal(a[0], b[1]) and torch.equal(a[0], a[2])
    assert not torch.equal(a[0], a[1])


# ------------------------------------------------------------------------------------------------------
# Seed pairing: guided and unguided runs share the base noise.
# ------------------------------------------------------------------------------------------------------
def test_guided_and_unguided_runs_are_seed_paired(sd_pipe):
    prompts, seeds = ["a cat", "a dog"], [11, 12]
    plain = sd_pipe(prompts, seeds=seeds, guided_steps=0, output_type="latent")
    lam0 = sd_pipe(prompts, seeds=seeds, lam=0.0, output_type="latent")
    guided = sd_pipe(prompts, seeds=seeds, output_type="latent")
    assert_close(lam0, plain, 1e-6, "lam=0 vs G=0")
    assert rel_err(guided, plain) > 1e-3
    c = sd_pipe.encode(prompts, ["", ""], 32, 32)
    p_plain = sd_pipe.sampler(0).prepare(c["cond"], latent_shape=(4, 16, 16), seeds=seeds)
    p_guided = sd_pipe.sampler().prepare(c["cond"], uncond=c["uncond"], latent_shape=(4, 16, 16), seeds=seeds)
    drawn = [k for k, d in enumerate(sd_pipe.sampler().schedule.draws_noise) if d]
    assert drawn and torch.equal(p_plain.x, p_guided.x)
    assert all(torch.equal(p_plain.z[k], p_guided.z[k]) for k in drawn)  # rows of other steps are unused


def test_seeds_are_per_image(sd_pipe):
    both = sd_pipe(["a cat", "a dog"], seeds=[5, 6], output_type="latent")
    second = sd_pipe(["a dog"], seeds=[6], output_type="latent")
    assert_close(both[1:], second, 1e-4, "batched vs single")
    assert rel_err(both[0], both[1]) > 0.1


# ------------------------------------------------------------------------------------------------------
# Student kinds and the VAE.
# ------------------------------------------------------------------------------------------------------
def test_unet_file_student(repos):
    pipe = Pipeline.from_pretrained(student=repos["sd_file"], teacher=repos["sd_teacher"], family="euler",
                                    student_weights="student_4step_unet.safetensors", local_files_only=True, steps=2)
    assert pipe.report.student_kind == "unet_file"
    assert rel_err(pipe.student.unet.conv_in.weight, pipe.teacher.unet.conv_in.weight) > 0.1
    assert pipe(["a cat"], output_type="pt").shape == (1, 3, 32, 32)


def test_pipeline_student_shares_encoders_and_vae(repos):
    pipe = Pipeline.from_pretrained(student=repos["xl_turbo"], teacher=repos["xl_teacher"], family="euler_a",
                                    local_files_only=True, steps=1)
    assert pipe.report.student_kind == "pipeline"
    assert pipe.report.shared_text_encoders and pipe.teacher_text is None
    assert pipe.report.vae_source == "teacher"
    assert pipe(["a cat"], output_type="pt", height=16, width=16).shape == (1, 3, 16, 16)


def test_pipeline_student_brings_its_schedule(repos, tmp_path):
    """A full student pipeline's scheduler config (spacing, betas) sets the sampler's schedule, as diffusers'
    own pipeline for that student would; keys of another scheduler class (DDPM's clip_sample) do not."""
    from distpp.schedules import build_schedule

    student = tmp_path / "turbo"
    shutil.copytree(repos["xl_turbo"], student)
    sched_file = student / "scheduler" / "scheduler_config.json"
    steps = {}
    for spacing in ("leading", "trailing"):
        cfg = json.loads(sched_file.read_text())
        cfg.update(timestep_spacing=spacing, clip_sample=True)
        sched_file.write_text(json.dumps(cfg))
        pipe = Pipeline.from_pretrained(student=str(student), teacher=repos["xl_teacher"], family="euler_a",
                                        local_files_only=True, steps=2)
        assert pipe.config.scheduler_config["timestep_spacing"] == spacing
        assert "clip_sample" not in pipe.config.scheduler_config
        steps[spacing] = pipe.sampler().schedule.timesteps
        assert steps[spacing] == build_schedule("euler_a", 2, scheduler_config={"timestep_spacing": spacing}).timesteps
    assert steps["leading"] != steps["trailing"]


def test_upcast_vae_decodes_in_float32(repos):
    pipe = Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                    local_files_only=True, dtype=torch.bfloat16, upcast_vae=True, steps=1)
    assert pipe.report.vae_dtype == torch.float32
    assert pipe.student.spec.dtype == torch.bfloat16
    out = pipe(["a cat"], output_type="pt")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any weights load or any model runs.
# ------------------------------------------------------------------------------------------------------
def test_unknown_family_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="unknown family 'lcm2'"):
        Pipeline.from_pretrained(student=str(tmp_path / "nope"), teacher=str(tmp_path / "nope"), family="lcm2")
    with pytest.raises(ConfigError, match="student_kind"):
        Pipeline.from_pretrained(student="a", teacher="b", family="lcm", student_kind="ckpt")


def test_device_dtype_and_schedule_are_refused_before_any_weights_load(no_weights, tmp_path, repos):
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        Pipeline.from_pretrained(student=str(tmp_path / "nope"), teacher=str(tmp_path / "nope"), family="lcm",
                                 device="cpu", dtype=torch.float16)
    # LCM's step cap in distpp's words: diffusers' own message is about `strength`, which distpp does not have
    with pytest.raises(ConfigError, match=r"steps=60 is more than the lcm schedule's original_inference_steps \(50\)") \
            as e:
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm", steps=60,
                                 local_files_only=True)
    assert "strength" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown backend 'fast'"):
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                 local_files_only=True, backend="fast")
    with pytest.raises(ConfigError, match="graphs must be"):
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                 local_files_only=True, graphs="yes")
    with pytest.raises(ConfigError, match="unknown option.* stepz for Pipeline.from_pretrained"):
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm", stepz=2)
    with pytest.raises(ConfigError, match="positive multiples of the VAE scale factor 2"):
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                 local_files_only=True, sizes=[(31, 32)])


def test_home_relative_paths_are_expanded(monkeypatch, repos):
    home = os.path.dirname(repos["sd_lcm"])
    monkeypatch.setenv("HOME", home)
    pipe = Pipeline.from_pretrained(student="~/sd_lcm", teacher="~/sd_teacher", family="lcm", local_files_only=True,
                                    steps=2)
    assert pipe.report.student_kind == "unet"


def test_missing_teacher_scheduler_config_warns(tmp_path, repos):
    teacher = tmp_path / "teacher_no_sched"
    shutil.copytree(repos["sd_teacher"], teacher)
    shutil.rmtree(teacher / "scheduler")
    with pytest.warns(UserWarning, match="assuming 'epsilon'"):
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=str(teacher), family="lcm", local_files_only=True,
                                 steps=2)


def test_missing_local_weights(tmp_path, repos):
    with pytest.raises(WeightsNotFoundError, match="no model folder"):
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=str(tmp_path / "absent"), family="lcm")
    with pytest.raises(WeightsNotFoundError, match="no model folder"):
        Pipeline.from_pretrained(student=str(tmp_path / "absent"), teacher=repos["sd_teacher"], family="lcm")


def test_hub_id_not_cached_offline(monkeypatch, repos):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError, match="offline"):
        Pipeline.from_pretrained(student="distpp-test/no-such-student", teacher=repos["sd_teacher"], family="lcm")
    with pytest.raises(WeightsNotFoundError, match="offline"):
        Pipeline.from_pretrained(student=repos["sd_lcm"], teacher="distpp-test/no-such-teacher", family="lcm")


def test_latent_channel_mismatch(repos):
    with pytest.raises(ConfigError, match="8 latent channels but the teacher 4"):
        Pipeline.from_pretrained(student=repos["bad_channels"], teacher=repos["sd_teacher"], family="lcm",
                                 local_files_only=True)


def test_conditioning_width_mismatch(repos):
    with pytest.raises(ConfigError, match="cross_attention_dim is 16"):
        Pipeline.from_pretrained(student=repos["bad_width"], teacher=repos["sd_teacher"], family="lcm",
                                 local_files_only=True)
    with pytest.raises(ConfigError, match="SD1.5-style and SDXL-style"):
        Pipeline.from_pretrained(student=repos["xl_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                 local_files_only=True)


def test_bad_call_arguments(sd_pipe):
    with pytest.raises(InputError, match="no prompts"):
        sd_pipe([])
    with pytest.raises(InputError, match="negative_prompt"):
        sd_pipe(["a", "b"], negative_prompt=["x"])
    with pytest.raises(InputError, match="multiples of the VAE scale factor 2"):
        sd_pipe(["a"], height=31)
    with pytest.raises(ConfigError, match="output_type"):
        sd_pipe(["a"], output_type="jpeg")


@pytest.mark.cuda
def test_float16_on_cuda_upcasts_the_vae(repos):
    pipe = Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                    local_files_only=True, device="cuda", steps=2, lam=0.3)
    assert pipe.student.spec.dtype == torch.float16 and pipe.report.vae_dtype == torch.float32
    guided = pipe(["a cat", "a dog"], seeds=[1, 2], output_type="pt")
    plain = pipe(["a cat", "a dog"], seeds=[1, 2], output_type="pt", guided_steps=0)
    assert guided.shape == (2, 3, 32, 32) and torch.isfinite(guided).all() and guided.is_cuda
    assert rel_err(guided, plain) > 1e-4


def test_unreachable_hub_is_reported_as_such(monkeypatch):
    """LocalEntryNotFoundError (no network, not cached) subclasses EntryNotFoundError (no such file):
    it must not be mistaken for a missing file."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from distpp.pipeline.fetch import fetch

    def unreachable(*a, **k):
        raise LocalEntryNotFoundError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsNotFoundError, match="could not reach the Hub"):
        fetch("org/model", "model_index.json", None, False)
    assert fetch("org/model", "model_index.json", None, True) is None


# ------------------------------------------------------------------------------------------------------
# Unguided (guided_steps=0) images equal diffusers' own pipeline for each student form, same prompts and
# per-sample generators (the randomness contract), no CFG for the student (as distilled students run).
# ------------------------------------------------------------------------------------------------------
PROMPTS, SEEDS = ["a cat", "a red dog"], [3, 4]


def _lcm_scheduler():
    from diffusers import LCMScheduler

    from distpp.schedules import SD_SCHEDULE

    return LCMScheduler(**SD_SCHEDULE, original_inference_steps=50, timestep_scaling=10.0)


def _sd_with(repos, teacher, **components):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "xl" in teacher:
        return StableDiffusionXLPipeline.from_pretrained(repos[teacher], **components)
    return StableDiffusionPipeline.from_pretrained(repos[teacher], safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, **components)


def _unet_with_file(repos, file):
    from diffusers import UNet2DConditionModel

    from distpp.pipeline.fetch import load_state_dict

    unet = UNet2DConditionModel.from_pretrained(repos["xl_teacher"], subfolder="unet")
    unet.load_state_dict(load_state_dict(os.path.join(repos["xl_file"], file)))
    return unet


def _lcm_pipeline(repos, student):
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.from_pretrained(repos[student])


def _lora_pipeline(repos, lora):
    pipe = _sd_with(repos, "sd_teacher", scheduler=_lcm_scheduler())
    pipe.load_lora_weights(repos[lora])  # the adapter stays unfused, at scale 1
    return pipe


def _xl_pipeline(repos, student):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(repos[student])


# name: (distpp from_pretrained kwargs, diffusers pipeline builder, diffusers call kwargs)
DIFFUSERS_CASES = {
    "sd15_lcm_pipeline": (dict(student="sd_lcm_pipe", teacher="sd_teacher", family="lcm", steps=2),
                          lambda r: _lcm_pipeline(r, "sd_lcm_pipe"), dict(num_inference_steps=2, guidance_scale=8.5)),
    "sd15_lcm_other_tokenizer": (dict(student="sd_lcm_tok", teacher="sd_teacher", family="lcm", steps=2),
                                 lambda r: _lcm_pipeline(r, "sd_lcm_tok"),
                                 dict(num_inference_steps=2, guidance_scale=8.5)),
    "lcm_lora": (dict(student="lora", teacher="sd_teacher", family="lcm", steps=2),
                 lambda r: _lora_pipeline(r, "lora"), dict(num_inference_steps=2, guidance_scale=1.0)),
    "lcm_lora_metadata": (dict(student="lora_meta", teacher="sd_teacher", family="lcm", steps=2),
                          lambda r: _lora_pipeline(r, "lora_meta"), dict(num_inference_steps=2, guidance_scale=1.0)),
    "sdxl_lcm_unet_latents_mean": (
        dict(student="xl_lcm", teacher="xl_teacher_lm", family="lcm", steps=2),
        lambda r: _sd_with(r, "xl_teacher_lm", unet=__import__("diffusers").UNet2DConditionModel.from_pretrained(
            r["xl_lcm"]), scheduler=_lcm_scheduler()),
        dict(num_inference_steps=2, guidance_scale=8.5)),
    "turbo_euler_a": (dict(student="xl_turbo", teacher="xl_teacher", family="euler_a", steps=2),
                      lambda r: _xl_pipeline(r, "xl_turbo"), dict(num_inference_steps=2, guidance_scale=0.0)),
    "lightning_euler": (
        dict(student="xl_file", student_weights="student_unet.safetensors", teacher="xl_teacher", family="euler",
             steps=2),
        lambda r: _sd_with(r, "xl_teacher", unet=_unet_with_file(r, "student_unet.safetensors"),
                           scheduler=__import__("diffusers").EulerDiscreteScheduler(
                               beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               timestep_spacing="trailing")),
        dict(num_inference_steps=2, guidance_scale=0.0)),
    "dmd2": (dict(student="xl_file", student_weights="student_unet.bin", teacher="xl_teacher", family="dmd2"),
             lambda r: _sd_with(r, "xl_teacher", unet=_unet_with_file(r, "student_unet.bin"),
                                scheduler=_lcm_scheduler()),
             dict(timesteps=[999, 749, 499, 249], guidance_scale=0.0)),
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CASES))
def test_unguided_images_equal_diffusers_pipeline(repos, case):
    ours_kw, build, call_kw = DIFFUSERS_CASES[case]
    if "lora" in ours_kw["student"] and not _has_peft():
        pytest.skip("LoRA students need peft")
    kw = {k: repos[v] if k in ("student", "teacher") else v for k, v in ours_kw.items()}
    pipe = Pipeline.from_pretrained(**kw, local_files_only=True, guided_steps=0)
    ours = pipe(PROMPTS, seeds=SEEDS, output_type="pt", height=32, width=32)
    ref_pipe = build(repos)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                       height=32, width=32, **call_kw).images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    err = float((ours - ref).abs().max())
    assert err <= 1e-5, f"{case}: max abs image difference {err:.2e} vs diffusers"
    assert float(ref.std()) > 1e-3  # a real image, not a constant one both sides agree on
    np_images = pipe(PROMPTS, seeds=SEEDS, output_type="np", height=32, width=32)
    assert np_images.shape == (2, 32, 32, 3) and np_images.dtype.name == "float32"
    assert np.array_equal(np_images, ours.permute(0, 2, 3, 1).numpy())


def test_latents_mean_and_std_are_applied(repos):
    """The VAE's latents_mean / latents_std (SDXL-style configs) change the decode, as in diffusers."""
    pipe = Pipeline.from_pretrained(student=repos["xl_lcm"], teacher=repos["xl_teacher_lm"], family="lcm",
                                    local_files_only=True, steps=1, guided_steps=0)
    cfg = pipe.vae.config
    assert cfg.latents_mean is not None and cfg.latents_std is not None
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    mean, std = (torch.tensor(v).view(1, 4, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
    with torch.no_grad():
        ref = (pipe.vae.decode(latents * std / cfg.scaling_factor + mean).sample / 2 + 0.5).clamp(0, 1)
        plain = (pipe.vae.decode(latents / cfg.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    out = pipe.decode(latents)
    assert float((out - ref).abs().max()) <= 1e-6
    assert float((plain - ref).abs().max()) > 1e-2


@pytest.mark.skipif(not _has_peft(), reason="LoRA students need peft")
def test_lora_adapter_metadata_sets_the_scale(repos):
    """Same LoRA factors, saved with and without diffusers' adapter metadata (rank 4, alpha 8): with it
    the fused change is alpha / rank = 2 times the one read without it (alpha inferred = rank)."""
    from tiny_repos import LORA_ALPHA, LORA_RANK

    kw = dict(teacher=repos["sd_teacher"], family="lcm", local_files_only=True, steps=1, guided_steps=0)
    plain = Pipeline.from_pretrained(student=repos["lora"], **kw)
    meta = Pipeline.from_pretrained(student=repos["lora_meta"], **kw)
    assert meta.report.lora_metadata and not plain.report.lora_metadata
    # a fused copy: a plain UNet of its own, no adapter layers left in it or in the teacher
    assert plain.report.student_kind == "lora" and plain.report.lora_mode == "fused_copy"
    assert plain.student.unet is not plain.teacher.unet
    assert not any("lora" in k for k in list(plain.student.unet.state_dict()) + list(plain.teacher.unet.state_dict()))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = plain.teacher.unet.state_dict()[name]
    d_plain = plain.student.unet.state_dict()[name] - base
    d_meta = meta.student.unet.state_dict()[name] - base
    assert float(d_plain.abs().max()) > 1e-3
    assert_close(d_meta, (LORA_ALPHA / LORA_RANK) * d_plain, 1e-5, "fused delta with metadata")


def test_encoders_with_other_tokenizers_are_not_shared(repos):
    shared = Pipeline.from_pretrained(student=repos["sd_lcm_pipe"], teacher=repos["sd_teacher"], family="lcm",
                                      local_files_only=True, steps=1)
    assert shared.report.shared_text_encoders and shared.teacher_text is None
    other = Pipeline.from_pretrained(student=repos["sd_lcm_tok"], teacher=repos["sd_teacher"], family="lcm",
                                     local_files_only=True, steps=1)
    assert not other.report.shared_text_encoders and other.teacher_text is not None
    # same encoder weights, other ids: the student's and the teacher's states for "a cat" differ
    s_states, _ = other.student_text.encode(["a cat"])
    t_states, _ = other.teacher_text.encode(["a cat"])
    assert rel_err(s_states, t_states) > 1e-3
    c = other.encode(["a cat"], [""], 32, 32)
    assert torch.equal(c["cond"].encoder_hidden_states, s_states)
    assert torch.equal(c["teacher_cond"].encoder_hidden_states, t_states)


def test_unet_file_of_another_architecture_is_refused_before_loading(no_weights, repos):
    with pytest.raises(ConfigError, match=r"does not fit the teacher's UNet: \d+ tensors of another shape \(e.g. "
                                          r"'.*attn2.to_k.weight': \(\d+, 16\) in the file, \(\d+, 32\)"):
        Pipeline.from_pretrained(student=repos["sd_file"], student_weights="other_width.safetensors",
                                 teacher=repos["sd_teacher"], family="euler", local_files_only=True)
    # an SDXL-style file on an SD1.5-style teacher; a torch .bin is read memory-mapped
    with pytest.raises(ConfigError, match="does not fit the teacher's UNet: 4 unexpected keys"):
        Pipeline.from_pretrained(student=repos["xl_file"], student_weights="student_unet.bin",
                                 teacher=repos["sd_teacher"], family="dmd2", local_files_only=True)


def _tiny(repos, student, teacher, family, **kw):
    """Pipeline.from_pretrained on two tiny repos (by name), offline."""
    return Pipeline.from_pretrained(student=repos[student], teacher=repos[teacher], family=family,
                                    local_files_only=True, **kw)


def test_family_must_fit_the_student_pipelines_scheduler(no_weights, repos):
    with pytest.raises(ConfigError, match=r"steps with LCMScheduler \(family lcm or dmd2\) but family='euler' "
                                          r"was passed: pass family='lcm', or allow_family_mismatch=True"):
        _tiny(repos, "sd_lcm_pipe", "sd_teacher", "euler")
    with pytest.raises(ConfigError, match="EulerAncestralDiscreteScheduler .*pass family='euler_a'"):
        _tiny(repos, "xl_turbo", "xl_teacher", "lcm")


def test_family_mismatch_can_be_allowed(repos):
    with pytest.warns(UserWarning, match="sampling it as 'euler' because allow_family_mismatch=True"):
        pipe = _tiny(repos, "sd_lcm_pipe", "sd_teacher", "euler", allow_family_mismatch=True, steps=1)
    assert pipe.config.family == "euler"


# ------------------------------------------------------------------------------------------------------
# The Runtime behind the pipeline: graphs, buckets, timers, lifecycle.
# ------------------------------------------------------------------------------------------------------
def _sibling(pipe: Pipeline, **runtime) -> Pipeline:
    """Another Pipeline on ``pipe``'s loaded parts (no reload) with other runtime options."""
    return Pipeline(pipe.student.unet, pipe.teacher.unet, pipe.vae, pipe.student_text, pipe.teacher_text,
                    config=pipe.config, device=pipe.device, dtype=pipe.dtype,
                    force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt, **runtime)


def test_graphs_on_equals_graphs_off_bit_for_bit(xl_pipe):
    """graphs=True (off CUDA: the GraphRunner's loop over its static buffers) gives the very images of
    graphs=False; every call reaches the runner's warmed bucket."""
    off = _sibling(xl_pipe, graphs=False)
    on = _sibling(xl_pipe, graphs=True, batch_sizes=(2,))
    assert not off.runtime.stats.graphs and on.runtime.stats.graphs
    records = on.warmup(guided_steps=[1, 0], progress=False)
    assert [(r.config.guided_steps, r.batch, r.latent_shape) for r in records] == [(1, 2, (4, 16, 16)),
                                                                                  (0, 2, (4, 16, 16))]
    warmed = on.runtime.stats.static_runs  # warmup ran each bucket once
    for g in (1, 0):
        a = off(["a cat", "a mat"], seeds=[5, 6], guided_steps=g, output_type="pt")
        b = on(["a cat", "a mat"], seeds=[5, 6], guided_steps=g, output_type="pt")
        assert torch.equal(a, b), f"guided_steps={g}"
    st = on.runtime.stats
    assert st.static_runs - warmed == 2 and st.calls == 2 and st.padded_calls == 0
    assert off.runtime.stats.static_runs == 0 and off.runtime.stats.calls == 2


def test_a_padded_bucket_returns_each_unpadded_sample(sd_pipe):
    on = _sibling(sd_pipe, graphs=True, batch_sizes=(4,))
    on.warmup(progress=False)
    prompts, seeds = ["a cat", "a dog", "a red mat"], [7, 8, 9]
    batch = on(prompts, seeds=seeds, output_type="pt")
    assert batch.shape == (3, 3, 32, 32) and on.runtime.stats.padded_calls == 1
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = sd_pipe([p], seeds=[s], output_type="pt")
        assert_close(batch[i:i + 1], alone, 1e-5, f"padded sample {i}")


def test_timer_laps_encode_loop_and_decode(sd_pipe):
    from distpp.timing import StageTimer

    timer, steps = StageTimer("cpu"), []
    timer.begin()
    sd_pipe(["a cat"], output_type="pt", timer=timer, progress=steps.append)
    totals = timer.totals()
    for stage in ("encode", "student", "teacher", "guidance", "decode"):
        assert totals.get(stage, 0.0) > 0.0, stage
    assert steps == [1] * sd_pipe.config.num_steps  # the progress hook still counts student steps


def test_from_pretrained_warmup_and_close(repos):
    pipe = Pipeline.from_pretrained(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm",
                                    local_files_only=True, steps=1, graphs=True, batch_sizes=(1, 2),
                                    sizes=[(32, 48)], warmup=True)
    assert [(r.batch, r.latent_shape) for r in pipe.runtime.stats.warmups] == [(1, (4, 16, 24)), (2, (4, 16, 24))]
    assert pipe.runtime.backend == "eager"
    warmed = pipe.runtime.stats.static_runs
    pipe(["a cat"], output_type="latent", height=32, width=48)
    assert pipe.runtime.stats.static_runs == warmed + 1
    with pipe:
        pass  # leaving the block closes it
    with pytest.raises(ConfigError, match="closed"):
        pipe(["a cat"], output_type="latent")
    pipe.close()  # idempotent

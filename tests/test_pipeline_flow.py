"""distpp.Pipeline on tiny flow-matching pipelines saved like diffusers repos and loaded offline: SD3-style
(CLIP-L + CLIP-G + T5, SD3Transformer2DModel) and FLUX-style (CLIP-L + T5, FluxTransformer2DModel, an
embedded-guidance teacher), both with a 16-channel VAE with shift_factor and FlowMatchEulerDiscreteScheduler.
The conditioning and the unguided images equal StableDiffusion3Pipeline's / FluxPipeline's, guided runs
call the teacher with CFG (SD3) or its guidance input and no uncond (FLUX), and bad combinations are
refused before any weights load."""

from __future__ import annotations

import pytest
import torch

from distpp import ConfigError, Pipeline
from distpp.pipeline import KNOWN_PAIRS
from tiny_repos import T5_MAX_LEN, build_tiny_flux_repos, build_tiny_sd3_repos

PROMPTS, SEEDS = ["a cat", "a red dog"], [3, 4]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return build_tiny_sd3_repos(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def pipe(repos):
    return Pipeline.from_pretrained(repos["sd3_turbo"], repos["sd3_teacher"], "flow", steps=2, guided_steps=0,
                                    lam=0.5, cfg=3.5, local_files_only=True, max_sequence_length=T5_MAX_LEN)


@pytest.fixture(scope="module")
def ref_pipe(repos):
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(repos["sd3_turbo"])
    p.set_progress_bar_config(disable=True)
    return p


def test_loads_shared_encoders_schedule_and_flow_options(pipe):
    assert pipe.report.shared_text_encoders and pipe.report.vae_source == "teacher"
    assert pipe.teacher_text is None  # one encoder set serves both: the student ships the teacher's
    cfg = pipe.config
    assert cfg.family == "flow" and cfg.prediction_type == cfg.teacher_prediction_type == "flow"
    assert cfg.scheduler_config["shift"] == 3.0 and not cfg.scheduler_config["use_dynamic_shifting"]
    assert dict(cfg.family_options) == {"timestep_scale": 1000.0, "sigmas": "scheduler"}
    assert pipe.default_size == 32 and pipe.latent_channels == 16


def test_states_equal_diffusers_encode_prompt(pipe, ref_pipe):
    states, pooled = pipe.student_text.encode(PROMPTS)
    with torch.no_grad():
        ref, _, ref_pooled, _ = ref_pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=T5_MAX_LEN)
    assert states.shape == ref.shape == (2, 8 + T5_MAX_LEN, 48) and pooled.shape == ref_pooled.shape == (2, 32)
    assert torch.equal(states, ref) and torch.equal(pooled, ref_pooled)
    # CLIP-L | CLIP-G states (16 + 16) zero-padded to the T5 width 48, then the T5 rows
    assert float(states[:, :8, 32:].abs().max()) == 0.0 and float(states[:, :8, :32].abs().min()) > 0.0
    assert float(states[:, 8:].abs().max()) > 0.0


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])  # Turbo's 0, and 1: both run no CFG in diffusers
def test_unguided_images_equal_stable_diffusion_3_pipeline(pipe, ref_pipe, guidance_scale):
    ours = pipe(PROMPTS, seeds=SEEDS, output_type="pt", height=32, width=32)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], num_inference_steps=2,
                       guidance_scale=guidance_scale, height=32, width=32, output_type="pt",
                       max_sequence_length=T5_MAX_LEN).images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    err = float((ours - ref).abs().max())
    assert err <= 1e-5, f"max abs image difference {err:.2e} vs StableDiffusion3Pipeline"
    assert float(ref.std()) > 1e-3


def test_guided_run_calls_the_teacher_with_cfg(pipe):
    rows = []
    hook = pipe.teacher.transformer.register_forward_pre_hook(
        lambda m, a, kw: rows.append(int(kw["hidden_states"].shape[0])), with_kwargs=True)
    try:
        guided = pipe(PROMPTS, seeds=SEEDS, output_type="pt", guided_steps=1)
    finally:
        hook.remove()
    plain = pipe(PROMPTS, seeds=SEEDS, output_type="pt", guided_steps=0)
    assert sum(rows) == 2 * len(PROMPTS)  # one guided step: cond + uncond rows of each prompt
    assert bool(guided.isfinite().all())
    assert float((guided - plain).abs().max()) > 1e-4


@pytest.fixture
def no_transformer_weights(monkeypatch):
    import diffusers

    def loaded(*a, **k):
        raise AssertionError("weights were loaded for a config that cannot run")

    monkeypatch.setattr(diffusers.SD3Transformer2DModel, "from_pretrained", loaded)


@pytest.mark.parametrize("kwargs, match", [
    (dict(family="euler"), "pass family='flow'"),
    (dict(family="flow", student_kind="unet"), "not supported for transformer pipelines"),
    (dict(family="flow", prediction_type="epsilon"), "must be 'flow'"),
    (dict(family="flow", max_sequence_length=0), "max_sequence_length"),
    (dict(family="flow", student_weights="unet.safetensors"), "for UNet students"),
    (dict(family="flow", family_options={"use_dynamic_shifting": True}), "needs exactly one of"),
])
def test_bad_settings_are_refused_before_any_weights_load(no_transformer_weights, repos, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Pipeline.from_pretrained(repos["sd3_turbo"], repos["sd3_teacher"], local_files_only=True, **kwargs)


def test_sd35_turbo_known_pair():
    k = KNOWN_PAIRS["sd35-turbo"]
    assert (k.student, k.teacher) == ("stabilityai/stable-diffusion-3.5-large-turbo",
                                      "stabilityai/stable-diffusion-3.5-large")
    assert (k.family, k.steps, k.guided_steps, k.lam, k.cfg) == ("flow", 4, 1, 0.05, 3.5)


# ------------------------------------------------------------------------------------------------------
# FLUX: a schnell-style student (no guidance embedding) with a dev-style teacher (guidance_embeds).
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_repos(tmp_path_factory):
    return build_tiny_flux_repos(str(tmp_path_factory.mktemp("tiny_flux")))


def _flux(flux_repos, student="flux_schnell", **kw):
    return Pipeline.from_pretrained(flux_repos[student], flux_repos["flux_dev"], "flow", steps=2, guided_steps=0,
                                    lam=0.5, local_files_only=True, max_sequence_length=T5_MAX_LEN, **kw)


@pytest.fixture(scope="module")
def flux_pipe(flux_repos):
    return _flux(flux_repos)


def _flux_ref(flux_repos, student):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(flux_repos[student])
    p.set_progress_bar_config(disable=True)
    return p


def test_flux_loads_embedded_teacher_and_flux_options(flux_pipe):
    cfg = flux_pipe.config
    assert cfg.teacher_guidance == "embedded" and cfg.cfg == 3.5  # FluxPipeline's default guidance_scale
    assert dict(cfg.family_options) == {"timestep_scale": 1.0, "sigmas": "linspace"}
    assert cfg.scheduler_config["shift"] == 1.0 and not cfg.scheduler_config["use_dynamic_shifting"]
    assert flux_pipe.report.shared_text_encoders and flux_pipe.teacher_text is None
    assert flux_pipe.default_size == 128 * 2 and flux_pipe.latent_channels == 16 and flux_pipe.size_multiple == 4


def test_flux_states_equal_diffusers_encode_prompt(flux_pipe, flux_repos):
    states, pooled = flux_pipe.student_text.encode(PROMPTS)
    with torch.no_grad():
        ref, ref_pooled, _ = _flux_ref(flux_repos, "flux_schnell").encode_prompt(PROMPTS, None,
                                                                                 max_sequence_length=T5_MAX_LEN)
    assert states.shape == ref.shape == (2, T5_MAX_LEN, 48) and pooled.shape == ref_pooled.shape == (2, 16)
    assert torch.equal(states, ref) and torch.equal(pooled, ref_pooled)


# flux_dynamic: a dynamically shifted student schedule; FluxPipeline computes mu from the packed tokens,
# (32 / 2 / 2) ** 2 = 64 at 32x32 pixels, which distpp takes as family_options image_seq_len.
@pytest.mark.parametrize("student, options", [("flux_schnell", None), ("flux_own_text", {}),
                                              ("flux_dynamic", {"use_dynamic_shifting": True, "image_seq_len": 64})])
def test_flux_unguided_images_equal_flux_pipeline(flux_pipe, flux_repos, student, options):
    pipe = flux_pipe if options is None else _flux(flux_repos, student, family_options=options or None)
    ours = pipe(PROMPTS, seeds=SEEDS, output_type="pt", height=32, width=32)
    with torch.no_grad():  # schnell's transformer has no guidance input: guidance_scale is unused
        ref = _flux_ref(flux_repos, student)(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                                             num_inference_steps=2, guidance_scale=0.0, height=32, width=32,
                                             output_type="pt", max_sequence_length=T5_MAX_LEN).images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    err = float((ours - ref).abs().max())
    assert err <= 1e-5, f"{student}: max abs image difference {err:.2e} vs FluxPipeline"
    assert float(ref.std()) > 1e-3
    if options:  # the same transformer weights: only the shifted schedule differs
        plain = flux_pipe(PROMPTS, seeds=SEEDS, output_type="pt", height=32, width=32)
        assert float((ours - plain).abs().max()) > 1e-4


def test_flux_guided_run_feeds_the_teacher_its_guidance_and_no_uncond(flux_pipe):
    calls = []
    hook = flux_pipe.teacher.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((int(kw["hidden_states"].shape[0]), kw["guidance"].clone())), with_kwargs=True)
    try:
        guided = flux_pipe(PROMPTS, seeds=SEEDS, output_type="pt", guided_steps=1, cfg=2.0, height=32, width=32)
    finally:
        hook.remove()
    plain = flux_pipe(PROMPTS, seeds=SEEDS, output_type="pt", guided_steps=0, height=32, width=32)
    assert sum(b for b, _ in calls) == len(PROMPTS)  # one batch-B forward: no uncond rows
    assert all(torch.equal(g, torch.full_like(g, 2.0)) for _, g in calls)
    assert bool(guided.isfinite().all())
    assert float((guided - plain).abs().max()) > 1e-4


def test_flux_teacher_with_other_encoders_gets_its_own_conditioning_and_no_uncond(flux_repos):
    pipe = _flux(flux_repos, "flux_own_text")
    assert not pipe.report.shared_text_encoders and pipe.teacher_text is not None
    calls = []
    hook = pipe.teacher.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["encoder_hidden_states"].clone(), kw["pooled_projections"].clone())),
        with_kwargs=True)
    try:
        pipe(PROMPTS, seeds=SEEDS, output_type="pt", guided_steps=1, height=32, width=32)
    finally:
        hook.remove()
    states, pooled = pipe.teacher_text.encode(PROMPTS)
    student_states, student_pooled = pipe.student_text.encode(PROMPTS)
    assert len(calls) == 1 and calls[0][0].shape[0] == len(PROMPTS)  # one batch-B forward, no uncond rows
    assert torch.equal(calls[0][0], states) and torch.equal(calls[0][1], pooled)
    assert not torch.equal(pooled, student_pooled)  # the teacher's CLIP, not the student's


@pytest.mark.parametrize("student, kwargs, match", [
    ("flux_dev", {}, "embeds a guidance scale"),
    ("flux_schnell", dict(teacher_guidance="cfg"), "does not fit the teacher transformer"),
    ("flux_schnell", dict(family_options={"use_dynamic_shifting": True}), "needs exactly one of"),
])
def test_flux_bad_settings_are_refused_before_any_weights_load(monkeypatch, flux_repos, student, kwargs, match):
    import diffusers

    def loaded(*a, **k):
        raise AssertionError("weights were loaded for a config that cannot run")

    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", loaded)
    with pytest.raises(ConfigError, match=match):
        Pipeline.from_pretrained(flux_repos[student], flux_repos["flux_dev"], "flow", local_files_only=True, **kwargs)


def test_flux_schnell_known_pair():
    k = KNOWN_PAIRS["flux-schnell"]
    assert (k.student, k.teacher) == ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev")
    assert (k.family, k.steps, k.guided_steps, k.lam, k.cfg) == ("flow", 4, 1, 0.05, 3.5)

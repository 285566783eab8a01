"""The onnxruntime backend behind the Denoiser protocol: sampling equals eager; bad input fails early."""

import pytest
import torch

from distpp import Cond, InputError, Sampler, SamplerConfig, WeightsNotFoundError
from distpp.backends import make_pair
from distpp.backends.onnxruntime import OrtDenoiser
from distpp.errors import ConfigError
from helpers import assert_close

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ort_pair(tiny_onnx, tiny_pair):
    return (OrtDenoiser(tiny_onnx["student"], tiny_pair.student),
            OrtDenoiser(tiny_onnx["teacher"], tiny_pair.teacher))


@pytest.mark.parametrize("B", [1, 3])
def test_guided_sampling_matches_eager(ort_pair, tiny_pair, B):
    cond, uncond = tiny_pair.random_cond(B, seed=B)
    cfg = SamplerConfig(family="lcm", guided_steps=1)
    kw = dict(uncond=uncond, latent_shape=tiny_pair.info.latent_shape, seeds=list(range(10, 10 + B)))
    ref = Sampler(tiny_pair.student, tiny_pair.teacher, cfg).sample(cond, **kw)
    out = Sampler(*ort_pair, cfg).sample(cond, **kw)
    assert out.dtype == torch.float32 and out.shape == (B, *tiny_pair.info.latent_shape)
    assert_close(out, ref, 1e-5, "onnxruntime vs eager sampler")


def test_prepare_adds_the_w_embedding(ort_pair, tiny_pair):
    cond, _ = tiny_pair.random_cond(2)
    s, t = ort_pair
    assert s.prepare(cond).timestep_cond.shape == (2, tiny_pair.info.time_cond_proj_dim)
    assert t.prepare(cond).timestep_cond is None
    assert s.spec.prediction_type == tiny_pair.student.spec.prediction_type and s.spec.dtype == torch.float32


def test_bad_inputs_fail_before_running(ort_pair, tiny_pair):
    s, _ = ort_pair
    cond = s.prepare(tiny_pair.random_cond(2)[0])
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), 500.0)
    with pytest.raises(InputError, match="built for torch.float32"):
        s(x.double(), t, cond)
    with pytest.raises(InputError, match="dim 1 must be 4"):
        s(torch.randn(2, 3, 16, 16), t, cond)
    with pytest.raises(InputError, match="timestep_cond"):
        s(x, t, Cond(cond.encoder_hidden_states))
    with pytest.raises(WeightsNotFoundError, match="distpp.export"):
        OrtDenoiser("/nonexistent/model.onnx", tiny_pair.student)


def test_not_a_model_is_refused(tmp_path, tiny_pair):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is a text file, not a protobuf")
    with pytest.raises(ConfigError, match="not an ONNX model"):
        OrtDenoiser(bad, tiny_pair.student)


def test_make_pair_reports_export_and_build_time(tiny_onnx, tiny_pair):
    s, t, timings = make_pair(tiny_pair.student, tiny_pair.teacher, "onnxruntime", cache=tiny_onnx["cache"],
                              resolutions=(tuple(tiny_pair.info.latent_shape[1:]),), tokens=tiny_pair.info.tokens)
    assert isinstance(s, OrtDenoiser) and s.onnx_path == tiny_onnx["student"] and t.onnx_path == tiny_onnx["teacher"]
    assert timings["backend"] == "onnxruntime" and timings["export_s"] > 0 and timings["build_s"] > 0


def test_sdxl_added_conditioning(tmp_path):
    """tiny_xl: text_embeds and time_ids as inputs beside LCM's timestep_cond."""
    from distpp.cache import ArtifactCache
    from distpp.export import cached_export, verify
    from distpp.presets import build_preset

    pair = build_preset("tiny_xl")
    path = cached_export(pair.student, latent_hw=(16, 16), tokens=8, cache=ArtifactCache(tmp_path))
    den = OrtDenoiser(path, pair.student)
    assert den.io.names == ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond")
    assert verify(pair.student, path, latent_hw=(16, 16), tokens=8) <= 1e-4
    cond = den.prepare(pair.random_cond(2)[0])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([999.0, 259.0])
    assert_close(den(x, t, cond), pair.student(x, t, pair.student.prepare(pair.random_cond(2)[0])), 1e-4)

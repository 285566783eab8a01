"""The TensorRT backend's cache and runtime error paths around fakes (TensorRT cannot be installed here):
every builder setting is in the engine key, a bad engine is discarded through the cache, and a failed
execution is a runtime error, not a cache error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distpp.backends import tensorrt as trt_mod
from distpp.backends.plan import ShapeRange, compute_profile, read_io_spec
from distpp.cache import ArtifactCache
from distpp.errors import CacheError

IDENT = ("10.3.0", "NVIDIA H100", (9, 0))


def fake_build(calls):
    def build(onnx_path, profile, cfg, out, timing):
        calls.append(cfg)
        (out / trt_mod.ENGINE_FILE).write_bytes(b"engine" * 10)
        return b"timing"

    return build


@pytest.mark.parametrize("change", [dict(opt_level=5), dict(workspace_bytes=1 << 30)])
def test_engine_key_covers_every_builder_setting(tiny_onnx, tmp_path, change):
    calls, cache = [], ArtifactCache(tmp_path)
    args = (tiny_onnx["student"], ShapeRange(batch=(1, 1, 2), resolutions=((16, 16),)), 1)
    base = trt_mod.EngineConfig("fp16")
    f1 = trt_mod.cached_engine(*args, base, cache=cache, build=fake_build(calls), identity=IDENT)[0]
    f2 = trt_mod.cached_engine(*args, trt_mod.EngineConfig("fp16", **change), cache=cache, build=fake_build(calls),
                               identity=IDENT)[0]
    assert f1 != f2 and len(calls) == 2, "an engine built with other builder settings was reused"


class _FakeTrt:
    """Just enough of the tensorrt module for TrtDenoiser: an engine whose execution fails."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            context = SimpleNamespace(set_tensor_address=lambda name, ptr: None,
                                      set_input_shape=lambda name, shape: True,
                                      execute_async_v3=lambda stream: False)
            return SimpleNamespace(create_execution_context=lambda: context)


def test_failed_execution_is_a_runtime_error_not_a_cache_error(tiny_onnx, tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_mod, "_trt", lambda: _FakeTrt)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    io = read_io_spec(tiny_onnx["teacher"])
    hw = tuple(tiny_pair.info.latent_shape[1:])
    profile = compute_profile(io, ShapeRange(batch=(1, 1, 2), resolutions=(hw,)), 2)
    (tmp_path / trt_mod.ENGINE_FILE).write_bytes(b"engine")
    den = trt_mod.TrtDenoiser(tmp_path, io, profile, tiny_pair.teacher, device="cpu")
    cond = den.prepare(tiny_pair.random_cond(2)[0])
    x, t = torch.randn(2, *tiny_pair.info.latent_shape), torch.full((2,), 500.0)
    with pytest.raises(RuntimeError, match="execute_async_v3") as info:
        den(x, t, cond)
    assert not isinstance(info.value, CacheError)


def test_engine_that_does_not_load_is_discarded_through_the_cache(tiny_onnx, tiny_pair, tmp_path, monkeypatch):
    """The rebuild after a deserialization failure removes the engine under the cache's lock."""
    calls, cache = [], ArtifactCache(tmp_path)
    real_cached_engine = trt_mod.cached_engine
    monkeypatch.setattr(trt_mod, "_trt", lambda: _FakeTrt)
    monkeypatch.setattr(trt_mod, "cached_engine",
                        lambda *a, **k: real_cached_engine(*a, **k, build=fake_build(calls), identity=IDENT))
    discarded = []
    real_discard = ArtifactCache.discard
    monkeypatch.setattr(ArtifactCache, "discard", lambda self, kind, key, *a, **k: (
        discarded.append((kind, key)), real_discard(self, kind, key, *a, **k))[1])
    loads = []

    class FlakyDenoiser:
        def __init__(self, folder, io, profile, base, device):
            loads.append(folder)
            if len(loads) == 1:
                raise CacheError(f"TensorRT could not deserialize {folder}")

    monkeypatch.setattr(trt_mod, "TrtDenoiser", FlakyDenoiser)
    with pytest.warns(UserWarning, match="rebuilding the engine"):
        trt_mod.make_denoiser(tiny_pair.student, onnx_path=tiny_onnx["student"], cache=cache, device="cpu",
                              shapes=ShapeRange(batch=(1, 1, 2), resolutions=((16, 16),)))
    assert len(calls) == 2 and len(loads) == 2 and discarded == [("trt_engine", loads[0].name)]
    cache.validate(loads[1])

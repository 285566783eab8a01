"""Backend registry: explicit requests raise with the extra to install, "auto" falls back with a warning."""

import importlib.util
import warnings

import pytest

from distpp import BackendUnavailableError, ConfigError
from distpp import backends

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_names_and_availability_here():
    assert {"eager", "onnxruntime", "tensorrt"} <= set(backends.backend_names())
    assert backends.is_available("eager") and backends.is_available("onnxruntime")
    if not HAS_TRT:  # TensorRT is not installable on any machine distpp is developed on
        assert not backends.is_available("tensorrt")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: these check its absence")
def test_explicit_unavailable_backend_names_the_extra():
    with pytest.raises(BackendUnavailableError, match=r"distpp\[tensorrt\]"):
        backends.get_backend("tensorrt")
    with pytest.raises(BackendUnavailableError, match=r"distpp\[tensorrt\]"):
        backends.resolve_backend("tensorrt", "cuda")
    with pytest.raises(ConfigError, match="unknown backend 'tvm'"):
        backends.get_backend("tvm")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: these check its absence")
def test_tensorrt_entry_points_refuse_cleanly(tiny_pair):
    from distpp.backends import tensorrt

    with pytest.raises(BackendUnavailableError, match=r"distpp\[tensorrt\]"):
        tensorrt.make_denoiser(tiny_pair.student)
    with pytest.raises(BackendUnavailableError):
        backends.make_pair(tiny_pair.student, tiny_pair.teacher, "tensorrt")


def test_auto_is_only_what_has_run_on_hardware():
    """auto never picks TensorRT (never run on hardware in this project) nor onnxruntime: eager, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", "cpu") == "eager"
        assert backends.resolve_backend("auto", "cuda") == "eager"


def test_factories_refuse_unknown_options(tiny_pair):
    with pytest.raises(ConfigError, match="backend 'eager' does not take engine"):
        backends.make_pair(tiny_pair.student, tiny_pair.teacher, "eager", engine=object())
    with pytest.raises(ConfigError, match="does not take compiel"):
        backends.make_denoiser("compile", tiny_pair.student, compiel=None)


def test_register_backend(tiny_pair):
    backends.register_backend("eager_alias", "distpp.backends.eager")
    try:
        s, t, timings = backends.make_pair(tiny_pair.student, tiny_pair.teacher, "eager_alias")
        assert s is tiny_pair.student and t is tiny_pair.teacher
        assert timings["backend"] == "eager_alias" and timings["export_s"] == 0.0 and timings["build_s"] >= 0.0
    finally:
        backends._REGISTRY.pop("eager_alias")

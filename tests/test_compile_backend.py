"""torch.compile backend: registry entry, equality with eager (dynamo's eager backend on CPU; Inductor on
a GPU), compile time accounted apart, config errors, and composition with the graph runner."""

import pytest
import torch
from helpers import assert_close

from distpp import backends
from distpp.backends.compile import CompileConfig, CompiledDenoiser
from distpp.config import SamplerConfig
from distpp.errors import ConfigError
from distpp.graphs import GraphRunner
from distpp.sampler import Sampler


@pytest.fixture(scope="module")
def compiled_pair(tiny_pair):
    torch._dynamo.reset()
    s, t, timings = backends.make_pair(tiny_pair.student, tiny_pair.teacher, "compile",
                                         compile=CompileConfig(backend="eager"))
    return s, t, timings


def test_registered_and_available():
    assert "compile" in backends.backend_names() and backends.is_available("compile")


def test_compiled_equals_eager_and_reports_compile_time(tiny_pair, compiled_pair):
    s, t, timings = compiled_pair
    assert isinstance(s, CompiledDenoiser) and timings["backend"] == "compile"
    cfg = SamplerConfig(guided_steps=1)
    cond, uncond = tiny_pair.random_cond(2, seed=3)
    shape = tiny_pair.info.latent_shape
    ref = Sampler(tiny_pair.student, tiny_pair.teacher, cfg).sample(cond, uncond=uncond, latent_shape=shape)
    out = Sampler(s, t, cfg).sample(cond, uncond=uncond, latent_shape=shape)
    assert_close(out, ref, 1e-5, "compiled vs eager")
    assert s.compiles == 1 and t.compiles == 1 and s.compile_s > 0 and t.compile_s > 0
    before = s.compile_s
    Sampler(s, t, cfg).sample(cond, uncond=uncond, latent_shape=shape, seeds=[5, 6])
    assert s.compile_s == before and s.compiles == 1  # same signature: no new compile counted


def test_composes_with_graph_runner(tiny_pair, compiled_pair):
    s, t, _ = compiled_pair
    cfg = SamplerConfig(guided_steps=1)
    cond, uncond = tiny_pair.random_cond(1, seed=4)
    shape = tiny_pair.info.latent_shape
    r = GraphRunner(Sampler(s, t, cfg), backend="compile")
    out = r.sample(cond, uncond=uncond, latent_shape=shape, seeds=[2])
    ref = Sampler(tiny_pair.student, tiny_pair.teacher, cfg).sample(cond, uncond=uncond, latent_shape=shape, seeds=[2])
    assert_close(out, ref, 1e-5, "compiled under the runner")
    assert r.keys()[0].backend == "compile"


def test_generic_callable_is_compiled():
    def model(x, t, cond):
        return x * 0.5 + t.view(-1, 1, 1, 1) * 1e-3

    d = CompiledDenoiser(model, CompileConfig(backend="eager"))
    from distpp import Cond

    x = torch.randn(2, 4, 8, 8)
    c = Cond(torch.randn(2, 3, 5))
    out = d(x, torch.tensor([10.0, 20.0]), c)
    assert_close(out, model(x, torch.tensor([10.0, 20.0]), c), 1e-6, "generic")
    d(torch.randn(3, 4, 8, 8), torch.ones(3), Cond(torch.randn(3, 3, 5)))
    assert d.compiles == 2  # a new shape is a new signature


@pytest.mark.parametrize("kw,msg", [(dict(mode="reduce-overhead"), "nest inside"), (dict(backend="tvm"), "inductor")])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CompileConfig(**kw)


def test_make_denoiser_rejects_foreign_config(tiny_pair):
    with pytest.raises(ConfigError, match="CompileConfig"):
        backends.get_backend("compile").make_denoiser(tiny_pair.student, compile={"mode": "default"})


@pytest.mark.cuda
def test_cuda_inductor_under_graph_runner():
    from distpp.presets import build_preset

    torch._dynamo.reset()
    pair = build_preset("tiny", device="cuda", dtype=torch.float16)
    s, t, _ = backends.make_pair(pair.student, pair.teacher, "compile", compile=CompileConfig())
    cfg = SamplerConfig(guided_steps=1)
    cond, uncond = pair.random_cond(2)
    shape = pair.info.latent_shape
    sampler = Sampler(s, t, cfg, device="cuda", dtype=torch.float16)
    eager = Sampler(pair.student, pair.teacher, cfg, device="cuda", dtype=torch.float16)
    r = GraphRunner(sampler, backend="compile")
    out = r.sample(cond, uncond=uncond, latent_shape=shape, seeds=[1, 2])
    assert r.is_captured(r.keys()[0]) and s.compile_s > 0
    assert_close(out, eager.sample(cond, uncond=uncond, latent_shape=shape, seeds=[1, 2]), 3e-2, "inductor+graphs")

"""distpp.Runtime: one object composing backend Denoisers, Samplers and GraphRunners (tiny preset, CPU).

Off CUDA, graphs=True runs the GraphRunner's eager loop over static buffers: the same keys, buckets,
padding, budget and counters as on a GPU, so everything here but the capture itself is what a GPU runs.
"""

from __future__ import annotations

import pytest
import torch

from distpp import CaptureError, ConfigError, Sampler, SamplerConfig
from distpp.backends import register_backend
from distpp.denoiser import DenoiserBase
from distpp.runtime import CondSpec, Runtime
from helpers import assert_close

FP32_TOL = 1e-5
SHAPE = (4, 16, 16)


@pytest.fixture(scope="module")
def spec(tiny_pair):
    return CondSpec(tiny_pair.info.tokens, tiny_pair.info.width)


def runtime(pair, spec, **kw):
    kw.setdefault("config", SamplerConfig(lam=0.3, steps=2))
    kw.setdefault("resolutions", (SHAPE[1:],))
    return Runtime(pair.student, pair.teacher, cond_spec=spec, **kw)


def test_graphs_path_equals_the_sampler_bit_for_bit_and_padding_within_fp32(tiny_pair, spec):
    cfg = SamplerConfig(lam=0.3, steps=2)
    ref_sampler = Sampler(tiny_pair.student, tiny_pair.teacher, cfg)
    cond, uncond = tiny_pair.random_cond(3)
    with runtime(tiny_pair, spec, graphs=True, batch_sizes=(1, 4)) as rt:
        recs = rt.warmup(progress=False)
        assert [(r.batch, r.latent_shape) for r in recs] == [(1, SHAPE), (4, SHAPE)]
        one = rt.sample(None, cond.map(lambda v: v[:1]), uncond=uncond, latent_shape=SHAPE, seeds=[7])
        ref_one = ref_sampler.sample(cond.map(lambda v: v[:1]), uncond=uncond, latent_shape=SHAPE, seeds=[7])
        assert torch.equal(one, ref_one)  # exact bucket: the same loop on the same values
        three = rt.sample(cfg, cond, uncond=uncond, latent_shape=SHAPE, seeds=[1, 2, 3])  # padded to 4
        for i, s in enumerate((1, 2, 3)):
            single = ref_sampler.sample(cond.map(lambda v: v[i:i + 1]), uncond=uncond, latent_shape=SHAPE, seeds=[s])
            assert_close(three[i:i + 1], single, FP32_TOL, f"padded row {i}")
        st = rt.stats
        assert st.graphs and not st.cuda_graphs and st.backend == "eager"
        assert st.padded_calls == 1 and st.static_runs >= 2 and st.calls == 2 and st.samplers == 1


def test_graphs_off_is_the_sampler_and_overrides_pick_configs(tiny_pair, spec):
    cond, uncond = tiny_pair.random_cond(2)
    rt = runtime(tiny_pair, spec, graphs=False)
    assert rt.graphs is False and rt.stats.cuda_graphs is False
    plain = rt.sample({"guided_steps": 0}, cond, latent_shape=SHAPE, seeds=[1, 2])
    lam0 = rt.sample({"lam": 0.0}, cond, uncond=uncond, latent_shape=SHAPE, seeds=[1, 2])
    assert_close(lam0, plain, 1e-6, "lam=0 vs G=0")
    assert rt.stats.samplers == 2 and rt.sampler({"guided_steps": 0}) is rt.sampler(SamplerConfig(lam=0.3, steps=2,
                                                                                                   guided_steps=0))
    with pytest.raises(ConfigError, match=r"unknown SamplerConfig field\(s\) \['lamb'\]"):
        rt.sample({"lamb": 0.1}, cond, latent_shape=SHAPE)
    with pytest.raises(ConfigError, match="mapping of its fields"):
        rt.sample("lcm", cond, latent_shape=SHAPE)


def test_auto_is_eager_without_graphs_on_cpu(tiny_pair, spec):
    rt = runtime(tiny_pair, spec)
    assert rt.backend == "eager" and rt.graphs is False
    assert rt.student is tiny_pair.student  # eager: the caller's Denoisers, nothing rebuilt


def test_one_graph_budget_over_every_config(tiny_pair, spec):
    rt = runtime(tiny_pair, spec, graphs=True, max_graphs=2)
    rt.warmup([None, {"guided_steps": 0}, {"guided_steps": 2}], progress=False)
    keys = [k for r in rt._runners.values() for k in r.keys()]
    assert len(keys) == 2 and rt.stats.evictions == 1  # three configs warmed, two kept: the LRU one went


def test_samplers_are_bounded_lru_and_the_default_config_stays(tiny_pair, spec):
    rt = runtime(tiny_pair, spec, graphs=True, max_samplers=2)
    cond, uncond = tiny_pair.random_cond(1)
    for lam in (0.1, 0.2, 0.3):
        rt.sample({"lam": lam, "steps": 1}, cond, uncond=uncond, latent_shape=SHAPE, seeds=[0])
    kept = set(rt._samplers)
    assert len(kept) == 2 and rt.config not in kept  # the default config was never used: not pinned in
    rt.sampler(None)
    assert rt.config in rt._samplers and len(rt._samplers) == 2
    rt.sample({"lam": 0.9, "steps": 1}, cond, uncond=uncond, latent_shape=SHAPE, seeds=[0])
    assert rt.config in rt._samplers  # the default is never the one dropped
    assert rt.stats.eager_runs == 4 and set(rt._runners) <= set(rt._samplers)
    with pytest.raises(ConfigError, match="max_samplers"):
        runtime(tiny_pair, spec, max_samplers=0)


def test_on_miss_error_refuses_unwarmed_shapes(tiny_pair, spec):
    cond, uncond = tiny_pair.random_cond(2)
    rt = runtime(tiny_pair, spec, graphs=True, batch_sizes=(1,), on_miss="error")
    rt.warmup(progress=False)
    with pytest.raises(CaptureError, match="no captured graph fits"):
        rt.sample(None, cond, uncond=uncond, latent_shape=SHAPE, seeds=[0, 1])  # batch 2 > bucket 1
    rt.sample(None, cond.map(lambda v: v[:1]), uncond=uncond, latent_shape=SHAPE, seeds=[0])


class _Closing(DenoiserBase):
    closed = 0

    def __init__(self, base):
        self.base, self.spec = base, base.spec

    def prepare(self, cond):
        return self.base.prepare(cond)

    def __call__(self, x, t, cond):
        return self.base(x, t, cond)

    def close(self):
        type(self).closed += 1


def test_close_releases_backend_denoisers_and_refuses_use(tiny_pair, spec, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("distpp_test_closing_backend")
    mod.EXTRA, mod.is_available = None, lambda: True

    def make_denoiser(base, *, role="student", shapes=None, tokens=None, cache=None, device=None, timings=None):
        return _Closing(base)

    mod.make_denoiser = make_denoiser
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    register_backend("closing", mod.__name__)
    try:
        rt = runtime(tiny_pair, spec, backend="closing", graphs=True)
        cond, uncond = tiny_pair.random_cond(1)
        rt.warmup(progress=False)
        rt.sample(None, cond, uncond=uncond, latent_shape=SHAPE, seeds=[0])
        rt.close()
        rt.close()  # idempotent
        assert _Closing.closed == 2  # student and teacher, once each
        with pytest.raises(ConfigError, match="closed"):
            rt.sample(None, cond, uncond=uncond, latent_shape=SHAPE)
    finally:
        from distpp import backends

        backends._REGISTRY.pop("closing")


def test_bad_settings_are_refused(tiny_pair, spec):
    with pytest.raises(ConfigError, match="CondSpec.tokens"):
        CondSpec(0, 32)
    with pytest.raises(ConfigError, match="both pooled and time_ids"):
        CondSpec(8, 32, time_ids=6)  # pooled alone is SD3/FLUX-style, time_ids alone is nothing
    with pytest.raises(ConfigError, match="cond_spec"):
        Runtime(tiny_pair.student, tiny_pair.teacher, cond_spec=(8, 32))
    with pytest.raises(ConfigError, match="graphs must be"):
        runtime(tiny_pair, spec, graphs="yes")
    with pytest.raises(ConfigError, match="batch_sizes"):
        runtime(tiny_pair, spec, batch_sizes=(0, 2))
    with pytest.raises(ConfigError, match="max_graphs"):
        runtime(tiny_pair, spec, max_graphs=0)
    with pytest.raises(ConfigError, match="on_miss"):
        runtime(tiny_pair, spec, on_miss="retry")
    with pytest.raises(ConfigError, match="needs latent resolutions"):
        runtime(tiny_pair, spec, resolutions=None).warmup(progress=False)
    with pytest.raises(ConfigError, match="does not take engine"):
        runtime(tiny_pair, spec, backend_options={"engine": None})


@pytest.mark.cuda
def test_cuda_calls_replay_captured_graphs():
    from distpp.presets import build_preset

    pair = build_preset("tiny", device="cuda", dtype=torch.float16)
    spec = CondSpec(pair.info.tokens, pair.info.width)
    cond, uncond = pair.random_cond(2)
    with Runtime(pair.student, pair.teacher, cond_spec=spec, batch_sizes=(2,), resolutions=(SHAPE[1:],)) as rt:
        assert rt.graphs and rt.stats.cuda_graphs
        assert all(r.captured for r in rt.warmup(progress=False))
        got = rt.sample(None, cond, uncond=uncond, latent_shape=SHAPE, seeds=[3, 4])
        ref = rt.sampler().sample(cond, uncond=uncond, latent_shape=SHAPE, seeds=[3, 4])
        assert_close(got, ref, 2e-2, "fp16 graph replay vs eager")
        assert rt.stats.replays == 1 and rt.stats.captures == 1

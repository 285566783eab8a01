"""GraphRunner: API, keys, LRU, static buffers, padding, copies vs views and error paths (eagerly on a CPU);
graph replay vs eager on a GPU (``cuda`` tier)."""

import threading
import warnings

import pytest
import torch
from helpers import assert_close

from distpp import graphs
from distpp.config import SamplerConfig
from distpp.errors import CaptureError, ConfigError, InputError
from distpp.graphs import GraphRunner, fill_plan, noop_ops
from distpp.sampler import Sampler, run_loop

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_pair):
    sampler = Sampler(tiny_pair.student, tiny_pair.teacher, SamplerConfig(guided_steps=1))
    cond, uncond = tiny_pair.random_cond(3, seed=5)
    return sampler, cond, uncond, tiny_pair.info.latent_shape


def rows(cond, b):
    return cond.map(lambda v: v[:b])


def call(runner_or_sampler, cond, uncond, shape, **kw):
    return runner_or_sampler.sample(cond, uncond=uncond, latent_shape=shape, **kw)


def test_matches_sampler_and_seeds(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    assert not r.use_cuda_graphs  # CPU: same API, eager over the static buffers
    a = call(r, cond, uncond, shape, seeds=[7, 8, 9])
    assert_close(a, call(sampler, cond, uncond, shape, seeds=[7, 8, 9]), FP32_TOL, "runner vs sampler")
    again = call(r, cond, uncond, shape, seeds=[7, 8, 9])
    assert torch.equal(a, again)
    other = call(r, cond, uncond, shape, seeds=[1, 8, 2])
    assert torch.equal(other[1], a[1]) and not torch.allclose(other[0], a[0]) and not torch.allclose(other[2], a[2])
    assert len(r.keys()) == 1 and r.stats.eager_runs == 3


def test_lam_cfg_seeds_reuse_key_and_take_effect(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    base = call(r, cond, uncond, shape, seeds=[1, 2, 3])
    for kw in (dict(lam=0.9), dict(cfg=[2.0, 3.0, 4.0])):
        out = call(r, cond, uncond, shape, seeds=[1, 2, 3], **kw)
        assert_close(out, call(sampler, cond, uncond, shape, seeds=[1, 2, 3], **kw), FP32_TOL, str(kw))
        assert not torch.allclose(out, base)
    assert len(r.keys()) == 1


def test_keys_cover_shapes(setup, tiny_pair):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler, pad=False, model="tiny")
    call(r, cond, uncond, shape)
    call(r, rows(cond, 2), uncond, shape)
    call(r, cond, uncond, (4, 8, 8))
    longer = cond.map(lambda v: torch.cat([v, v], 1) if v.dim() == 3 else v)  # 16 tokens instead of 8
    call(r, longer, uncond.map(lambda v: torch.cat([v, v], 1)), shape)
    keys = r.keys()
    assert len(keys) == 4 and len(set(keys)) == 4
    assert {k.batch for k in keys} == {3, 2} and {k.latent_shape for k in keys} == {(4, 16, 16), (4, 8, 8)}
    assert all(k.model == "tiny" and k.family == "lcm" and k.steps == 4 and k.guided_steps == 1 for k in keys)


def test_lru_bound_and_order(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler, max_graphs=2, pad=False)
    call(r, rows(cond, 1), uncond, shape)
    call(r, rows(cond, 2), uncond, shape)
    call(r, rows(cond, 1), uncond, shape)  # touch batch 1: batch 2 becomes least recent
    call(r, cond, uncond, shape)
    assert [k.batch for k in r.keys()] == [1, 3] and r.stats.evictions == 1
    r.clear()
    assert r.keys() == [] and r.stats.evictions == 3


def test_padding_to_a_cached_batch(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    r.warmup(cond, uncond=uncond, latent_shape=shape)
    for b in (1, 2):
        out = call(r, rows(cond, b), uncond, shape, seeds=list(range(10, 10 + b)), lam=[0.3] * b)
        assert out.shape == (b,) + tuple(shape)
        ref = call(sampler, rows(cond, b), uncond, shape, seeds=list(range(10, 10 + b)), lam=[0.3] * b)
        assert_close(out, ref, FP32_TOL, f"padded batch {b}")
    assert len(r.keys()) == 1 and r.stats.padded_calls == 2
    unpadded = GraphRunner(sampler, pad=False)
    unpadded.warmup(cond, uncond=uncond, latent_shape=shape)
    call(unpadded, rows(cond, 1), uncond, shape)
    assert sorted(k.batch for k in unpadded.keys()) == [1, 3]


def test_padding_rows_replicate_last_sample(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    (key,) = r.warmup(cond, uncond=uncond, latent_shape=shape)
    call(r, rows(cond, 2), uncond, shape, seeds=[4, 5], cfg=[2.0, 6.0])
    st = r.static_plan(key)
    assert torch.equal(st.cfg, torch.tensor([2.0, 6.0, 6.0]))
    ehs = st.cond_t.encoder_hidden_states  # [uncond 3; cond 3]: each half padded on its own
    assert torch.equal(ehs[2], ehs[1]) and torch.equal(ehs[5], ehs[4]) and torch.equal(ehs[4], cond.encoder_hidden_states[1])


def test_copy_vs_view(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    view = call(r, cond, uncond, shape, seeds=[1, 2, 3], copy=False)
    (key,) = r.keys()
    assert view.data_ptr() == r.static_plan(key).x.data_ptr()
    kept = view.clone()
    copied = call(r, cond, uncond, shape, seeds=[4, 5, 6])
    assert copied.data_ptr() != view.data_ptr()
    assert torch.equal(view, copied) and not torch.equal(view, kept)  # the view follows the buffer


def test_on_miss_policies(setup):
    sampler, cond, uncond, shape = setup
    strict = GraphRunner(sampler, on_miss="error")
    with pytest.raises(CaptureError, match="warm up this shape"):
        call(strict, cond, uncond, shape)
    strict.warmup(cond, uncond=uncond, latent_shape=shape, batch_sizes=[1, 3])
    call(strict, rows(cond, 2), uncond, shape)  # padded to 3
    with pytest.raises(CaptureError, match="no captured graph fits"):
        call(strict, cond, uncond, (4, 8, 8))
    loose = GraphRunner(sampler, on_miss="eager")
    out = call(loose, cond, uncond, shape, seeds=[1, 2, 3])
    assert loose.keys() == [] and loose.stats.eager_runs == 1
    assert_close(out, call(sampler, cond, uncond, shape, seeds=[1, 2, 3]), FP32_TOL, "on_miss=eager")


def test_mismatched_buffers_refused_untouched(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    (key,) = r.warmup(cond, uncond=uncond, latent_shape=shape)
    static = r.static_plan(key)
    before = static.x.clone()
    bad = sampler.prepare(cond, uncond=uncond, latent_shape=shape, seeds=[9, 9, 9])
    bad.t_student = bad.t_student.double()  # the last-checked field is fine, this one is not
    with pytest.raises(CaptureError, match="t_student"):
        fill_plan(static, bad)
    assert torch.equal(static.x, before)  # checked before any copy
    wide = sampler.prepare(cond, uncond=uncond, latent_shape=(4, 8, 8))
    with pytest.raises(CaptureError, match="refusing to replay"):
        fill_plan(static, wide)


def test_oom_during_capture_falls_back_eagerly(setup, monkeypatch):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    r.use_cuda_graphs = True  # pretend: the capture itself is replaced below

    def oom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(graphs, "capture_cuda", oom)
    with pytest.warns(RuntimeWarning, match="out of GPU memory"):
        out = call(r, cond, uncond, shape, seeds=[1, 2, 3])
    assert_close(out, call(sampler, cond, uncond, shape, seeds=[1, 2, 3]), FP32_TOL, "after OOM")
    assert r.stats.oom_fallbacks == 1 and not r.is_captured(r.keys()[0])
    r.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the key stays eager: no second capture attempt, no new warning
        call(r, cond, uncond, shape)


def test_other_capture_failures_raise_and_leave_runner_usable(setup, monkeypatch):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    r.use_cuda_graphs = True

    def broken(*_a, **_k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "capture_cuda", broken)
    with pytest.raises(CaptureError, match="graphs=False"):
        call(r, cond, uncond, shape)
    assert r.keys() == []
    r.use_cuda_graphs = False
    assert call(r, cond, uncond, shape).shape == (3,) + tuple(shape)


def test_timer_and_noop_ops(setup):
    from distpp.timing import StageTimer

    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    tm = StageTimer("cpu")
    tm.begin()
    call(r, cond, uncond, shape, timer=tm)
    tot = tm.totals()
    assert tot["student"] > 0 and tot["teacher"] > 0  # eager entries lap per stage

    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return x * 0.5

    counting.spec = None
    s2 = Sampler(counting, counting, SamplerConfig(guided_steps=2))
    plan = s2.prepare(cond, uncond=uncond, latent_shape=shape)
    x0 = plan.x.clone()
    run_loop(counting, counting, noop_ops(), s2.schedule, plan)
    assert calls == [3, 6, 3, 6, 3, 3] and torch.equal(plan.x, x0)  # forwards only, state untouched


def test_concurrent_calls_are_serialized(setup):
    sampler, cond, uncond, shape = setup
    r = GraphRunner(sampler)
    r.warmup(cond, uncond=uncond, latent_shape=shape)
    refs = {s: call(sampler, rows(cond, 1), uncond, shape, seeds=[s]) for s in (1, 2, 3, 4)}
    outs, errs = {}, []

    def work(s):
        try:
            outs[s] = call(r, rows(cond, 1), uncond, shape, seeds=[s])
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errs.append(e)

    ts = [threading.Thread(target=work, args=(s,)) for s in refs]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errs
    for s, ref in refs.items():
        assert_close(outs[s], ref, FP32_TOL, f"thread seed {s}")


def test_config_and_input_errors(setup):
    sampler, cond, uncond, shape = setup
    with pytest.raises(ConfigError, match="max_graphs"):
        GraphRunner(sampler, max_graphs=0)
    with pytest.raises(ConfigError, match="on_miss"):
        GraphRunner(sampler, on_miss="retry")
    with pytest.raises(ConfigError, match="wraps a distpp.Sampler"):
        GraphRunner(object())
    r = GraphRunner(sampler)
    with pytest.raises(InputError, match="batch_sizes"):
        r.warmup(cond, uncond=uncond, latent_shape=shape, batch_sizes=[0])
    with pytest.raises(InputError, match="draws its own noise"):
        r.warmup(cond, uncond=uncond, latent_shape=shape, seeds=[1, 2, 3])
    with pytest.raises(InputError, match="uncond"):
        r.sample(cond, latent_shape=shape)
    assert r.keys() == []


# ---- GPU tier -------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_cuda_replay_equals_eager(dtype, tol):
    from distpp.presets import build_preset

    pair = build_preset("tiny", device="cuda", dtype=dtype)
    sampler = Sampler(pair.student, pair.teacher, SamplerConfig(guided_steps=1), device="cuda", dtype=dtype)
    cond, uncond = pair.random_cond(2)
    shape = pair.info.latent_shape
    r = GraphRunner(sampler)
    out = call(r, cond, uncond, shape, seeds=[3, 4])
    assert r.use_cuda_graphs and r.is_captured(r.keys()[0]) and r.stats.captures == 1
    # the same noise buffers: prepare draws them identically for the same seeds
    assert_close(out, call(sampler, cond, uncond, shape, seeds=[3, 4]), tol, f"graph vs eager {dtype}")
    out2 = call(r, cond, uncond, shape, seeds=[3, 4], lam=0.2)
    assert_close(out2, call(sampler, cond, uncond, shape, seeds=[3, 4], lam=0.2), tol, "new lam, no re-capture")
    assert r.stats.captures == 1 and r.stats.replays == 2
    small = call(r, rows(cond, 1), uncond, shape, seeds=[3])
    assert_close(small, out[:1], tol, "padded replay")


@pytest.mark.cuda
def test_cuda_guided_sd_tiny_four_steps_and_eviction_frees_memory():
    from distpp.presets import build_preset

    pair = build_preset("tiny", device="cuda", dtype=torch.float16)
    sampler = Sampler(pair.student, pair.teacher, SamplerConfig(steps=4, guided_steps=2), device="cuda",
                      dtype=torch.float16)
    cond, uncond = pair.random_cond(4)
    r = GraphRunner(sampler, max_graphs=1)
    a = call(r, cond, uncond, (4, 32, 32), seeds=[1, 2, 3, 4])
    b = call(r, cond, uncond, (4, 32, 32), seeds=[1, 2, 3, 5])
    assert r.stats.captures == 1 and r.stats.replays == 2
    assert torch.isfinite(a).all() and torch.equal(a[:3], b[:3]) and not torch.equal(a[3], b[3])
    st = r.static_plan(r.keys()[0])
    static_bytes = sum(t.numel() * t.element_size() for t in (st.x, st.z, st.n, st.t_in))
    del st
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    r.clear()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= held - static_bytes  # buffers (and the graph's pool) released


def test_non_capturable_models_run_eagerly_with_a_warning():
    """A Denoiser with capturable = False (ONNX Runtime syncs the host in its forward) is never captured."""
    from helpers import GaussianDenoiser

    from distpp import Sampler, SamplerConfig
    from distpp.schedules import build_schedule

    class HostSyncing(GaussianDenoiser):
        capturable = False

    acp = build_schedule("lcm", 4).alphas_cumprod
    s = Sampler(GaussianDenoiser(acp), HostSyncing(acp), SamplerConfig(kernel_impl="torch"))
    s.device = torch.device("cuda")  # only the runner's decision is under test: nothing runs here
    with pytest.warns(RuntimeWarning, match="HostSyncing cannot be captured"):
        assert GraphRunner(s, graphs=True).use_cuda_graphs is False
    s.teacher = GaussianDenoiser(acp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GraphRunner(s, graphs=True).use_cuda_graphs is True

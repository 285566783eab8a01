"""Property-based tests over the public API with hostile input.

Every call either returns a finite result of the promised shape or raises a distpp.errors type
(DistppError subclass) with a message; never a raw TypeError/IndexError/RuntimeError from inside torch,
never a silently wrong shape. Examples are derandomized with a fixed budget, so CI is deterministic.
Cheap analytic models (tests/helpers.py) carry most examples; a few run the tiny UNet.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distpp import Cond, ConfigError, DistppError, InputError, Sampler, SamplerConfig, build_schedule
from distpp.kernels import guided_update_ref, plain_update_ref, student_update_ref
from distpp.kernels.guided_update import check_guided_update
from distpp.kernels.plain_update import check_plain_update
from distpp.kernels.student_update import check_student_update
from distpp.schedules import FAMILIES, NUM_COLS, NUM_GCOLS, PREDICTION_TYPES
from helpers import GaussianDenoiser

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ACP = build_schedule("lcm", 4).alphas_cumprod
WIDTH, CH = 8, 4


def expect(fn):
    """Run fn; returns its result, or None if it raised a DistppError with a message. Anything else fails."""
    try:
        out = fn()
    except DistppError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        event(type(e).__name__)  # outcome shares: pytest --hypothesis-show-statistics
        return None
    event("returned")
    return out


def assert_latents(out, shape):
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == tuple(shape), f"got {tuple(out.shape)}, expected {tuple(shape)}"
    assert torch.isfinite(out).all(), "non-finite result from finite input"


# --- SamplerConfig and Sampler construction ---------------------------------------------------------
F32_MAX = float(torch.finfo(torch.float32).max)
past_float32 = st.one_of(st.integers(2**1000, 2**1400), st.integers(-2**1400, -2**1000),  # past float64 too
                         st.floats(F32_MAX * (1 + 1e-7), 1.7e308), st.floats(-1.7e308, -F32_MAX * (1 + 1e-7)),
                         st.just(math.inf))
junk = st.one_of(st.none(), st.text(max_size=4), st.floats(allow_nan=True), st.booleans(), st.lists(st.integers()))
config_kwargs = st.fixed_dictionaries({}, optional={
    "family": st.one_of(st.sampled_from(FAMILIES), junk),
    "steps": st.one_of(st.integers(-3, 1200), st.floats(-2, 70), junk),
    "timesteps": st.one_of(st.lists(st.integers(-50, 1100), max_size=6), junk, st.integers()),
    "guided_steps": st.one_of(st.integers(-2, 6), junk),
    "lam": st.one_of(st.floats(-1, 2), st.floats(allow_nan=True, allow_infinity=True), past_float32, junk),
    "cfg": st.one_of(st.floats(-5, 1000), st.floats(allow_nan=True, allow_infinity=True), past_float32, junk),
    "teacher_rule": st.one_of(st.sampled_from(["next", "same", "random"]), junk),
    "prediction_type": st.sampled_from(PREDICTION_TYPES + ("eps",)),
    "kernel_impl": st.sampled_from(["torch", "auto", "cuda", "triton", "cutlass"]),
})


@settings(FUZZ, max_examples=150)
@given(kw=config_kwargs)
def test_config_and_sampler_construction(kw):
    cfg = expect(lambda: SamplerConfig(check_finite=True, **kw))
    if cfg is None:
        return
    assert 0 <= cfg.guided_steps <= cfg.num_steps and 0 <= cfg.resolved_lam <= 1 and 0 <= cfg.cfg <= F32_MAX
    pt = cfg.prediction_type
    sampler = expect(lambda: Sampler(GaussianDenoiser(ACP, prediction_type=pt),
                                     GaussianDenoiser(ACP, prediction_type=cfg.teacher_prediction_type), cfg))
    if sampler is None or cfg.num_steps > 64:  # long schedules: built above, not sampled (cost)
        return
    cond = Cond(torch.randn(2, 3, WIDTH))
    out = expect(lambda: sampler.sample(cond, uncond=Cond(torch.randn(1, 3, WIDTH)), latent_shape=(CH, 3, 5),
                                        seeds=[1, 2]))
    assert out is not None, "a valid config and valid inputs must sample"
    assert_latents(out, (2, CH, 3, 5))


@settings(FUZZ, max_examples=40)
@given(family=st.sampled_from(FAMILIES), steps=st.integers(1, 1000), pt=st.sampled_from(PREDICTION_TYPES),
       timesteps=st.none() | st.lists(st.integers(-5, 1005), min_size=1, max_size=8))
def test_build_schedule_tables(family, steps, pt, timesteps):
    # LCMScheduler refuses steps > original_inference_steps (50): build_schedule turns that into ConfigError.
    sch = expect(lambda: build_schedule(family, None if timesteps else steps, timesteps=timesteps,
                                        prediction_type=pt))
    if sch is None:
        return
    n = sch.steps
    assert sch.coef.shape == (n, NUM_COLS) and len(sch.draws_noise) == n == len(sch.level_bounds)
    for name in ("coef", "c_in", "t_model", "abar", "abar_next", "t_next"):
        t = getattr(sch, name)
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), name


def test_build_schedule_turns_scheduler_refusal_into_config_error():
    with pytest.raises(ConfigError, match="lcm scheduler refused"):
        build_schedule("lcm", 60)  # LCM's original_inference_steps is 50


def test_sampler_turns_scheduler_refusal_into_config_error():
    with pytest.raises(ConfigError, match="scheduler refused"):
        Sampler(GaussianDenoiser(ACP), GaussianDenoiser(ACP), SamplerConfig(steps=60))


@pytest.mark.parametrize("device", ["meta", "gpu0", "cuda:x"])
def test_bad_devices(device):
    with pytest.raises(ConfigError):
        Sampler(GaussianDenoiser(ACP), GaussianDenoiser(ACP), SamplerConfig(), device=device)


# --- Sampler.sample with hostile inputs -------------------------------------------------------------
FAULTS = ("cond_dtype", "cond_device", "cond_rank", "cond_width", "cond_empty", "text_embeds_rows", "nan_cond",
          "uncond_rows", "uncond_tokens", "uncond_missing", "uncond_tensor", "latent_channels", "latent_size",
          "latent_float", "latent_len", "latent_str", "latent_vs_noise", "noise_batch", "noise_rank", "noise_dtype", "noise_meta",
          "nan_noise", "seeds_huge", "seeds_neg", "seeds_short", "seeds_scalar", "gens_ints", "lam_range",
          "lam_nan", "lam_len", "lam_str", "lam_huge", "cfg_neg", "cfg_inf", "cfg_len", "cfg_huge", "latent_huge",
          "latent_int_vs_noise")


@st.composite
def sample_calls(draw):
    """A valid call (random batch, tokens, latent size, seeds, per-sample lam/cfg) with at most one fault."""
    B, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kw = dict(cond=Cond(torch.randn(B, tokens, WIDTH)), uncond=Cond(torch.randn(draw(st.sampled_from([1, B])),
                                                                                 tokens, WIDTH)))
    use_noise = draw(st.booleans())
    if use_noise:
        kw["noise"] = torch.randn(B, CH, h, w)
    else:
        kw["latent_shape"] = (CH, h, w)
    if draw(st.booleans()):
        kw["seeds"] = draw(st.lists(st.integers(0, 2**63), min_size=B, max_size=B))
    if draw(st.booleans()):
        kw["lam"] = draw(st.one_of(st.floats(0, 1), st.lists(st.floats(0, 1), min_size=B, max_size=B)))
    if draw(st.booleans()):
        kw["cfg"] = draw(st.one_of(st.floats(0, 50), st.lists(st.floats(0, 50), min_size=B, max_size=B)))
    fault = draw(st.sampled_from((None,) * 12 + FAULTS))
    ehs = kw["cond"].encoder_hidden_states
    nan = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if fault is not None and "noise" in fault and not use_noise:
        kw.pop("latent_shape")
        kw["noise"] = torch.randn(B, CH, h, w)
    if fault is not None and fault.startswith("latent") and use_noise:
        kw.pop("noise")
    change = {
        "cond_dtype": lambda: dict(cond=Cond(ehs.long())),
        "cond_device": lambda: dict(cond=Cond(ehs.to("meta"))),
        "cond_rank": lambda: dict(cond=Cond(ehs[:, 0])),
        "cond_width": lambda: dict(cond=Cond(ehs[..., :5].contiguous())),
        "cond_empty": lambda: dict(cond=Cond(ehs[:, :0])),
        "text_embeds_rows": lambda: dict(cond=Cond(ehs, text_embeds=torch.randn(B + 1, 3))),
        "nan_cond": lambda: dict(cond=Cond(ehs.index_fill(1, torch.tensor([0]), nan))),
        "uncond_rows": lambda: dict(uncond=Cond(torch.randn(B + 1, tokens, WIDTH))),
        "uncond_tokens": lambda: dict(uncond=Cond(torch.randn(1, tokens + 1, WIDTH))),
        "uncond_missing": lambda: dict(uncond=None),
        "uncond_tensor": lambda: dict(uncond=torch.randn(1, tokens, WIDTH)),
        "latent_channels": lambda: dict(latent_shape=(CH - 1, h, w)),
        "latent_size": lambda: dict(latent_shape=(CH, draw(st.integers(-2, 0)), w)),
        "latent_float": lambda: dict(latent_shape=(CH, h + 0.5, w)),
        "latent_len": lambda: dict(latent_shape=(CH, h)),
        "latent_str": lambda: dict(latent_shape="4x8x8"),
        "latent_vs_noise": lambda: dict(noise=torch.randn(B, CH, h, w), latent_shape=(CH, h + 1, w)),
        "latent_int_vs_noise": lambda: dict(noise=torch.randn(B, CH, h, w), latent_shape=CH),
        "noise_batch": lambda: dict(noise=torch.randn(B + 1, CH, h, w)),
        "noise_rank": lambda: dict(noise=torch.randn(B, CH, h)),
        "noise_dtype": lambda: dict(noise=torch.ones(B, CH, h, w, dtype=torch.int32)),
        "noise_meta": lambda: dict(noise=torch.empty(B, CH, h, w, device="meta")),
        "nan_noise": lambda: dict(noise=kw["noise"].index_fill(3, torch.tensor([w - 1]), nan)),
        "seeds_huge": lambda: dict(seeds=[2**64] * B),
        "seeds_neg": lambda: dict(seeds=[-1] * B),
        "seeds_short": lambda: dict(seeds=list(range(B - 1))),
        "seeds_scalar": lambda: dict(seeds=3) if B > 1 else dict(seeds="3"),
        "gens_ints": lambda: dict(generators=list(range(B)), guidance_generators=list(range(B)), seeds=None),
        "lam_range": lambda: dict(lam=draw(st.sampled_from([-0.1, 1.5, 1e9]))),
        "lam_nan": lambda: dict(lam=[nan] * B),
        "lam_len": lambda: dict(lam=[0.1] * (B + 1)),
        "lam_str": lambda: dict(lam="0.1"),
        "cfg_neg": lambda: dict(cfg=-1.0),
        "cfg_inf": lambda: dict(cfg=[nan] * B),
        "cfg_len": lambda: dict(cfg=[1.0] * (B + 1)),
        "lam_huge": lambda: dict(lam=draw(past_float32)),
        "cfg_huge": lambda: dict(cfg=[1.0] * (B - 1) + [draw(past_float32)]),
        "latent_huge": lambda: dict(latent_shape=(CH, draw(st.integers(2**40, 2**80)), w)),
    }
    if fault is not None:
        kw.update(change[fault]())
    return fault, kw


def expected_shape(kw):
    if "noise" in kw:
        return tuple(kw["noise"].shape)
    return (kw["cond"].batch,) + tuple(kw["latent_shape"])


@pytest.fixture(scope="module")
def gaussian_samplers():
    out = {}
    for family in ("lcm", "euler_a", "ddim"):
        for rule in ("next", "random"):
            out[family, rule] = Sampler(GaussianDenoiser(ACP), GaussianDenoiser(ACP),
                                        SamplerConfig(family=family, steps=2, guided_steps=1, teacher_rule=rule,
                                                      kernel_impl="torch", check_finite=True))
    return out


@settings(FUZZ, max_examples=300)
@given(call=sample_calls(), which=st.sampled_from([("lcm", "next"), ("euler_a", "random"), ("ddim", "random")]))
def test_sample_hostile_inputs(gaussian_samplers, call, which):
    fault, kw = call
    out = expect(lambda: gaussian_samplers[which].sample(**kw))
    if fault is None:
        assert out is not None, "a valid call must sample"
    else:
        assert out is None, f"fault {fault!r} was accepted"
    if out is not None:
        assert_latents(out, expected_shape(kw))


# --- extreme settings on valid inputs: finite and correctly shaped ----------------------------------
@settings(FUZZ, max_examples=40)
@given(family=st.sampled_from(FAMILIES), steps=st.integers(1, 50), g=st.integers(0, 50),
       lam=st.floats(0, 1), cfg=st.floats(0, 100), rule=st.sampled_from(["next", "same", "random"]),
       pt=st.sampled_from(PREDICTION_TYPES), B=st.integers(1, 3))
def test_extreme_settings_stay_finite(family, steps, g, lam, cfg, rule, pt, B):
    config = SamplerConfig(family=family, steps=steps, guided_steps=min(g, steps), lam=lam, cfg=cfg,
                           teacher_rule=rule, teacher_prediction_type=pt, kernel_impl="torch")
    s = Sampler(GaussianDenoiser(ACP), GaussianDenoiser(ACP, prediction_type=pt), config)
    g_ = torch.Generator().manual_seed(steps)
    out = s.sample(Cond(torch.randn(B, 2, WIDTH, generator=g_)), uncond=Cond(torch.zeros(1, 2, WIDTH)),
                   latent_shape=(CH, 3, 3), seeds=list(range(B)))
    assert_latents(out, (B, CH, 3, 3))


# --- models that break the Denoiser contract --------------------------------------------------------
@pytest.mark.parametrize("bad", ["one_row", "one_channel", "int", "not_tensor", "teacher_half", "meta"])
def test_model_returning_wrong_output_is_an_input_error(bad):
    good = GaussianDenoiser(ACP)
    broken = {"meta": lambda x, t, c: torch.empty_like(good(x, t, c), device="meta"),
              "one_row": lambda x, t, c: good(x, t, c)[:1],
              "one_channel": lambda x, t, c: good(x, t, c)[:, :1],
              "int": lambda x, t, c: good(x, t, c).long(),
              "not_tensor": lambda x, t, c: good(x, t, c).tolist(),
              "teacher_half": lambda x, t, c: good(x, t, c)[: x.shape[0] // 2]}[bad]
    student, teacher = (good, broken) if bad == "teacher_half" else (broken, good)
    s = Sampler(student, teacher, SamplerConfig(kernel_impl="torch"))
    with pytest.raises(InputError, match="a Denoiser must return a float prediction of its input's shape"):
        s.sample(Cond(torch.randn(2, 3, WIDTH)), uncond=Cond(torch.zeros(1, 3, WIDTH)), latent_shape=(CH, 3, 3))


# --- the tiny UNet with hostile shapes --------------------------------------------------------------
@settings(FUZZ, max_examples=8)
@given(B=st.integers(1, 2), h=st.integers(2, 12), w=st.integers(2, 12), tokens=st.integers(0, 9),
       width=st.sampled_from([32, 32, 16]), channels=st.sampled_from([4, 4, 3]), utok=st.sampled_from([0, 1]))
def test_tiny_unet_hostile_shapes(tiny_pair, one_torch_thread, B, h, w, tokens, width, channels, utok):
    s = Sampler(tiny_pair.student, tiny_pair.teacher, SamplerConfig(steps=1, kernel_impl="torch", check_finite=True))
    cond = Cond(torch.randn(B, tokens, width))
    uncond = Cond(torch.randn(1, tokens + utok, width))
    out = expect(lambda: s.sample(cond, uncond=uncond, latent_shape=(channels, h, w)))
    if out is not None:
        assert_latents(out, (B, channels, h, w))


# --- the fused ops' references and their checks -----------------------------------------------------
@st.composite
def op_args(draw):
    """Arguments for the three ops, each buffer sometimes off in shape, dtype, device or layout."""
    B, N, G = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    per = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dev = draw(st.sampled_from(["cpu", "cpu", "meta"]))

    def buf(batch, dtype=torch.float32, cols=None, optional=False):
        shape = (batch,) + per if cols is None else cols
        # None only where the contract allows it (z, xin_out); see test_op_checks_refuse_none_tables.
        fault = draw(st.sampled_from([None] * 24 + ["shape", "dtype", "device", "layout"] + ["none"] * optional))
        if fault == "shape":
            shape = tuple(shape[:-1]) + (shape[-1] + 1,)
        if fault == "dtype":
            dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.float16]))
        d = "cpu" if fault == "device" and dev == "meta" else ("meta" if fault == "device" else dev)
        t = torch.randn(shape, device=d).to(dtype) if d != "meta" else torch.empty(shape, dtype=dtype, device=d)
        if fault == "layout" and t.dim() > 1 and t.shape[0] > 1 and t.shape[-1] > 1:
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        return None if fault == "none" else t

    md = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    a = dict(x=buf(B), m_s=buf(B, md), n=buf(B), m_t=buf(2 * B, md), z=buf(B, optional=True), coef=buf(0, cols=(N, NUM_COLS)),
             gcoef=buf(0, cols=(G, B, NUM_GCOLS)), lam=buf(0, cols=(B,)), cfg=buf(0, cols=(B,)),
             out=buf(2 * B, md), x_out=buf(B), xin_out=buf(B, md, optional=True))
    a["k"] = draw(st.integers(-1, 4))
    return a


def call_op(name, a):
    if name == "student":
        args = (a["x"], a["m_s"], a["n"], a["coef"], a["gcoef"], a["k"], a["out"])
        return check_student_update, student_update_ref, args, a["out"]
    if name == "guided":
        args = (a["x"], a["m_s"], a["n"], a["m_t"], a["z"], a["coef"], a["gcoef"], a["lam"], a["cfg"], a["k"],
                a["x_out"], a["xin_out"])
        return check_guided_update, guided_update_ref, args, a["x_out"]
    args = (a["x"], a["m_s"], a["z"], a["coef"], a["k"], a["x_out"], a["xin_out"])
    return check_plain_update, plain_update_ref, args, a["x_out"]


@settings(FUZZ, max_examples=200)
@given(a=op_args(), name=st.sampled_from(["student", "guided", "plain"]))
def test_op_checks_guard_the_references(a, name):
    """check_<op> is the gate: it raises InputError, or the reference runs and fills its output."""
    check, ref, args, out = call_op(name, a)
    if expect(lambda: check(*args) or True) is None:
        return
    if out.device.type != "meta":
        out.fill_(math.nan)  # poisoned: every element must be written
    res = ref(*args)
    assert res is out
    if out.device.type != "meta":
        assert torch.isfinite(out).all()


def test_op_checks_refuse_none_tables():
    x = torch.randn(2, 3)
    with pytest.raises(InputError, match="coef must be a float32 torch.Tensor"):
        check_plain_update(x, x.clone(), None, None, 0, x.clone(), None)


# --- numbers and sizes past float32, the fused ops or memory (issue 13 items 4 and 7) ----------------


def as_form(v, form):
    """``v`` as a Python number, numpy float64, 0-d float64 tensor or a per-sample list of two."""
    import numpy as np

    fits = isinstance(v, float) or abs(v) < 1e308
    if form == "numpy" and fits:
        return np.float64(v)
    if form == "tensor" and fits:
        return torch.tensor(float(v), dtype=torch.float64)
    return [0.5, v] if form == "list" else v


def expect_config_or_input_error(fn):
    """fn's result, or None if it raised ConfigError / InputError (the contract here; nothing else)."""
    try:
        return fn()
    except (ConfigError, InputError) as e:
        assert str(e).strip() and len(str(e)) < 400, f"{type(e).__name__}: {str(e)[:100]}..."
        event(type(e).__name__)
        return None


@settings(FUZZ, max_examples=60)
@given(name=st.sampled_from(["lam", "cfg"]), v=st.one_of(past_float32, st.floats(0, F32_MAX), st.floats(0, 1)),
       form=st.sampled_from(["python", "numpy", "tensor", "list"]), where=st.sampled_from(["config", "call"]))
def test_lam_cfg_past_float32_are_errors_or_finite(gaussian_samplers, name, v, form, where):
    """ConfigError/InputError or a finite result for any lam/cfg; an error for any value float32 cannot hold."""
    value = as_form(v, form)
    cond, uncond = Cond(torch.randn(2, 3, WIDTH)), Cond(torch.zeros(1, 3, WIDTH))
    if where == "config" and form != "list":
        out = expect_config_or_input_error(lambda: Sampler(
            GaussianDenoiser(ACP), GaussianDenoiser(ACP), SamplerConfig(steps=2, kernel_impl="torch",
                                                                        check_finite=True, **{name: value})
        ).sample(cond, uncond=uncond, latent_shape=(CH, 3, 3)))
    else:
        out = expect_config_or_input_error(lambda: gaussian_samplers["lcm", "next"].sample(
            cond, uncond=uncond, latent_shape=(CH, 3, 3), **{name: value}))
    if out is None:
        return
    assert_latents(out, (2, CH, 3, 3))
    assert 0 <= v <= (1 if name == "lam" else F32_MAX), f"{name}={v!r} was accepted"


@settings(FUZZ, max_examples=40)
@given(dims=st.lists(st.one_of(st.integers(1, 6), st.integers(2**40, 2**80)), min_size=3, max_size=3),
       B=st.integers(1, 3))
def test_huge_latent_shapes_are_input_errors(gaussian_samplers, dims, B):
    """A latent dimension of 2**40 or more is refused with InputError before anything is allocated (the
    other dimensions are small, so a shape that is accepted is cheap). The bounds themselves are tested in
    tests/test_validation.py."""
    shape = (CH,) + tuple(dims[1:]) if dims[0] <= 6 else tuple(dims)
    out = expect_config_or_input_error(lambda: gaussian_samplers["euler_a", "random"].sample(
        Cond(torch.randn(B, 2, WIDTH)), uncond=Cond(torch.zeros(1, 2, WIDTH)), latent_shape=shape))
    huge = max(shape) >= 2**40
    assert (out is None) == huge, f"latent_shape {shape} {'accepted' if huge else 'refused'}"
    if out is not None:
        assert_latents(out, (B,) + shape)

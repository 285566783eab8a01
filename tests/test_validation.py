"""Bad input gets a clear error naming what to pass instead, before any model runs."""

import pytest
import torch

from distpp import Cond, ConfigError, InputError, Sampler, SamplerConfig, WeightsNotFoundError
from distpp.presets import build_preset, load_unet
from helpers import GaussianDenoiser, gaussian_conds
from distpp.schedules import build_schedule

SHAPE = (4, 6, 6)


def models():
    acp = build_schedule("lcm", 4).alphas_cumprod
    return GaussianDenoiser(acp), GaussianDenoiser(acp)


def sampler(**kw):
    s, t = models()
    return Sampler(s, t, SamplerConfig(kernel_impl="torch", **kw)), s, t


@pytest.mark.parametrize("kw,match", [
    (dict(family="lcmx"), "unknown family 'lcmx'; pass one of"),
    (dict(lam=1.5), r"lam must be a number in \[0, 1\]"),
    (dict(lam=-0.1), r"lam must be a number in \[0, 1\]"),
    (dict(steps=4, guided_steps=5), r"guided_steps must be an integer in \[0, 4\]"),
    (dict(guided_steps=-1), "guided_steps"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(cfg=float("nan")), "cfg"),
    (dict(cfg=-1.0), "cfg"),
    (dict(teacher_rule="prev"), "unknown teacher_rule"),
    (dict(prediction_type="eps"), "unknown prediction_type"),
    (dict(kernel_impl="cutlass"), "unknown kernel_impl"),
    (dict(family="euler_a", timesteps=(999, 500)), "does not take explicit timesteps"),
    (dict(timesteps=(500, 700)), "strictly decreasing"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        s, t = models()
        Sampler(s, t, SamplerConfig(**kw))


def test_guided_needs_teacher():
    s, _ = models()
    with pytest.raises(ConfigError, match="needs a teacher"):
        Sampler(s, None, SamplerConfig(guided_steps=1))


def test_dtype_the_device_cannot_run():
    s, t = models()
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        Sampler(s, t, SamplerConfig(), dtype=torch.float16)
    with pytest.raises(ConfigError, match="not supported"):
        Sampler(s, t, SamplerConfig(), dtype=torch.float64)


def test_model_dtype_mismatch(tiny_pair):
    with pytest.raises(ConfigError, match="the student model is torch.float32 but the sampler dtype is torch.bfloat16"):
        Sampler(tiny_pair.student, tiny_pair.teacher, SamplerConfig(), dtype=torch.bfloat16)


def _no_model_calls(s, st, tt):
    assert not st.calls and not tt.calls


@pytest.mark.parametrize("case,match", [
    ("channels", "latents have 3 channels but the student takes 4"),
    ("noise_batch", "noise has batch 3 but cond has 2 rows"),
    ("no_shape", r"pass latent_shape=\(C, H, W\)"),
    ("cond_width", "cross_attention_dim is 8"),
    ("uncond_missing", "pass uncond=Cond"),
    ("uncond_batch", "conditioning has 3 rows; pass 1"),
    ("lam_per_sample", "one value per sample"),
    ("lam_range", r"lam must be a number in \[0, 1\]"),
    ("seeds", "seeds must be 2 non-negative ints"),
    ("generators", "one generator and one guidance generator per sample"),
    ("nan_cond", "contains NaN or inf"),
    ("nan_noise", "noise contains NaN or inf"),
    ("not_cond", "must be a distpp.Cond"),
    ("latent_int_vs_noise", r"latent_shape must be \(C, H, W\), got 4"),
])
def test_input_errors_before_any_forward(case, match):
    s, st, tt = sampler(check_finite=True)
    cond, uncond = gaussian_conds(2)
    kw = dict(uncond=uncond, latent_shape=SHAPE)
    if case == "channels":
        kw["latent_shape"] = (3, 6, 6)
    elif case == "noise_batch":
        kw = dict(uncond=uncond, noise=torch.randn(3, *SHAPE))
    elif case == "no_shape":
        kw = dict(uncond=uncond)
    elif case == "cond_width":
        cond = Cond(torch.randn(2, 3, 9))
    elif case == "uncond_missing":
        kw.pop("uncond")
    elif case == "uncond_batch":
        kw["uncond"] = Cond(torch.randn(3, 3, 8))
    elif case == "lam_per_sample":
        kw["lam"] = [0.1, 0.2, 0.3]
    elif case == "lam_range":
        kw["lam"] = [0.1, 2.0]
    elif case == "seeds":
        kw["seeds"] = [1]
    elif case == "generators":
        kw["generators"] = [torch.Generator()]
        kw["guidance_generators"] = [torch.Generator()]
    elif case == "nan_cond":
        e = cond.encoder_hidden_states.clone()
        e[1, 2, 3] = float("nan")
        cond = Cond(e)
    elif case == "nan_noise":
        nz = torch.randn(2, *SHAPE)
        nz[0, 0, 0, 0] = float("inf")
        kw = dict(uncond=uncond, noise=nz)
    elif case == "not_cond":
        cond = cond.encoder_hidden_states
    elif case == "latent_int_vs_noise":
        kw = dict(uncond=uncond, noise=torch.randn((2,) + SHAPE), latent_shape=4)
    with pytest.raises(ConfigError if case == "lam_range" else InputError, match=match):
        s.sample(cond, **kw)
    _no_model_calls(s, st, tt)


def test_sdxl_style_conditioning_is_checked():
    pair = build_preset("tiny_xl")
    s = Sampler(pair.student, pair.teacher, SamplerConfig(family="euler", guided_steps=1, lam=0.1))
    cond, uncond = pair.random_cond(2)
    out = s.sample(cond, uncond=uncond, latent_shape=(4, 8, 8), seeds=[1, 2])
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(InputError, match="SDXL-style model: pass Cond"):
        s.sample(Cond(cond.encoder_hidden_states), uncond=uncond, latent_shape=(4, 8, 8))
    bad = Cond(cond.encoder_hidden_states, cond.text_embeds[:, :5], cond.time_ids)
    with pytest.raises(InputError, match="text_embeds has shape"):
        s.sample(bad, uncond=uncond, latent_shape=(4, 8, 8))


def test_unknown_preset_and_large_preset_on_cpu():
    with pytest.raises(ConfigError, match="unknown preset 'sd3'"):
        build_preset("sd3")
    with pytest.raises(ConfigError, match="needs about 21 GB .* refused on CPU"):
        build_preset("sdxl")


def test_missing_weights(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no model folder"):
        load_unet(str(tmp_path / "nope" / "unet"))
    with pytest.raises(WeightsNotFoundError, match="could not load UNet weights"):
        load_unet(str(tmp_path))


def test_loop_makes_no_host_reads(monkeypatch):
    """run_loop never pulls a device value to the host (.item / bool / tolist / numpy)."""
    from distpp import run_loop

    s, st, tt = sampler(guided_steps=2, family="lcm")
    cond, uncond = gaussian_conds(2)
    plan = s.prepare(cond, uncond=uncond, latent_shape=SHAPE)

    def boom(*a, **k):
        raise AssertionError("host read inside the sampling loop")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    with torch.inference_mode():
        out = run_loop(s.student, s.teacher, s.ops, s.schedule, plan)
    monkeypatch.undo()
    assert out.shape == (2,) + SHAPE and torch.isfinite(out).all()


def test_w_embedding_matches_diffusers():
    pytest.importorskip("transformers")
    from diffusers import LatentConsistencyModelPipeline

    from distpp.denoiser import guidance_scale_embedding

    w = torch.tensor([7.5, 1.0, 3.25])
    for dim in (32, 256, 33):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.allclose(guidance_scale_embedding(w, dim), ref, atol=1e-6, rtol=1e-6)


def test_load_unet_routes_hub_ids_and_paths(monkeypatch, tmp_path):
    """'org/name' goes to the Hub loader; a missing local path fails before any download attempt."""
    import diffusers

    from distpp.errors import WeightsNotFoundError
    from distpp.presets import load_unet

    seen = []

    def fake_from_pretrained(name, **kw):
        seen.append(name)
        raise OSError("offline")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", fake_from_pretrained)
    with pytest.raises(WeightsNotFoundError, match="could not load UNet weights from 'org/student'"):
        load_unet("org/student")
    with pytest.raises(WeightsNotFoundError, match="no model folder at './missing'"):
        load_unet("./missing")
    with pytest.raises(WeightsNotFoundError, match="no model folder"):
        load_unet(str(tmp_path / "a" / "b"))
    load_dir = tmp_path / "unet_dir"
    load_dir.mkdir()
    with pytest.raises(WeightsNotFoundError):
        load_unet(str(load_dir))
    assert seen == ["org/student", str(load_dir)]


def test_lam_and_cfg_take_numpy_and_tensor_values():
    """Per-call lam / cfg as numpy scalars, 0-d tensors or per-sample arrays give the float result."""
    import numpy as np

    s, st, tt = sampler(guided_steps=1)
    cond, uncond = gaussian_conds(2)
    kw = dict(uncond=uncond, latent_shape=(4, 8, 8), seeds=[3, 4])
    ref = s.sample(cond, lam=0.25, cfg=3.0, **kw)
    other = s.sample(cond, lam=0.5, cfg=3.0, **kw)
    assert (ref - other).abs().max() > 0  # the values matter, so equality below means they were read
    for lam, cfg in ((np.float32(0.25), np.float64(3.0)), (torch.tensor(0.25), torch.tensor(3)),
                     (np.array([0.25, 0.25]), torch.tensor([3.0, 3.0])), ([np.float64(0.25), torch.tensor(0.25)], 3)):
        assert torch.equal(s.sample(cond, lam=lam, cfg=cfg, **kw), ref), (type(lam), type(cfg))
    with pytest.raises(ConfigError, match="lam must be a number in"):
        s.sample(cond, lam=torch.tensor(1.5), **kw)
    with pytest.raises(InputError, match="got the string"):
        s.sample(cond, lam="0.1", **kw)


def test_one_reused_buffer_model_cannot_be_student_and_teacher():
    class Reusing(GaussianDenoiser):
        reuses_output = True  # like TrtDenoiser: returns a view of a buffer it overwrites on its next call

    acp = build_schedule("lcm", 4).alphas_cumprod
    r = Reusing(acp)
    with pytest.raises(ConfigError, match="build a second instance for the teacher"):
        Sampler(r, r, SamplerConfig(kernel_impl="torch"))
    Sampler(r, Reusing(acp), SamplerConfig(kernel_impl="torch"))  # two instances are fine


# --- issue 13: numbers and sizes beyond what float32 / the fused ops / memory hold --------------------
F32_MAX = float(torch.finfo(torch.float32).max)
HUGE = 10**400  # an int no float holds


@pytest.mark.parametrize("where", ["config", "call", "call_per_sample"])
@pytest.mark.parametrize("name", ["lam", "cfg"])
def test_huge_int_lam_cfg_are_config_errors(where, name):
    with pytest.raises(ConfigError, match=name) as e:
        if where == "config":
            SamplerConfig(**{name: HUGE})
        else:
            s, st, tt = sampler()
            cond, uncond = gaussian_conds(2)
            v = HUGE if where == "call" else [0.5, HUGE]
            try:
                s.sample(cond, uncond=uncond, latent_shape=SHAPE, **{name: v})
            finally:
                _no_model_calls(s, st, tt)
    assert len(str(e.value)) < 300, "the message repeats a 400-digit number"


@pytest.mark.parametrize("value", [1e39, F32_MAX * (1 + 1e-7), "np", "tensor"])
def test_cfg_beyond_float32_is_a_config_error(value):
    import numpy as np

    value = {"np": np.float64(1e39), "tensor": torch.tensor(1e39, dtype=torch.float64)}.get(value, value)
    assert torch.tensor(float(value)).isinf()  # what the loop would compute with
    with pytest.raises(ConfigError, match=r"cfg .* at most 3.4"):
        SamplerConfig(cfg=value)
    s, st, tt = sampler()
    cond, uncond = gaussian_conds(2)
    for v in (value, [7.5, value]):
        with pytest.raises(ConfigError, match=r"cfg .* at most 3.4"):
            s.sample(cond, uncond=uncond, latent_shape=SHAPE, cfg=v)
    _no_model_calls(s, st, tt)
    assert SamplerConfig(cfg=F32_MAX).cfg == F32_MAX  # the bound itself is accepted


def test_config_takes_numpy_and_tensor_scalars_as_floats():
    import numpy as np

    c = SamplerConfig(lam=np.float32(0.25), cfg=torch.tensor(3))
    assert (c.lam, c.cfg, c.resolved_lam) == (0.25, 3.0, 0.25)
    assert type(c.lam) is float and type(c.cfg) is float and hash(c)  # stored as plain floats
    with pytest.raises(ConfigError, match="lam"):
        SamplerConfig(lam=True)  # a bool is not a number here (as for per-call values)


@pytest.mark.parametrize("case", ["noise", "cond", "uncond", "noise_times_sigma"])
def test_check_finite_checks_inputs_as_cast(case):
    """float64 inputs finite as float64 but inf in the dtype they are used in are caught by check_finite."""
    family = "euler" if case == "noise_times_sigma" else "lcm"  # euler's init_noise_sigma is ~14.6
    s, st, tt = sampler(check_finite=True, family=family)
    cond, uncond = gaussian_conds(2)
    kw = dict(uncond=uncond, latent_shape=SHAPE)
    if case == "noise":
        nz = torch.randn((2,) + SHAPE, dtype=torch.float64)
        nz[1, 0, 0, 0] = 1e39
        kw = dict(uncond=uncond, noise=nz)
    elif case == "noise_times_sigma":
        kw = dict(uncond=uncond, noise=torch.full((2,) + SHAPE, 1e38))  # finite float32 input
    elif case == "cond":
        e = cond.encoder_hidden_states.double()
        e[0, 1, 2] = -1e39
        cond = Cond(e)
    else:
        kw["uncond"] = Cond(torch.full((1, 3, 8), 1e39, dtype=torch.float64))
    with pytest.raises(InputError, match="contains NaN or inf after"):
        s.sample(cond, **kw)
    _no_model_calls(s, st, tt)


def test_check_finite_refuses_a_non_finite_result():
    """cfg = float32's max is accepted, but the guidance overflows with it: with check_finite a non-finite
    result is an InputError that says what to lower, from Sampler.sample and GraphRunner.sample."""
    from distpp import GraphRunner

    cond, uncond = gaussian_conds(2)
    kw = dict(uncond=uncond, latent_shape=SHAPE, cfg=F32_MAX, seeds=[1, 2])
    plain, _, _ = sampler()
    assert not torch.isfinite(plain.sample(cond, **kw)).all()  # the premise: this overflows
    s, _, _ = sampler(check_finite=True)
    for call in (s.sample, GraphRunner(s, graphs=False).sample):
        with pytest.raises(InputError, match=r"contain NaN or inf.*lower cfg \(up to 3.4e\+38 "):
            call(cond, **kw)
    out = s.sample(cond, **{**kw, "cfg": 7.5})
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(4, 2**31, 2**31), (4, 2**62, 2**62), (4, 2**100, 1)])
def test_overflowing_latent_shape_is_an_input_error(shape):
    s, st, tt = sampler()
    cond, uncond = gaussian_conds(2)
    with pytest.raises(InputError, match=r"at most 1073741824 \(2\*\*30\) elements per sample"):
        s.sample(cond, uncond=uncond, latent_shape=shape)
    _no_model_calls(s, st, tt)


def test_latent_buffers_beyond_device_memory_are_an_input_error(monkeypatch):
    """A shape the fused ops could index but whose buffers alone exceed the device's memory is refused
    before anything is allocated (here with the memory size patched to 1 MiB, so nothing big is tried)."""
    import distpp.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "device_memory_bytes", lambda device: 2**20, raising=False)
    s, st, tt = sampler()
    cond, uncond = gaussian_conds(2)
    with pytest.raises(InputError, match=r"1\.0 MiB.*at most \d+ elements per sample"):
        s.sample(cond, uncond=uncond, latent_shape=(4, 128, 128))
    with pytest.raises(InputError, match="MiB"):
        s.sample(cond, uncond=uncond, noise=torch.randn(2, 4, 128, 128))
    _no_model_calls(s, st, tt)
    assert s.sample(cond, uncond=uncond, latent_shape=(4, 8, 8)).shape == (2, 4, 8, 8)


def test_latent_size_bounds_are_exact(monkeypatch):
    """2**30 elements per sample is accepted by the index bound and one more is not; the memory bound counts
    every buffer of the plan (host arithmetic only: nothing is allocated here)."""
    import distpp.sampler as sampler_mod

    s, _, _ = sampler(guided_steps=1)
    monkeypatch.setattr(sampler_mod, "device_memory_bytes", lambda device: 2**62)
    s._check_size((2, 4, 2**14, 2**14))
    with pytest.raises(InputError, match=r"has 1073741825 elements per sample; distpp takes at most 1073741824"):
        s._check_size((2, 1, 2**30 + 1, 1))
    # 2 samples x 4 x 8 x 8 latents, N = 4, G = 1, float32 models: x, m_s, z[4], n[1] (4 bytes each: 28), x_in (4),
    # m_t and t_in (2 rows x 4 bytes each: 16) = 48 bytes per element -> 2 * 256 * 48 = 24576 bytes
    monkeypatch.setattr(sampler_mod, "device_memory_bytes", lambda device: 24576)
    s._check_size((2, 4, 8, 8))
    monkeypatch.setattr(sampler_mod, "device_memory_bytes", lambda device: 24575)
    with pytest.raises(InputError, match="need 24576 bytes .* has 24575 bytes .* pass at most 255 elements per sample"):
        s._check_size((2, 4, 8, 8))


def test_check_finite_names_the_model_dtype():
    """A float32 value finite in float32 but past bfloat16's range (3.39e38) is caught after the cast."""
    s, t = models()
    smp = Sampler(s, t, SamplerConfig(kernel_impl="torch", check_finite=True), dtype=torch.bfloat16)
    cond, uncond = gaussian_conds(2)
    e = cond.encoder_hidden_states.clone()
    e[1, 0, 0] = 3.4e38
    assert torch.isfinite(e).all()
    with pytest.raises(InputError, match=r"cond encoder_hidden_states contains NaN or inf after the cast to the "
                                         r"model dtype \(bfloat16\); .*3\.39e\+38"):
        smp.sample(Cond(e), uncond=uncond, latent_shape=SHAPE)
    _no_model_calls(smp, s, t)

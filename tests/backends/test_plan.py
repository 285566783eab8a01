"""TensorRT-free planning: IO specs, profiles, checks before launch, buffer plans, cache keys."""

import pytest
import torch

from distpp import Cond, ModelSpec
from distpp.backends.plan import (IOSpec, ShapeRange, TensorSpec, check_feeds, compute_profile, cond_feeds,
                                  engine_key, input_names, io_spec_for, onnx_sha256, plan_buffers, read_io_spec,
                                  view)
from distpp.errors import ConfigError, InputError, WeightsNotFoundError

LCM = ModelSpec(in_channels=4, cross_attention_dim=32, time_cond_proj_dim=16)
XL = ModelSpec(in_channels=4, cross_attention_dim=32, text_embeds_dim=24, time_ids_dim=6)


def test_input_names_follow_conditioning():
    assert input_names(ModelSpec(in_channels=4, cross_attention_dim=8)) == ("sample", "timestep",
                                                                              "encoder_hidden_states")
    assert input_names(LCM)[-1] == "timestep_cond"
    assert input_names(XL)[3:] == ("text_embeds", "time_ids")


def test_teacher_profile_covers_cfg_batch_and_resolutions():
    io = io_spec_for(LCM, tokens=77, dtype=torch.float16)
    shapes = ShapeRange(batch=(1, 2, 4), resolutions=((64, 64), (96, 128), (48, 32)))
    s = compute_profile(io, shapes, 1).as_dict()
    t = compute_profile(io, shapes, 2).as_dict()
    assert s["sample"] == ((1, 4, 48, 32), (2, 4, 64, 64), (4, 4, 96, 128))
    assert t["sample"] == ((2, 4, 48, 32), (4, 4, 64, 64), (8, 4, 96, 128))
    assert t["encoder_hidden_states"] == ((2, 77, 32), (4, 77, 32), (8, 77, 32))
    assert t["timestep"] == ((2,), (4,), (8,))
    assert t["timestep_cond"][2] == (8, 16)


def test_profile_rejects_what_the_export_cannot_serve():
    static = io_spec_for(LCM, tokens=8, dtype=torch.float32, spatial_dynamic=False, latent_hw=(16, 16))
    compute_profile(static, ShapeRange(resolutions=((16, 16),)))
    with pytest.raises(ConfigError, match="dynamic height/width"):
        compute_profile(static, ShapeRange(resolutions=((16, 16), (32, 32))))
    odd = IOSpec((TensorSpec("sample", ("batch", 4, "height", "width"), torch.float32),
                  TensorSpec("encoder_hidden_states", ("batch", "seq", 8), torch.float32)),
                 TensorSpec("out_sample", ("batch", 4, "height", "width"), torch.float32))
    with pytest.raises(ConfigError, match="'seq'"):
        compute_profile(odd, ShapeRange())
    with pytest.raises(ConfigError, match="batch range"):
        ShapeRange(batch=(2, 1, 4))


def _feeds(b, dtype=torch.float32, hw=(16, 16), tokens=8):
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 4, *hw, generator=g).to(dtype)
    t = torch.rand(b, generator=g) * 999
    cond = Cond(torch.randn(b, tokens, 32, generator=g).to(dtype), timestep_cond=torch.randn(b, 16, generator=g).to(dtype))
    return x, t, cond


def test_checks_before_launch():
    io = io_spec_for(LCM, tokens=8, dtype=torch.float16)
    prof = compute_profile(io, ShapeRange(batch=(1, 1, 2), resolutions=((16, 16),)), 2)
    x, t, cond = _feeds(4, torch.float16)
    assert check_feeds(io, cond_feeds(io, x, t, cond), prof) == 4
    with pytest.raises(InputError, match="outside the built profile"):
        check_feeds(io, cond_feeds(io, *_feeds(6, torch.float16)), prof)
    with pytest.raises(InputError, match="outside the built profile"):
        check_feeds(io, cond_feeds(io, *_feeds(2, torch.float16, hw=(24, 16))), prof)
    with pytest.raises(InputError, match="built for torch.float16"):
        check_feeds(io, cond_feeds(io, *_feeds(2, torch.float32)), prof)
    with pytest.raises(InputError, match="dim 1 must be 8"):
        check_feeds(io, cond_feeds(io, *_feeds(2, torch.float16, tokens=9)), prof)
    x, t, cond = _feeds(2, torch.float16)
    with pytest.raises(InputError, match="batch = 3"):
        check_feeds(io, cond_feeds(io, x, torch.rand(3), cond), prof)
    with pytest.raises(InputError, match="timestep_cond"):
        cond_feeds(io, x, t, Cond(cond.encoder_hidden_states))
    xl = io_spec_for(XL, tokens=8, dtype=torch.float32)
    assert "timestep_cond" not in cond_feeds(xl, x, t, Cond(cond.encoder_hidden_states, torch.randn(2, 24),
                                                             torch.randn(2, 6), cond.timestep_cond))


def test_buffer_views_keep_addresses():
    io = io_spec_for(LCM, tokens=8, dtype=torch.float16)
    prof = compute_profile(io, ShapeRange(batch=(1, 2, 3), resolutions=((16, 16), (8, 24))), 2)
    plan = plan_buffers(io, prof)
    sizes = {n: (k, dt) for n, k, dt in plan.sizes}
    assert sizes["sample"] == (6 * 4 * 16 * 24, torch.float16)
    assert sizes["out_sample"] == sizes["sample"]
    assert sizes["timestep"] == (6, torch.float32)
    bufs = plan.allocate("cpu")
    assert plan.nbytes() == sum(b.numel() * b.element_size() for b in bufs.values())
    small, big = view(bufs["sample"], (2, 4, 8, 24)), view(bufs["sample"], (6, 4, 16, 24))
    assert small.data_ptr() == big.data_ptr() == bufs["sample"].data_ptr()
    with pytest.raises(InputError, match="static buffer"):
        view(bufs["sample"], (7, 4, 16, 24))


def _profile(b=2):
    return compute_profile(io_spec_for(LCM, 77, torch.float16), ShapeRange(batch=(1, 1, b)), 2)


def test_engine_key_changes_with_every_input():
    base = dict(onnx_sha256="ab" * 32, profile=_profile(), precision=("FP16",), opt_level=3, workspace_bytes=None,
                trt_version="10.3.0", gpu_name="NVIDIA H100", compute_capability=(9, 0))
    key = engine_key(**base)
    assert engine_key(**dict(base, profile=_profile())) == key  # equal inputs, fresh objects
    changes = dict(onnx_sha256="cd" * 32, profile=_profile(4), precision=("BF16",), opt_level=5,
                   workspace_bytes=1 << 30, trt_version="10.4.0", gpu_name="NVIDIA A100", compute_capability=(8, 0))
    keys = {engine_key(**dict(base, **{k: v})) for k, v in changes.items()}
    assert len(keys) == len(changes) and key not in keys


def test_read_io_spec_rejects_missing_and_foreign_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(WeightsNotFoundError, match="no ONNX file"):
        read_io_spec(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x07not a protobuf at all" * 50)
    with pytest.raises(ConfigError, match="not an ONNX model"):
        read_io_spec(junk)
    node = helper.make_node("Identity", ["input"], ["output"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(ConfigError, match="python -m distpp.export"):
        read_io_spec(foreign)


def test_read_io_spec_and_hash_of_export(tiny_onnx, tiny_pair):
    io = read_io_spec(tiny_onnx["student"])
    assert io.names == input_names(tiny_pair.student.spec)
    assert io.input("sample").dims == ("batch", 4, "height", "width")
    assert io.input("timestep").dtype == torch.float32 and io.dtype == torch.float32
    assert "timestep_cond" not in read_io_spec(tiny_onnx["teacher"]).names
    assert onnx_sha256(tiny_onnx["student"]) != onnx_sha256(tiny_onnx["teacher"])
    assert onnx_sha256(tiny_onnx["student"]) == onnx_sha256(tiny_onnx["student"])


def test_engine_cache_builds_once_and_rebuilds_corrupt(tiny_onnx, tmp_path):
    """The engine cache around a fake builder (the real one needs TensorRT)."""
    from distpp.backends.tensorrt import ENGINE_FILE, EngineConfig, cached_engine
    from distpp.cache import ArtifactCache

    calls = []

    def fake_build(onnx_path, profile, cfg, out, timing):
        calls.append((cfg.precision, timing))
        (out / ENGINE_FILE).write_bytes(repr((profile.shapes, cfg.flags)).encode() * 20)
        return b"timing-" + cfg.precision.encode()

    cache = ArtifactCache(tmp_path)
    ident = ("10.3.0", "NVIDIA H100", (9, 0))
    shapes = ShapeRange(batch=(1, 1, 2), resolutions=((16, 16),))
    args = (tiny_onnx["teacher"], shapes, 2)
    f1, io, prof = cached_engine(*args, EngineConfig("fp16"), cache=cache, build=fake_build, identity=ident)
    assert prof.as_dict()["sample"][2] == (4, 4, 16, 16)
    assert cached_engine(*args, EngineConfig("fp16"), cache=cache, build=fake_build, identity=ident)[0] == f1
    assert calls == [("fp16", b"")]
    f2 = cached_engine(*args, EngineConfig("bf16"), cache=cache, build=fake_build, identity=ident)[0]
    assert f2 != f1 and calls[-1] == ("bf16", b"timing-fp16")  # the persisted timing cache is reused
    f3 = cached_engine(*args, EngineConfig("fp16"), cache=cache, build=fake_build,
                       identity=("10.3.0", "NVIDIA L4", (8, 9)))[0]
    assert f3 not in (f1, f2)
    engine = f1 / ENGINE_FILE
    engine.write_bytes(engine.read_bytes()[:10])  # truncated
    with pytest.warns(UserWarning, match="truncated"):
        again = cached_engine(*args, EngineConfig("fp16"), cache=cache, build=fake_build, identity=ident)[0]
    assert again == f1 and len(engine.read_bytes()) > 10 and len(calls) == 4


def test_engine_cache_checks_inputs_before_building(tmp_path):
    from distpp.backends.tensorrt import EngineConfig, cached_engine

    def never(*a):
        raise AssertionError("build must not run")

    with pytest.raises(WeightsNotFoundError):
        cached_engine(tmp_path / "missing.onnx", ShapeRange(), 1, EngineConfig(), build=never,
                      identity=("10", "gpu", (9, 0)))
    with pytest.raises(ConfigError, match="precision"):
        EngineConfig("int4")

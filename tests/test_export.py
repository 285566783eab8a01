"""ONNX export of the tiny preset: verify against torch, CLI, cache keys, corruption, concurrency."""

import os

import pytest
import torch

pytest.importorskip("onnxruntime")

from distpp.backends.plan import onnx_key, onnx_sha256, read_io_spec  # noqa: E402
from distpp.cache import ArtifactCache  # noqa: E402
from distpp.errors import ConfigError  # noqa: E402
from distpp.export import DATA_FILE, ExportConfig, cached_export, export_key, main, verify  # noqa: E402

HW, TOKENS = (16, 16), 8


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    return tiny_onnx["cache"], {r: tiny_onnx[r] for r in ("student", "teacher")}


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_export_verifies_against_torch(exported, tiny_pair, role):
    _, paths = exported
    io = read_io_spec(paths[role])
    assert io.input("sample").dims == ("batch", 4, "height", "width")
    assert ("timestep_cond" in io.names) == (role == "student")
    # batches 1 and 3 (traced at 2) and a non-square resolution: nothing shape-specific was baked
    assert verify(getattr(tiny_pair, role), paths[role], latent_hw=HW, tokens=TOKENS) <= 1e-4
    assert verify(getattr(tiny_pair, role), paths[role], latent_hw=(24, 8), tokens=TOKENS, batches=(2,)) <= 1e-4


def test_opset_is_at_least_18(exported):
    import onnx

    model = onnx.load(str(exported[1]["student"]), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18


def test_cli_hits_the_cache_and_verifies(exported, capsys):
    cache, paths = exported
    mtime = paths["student"].stat().st_mtime_ns
    assert main(["--preset", "tiny", "--which", "student", "--cache-dir", str(cache.root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"student: {paths['student']}" in out and "teacher" not in out
    assert out.count("(ok,") == 1
    assert paths["student"].stat().st_mtime_ns == mtime  # loaded, not re-exported


def test_export_key_changes_with_every_input(tiny_pair):
    base = tiny_pair.student
    key = export_key(base, ExportConfig(), HW, TOKENS)[0]
    assert export_key(base, ExportConfig(), HW, TOKENS)[0] == key
    variants = [export_key(base, ExportConfig(opset=19), HW, TOKENS), export_key(base, ExportConfig(dtype="fp16"), HW, TOKENS),
                export_key(base, ExportConfig(dynamic_spatial=False), HW, TOKENS),
                export_key(base, ExportConfig(exporter="dynamo"), HW, TOKENS),
                export_key(base, ExportConfig(external_data=True), HW, TOKENS),
                export_key(base, ExportConfig(example_batch=3), HW, TOKENS),
                export_key(base, ExportConfig(), (24, 24), TOKENS), export_key(base, ExportConfig(), HW, 9),
                export_key(tiny_pair.teacher, ExportConfig(), HW, TOKENS)]
    keys = {k for k, _ in variants}
    assert len(keys) == len(variants) and key not in keys
    # weights: one element nudged changes the key; restored, the key is back
    p = next(base.unet.parameters())
    old = p.data.flatten()[0].item()
    try:
        p.data.view(-1)[0] += 1e-3
        assert export_key(base, ExportConfig(), HW, TOKENS)[0] != key
    finally:
        p.data.view(-1)[0] = old
    assert export_key(base, ExportConfig(), HW, TOKENS)[0] == key
    parts = dict(model_config={"a": 1}, weights="w", opset=18, dtype="fp32", dynamic_axes={"sample": {0: "batch"}},
                 example_shapes={"sample": [2, 4]}, exporter="legacy", torch_version="2.13.0", onnx_version="1.23.0",
                 external_data=False)
    ref = onnx_key(**parts)
    changed = dict(model_config={"a": 2}, weights="v", opset=19, dtype="fp16", dynamic_axes={"sample": {0: "b"}},
                   example_shapes={"sample": [3, 4]}, exporter="dynamo", torch_version="2.14.0",
                   onnx_version="1.24.0", external_data=True)
    assert len({onnx_key(**dict(parts, **{k: v})) for k, v in changed.items()} - {ref}) == len(changed)


def test_corrupt_export_is_detected_and_rebuilt(tmp_path, exported, tiny_pair):
    """A same-size corruption (only the sha256 shows it) of a copy of the session's teacher export."""
    import shutil

    src = exported[1]["teacher"].parent
    cache = ArtifactCache(tmp_path)
    shutil.copytree(src, cache.path("onnx", src.name))
    path = cache.path("onnx", src.name) / src.joinpath("model.onnx").name
    good = path.read_bytes()
    path.write_bytes(good[:-64] + bytes(64))
    with pytest.warns(UserWarning, match="corrupt"):
        again = cached_export(tiny_pair.teacher, latent_hw=HW, tokens=TOKENS, cache=cache)
    assert again == path and cache.validate(path.parent)
    assert verify(tiny_pair.teacher, again, latent_hw=HW, tokens=TOKENS, batches=(2,)) <= 1e-4


def _export_in_child(barrier, cache_dir):
    torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP pool carried across fork
    barrier.wait(timeout=60)
    os._exit(main(["--which", "student", "--cache-dir", cache_dir]))


def test_two_processes_exporting_at_once_leave_one_valid_file(tmp_path, tiny_pair):
    """Two forked processes (diffusers already imported: no 10 s re-import each) start together."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_export_in_child, args=(barrier, str(tmp_path))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    root = tmp_path / "onnx"
    folders = [p for p in root.iterdir() if p.is_dir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")  # no temp folder left behind
    path = folders[0] / "model.onnx"
    ArtifactCache(tmp_path).validate(folders[0])
    assert path == cached_export(tiny_pair.student, latent_hw=HW, tokens=TOKENS, cache=ArtifactCache(tmp_path))
    assert verify(tiny_pair.student, path, latent_hw=HW, tokens=TOKENS, batches=(2,)) <= 1e-4


def test_external_data_and_fp16(tmp_path, tiny_pair):
    cache = ArtifactCache(tmp_path)
    ext = cached_export(tiny_pair.student, ExportConfig(external_data=True), latent_hw=HW, tokens=TOKENS, cache=cache)
    data = ext.parent / DATA_FILE
    assert data.stat().st_size > ext.stat().st_size  # the weights live beside the graph
    assert verify(tiny_pair.student, ext, latent_hw=HW, tokens=TOKENS, batches=(2,)) <= 1e-4
    h = onnx_sha256(ext)
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    assert onnx_sha256(ext) != h  # the engine key sees weight changes in external data
    half = cached_export(tiny_pair.student, ExportConfig(dtype="fp16"), latent_hw=HW, tokens=TOKENS, cache=cache)
    io = read_io_spec(half)
    assert io.dtype == torch.float16 and io.input("timestep").dtype == torch.float32
    assert verify(tiny_pair.student, half, latent_hw=HW, tokens=TOKENS, batches=(2,)) <= 1e-2


def test_config_errors():
    with pytest.raises(ConfigError, match="opset >= 18"):
        ExportConfig(opset=17)
    with pytest.raises(ConfigError, match="'fp32' or 'fp16'"):
        ExportConfig(dtype="bf16")
    with pytest.raises(ConfigError, match="exporter"):
        ExportConfig(exporter="script")


@pytest.mark.parametrize("argv,match", [
    (["--preset", "tinyy"], "unknown preset 'tinyy'"),
    (["--weights", "/nonexistent"], "no model folder at '/nonexistent"),
    (["--opset", "17"], "--opset 17"),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device cuda"),
    (["--device", "gpu"], "--device gpu"),
], ids=["preset", "weights", "opset", "device-cuda", "device-name"])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, match):
    assert main(argv + ["--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distpp.export: ") and match in err and err.count("\n") == 1, err

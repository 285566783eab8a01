import json

import pytest
import torch

from distpp import SamplerConfig, bench
from distpp.bench import cli, e2e
from distpp.baselines import BaselineSampler, baseline_sample


def _table(out: str) -> dict[str, list[str]]:
    """variant -> its printed cells, from the report's table (rows between the header and the footer)."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split("|")[0].strip() == "variant")
    rows = {}
    for ln in lines[start + 1:]:
        if "|" not in ln:
            break
        cells = [c.strip() for c in ln.split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _check_speedups(data):
    """Every named speed-up is baseline ms / variant ms of the rows it names (> 1: distpp faster)."""
    rows = {r["variant"]: r for r in data["rows"]}
    assert data["speedups"] and data["speedup_convention"].startswith("speed-up = baseline ms / distpp ms")
    for u in data["speedups"]:
        col = "median_ms" if u["stage"] == "total" else f"{u['stage']}_ms"
        assert u["speedup"] == pytest.approx(rows[u["baseline"]][col] / rows[u["variant"]][col], rel=1e-12)
        assert u["name"].startswith(f"{u['variant']} vs {u['baseline']}")


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = bench.main(["--repeats", "2", "--warmup", "0", "--no-progress", "--json", str(out), "--batch", "2",
                     "--threads", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) >= {"unguided", "distpp", "eager", "research"}
    for r in rows.values():
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["student_ms"] > 0
        assert 0 <= r["outside_forwards_pct"] <= 100
    assert rows["unguided"]["teacher_ms"] == 0 and rows["distpp"]["teacher_ms"] > 0
    assert {u["name"] for u in data["speedups"]} == {"distpp vs eager", "distpp vs research"}
    _check_speedups(data)
    g = data["time_ratios"]["guided/unguided time ratio"]
    assert g == pytest.approx(rows["distpp"]["median_ms"] / rows["unguided"]["median_ms"])
    assert data["env"]["device_name"] and data["settings"]["batch"] == 2 and data["env"]["cpu_threads"] == 1
    printed = capsys.readouterr().out
    assert "speed-up = baseline ms / distpp ms" in printed and "guided/unguided time ratio" in printed
    assert set(_table(printed)) == set(rows)


@pytest.mark.parametrize("argv,msg", [(["--preset", "sd3"], "unknown preset"), (["--dtype", "int8"], "unknown --dtype"),
                                      (["--family", "foo"], "unknown family"),
                                      (["--batch", "99999999999"], "--batch must be 1..1024, got 99999999999"),
                                      (["--batch", "0"], "--batch must be 1..1024"),
                                      (["--threads", "0"], "--threads must be >= 1"),
                                      (["--student", "x"], "add --pipeline")])
def test_bench_bad_arguments(argv, msg, capsys):
    assert bench.main(argv + ["--repeats", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--batch", "abc"], ["--pipeline", "--pair", "nope"], ["--graphs", "maybe"]])
def test_bench_argparse_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("python -m distpp.bench: error: argument")


def test_bench_allocation_failure_is_one_line(monkeypatch, capsys):
    def no_memory(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes.\nmore detail")

    monkeypatch.setattr(cli, "run", no_memory)
    assert bench.main(["--batch", "1000", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory at --batch 1000" in err[0] and "smaller --batch" in err[0]
    monkeypatch.setattr(cli, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):  # only allocation failures become one line
        bench.main(["--no-progress"])


def test_p90_warning():
    calm = bench.Variant("calm", None, stages=[{"total": t} for t in (10.0, 10.5, 11.0, 10.2, 10.1)])
    noisy = bench.Variant("noisy", None, stages=[{"total": t} for t in (10.0, 10.5, 40.0, 10.2, 10.1)])
    rows = [calm.summary(1), noisy.summary(1)]
    warnings = bench.noisy_warnings(rows)
    assert len(warnings) == 1 and warnings[0].startswith("noisy: p90 40.00 ms is 3.92x its median 10.20 ms")
    assert rows[0]["noisy"] is False and rows[1]["noisy"] is True


def test_baseline_sampler_reused_equals_fresh(tiny_pair):
    """The bench builds the baseline's scheduler once and times sample() only: a reused sampler must give
    what a freshly built one gives, call after call (its step counter is reset per call)."""
    cond, uncond = tiny_pair.random_cond(2, seed=5)
    shape = tiny_pair.info.latent_shape
    for family in ("lcm", "euler_a"):
        cfg = SamplerConfig(family=family, guided_steps=1, kernel_impl="torch")
        base = BaselineSampler(tiny_pair.student, tiny_pair.teacher, cfg, device="cpu", dtype=torch.float32)
        first = base.sample(cond, uncond, shape, [1, 2])
        again = base.sample(cond, uncond, shape, [1, 2])
        fresh = baseline_sample(tiny_pair.student, tiny_pair.teacher, cfg, cond, uncond, shape, [1, 2], device="cpu",
                                dtype=torch.float32)
        assert torch.equal(first, again) and torch.equal(first, fresh), family


def test_bench_graphs_plot_and_telemetry(tmp_path, capsys):
    out, png = tmp_path / "g.json", tmp_path / "g.png"
    rc = bench.main(["--repeats", "2", "--warmup", "1", "--no-progress", "--graphs", "on", "--variants",
                     "unguided,distpp,eager", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"unguided", "distpp", "eager", "distpp_graph", "unguided_graph", "forwards_graph"}
    assert rows["forwards_graph"]["guidance_ms"] < rows["distpp_graph"]["guidance_ms"] + 1.0
    assert 0 <= rows["distpp_graph"]["outside_forwards_pct"] <= 100
    t = data["targets"]
    assert {"a_outside_forwards_loop_pct", "b_speedup_vs_eager", "c_guided_over_unguided", "c_bound"} <= set(t)
    assert t["c_bound"] > 1.02 and "graph guided/unguided time ratio" in data["time_ratios"]
    assert {"distpp_graph vs eager", "distpp_graph vs distpp"} <= {u["name"] for u in data["speedups"]}
    _check_speedups(data)
    assert t["b_speedup_vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / rows["distpp_graph"]["median_ms"])
    assert data["telemetry"]["available"] is False and data["telemetry"]["reason"]
    assert data["settings"]["graphs"] == "on" and data["settings"]["cuda_graphs"] is False
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "targets" in capsys.readouterr().out


def test_bench_compile_backend_and_bad_backend(capsys):
    assert bench.main(["--backend", "nope", "--repeats", "1", "--no-progress"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert bench.main(["--backend", "compile", "--compile-mode", "reduce-overhead", "--repeats", "1",
                       "--no-progress"]) == 2
    assert "nest inside" in capsys.readouterr().err


def test_bench_pipeline_end_to_end(tmp_path, capsys):
    """``--pipeline`` (tiny, built in memory): diffusers' own unguided pipeline, the eager guided baseline and
    distpp eager / graphs in one run, per stage; the JSON has the printed rows; every call encodes."""
    out = tmp_path / "p.json"
    rc = bench.main(["--pipeline", "--repeats", "2", "--warmup", "1", "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["diffusers_unguided", "eager_guided", "distpp", "distpp_graph"]
    table = _table(printed)
    assert list(table) == list(rows)
    for name, cells in table.items():  # median, p90, img/s, encode, encode p90, loop, loop p90, decode, ...
        r = rows[name]
        assert float(cells[0]) == pytest.approx(r["median_ms"], abs=1e-3)
        assert float(cells[5]) == pytest.approx(r["loop_ms"], abs=1e-3)
        for st in bench.E2E_STAGES:
            assert r[f"{st}_ms"] > 0 and r[f"{st}_p90_ms"] >= r[f"{st}_ms"], (name, st)
    _check_speedups(data)
    names = {u["name"] for u in data["speedups"]}
    assert {"distpp_graph vs diffusers_unguided", "distpp_graph vs eager_guided (loop)"} <= names
    t = data["targets"]
    assert t["distpp_variant"] == "distpp_graph"
    assert t["loop_speedup_vs_eager_guided"] == pytest.approx(rows["eager_guided"]["loop_ms"] / rows["distpp_graph"]["loop_ms"])
    s = data["settings"]
    assert s["mode"] == "pipeline" and s["height"] == s["width"] == 32 and s["graphs"] == "on"
    assert "end to end" in printed and "speed-up = baseline ms / distpp ms" in printed


def test_bench_pipeline_every_call_encodes(monkeypatch):
    """No variant skips its text encoder through the Pipeline's prompt cache: each distpp / eager_guided
    call runs the encoders once (the negative prompt, the same for every call, is cached alike)."""
    from distpp.timing import StageTimer

    args = bench.parse_args(["--pipeline", "--variants", "eager_guided,distpp,distpp_graph", "--no-progress"])
    src = e2e.random_source(args, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(e2e, "random_source", lambda *a: src)
    variants, _ = bench.build_pipeline_variants(args, torch.device("cpu"), torch.float32)
    enc = src.student_text
    enc.encode([""])  # the negative prompt: encoded once, then cached for every variant alike
    for v in variants * 2:
        before = enc.encoder_calls
        tm = StageTimer("cpu")
        tm.begin()
        v.run(tm)
        assert enc.encoder_calls == before + 1, v.name


def test_bench_pipeline_loaded_pair(tmp_path_factory, tmp_path):
    """``--pipeline --student --teacher --family``: the pair loads through Pipeline.from_pretrained and
    diffusers' own LCM pipeline is built from the very same loaded modules."""
    from tiny_repos import tiny_repos_for

    repos = tiny_repos_for(tmp_path_factory)
    out = tmp_path / "p.json"
    rc = bench.main(["--pipeline", "--student", repos["sd_lcm"], "--teacher", repos["sd_teacher"], "--family", "lcm",
                     "--variants", "diffusers_unguided,distpp", "--repeats", "1", "--warmup", "0", "--no-progress",
                     "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["diffusers_unguided", "distpp"]
    assert data["settings"]["model"].endswith("sd_teacher") and data["settings"]["family"] == "lcm"
    assert bench.main(["--pipeline", "--student", str(tmp_path / "nowhere"), "--teacher", repos["sd_teacher"],
                       "--family", "lcm", "--no-progress"]) == 2


@pytest.mark.parametrize("preset,teacher,why", [("tiny_flux", "embedded", "teacher reads its own (16 tokens)"),
                                                ("tiny_sd3", "cfg", "family 'flow' has none")])
def test_bench_flow_presets(preset, teacher, why, tmp_path, capsys):
    """``--preset tiny_flux`` / ``tiny_sd3``: the distpp variants run the preset's flow family and teacher;
    the eager / research baselines (VP families, CFG teachers only) are left out with a printed note,
    and the printed table, JSON rows, speed-ups and time ratios agree on what ran."""
    out = tmp_path / "f.json"
    rc = bench.main(["--preset", preset, "--repeats", "1", "--warmup", "0", "--no-progress", "--threads", "1",
                     "--steps", "2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    printed = capsys.readouterr().out
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["unguided", "distpp"] and set(_table(printed)) == set(rows)
    assert rows["distpp"]["teacher_ms"] > 0 and rows["unguided"]["teacher_ms"] == 0
    s = data["settings"]
    assert s["family"] == "flow" and s["teacher_guidance"] == teacher and set(s["skipped"]) == {"eager", "research"}
    assert s["cfg"] == (3.5 if teacher == "embedded" else 4.0) and s["lam"] == 0.05
    assert all(why in r for r in s["skipped"].values())
    assert "note: variant eager skipped: " in printed and why in printed and "family=flow" in printed
    assert data["speedups"] == [] and "guided/unguided time ratio" in data["time_ratios"]
    # a --cfg given on the command line wins over the preset's w
    assert bench.main(["--preset", preset, "--variants", "distpp", "--cfg", "2.0", "--repeats", "1", "--warmup",
                       "0", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["cfg"] == 2.0
    capsys.readouterr()
    assert bench.main(["--preset", preset, "--variants", "eager", "--repeats", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no variant left to time" in err and len(err.strip().splitlines()) == 1

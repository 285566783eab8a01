import json

import pytest

from distpp import bench


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = bench.main(["--repeats", "2", "--warmup", "0", "--no-progress", "--json", str(out), "--batch", "2"])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) >= {"unguided", "distpp", "eager", "research"}
    for r in rows.values():
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["student_ms"] > 0
        assert 0 <= r["outside_forwards_pct"] <= 100
    assert rows["unguided"]["teacher_ms"] == 0 and rows["distpp"]["teacher_ms"] > 0
    assert set(data["ratios"]) == {"distpp/eager", "distpp/research", "guided/unguided"}
    assert data["env"]["device_name"] and data["settings"]["batch"] == 2
    assert "distpp/eager" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [(["--preset", "sd3"], "unknown preset"), (["--dtype", "int8"], "unknown dtype"),
                                      (["--family", "foo"], "unknown family")])
def test_bench_bad_arguments(argv, msg, capsys):
    assert bench.main(argv + ["--repeats", "1", "--no-progress"]) == 2
    assert msg in capsys.readouterr().err


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
    assert t["c_bound"] > 1.02 and "distpp_graph/eager" in data["ratios"]
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

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

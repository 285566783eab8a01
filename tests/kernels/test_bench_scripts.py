"""The benchmark scripts run on a CPU: gpu_check.sh's dry run prints its plan and stage table, and
bench_guidance.py's CPU mode times the references and writes its JSON rows."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    for stage in ("install", "build_csrc", "cuda_tests", "bench_guidance"):
        assert f"[dry-run] {stage}:" in out.stdout
    lines = out.stdout.rstrip().splitlines()
    table = lines[next(i for i, ln in enumerate(lines) if ln.startswith("stage ")) + 1:]  # the table comes last
    assert [ln.split()[0] for ln in table] == ["env", "install", "build_csrc", "csrc_example", "cuda_tests",
                                               "bench_guidance", "sampler_b1", "sampler_b4"]
    assert all(ln.split()[1] == "dry-run" for ln in table)
    assert "pytest -m cuda" in out.stdout and "DISTPP_WITH_CUDA=OFF" not in out.stdout


def test_gpu_check_rejects_unknown_option(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bogus"], capture_output=True,
                         text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 2 and "unknown option" in out.stdout


def test_bench_guidance_cpu_mode(tmp_path):
    path = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_guidance.py"), "--json", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "GPU numbers need a GPU" in out.stdout
    data = json.loads(path.read_text())
    assert data["info"]["device"] == "cpu" and data["info"]["torch"]
    ops = {(r["op"], r["impl"]) for r in data["rows"]}
    names = ("student_update", "guided_update", "plain_update")
    assert ops == {(op, impl) for op in names for impl in ("copy", "torch")}
    assert all(r["median_ms"] > 0 and r["bytes"] > 0 for r in data["rows"])
    launches = data["info"]["launches_per_step"]
    assert launches["guided_after"] == 2 and launches["guided_before"] > 10

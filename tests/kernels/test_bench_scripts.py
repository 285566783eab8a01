"""The benchmark scripts run on a CPU: gpu_check.sh's dry run prints its plan and stage table (the
end-to-end stages' import check says what is missing), bench_guidance.py's CPU mode times the references
and writes its JSON rows, and the serve worker bench times a tiny worker."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    for stage in ("install", "build_csrc", "cuda_tests", "bench_guidance", "e2e_b1", "serve_worker"):
        assert f"[dry-run] {stage}:" in out.stdout
    lines = out.stdout.rstrip().splitlines()
    table = lines[next(i for i, ln in enumerate(lines) if ln.startswith("stage ")) + 1:]  # the table comes last
    assert [ln.split()[0] for ln in table] == ["env", "install", "build_csrc", "csrc_example", "cuda_tests",
                                               "bench_guidance", "sampler_b1", "sampler_b4", "e2e_imports", "e2e_b1",
                                               "e2e_b4", "serve_worker"]
    assert all(ln.split()[1] == "dry-run" for ln in table)
    assert "pytest -m cuda" in out.stdout and "DISTPP_WITH_CUDA=OFF" not in out.stdout
    e2e = next(ln for ln in out.stdout.splitlines() if ln.startswith("[dry-run] e2e_b1:"))
    assert "--pipeline --preset sd15 --dtype float16 --device cuda" in e2e and "--batch 1" in e2e


def test_gpu_check_flux_stage_behind_its_flag(tmp_path):
    """--flux adds the FLUX loop stage (the flux preset in bfloat16 on CUDA, batch 1, 4 steps + 1 guided,
    graphs on both loops); without the flag it is not planned."""
    def plan(*flags):
        out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *flags],
                             capture_output=True, text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "flux_b1" not in plan()
    flux = next(ln for ln in plan("--flux").splitlines() if ln.startswith("[dry-run] flux_b1:"))
    for part in ("--preset flux --dtype bfloat16 --device cuda", "--steps 4 --guided-steps 1 --batch 1",
                 "--graphs on --variants distpp_graph,unguided_graph"):
        assert part in flux


def test_e2e_import_check_names_what_is_missing(tmp_path):
    """The end-to-end stages' import check: with transformers unimportable it names it and the wheels."""
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    fake = tmp_path / "fake" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: no transformers on this image')\n")
    check = subprocess.run([sys.executable, str(tmp_path / "check_e2e_imports.py")], capture_output=True, text=True,
                           env={"PYTHONPATH": str(tmp_path / "fake"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert check.returncode == 3
    assert "missing for the end-to-end stages: transformers (ImportError: simulated" in check.stdout
    assert "../shared/wheels" in check.stdout and "diffusers" in check.stdout


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


def test_serve_worker_bench_cpu(tmp_path):
    path = tmp_path / "serve.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve_worker.py"), "--device", "cpu",
                          "--repeats", "2", "--warmup", "1", "--batches", "1", "2", "--json", str(path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = json.loads(path.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["median_ms"] > 0 and r["repeats"] == 2 for r in rows)
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve_worker.py"), "--batches", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1

"""A short soak (benchmarks/soak.py) in the default tier: memory flat, results reproducible per seed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

CALLS, WARMUP = 150, 30
# RSS growth allowed after warm-up over 120 calls. Measured 0.1 MiB (2-core CPU dev box); a leak of one
# tiny-preset call's buffers (~10 KiB) per call would be ~1.2 MiB, of the Plan with its model outputs more.
GROWTH_MIB = 8.0


def load_soak():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
    name = "distpp_bench_soak"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report(tiny_pair):
    return load_soak().run_soak(CALLS, warmup=WARMUP, recheck=4, torch_threads=1, pair=tiny_pair)


def test_soak_memory_stays_flat(report):
    assert report["rss_growth_after_warmup_mib"] < GROWTH_MIB, report
    assert report["rss_peak_mib"] - report["rss_after_warmup_mib"] < GROWTH_MIB, report


def test_soak_results_finite_and_reproducible(report):
    assert report["nonfinite_values"] == 0
    assert report["configs"] == 18  # 6 epsilon-model families (lcm dmd2 euler euler_a ddim tcd) x G in {0, 1, 2}
    assert len(report["repro"]) == 4 and report["repro_all_bitwise"], report["repro"]
    assert report["calls"] == CALLS and report["calls_per_s"] > 0


def test_soak_slope_helper():
    soak = load_soak()
    assert soak.slope_per_1000([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1000.0)
    assert soak.slope_per_1000([5.0] * 10) == 0.0

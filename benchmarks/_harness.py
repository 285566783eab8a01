"""Shared benchmark harness: timing (do_bench on a GPU, perf_counter on a CPU), run metadata, JSON rows.

Rows are dicts; ``write_rows`` stores them with the metadata of the run (GPU name, versions, commit,
time) so every figure can be traced to its machine.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def run_info() -> dict:
    """Machine and software of this run."""
    info = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), python=platform.python_version(), torch=torch.__version__,
                commit=_commit(), device="cpu", gpu=None, cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if on_gpu():
        p = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=p.name, capability=f"{p.major}.{p.minor}",
                    gpu_memory_gb=round(p.total_memory / 2**30, 1))
    return info


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100, timer: str = "events") -> dict:
    """Median and p90 milliseconds of ``fn``. On a GPU, timer "events": triton.testing.do_bench (CUDA
    events, L2 flushed before every run by zeroing a 256 MB buffer, so each op reads its inputs from HBM
    as in the sampler, where the UNet forwards evict them; the host-side launch cost shows when it
    exceeds the flush). Timer "cudagraph": triton.testing.do_bench_cudagraph (``fn`` captured once in a
    CUDA graph and replayed: device time only, as inside distpp's whole-loop graphs; no L2 flush, so
    small latents are read from L2). On a CPU: perf_counter over repeated calls."""
    if on_gpu() and timer == "cudagraph":
        from triton.testing import do_bench_cudagraph

        med, p90 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.9])
        return dict(median_ms=med, p90_ms=p90)
    if on_gpu():
        from triton.testing import do_bench

        med, p90 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.9])
        return dict(median_ms=med, p90_ms=p90)
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return dict(median_ms=statistics.median(times), p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))])


def count_aten_ops(fn: Callable[[], object]) -> int:
    """How many non-view aten ops ``fn`` dispatches: one device kernel launch each for these elementwise
    chains (views such as select/expand launch nothing and are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 0 if getattr(func, "is_view", False) else 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


def write_rows(path: str | Path, rows: list[dict], info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(info=info or run_info(), rows=rows), indent=1))
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))

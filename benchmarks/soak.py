"""Soak benchmark: thousands of sampling calls with varying seeds, batch sizes, latent shapes and settings,
with injected model failures and bad requests.

Every call draws a random family, guided_steps G, batch, latent shape, seeds, lam and cfg on the tiny
preset (one Sampler per (family, G), built up front, as a server would keep them). Between calls, bad
requests (lone surrogates, float32 overflow, 5000-digit seeds, deep JSON nesting) go through the
service's validation (distpp.serve), which must refuse each one; some calls get an injected model
failure (the student raises once, as a lost engine would), which must surface as that call's error and
leave the next calls unaffected. Measures calls/s, the process RSS (psutil, else /proc/self/statm)
and, on CUDA, torch's allocator; checks that memory stays flat after a warm-up and that the first
calls' results are reproduced exactly when rerun at the end.

    python benchmarks/soak.py --calls 2000 --json soak.json

Prints one JSON object (also written to --json). Memory growth is reported two ways: end minus
post-warm-up RSS, and the least-squares slope of RSS over the calls after warm-up (MiB per 1000 calls),
which a one-off allocator step does not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass

import torch

from distpp import Sampler, SamplerConfig
from distpp.denoiser import DenoiserBase
from distpp.errors import DistppError
from distpp.families import FAMILIES as ALL_FAMILIES
from distpp.families import get_family
from distpp.presets import build_preset

# The tiny preset's UNets predict epsilon: soak the families they fit (not flow).
FAMILIES = tuple(f for f in ALL_FAMILIES if "epsilon" in get_family(f).prediction_types)

MIB = 2**20


def rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Call:
    """One soak call's settings; ``fail``: the student raises once during this call; ``bad``: a bad
    request (raw HTTP body) sent through the service's validation before the call."""

    family: str
    guided: int
    seeds: tuple[int, ...]
    lam: tuple[float, ...]
    cfg: tuple[float, ...]
    shape: tuple[int, int, int] = (4, 8, 8)
    fail: bool = False
    bad: bytes | None = None


BAD_BODIES = (b'{"prompt": "\\ud800"}', b'{"prompt": "x", "negative_prompt": "\\udfff"}',
              b'{"prompt": "x", "cfg": 1e39}',
              b'{"prompt": "x", "lam": 1' + b"0" * 400 + b"}", b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}",
              b"[" * 30000, b'{"prompt": "x", "cfg": NaN}', b"\xff")


def draw_call(rng: random.Random, steps: int, max_batch: int, shapes=((4, 8, 8),), fail_rate: float = 0.0,
              bad_rate: float = 0.0) -> Call:
    b = rng.randint(1, max_batch)
    return Call(family=rng.choice(FAMILIES), guided=rng.randint(0, min(2, steps)),
                seeds=tuple(rng.randrange(2**31) for _ in range(b)),
                lam=tuple(round(rng.uniform(0.0, 0.2), 4) for _ in range(b)),
                cfg=tuple(round(rng.uniform(1.0, 9.0), 3) for _ in range(b)),
                shape=tuple(rng.choice(shapes)), fail=rng.random() < fail_rate,
                bad=rng.choice(BAD_BODIES) if rng.random() < bad_rate else None)


class InjectedFailure(RuntimeError):
    """The soak's stand-in for a model failure (a lost GPU, a broken engine)."""


class Flaky(DenoiserBase):
    """A Denoiser that forwards to ``inner`` and raises InjectedFailure once after ``arm()``."""

    def __init__(self, inner):
        self.inner, self.armed = inner, False
        self.spec = inner.spec

    def arm(self) -> None:
        self.armed = True

    def prepare(self, cond):
        return self.inner.prepare(cond)

    def __call__(self, x, t, cond):
        if self.armed:
            self.armed = False
            raise InjectedFailure("injected model failure")
        return self.inner(x, t, cond)


def refuses(body: bytes) -> bool:
    """True when the service's validation refuses ``body`` with a distpp error (its 4xx answer)."""
    from distpp.serve import ServeSettings, parse_request
    from distpp.serve.http import parse_json

    try:
        parse_request(parse_json(body), ServeSettings(device="cpu"))
    except DistppError:
        return True
    return False


def slope_per_1000(ys: list[float]) -> float:
    """Least-squares slope of ys against their index, times 1000."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    num = sum((i - mx) * (y - my) for i, y in enumerate(ys))
    den = sum((i - mx) ** 2 for i in range(n))
    return 1000.0 * num / den


LATENT_SHAPES = ((4, 8, 8), (4, 8, 12), (4, 12, 8))


def run_soak(calls: int = 2000, *, steps: int = 2, latent_shapes=LATENT_SHAPES, max_batch: int = 3, seed: int = 0,
             warmup: int = 30, recheck: int = 5, device: str = "cpu", torch_threads: int | None = None,
             pair=None, fail_rate: float = 0.03, bad_rate: float = 0.05) -> dict:
    """Run the soak; returns the report dict (see the module docstring). ``latent_shapes``: the (C, H, W)
    shapes calls draw from; ``fail_rate`` / ``bad_rate``: shares of calls with an injected model failure
    / preceded by a bad request. ``torch_threads`` sets torch's intra-op threads for the run (restored
    after): on a CPU shared with other processes, 1 avoids the OpenMP oversubscription that made
    tiny-preset calls ~60x slower on our 2-core box."""
    threads_before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        return _run(calls, steps, tuple(map(tuple, latent_shapes)), max_batch, seed, warmup, recheck, device, pair,
                    fail_rate, bad_rate)
    finally:
        torch.set_num_threads(threads_before)


def _run(calls, steps, latent_shapes, max_batch, seed, warmup, recheck, device, pair, fail_rate, bad_rate) -> dict:
    load_start = os.getloadavg()
    pair = pair or build_preset("tiny", device=device)
    dev = torch.device(pair.device)
    student = Flaky(pair.student)
    samplers = {(f, g): Sampler(student, pair.teacher if g else None,
                                SamplerConfig(family=f, steps=steps, guided_steps=g), device=dev)
                for f in FAMILIES for g in range(0, min(2, steps) + 1)}
    bank, uncond = pair.random_cond(max_batch, seed=seed)
    rng = random.Random(seed)
    plan = [draw_call(rng, steps, max_batch, latent_shapes, fail_rate, bad_rate) for _ in range(calls)]
    counts = {"bad_requests": 0, "bad_refused": 0, "failures_injected": 0, "failures_surfaced": 0}

    def one(c: Call, inject: bool = True) -> torch.Tensor | None:
        if c.bad is not None and inject:
            counts["bad_requests"] += 1
            counts["bad_refused"] += refuses(c.bad)
        cond = bank.map(lambda v: v[: len(c.seeds)])
        if c.fail and inject:
            counts["failures_injected"] += 1
            student.arm()
        try:
            return samplers[(c.family, c.guided)].sample(cond, uncond=uncond if c.guided else None,
                                                         latent_shape=c.shape, seeds=list(c.seeds),
                                                         lam=list(c.lam), cfg=list(c.cfg))
        except InjectedFailure:
            counts["failures_surfaced"] += 1
            return None
        finally:
            student.armed = False

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rss, first, nonfinite, images = [], {}, 0, 0
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    t_warm = None
    cuda_warm = None
    for i, c in enumerate(plan):
        out = one(c)
        if cuda:
            torch.cuda.synchronize(dev)
        if out is not None:
            nonfinite += int((~torch.isfinite(out)).sum())
            images += out.shape[0]
            if len(first) < recheck:
                first[i] = out.detach().cpu().clone()
        rss.append(rss_bytes())
        if i + 1 == warmup:
            t_warm = time.perf_counter()
            cuda_warm = torch.cuda.memory_allocated(dev) if cuda else None
    wall = time.perf_counter() - t0
    steady = rss[warmup:] if calls > warmup else rss
    steady_wall = time.perf_counter() - t_warm if t_warm is not None and calls > warmup else wall

    repro = []
    for i, ref in first.items():
        again = one(plan[i], inject=False).detach().cpu()
        repro.append({"call": i, "bitwise_equal": bool(torch.equal(again, ref)),
                      "max_abs_diff": float((again - ref).abs().max())})

    report = {
        "calls": calls, "images": images, "steps": steps, "latent_shapes": [list(x) for x in latent_shapes],
        **counts, "shapes_seen": sorted({c.shape for c in plan}),
        "max_batch": max_batch, "warmup": warmup, "wall_s": round(wall, 3),
        "calls_per_s": round(calls / wall, 2),
        "calls_per_s_after_warmup": round((calls - warmup) / steady_wall, 2) if calls > warmup else None,
        "rss_start_mib": round(rss0 / MIB, 1),
        "rss_after_warmup_mib": round(rss[min(warmup, calls) - 1] / MIB, 1),
        "rss_end_mib": round(rss[-1] / MIB, 1),
        "rss_peak_mib": round(max(rss) / MIB, 1),
        "rss_growth_after_warmup_mib": round((rss[-1] - rss[min(warmup, calls) - 1]) / MIB, 2),
        "rss_slope_mib_per_1000_calls": round(slope_per_1000([r / MIB for r in steady]), 3),
        "torch_cuda_after_warmup_mib": round(cuda_warm / MIB, 2) if cuda else None,
        "torch_cuda_end_mib": round(torch.cuda.memory_allocated(dev) / MIB, 2) if cuda else None,
        "torch_cuda_peak_mib": round(torch.cuda.max_memory_allocated(dev) / MIB, 2) if cuda else None,
        "nonfinite_values": nonfinite,
        "repro": repro,
        "repro_all_bitwise": all(r["bitwise_equal"] for r in repro),
        "configs": len(samplers), "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return report


def run_service_soak(batches: int = 300, *, max_batch: int = 4, seed: int = 0, warmup: int = 20, recheck: int = 5,
                     fail_rate: float = 0.05, bad_rate: float = 0.1, torch_threads: int | None = None,
                     pair=None) -> dict:
    """The service's path under soak: batches of request bodies through a serve PresetWorker (tiny preset,
    2 steps; parse -> run_batch, as a replica runs them), with bad bodies among them (each must be refused
    at parse time, never reaching a batch) and injected model failures (the student raises once inside a
    batched call; the worker's per-request retry absorbs it when the call held several requests, else
    it is that one request's error, never another's).
    Reports RSS after warm-up and at the end, and reruns the first results alone (batched vs single agree
    within fp32 tolerance)."""
    from dataclasses import replace

    import numpy as np

    from distpp.serve import PresetWorker, ServeSettings
    from distpp.serve.http import parse_json

    threads_before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        pair = pair or build_preset("tiny")
        student = Flaky(pair.student)
        settings = ServeSettings(device="cpu", steps=2, max_steps=4, max_batch_size=max_batch, warm=False)
        worker = PresetWorker(settings, pair=replace(pair, student=student))
        rng = random.Random(seed)
        counts = {"requests": 0, "bad_requests": 0, "bad_refused": 0, "failures_injected": 0, "errors": 0}
        rss, first, t0 = [], [], time.perf_counter()
        for i in range(batches):
            reqs = []
            # One sampler key per batch, as Serve's batches mostly are: the requests share one call.
            key = {"family": rng.choice(FAMILIES), "steps": rng.randint(1, 2)}
            key["guided_steps"] = rng.randint(0, key["steps"])
            for _ in range(rng.randint(1, max_batch)):
                if rng.random() < bad_rate:
                    counts["bad_requests"] += 1
                    try:
                        worker.parse(parse_json(rng.choice(BAD_BODIES)))
                    except DistppError:
                        counts["bad_refused"] += 1
                    continue
                reqs.append(worker.parse({"prompt": f"soak {rng.randrange(50)}", "seed": rng.randrange(2**32), **key,
                                          "lam": round(rng.uniform(0, 0.3), 3), "cfg": round(rng.uniform(1, 9), 2)}))
            if not reqs:
                continue
            if rng.random() < fail_rate:
                counts["failures_injected"] += 1
                student.arm()
            out = worker.run_batch(reqs)
            student.armed = False
            counts["requests"] += len(reqs)
            counts["errors"] += sum(isinstance(x, Exception) for x in out)
            if len(first) < recheck and len(reqs) > 1 and not isinstance(out[0], Exception):
                first.append((reqs[0], out[0]))
            rss.append(rss_bytes())
        wall = time.perf_counter() - t0
        rel = [float(np.linalg.norm(worker.run_batch([r])[0] - x) / np.linalg.norm(x)) for r, x in first]
        w = min(warmup, len(rss)) - 1
        # An injected failure either hits a call of several requests (retried one by one: absorbed) or a
        # call of one (that request's error, a 500): never more than one error per injection.
        counts["failures_absorbed"] = counts["failures_injected"] - counts["errors"]
        return {**counts, "batches": batches, "wall_s": round(wall, 2),
                "requests_per_s": round(counts["requests"] / wall, 2),
                "rss_after_warmup_mib": round(rss[w] / MIB, 1), "rss_end_mib": round(rss[-1] / MIB, 1),
                "rss_peak_mib": round(max(rss) / MIB, 1),
                "rss_growth_after_warmup_mib": round((rss[-1] - rss[w]) / MIB, 2),
                "rss_slope_mib_per_1000_batches": round(slope_per_1000([r / MIB for r in rss[w:]]), 3),
                "batched_vs_single_max_rel": max(rel) if rel else None, "samplers": worker.runtime.stats.samplers,
                "torch_threads": torch.get_num_threads(), "device": f"cpu ({os.cpu_count()} cores)",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    finally:
        torch.set_num_threads(threads_before)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--latents", default="4x8x8,4x8x12,4x12x8", help="comma-separated CxHxW latent shapes")
    p.add_argument("--fail-rate", type=float, default=0.03, help="share of calls with an injected model failure")
    p.add_argument("--bad-rate", type=float, default=0.05, help="share of calls preceded by a bad request")
    p.add_argument("--max-batch", type=int, default=3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--recheck", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--service", action="store_true",
                   help="soak the serve worker instead (batches of requests, bad bodies, model failures)")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args(argv)
    if a.service:
        report = run_service_soak(a.calls, seed=a.seed, warmup=a.warmup, recheck=a.recheck, fail_rate=a.fail_rate,
                                  bad_rate=a.bad_rate, torch_threads=a.torch_threads)
        print(json.dumps(report, indent=1))
        if a.json:
            with open(a.json, "w") as f:
                f.write(json.dumps(report, indent=1) + "\n")
        return 0 if report["bad_refused"] == report["bad_requests"] and report["failures_absorbed"] >= 0 else 1
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.latents.split(",")]
    report = run_soak(a.calls, steps=a.steps, latent_shapes=shapes, max_batch=a.max_batch, seed=a.seed,
                      warmup=a.warmup, recheck=a.recheck, device=a.device, torch_threads=a.torch_threads,
                      fail_rate=a.fail_rate, bad_rate=a.bad_rate)
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    ok = report["repro_all_bitwise"] and report["nonfinite_values"] == 0 and \
        report["bad_refused"] == report["bad_requests"] and report["failures_surfaced"] == report["failures_injected"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

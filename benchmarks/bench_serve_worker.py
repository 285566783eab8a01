"""Latency of one serve replica's worker (distpp.serve.worker.PresetWorker), without Ray: a batch of
requests parsed as Serve would pass them, run through ``run_batch`` (latents back on the host).

    python benchmarks/bench_serve_worker.py --preset sd15 --dtype float16 --batches 1 4 --json out/serve.json

Each timed call carries prompts no call had before (the worker's conditioning is per prompt). Median and
p90 ms per batch, images/s; JSON rows with the run's metadata (benchmarks/_harness.py). The GPU check
runs it as stage ``serve_worker`` (the GPU image has no Ray; the worker does not need it).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import _harness as H
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", help="float32, float16 (GPU only), bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--graphs", default="auto", choices=("auto", "on", "off"),
                    help="the worker Runtime's CUDA graphs (auto: on for a GPU; batches padded to the buckets)")
    ap.add_argument("--json", default="serve_worker.json")
    args = ap.parse_args(argv)
    from distpp.errors import DistppError
    from distpp.serve.request import ServeSettings, parse_request
    from distpp.serve.worker import PresetWorker

    if args.repeats < 1 or args.warmup < 0 or any(b < 1 or b > 1024 for b in args.batches):
        print("bench_serve_worker: --repeats >= 1, --warmup >= 0 and --batches in 1..1024", file=sys.stderr)
        return 2
    try:
        graphs = {"auto": "auto", "on": True, "off": False}[args.graphs]
        settings = ServeSettings(preset=args.preset, device=args.device, dtype=args.dtype,
                                 max_batch_size=max(args.batches), batch_buckets=tuple(sorted(set(args.batches))),
                                 graphs=graphs)
        t0 = time.perf_counter()
        worker = PresetWorker(settings)
        worker.warm()
    except DistppError as e:
        print(f"bench_serve_worker: {e}", file=sys.stderr)
        return 2
    build_s = time.perf_counter() - t0
    cuda = worker.device.type == "cuda"
    ids = itertools.count()
    rows = []
    for B in args.batches:
        times = []
        for i in range(args.warmup + args.repeats):
            reqs = [parse_request({"prompt": f"a photo of object {next(ids)}", "seed": j}, settings) for j in range(B)]
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = worker.run_batch(reqs)  # host arrays: the call has synchronized when it returns
            dt = (time.perf_counter() - t) * 1e3
            failed = [o for o in out if isinstance(o, Exception)]
            if failed:
                raise failed[0]
            if i >= args.warmup:
                times.append(dt)
        med = statistics.median(times)
        rows.append(dict(preset=args.preset, dtype=args.dtype, batch=B, median_ms=med,
                         p90_ms=sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
                         images_per_s=1e3 * B / med, repeats=len(times)))
    info = H.run_info()
    info.update(build_s=build_s, worker_device=str(worker.device), settings=repr(settings),
                runtime=repr(worker.runtime.stats))
    path = H.write_rows(args.json, rows, info)
    print(f"serve worker ({args.preset}, {args.dtype}) on {info['gpu'] or 'cpu'}, built and warmed in {build_s:.1f} s")
    H.print_table(rows, ["batch", "median_ms", "p90_ms", "images_per_s", "repeats"])
    print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bounded load test of the Ray Serve deployment (distpp.serve) on a fresh local Ray instance.

For each batch setting (max_batch_size:batch_wait_timeout_s) the app is deployed with ``--replicas``
replicas, then for each concurrency level C, C closed-loop clients send POST /sample over loopback HTTP
(127.0.0.1 only; run it inside tests/in_loopback_netns.sh) until ``--requests`` requests have been sent
or ``--max-duration-s`` has passed.
Reports p50/p99 latency, throughput (completed requests/s) and errors per level; writes JSON rows with
the machine, versions and commit beside the table.

    pip install ".[serve]"
    tests/in_loopback_netns.sh python benchmarks/serve_load.py --replicas 2 --concurrency 1,4,16 \
        --batch 1:0,8:0.02 --requests 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--batch", default="1:0,8:0.02",
                   help="comma-separated max_batch_size:batch_wait_timeout_s settings")
    p.add_argument("--requests", type=int, default=32, help="requests per level (fixed count)")
    p.add_argument("--max-duration-s", type=float, default=60.0, help="cap per level; no new requests after it")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request HTTP timeout")
    p.add_argument("--json", default=None, help="write rows here")
    return p.parse_args(argv)


def post(url: str, body: dict, timeout: float) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def run_level(url: str, concurrency: int, n_requests: int, max_duration_s: float, timeout: float) -> dict:
    """C closed-loop clients; returns latencies (s) of successes, error count, wall time."""
    lock = threading.Lock()
    state = {"next": 0}
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    deadline = t0 + max_duration_s

    def client():
        while True:
            with lock:
                i = state["next"]
                if i >= n_requests or time.perf_counter() >= deadline:
                    return
                state["next"] = i + 1
            body = {"prompt": f"load test prompt {i % 7}", "seed": i, "lam": 0.01 + 0.001 * (i % 5),
                    "output": "latent_b64"}
            s = time.perf_counter()
            try:
                code = post(url, body, timeout)
            except (OSError, urllib.error.URLError) as e:
                code, msg = None, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - s
            with lock:
                if code == 200:
                    lat.append(dt)
                else:
                    errors.append(msg if code is None else f"HTTP {code}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3
    return {"concurrency": concurrency, "sent": state["next"], "ok": len(lat), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "wall_s": round(wall, 3),
            "throughput_rps": round(len(lat) / wall, 3) if wall > 0 else 0.0,
            "p50_ms": round(float(np.percentile(a, 50)), 1) if len(a) else None,
            "p99_ms": round(float(np.percentile(a, 99)), 1) if len(a) else None}


def machine() -> dict:
    import ray
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host_cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    a = parse_args(argv)
    from distpp.serve import ServeSettings, build_app
    from distpp.serve.local_ray import init_local_ray

    levels = [int(c) for c in a.concurrency.split(",")]
    batch_settings = [(int(b.split(":")[0]), float(b.split(":")[1])) for b in a.batch.split(",")]
    base = ServeSettings(preset=a.preset, replicas=a.replicas, cpus_per_replica=a.cpus_per_replica, device=a.device)
    port = free_port()
    init_local_ray(log_to_driver=False)  # every listener on 127.0.0.1
    import ray
    from ray import serve

    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/sample"
        for mbs, wait in batch_settings:
            settings = replace(base, max_batch_size=mbs, batch_wait_timeout_s=wait)
            t = time.perf_counter()
            serve.run(build_app(settings), name="distpp_load", route_prefix="/")
            startup = time.perf_counter() - t
            for c in levels:
                r = run_level(url, c, a.requests, a.max_duration_s, a.timeout_s)
                r.update(max_batch_size=mbs, batch_wait_timeout_s=wait, replicas=a.replicas, preset=a.preset,
                         deploy_s=round(startup, 1))
                rows.append(r)
                print(f"batch {mbs:>2} wait {wait:<5} C={c:<3} ok {r['ok']:>3}/{r['sent']:<3} err {r['errors']:<2} "
                      f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  {r['throughput_rps']} req/s", flush=True)
            serve.delete("distpp_load")
    finally:
        serve.shutdown()
        ray.shutdown()
    info = machine()
    print("\n| max batch | wait (s) | clients | ok/sent | errors | p50 (ms) | p99 (ms) | req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_batch_size']} | {r['batch_wait_timeout_s']} | {r['concurrency']} | {r['ok']}/{r['sent']} | "
              f"{r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['throughput_rps']} |")
    print(f"\nmachine: {json.dumps(info)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "args": vars(a), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

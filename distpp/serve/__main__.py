"""``python -m distpp.serve``: start the Ray Serve deployment and serve HTTP until Ctrl-C.

Without ``--address`` a local Ray instance is started with every listener on 127.0.0.1 (see
:mod:`distpp.serve.local_ray`; HTTP on 127.0.0.1 by default); with
``--address auto`` (or host:port) the deployment joins a running cluster (``ray start --head`` first).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..errors import DistppError
from .request import settings_from_strings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distpp.serve", description=__doc__.splitlines()[0])
    p.add_argument("--student", default="none", help="pipeline mode (POST /generate): student folder or Hub id")
    p.add_argument("--teacher", default="none", help="pipeline mode: teacher diffusers pipeline folder or Hub id")
    p.add_argument("--local-files-only", action="store_true", help="pipeline mode: never touch the network")
    p.add_argument("--sizes", default="none", help="pipeline mode: HEIGHTxWIDTH sizes to serve (default: native)")
    p.add_argument("--preset", default="tiny", help="preset mode (POST /sample, no --student/--teacher)")
    p.add_argument("--batch-buckets", default="none", help="warmed batch sizes, e.g. 1,2,4,8 (default: powers of 2)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--graphs", default="auto", choices=("auto", "true", "false"))
    p.add_argument("--max-queued-requests", default="none")
    p.add_argument("--max-inflight-cost", default="none")
    p.add_argument("--retry-after-s", default="1")
    p.add_argument("--replicas", default="1")
    p.add_argument("--max-batch-size", default="8")
    p.add_argument("--batch-wait-timeout-s", default="0.01")
    p.add_argument("--max-ongoing-requests", default="none")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpus-per-replica", default="none", help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-replica", default="1")
    p.add_argument("--family", default="lcm")
    p.add_argument("--steps", default="4")
    p.add_argument("--guided-steps", default="1")
    p.add_argument("--kernel-impl", default="auto")
    p.add_argument("--weights", default="none", help="local folder with student/ and teacher/ UNets")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--no-warm", action="store_true", help="skip the warm-up sample at replica start")
    p.add_argument("--address", default=None, help="Ray cluster address (auto, host:port); default: start locally")
    p.add_argument("--node-ip-address", default="127.0.0.1",
                   help="with --address: this driver's node IP in the cluster (default 127.0.0.1, a cluster on this "
                        "machine; pass this machine's cluster address to join a multi-node cluster)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="distpp", help="Serve application name")
    p.add_argument("--route-prefix", default="/")
    return p.parse_args(argv)


def _settings(a: argparse.Namespace):
    return settings_from_strings({
        "preset": a.preset, "replicas": a.replicas, "max_batch_size": a.max_batch_size,
        "batch_wait_timeout_s": a.batch_wait_timeout_s, "max_ongoing_requests": a.max_ongoing_requests,
        "device": a.device, "gpus_per_replica": a.gpus_per_replica, "cpus_per_replica": a.cpus_per_replica,
        "family": a.family, "steps": a.steps, "guided_steps": a.guided_steps, "kernel_impl": a.kernel_impl,
        "weights": a.weights, "dtype": a.dtype, "warm": str(not a.no_warm), "student": a.student,
        "teacher": a.teacher, "local_files_only": "true" if a.local_files_only else "none", "sizes": a.sizes,
        "batch_buckets": a.batch_buckets, "backend": a.backend, "graphs": a.graphs,
        "max_queued_requests": a.max_queued_requests, "max_inflight_cost": a.max_inflight_cost,
        "retry_after_s": a.retry_after_s})


def main(argv=None) -> None:
    a = parse_args(argv)
    try:
        settings = _settings(a)
    except DistppError as e:  # one line, exit code 2, as every distpp CLI
        print(f"python -m distpp.serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from . import build_app
    from .local_ray import connect_ray, init_local_ray

    if a.address is None:
        init_local_ray()  # before ray is imported: its listeners must all be on loopback
    import ray
    from ray import serve

    if a.address is not None:
        connect_ray(a.address, a.node_ip_address)
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(build_app(settings), name=a.name, route_prefix=a.route_prefix)
    prefix = a.route_prefix.rstrip("/")
    what, route = ((f"preset {settings.preset!r}", "sample") if settings.mode == "preset"
                   else (f"{settings.student} guided by {settings.teacher}", "generate"))
    print(f"distpp serving {what} with {settings.replicas} replica(s): POST http://{a.host}:{a.port}{prefix}/{route}, "
          f"GET {prefix}/healthz; Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

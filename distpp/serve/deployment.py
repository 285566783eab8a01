"""The Ray Serve deployment: one worker per replica (distpp.serve.worker), Serve's dynamic batching in
front of it.

Imports Ray at module level: import it through :func:`distpp.serve.build_app` (which checks that Ray is
installed) or by ``serve run distpp.serve.deployment:app_builder preset=tiny replicas=2``.

Pipeline mode (``student=``/``teacher=`` set): ``POST /generate`` with a JSON GenerateRequest -> the
decoded image as image/png (``output`` "png", the default) or JSON with the float32 [H, W, 3] image in
base64 (``output`` "image_b64"); handle: ``handle.generate.remote({...}).result()`` -> ``{"image":
float32 [H, W, 3], "seed", "replica", "batch_size"}``.
Preset mode: ``POST /sample`` with a JSON SampleRequest -> JSON latent (``output`` "latent" or
"latent_b64") or an image/png of its first channels (``output`` "png"); handle: ``handle.sample.remote``
-> ``{"latent": float32 [C, H, W], ...}``.
Both: ``GET /healthz`` -> the replica's status. Every error is a JSON ``{"error": message, "type": error
class}``: 400 for a bad request, 404/405 for a wrong route/method, 413 for a body over 64 KiB (refused on
its Content-Length, or when a chunked body reaches the cap), 422 for settings whose result is not
finite, 503 + Retry-After when the replica's in-flight cost bound is reached (Serve's own 503 +
Retry-After when its queue at the caller is full), 500 only for failures of the server itself. Through
a handle the same errors are raised (ConfigError / InputError are ValueErrors).
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import ConfigError, DistppError, InputError
from .conditioning import image_png, latent_b64, png_bytes
from .http import MAX_BODY_BYTES, Overloaded, content_length, error_body, parse_json, read_body, status_of
from .request import ServeSettings, settings_from_strings
from .worker import CostGate, make_worker

# Health: a replica whose sampling calls keep failing for reasons other than bad requests (a lost GPU,
# a corrupt engine) reports unhealthy so Serve replaces it; one transient failure does not.
UNHEALTHY_AFTER_FAILURES = 3
ROUTES = ("/sample", "/generate")


@serve.deployment
class SamplerDeployment:
    """A replica: builds (and warms) its worker once, then serves batched sampling."""

    def __init__(self, settings: ServeSettings):
        import torch

        self.settings = settings
        if not torch.cuda.is_available():
            # Replicas share the host's cores: each uses the CPUs Ray reserved for it, not all of them.
            torch.set_num_threads(max(1, int(settings.cpus_per_replica)))
        self.worker = make_worker(settings)
        if settings.warm:
            self.worker.warm()
        self.run_batch.set_max_batch_size(settings.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._failures = 0
        self.gate = CostGate(self.worker.cost_bound())

    # --- batching ------------------------------------------------------------------------------------
    @serve.batch
    async def run_batch(self, reqs: list) -> list[tuple[Any, int]]:
        # The sampling call runs in a thread so the replica's event loop keeps queueing requests and
        # answering health checks meanwhile; Serve runs one batch at a time (max_concurrent_batches=1).
        results = await asyncio.to_thread(self.worker.run_batch, reqs)
        # Only failures that are not the request's fault count toward health: bad requests are refused
        # before batching, and run_batch isolates a request that still breaks its call.
        unexpected = [r for r in results if isinstance(r, Exception) and not isinstance(r, DistppError)]
        self._failures = self._failures + 1 if unexpected else 0
        return [(r, len(reqs)) for r in results]

    async def _run(self, req) -> tuple[np.ndarray, int]:
        """Admit by cost, then sample in a batch; raises the request's own error (Overloaded when the
        replica's in-flight cost bound is reached)."""
        cost = self.worker.cost(req)
        if not self.gate.admit(cost):
            raise Overloaded(f"this replica holds {self.gate.inflight} of its {self.gate.budget} in-flight cost "
                             f"(UNet rows x latent pixels) and this request adds {cost}; retry after "
                             f"{self.settings.retry_after_s:g} s, or ask for fewer steps")
        try:
            result, batch = await self.run_batch(req)
        finally:
            self.gate.release(cost)
        if isinstance(result, Exception):
            raise result
        return result, batch

    def _parse(self, route: str, body):
        if route != self.worker.route:
            raise _wrong_route(route, self.worker.route)
        return self.worker.parse(body)

    # --- Python handle API ---------------------------------------------------------------------------
    async def sample(self, request: dict) -> dict:
        """Preset mode: one request dict -> {"latent": float32 [C, H, W], "seed", "replica", "batch_size"}."""
        req = self._parse("/sample", request)
        latent, batch = await self._run(req)
        return {"latent": latent, "seed": req.seed, "replica": self.replica, "batch_size": batch}

    async def generate(self, request: dict) -> dict:
        """Pipeline mode: one request dict -> {"image": float32 [H, W, 3] in [0, 1], "seed", "replica",
        "batch_size"}."""
        req = self._parse("/generate", request)
        image, batch = await self._run(req)
        return {"image": image, "seed": req.seed, "replica": self.replica, "batch_size": batch}

    def health(self) -> dict:
        w, st = self.worker, self.worker_stats()
        return {"status": "ok", "replica": self.replica, "route": w.route, **w.describe(), "device": str(w.device),
                "max_batch_size": self.settings.max_batch_size,
                "batch_buckets": list(self.settings.resolved_batch_buckets),
                "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
                "consecutive_failures": self._failures, "inflight_cost": self.gate.inflight,
                "max_inflight_cost": self.gate.budget, "pid": os.getpid(), "runtime": st}

    def worker_stats(self) -> dict:
        st = self.worker.runtime.stats
        return {"backend": st.backend, "graphs": st.graphs, "cuda_graphs": st.cuda_graphs, "calls": st.calls,
                "captures": st.captures, "replays": st.replays, "padded_calls": st.padded_calls,
                "eager_runs": st.eager_runs, "samplers": st.samplers, "warmup_s": round(st.warmup_s, 3)}

    def check_health(self) -> None:
        """Called by Serve periodically; raising marks the replica unhealthy and Serve replaces it."""
        if self._failures >= UNHEALTHY_AFTER_FAILURES:
            raise RuntimeError(f"{self._failures} sampling batches in a row failed; replacing this replica")
        if self.worker.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.worker.device)  # surfaces a sticky CUDA error

    # --- HTTP ----------------------------------------------------------------------------------------
    async def __call__(self, http: Request) -> Response:
        path = http.url.path[len(http.scope.get("root_path", "")):].rstrip("/") or "/"
        route = self.worker.route
        if path == "/healthz" and http.method == "GET":
            return JSONResponse(self.health())
        if path in ROUTES and path != route:
            return _error(_wrong_route(path, route), 404)
        if path != route:
            return _error(InputError(f"no route {http.method} {path}; use POST {route} or GET /healthz"), 404)
        if http.method != "POST":
            return _error(InputError(f"{path} takes POST with a JSON body, got {http.method}"), 405)
        try:
            body = await read_body(content_length(http.scope.get("headers", [])), http.stream(), MAX_BODY_BYTES)
            req = self.worker.parse(parse_json(body))
            result, batch = await self._run(req)
        except Exception as e:  # noqa: BLE001 - every error is an answer: 4xx the request's, 503 load, 500 ours
            return _error(e, retry_after_s=self.settings.retry_after_s)
        meta = {"seed": req.seed, "replica": self.replica, "batch_size": batch}
        if req.output == "png":
            data = png_bytes(result) if route == "/sample" else image_png(result)
            return Response(data, media_type="image/png",
                            headers={f"x-distpp-{k.replace('_', '-')}": str(v) for k, v in meta.items()})
        out = {"shape": list(result.shape), "dtype": "float32", **meta}
        if req.output == "latent":
            out["latent"] = result.tolist()
        else:  # latent_b64 / image_b64
            out[req.output] = latent_b64(result)
        return JSONResponse(out)


def _wrong_route(route: str, served: str) -> InputError:
    what = "a text-to-image Pipeline" if served == "/generate" else "a preset's UNet pair (no text encoder or VAE)"
    how = "start it with a preset" if served == "/generate" else "start it with student= and teacher="
    return InputError(f"this deployment serves {what}: use POST {served}, not {route} ({how} for {route})")


def _error(e: Exception, status: int | None = None, retry_after_s: float = 1.0) -> JSONResponse:
    status = status or status_of(e)
    headers = {"retry-after": str(math.ceil(retry_after_s))} if status == 503 else None
    return JSONResponse(error_body(e), status_code=status, headers=headers)


def build_app(settings: ServeSettings) -> serve.Application:
    """The bound application for ``serve.run``: ``settings.replicas`` replicas, each reserving
    ``cpus_per_replica`` CPUs and ``gpus_per_replica`` GPUs (auto: 1 when the Ray cluster has GPUs)."""
    gpus = settings.gpus_per_replica
    if gpus is None:
        gpus = 1 if settings.device != "cpu" and _cluster_gpus() > 0 else 0
    if settings.device == "cuda" and gpus == 0:
        raise ConfigError("device='cuda' needs GPUs per replica; pass gpus_per_replica=1 (or device='auto')")
    if settings.device == "cpu":
        gpus = 0
    from ray.serve.config import BackpressureConfig

    return SamplerDeployment.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=settings.resolved_max_ongoing_requests,
        max_queued_requests=settings.resolved_max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
    ).bind(settings)


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run`` / ``serve deploy`` entry point: ServeSettings from ``key=value`` strings."""
    return build_app(settings_from_strings(args))


def _cluster_gpus() -> float:
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    import torch

    return float(torch.cuda.device_count())

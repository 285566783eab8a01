"""The Ray Serve deployment: one SamplerWorker per replica, Serve's dynamic batching in front of it.

Imports Ray at module level: import it through :func:`distpp.serve.build_app` (which checks that Ray is
installed) or by ``serve run distpp.serve.deployment:app_builder preset=tiny replicas=2``.

Python handle API: ``handle.sample.remote({"prompt": ..., "seed": ...}).result()`` -> dict with
``latent`` (numpy float32 [C, H, W]), ``seed``, ``replica``, ``batch_size``; bad requests raise
``ConfigError`` / ``InputError`` (``ValueError``) to the caller.
HTTP (route prefix ``/`` unless given): ``POST /sample`` with a JSON request (see SampleRequest) ->
JSON latent (``output`` "latent" or "latent_b64") or an image/png (``output`` "png"); ``GET /healthz``
-> replica status. Bad requests get 400 with ``{"error": message, "type": error class}``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import ConfigError, DistppError, InputError
from .conditioning import latent_b64, png_bytes
from .request import SampleRequest, ServeSettings, parse_request, settings_from_strings
from .worker import SamplerWorker

MAX_BODY_BYTES = 64 * 1024  # two prompts of MAX_PROMPT_CHARS plus fields, with room to spare
# Health: a replica whose sampling calls keep failing for reasons other than bad requests (a lost GPU,
# a corrupt engine) reports unhealthy so Serve replaces it; one transient failure does not.
UNHEALTHY_AFTER_FAILURES = 3


@serve.deployment
class SamplerDeployment:
    """A replica: builds (and warms) its sampler once, then serves batched sampling."""

    def __init__(self, settings: ServeSettings):
        import torch

        self.settings = settings
        if not torch.cuda.is_available():
            # Replicas share the host's cores: each uses the CPUs Ray reserved for it, not all of them.
            torch.set_num_threads(max(1, int(settings.cpus_per_replica)))
        self.worker = SamplerWorker(settings)
        if settings.warm:
            self.worker.warm()
        self.sample_batch.set_max_batch_size(settings.max_batch_size)
        self.sample_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._failures = 0

    # --- batching ------------------------------------------------------------------------------------
    @serve.batch
    async def sample_batch(self, reqs: list[SampleRequest]) -> list[tuple[Any, int]]:
        # The sampling call runs in a thread so the replica's event loop keeps queueing requests and
        # answering health checks meanwhile; Serve runs one batch at a time (max_concurrent_batches=1).
        results = await asyncio.to_thread(self.worker.run_batch, reqs)
        unexpected = [r for r in results if isinstance(r, Exception) and not isinstance(r, DistppError)]
        self._failures = self._failures + 1 if unexpected else 0
        return [(r, len(reqs)) for r in results]

    async def _run(self, req: SampleRequest) -> tuple[np.ndarray, int]:
        result, batch = await self.sample_batch(req)
        if isinstance(result, Exception):
            raise result
        return result, batch

    # --- Python handle API ---------------------------------------------------------------------------
    async def sample(self, request: dict) -> dict:
        """One request dict -> {"latent": float32 [C, H, W], "seed", "replica", "batch_size"}."""
        req = parse_request(request, self.settings)
        latent, batch = await self._run(req)
        return {"latent": latent, "seed": req.seed, "replica": self.replica, "batch_size": batch}

    def health(self) -> dict:
        w = self.worker
        return {"status": "ok", "replica": self.replica, "preset": self.settings.preset, "device": str(w.device),
                "latent_shape": list(w.latent_shape), "max_batch_size": self.settings.max_batch_size,
                "batch_wait_timeout_s": self.settings.batch_wait_timeout_s}

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
        if path == "/healthz" and http.method == "GET":
            return JSONResponse(self.health())
        if path != "/sample":
            return _error(404, InputError(f"no route {http.method} {path}; use POST /sample or GET /healthz"))
        if http.method != "POST":
            return _error(405, InputError(f"{path} takes POST with a JSON body, got {http.method}"))
        body = await http.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, InputError(f"request body is {len(body)} bytes; send at most {MAX_BODY_BYTES}"))
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _error(400, InputError(f"the body is not valid JSON ({e}); send e.g. {{\"prompt\": \"a cat\"}}"))
        try:
            req = parse_request(data, self.settings)
        except DistppError as e:
            return _error(400, e)
        try:
            latent, batch = await self._run(req)
        except DistppError as e:  # settings the sampler itself refuses: still the request's fault
            return _error(400, e)
        except Exception as e:  # noqa: BLE001 - anything else is the server's fault: 500 with its message
            return _error(500, e)
        meta = {"seed": req.seed, "replica": self.replica, "batch_size": batch}
        if req.output == "png":
            return Response(png_bytes(latent), media_type="image/png",
                            headers={f"x-distpp-{k.replace('_', '-')}": str(v) for k, v in meta.items()})
        out = {"shape": list(latent.shape), "dtype": "float32", **meta}
        if req.output == "latent_b64":
            out["latent_b64"] = latent_b64(latent)
        else:
            out["latent"] = latent.tolist()
        return JSONResponse(out)


def _error(status: int, e: Exception) -> JSONResponse:
    return JSONResponse({"error": str(e), "type": type(e).__name__}, status_code=status)


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
    return SamplerDeployment.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=settings.resolved_max_ongoing_requests,
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

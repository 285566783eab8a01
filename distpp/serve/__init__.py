"""Serving distpp beyond one GPU with Ray Serve (``pip install ".[serve]"``).

One worker per Ray Serve replica (built and warmed once; one GPU each when the cluster has GPUs), both
sampling through one ``distpp.Runtime``: in pipeline mode a text-to-image ``Pipeline`` serving
``POST /generate`` (decoded images), in preset mode a preset's UNet pair serving ``POST /sample``
(latents; latency tests of the loop). Serve's dynamic batching merges concurrent requests into batched
calls (per-request seed, lam, cfg), padded to the warmed batch buckets. HTTP and handle API: see
:mod:`distpp.serve.deployment`. Run locally with ``python -m distpp.serve --preset tiny --replicas 2``
or ``python -m distpp.serve --student ... --teacher ... --family lcm``.

Ray is imported lazily: this package imports without it; :func:`build_app` raises
``BackendUnavailableError`` naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import BackendUnavailableError
from .conditioning import image_png, latent_b64, latent_image, png_bytes, prompt_cond
from .request import GenerateRequest, SampleRequest, ServeSettings, parse_generate, parse_request, settings_from_strings
from .worker import PipelineWorker, PresetWorker, group_indices, make_worker


def is_available() -> bool:
    """True when Ray Serve (and starlette, which it brings) can be imported. Imports neither: a local Ray
    reads its environment when ray is first imported (see distpp.serve.local_ray)."""
    ray = importlib.util.find_spec("ray")
    serve = ray is not None and any(os.path.isdir(os.path.join(loc, "serve"))
                                    for loc in ray.submodule_search_locations or ())
    return serve and importlib.util.find_spec("starlette") is not None


def build_app(settings: ServeSettings):
    """The Ray Serve application for ``serve.run`` (see distpp.serve.deployment.build_app)."""
    if not is_available():
        raise BackendUnavailableError('Ray Serve is not installed; pip install "distpp[serve]" (or "ray[serve]")')
    from .deployment import build_app as _build

    return _build(settings)


__all__ = ["ServeSettings", "SampleRequest", "GenerateRequest", "parse_request", "parse_generate",
           "settings_from_strings", "PresetWorker", "PipelineWorker", "make_worker", "group_indices", "prompt_cond",
           "latent_b64", "latent_image", "png_bytes", "image_png", "is_available", "build_app"]

"""Serving distpp beyond one GPU with Ray Serve (``pip install ".[serve]"``).

One :class:`SamplerWorker` (a model pair and its samplers, built and warmed once) per Ray Serve replica,
one GPU each when the cluster has GPUs; Serve's dynamic batching merges concurrent requests into
batched ``Sampler.sample`` calls (per-request seed, lam, cfg; requests with different family / steps /
guided_steps run as separate calls). Python handle API and HTTP/JSON endpoint: see
:mod:`distpp.serve.deployment`. Run locally with ``python -m distpp.serve --preset tiny --replicas 2``.

Ray is imported lazily: this package imports without it; :func:`build_app` raises
``BackendUnavailableError`` naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import BackendUnavailableError
from .conditioning import latent_b64, latent_image, png_bytes, prompt_cond
from .request import SampleRequest, ServeSettings, parse_request, settings_from_strings
from .worker import SamplerWorker, group_indices


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


__all__ = ["ServeSettings", "SampleRequest", "parse_request", "settings_from_strings", "SamplerWorker",
           "group_indices", "prompt_cond", "latent_b64", "latent_image", "png_bytes", "is_available", "build_app"]

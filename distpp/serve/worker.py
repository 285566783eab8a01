"""The two workers a replica can hold, both free of Ray (tested directly; the Serve deployment is a thin
shell around them), both sampling through one ``distpp.Runtime``:

- :class:`PresetWorker` (``POST /sample``): a preset's UNet pair with hashed stand-in prompt states,
  returning latents: latency tests of the sampling loop alone.
- :class:`PipelineWorker` (``POST /generate``): a text-to-image ``distpp.Pipeline`` (text encoders,
  UNets, VAE; its Runtime inside), returning decoded float32 images.

A batch from Serve's dynamic batching may mix requests that cannot share a sampling call (family /
steps / guided_steps for /sample; guided_steps / size for /generate): it is grouped by the request's
``group_key`` and each group runs as one batched call with per-sample seeds, lam and cfg, which the
Runtime pads up to the smallest warmed batch bucket (CUDA graphs replayed on a GPU).

Isolation: a failing group call is retried one request at a time, so a request that breaks the call
fails only itself and the others get exactly their single-request results; a result holding NaN/inf
(settings that overflow float32 inside the math) is an error for that request, never a success.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..denoiser import Cond
from ..runtime import Runtime
from .conditioning import prompt_cond
from .http import NonFiniteResult
from .request import GenerateRequest, SampleRequest, ServeSettings, parse_generate, parse_request, request_cost


def resolve_device(setting: str) -> torch.device:
    """'auto' -> cuda when this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES per replica), else cpu."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class PresetWorker:
    """A preset's model pair behind one Runtime on one device (preset mode, ``POST /sample``).

    settings: ServeSettings (preset, device, defaults, kernel_impl, backend, graphs, batch_buckets).
    pair:     an already-built ModelPair (tests pass one to share weights); default builds the preset.
    """

    route = "/sample"

    def __init__(self, settings: ServeSettings, pair=None):
        from ..presets import build_preset

        self.settings = settings
        self.device = resolve_device(settings.device)
        if pair is None:
            pair = build_preset(settings.preset, device=self.device, dtype=getattr(torch, settings.dtype),
                                weights=settings.weights)
        self.pair = pair
        info = pair.info
        spec = info.cond_spec()
        self.runtime = Runtime(pair.student, pair.teacher, cond_spec=spec, config=settings.default_config(),
                               backend=settings.backend, graphs=settings.graphs,
                               batch_sizes=settings.resolved_batch_buckets, resolutions=[self.latent_shape[1:]],
                               device=self.device, label=f"preset:{settings.preset}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.pair.info.latent_shape)

    def parse(self, body) -> SampleRequest:
        return parse_request(body, self.settings)

    def cost(self, req: SampleRequest) -> int:
        """The request's work in UNet rows x latent pixels (see ServeSettings.max_inflight_cost)."""
        _, h, w = self.latent_shape
        return request_cost(req.steps, req.guided_steps, h * w)

    def cost_bound(self) -> int:
        _, h, w = self.latent_shape
        s = self.settings
        return s.resolved_max_inflight_cost(request_cost(s.max_steps, s.max_steps, h * w),
                                            request_cost(s.steps, s.guided_steps, h * w))

    def warm(self) -> None:
        """Warm the default config at every batch bucket (CUDA graphs captured on a GPU)."""
        self.runtime.warmup(progress=False)

    def run_group(self, reqs: Sequence[SampleRequest]) -> np.ndarray:
        """Sample requests that share a group key in one batched call -> [B, C, H, W] float32 (host)."""
        keys = {r.group_key for r in reqs}
        if len(keys) != 1:
            raise ValueError(f"run_group takes requests of one (family, steps, guided_steps), got {sorted(keys)}")
        info = self.pair.info
        cond = _stack([prompt_cond(info, r.prompt) for r in reqs])
        uncond = _stack([prompt_cond(info, r.negative_prompt) for r in reqs])
        x = self.runtime.sample(reqs[0].sampler_config(self.settings.kernel_impl), cond, uncond=uncond,
                                latent_shape=self.latent_shape, seeds=[r.seed for r in reqs],
                                lam=[r.lam for r in reqs], cfg=[r.cfg for r in reqs])
        return x.cpu().numpy()

    def run_batch(self, reqs: Sequence[SampleRequest]) -> list[np.ndarray | Exception]:
        """Results in request order: [C, H, W] float32 arrays, or the exception that failed that request."""
        return run_isolated(self.run_group, reqs)

    def describe(self) -> dict:
        return {"mode": "preset", "preset": self.settings.preset, "latent_shape": list(self.latent_shape)}


class PipelineWorker:
    """A text-to-image Pipeline (its Runtime inside) on one device (pipeline mode, ``POST /generate``).

    settings: ServeSettings with student, teacher, family, steps, guided_steps, sizes, batch_buckets, ...
    pipe:     an already-built Pipeline (tests pass one to share weights); default loads
              ``Pipeline.from_pretrained(settings.student, settings.teacher, settings.family, ...)``.
    """

    route = "/generate"

    def __init__(self, settings: ServeSettings, pipe=None):
        self.settings = settings
        self.device = resolve_device(settings.device)
        if pipe is None:
            from ..pipeline import Pipeline

            pipe = Pipeline.from_pretrained(
                settings.student, settings.teacher, settings.family, local_files_only=settings.local_files_only,
                device=self.device, dtype=getattr(torch, settings.dtype), backend=settings.backend,
                graphs=settings.graphs, batch_sizes=settings.resolved_batch_buckets, sizes=settings.sizes,
                steps=settings.steps, guided_steps=settings.guided_steps, kernel_impl=settings.kernel_impl)
        self.pipe = pipe
        self.sizes = [pipe.image_size(h, w) for h, w in settings.sizes or [(None, None)]]

    @property
    def runtime(self):
        return self.pipe.runtime

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The latent of the default (first) size."""
        f = self.pipe.vae_scale_factor
        h, w = self.sizes[0]
        return (self.pipe.latent_channels, h // f, w // f)

    def parse(self, body) -> GenerateRequest:
        return parse_generate(body, self.settings, self.sizes)

    def cost(self, req: GenerateRequest) -> int:
        f = self.pipe.vae_scale_factor
        return request_cost(self.settings.steps, req.guided_steps, (req.height // f) * (req.width // f))

    def cost_bound(self) -> int:
        f2 = self.pipe.vae_scale_factor ** 2
        s = self.settings
        largest = max(h * w for h, w in self.sizes) // f2
        _, h, w = self.latent_shape
        return s.resolved_max_inflight_cost(request_cost(s.steps, s.steps, largest),
                                            request_cost(s.steps, s.guided_steps, h * w))

    def warm(self) -> None:
        """Warm the default guided_steps at every size and batch bucket."""
        self.pipe.warmup(sizes=self.sizes, progress=False)

    def run_group(self, reqs: Sequence[GenerateRequest]) -> np.ndarray:
        """Requests of one group key in one Pipeline call -> [B, H, W, 3] float32 images in [0, 1] (host)."""
        keys = {r.group_key for r in reqs}
        if len(keys) != 1:
            raise ValueError(f"run_group takes requests of one (guided_steps, height, width), got {sorted(keys)}")
        r0 = reqs[0]
        images = self.pipe([r.prompt for r in reqs], [r.negative_prompt for r in reqs], height=r0.height,
                           width=r0.width, seeds=[r.seed for r in reqs], guided_steps=r0.guided_steps,
                           lam=[r.lam for r in reqs], cfg=[r.cfg for r in reqs], output_type="pt")
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def run_batch(self, reqs: Sequence[GenerateRequest]) -> list[np.ndarray | Exception]:
        return run_isolated(self.run_group, reqs)

    def describe(self) -> dict:
        return {"mode": "pipeline", "family": self.settings.family, "steps": self.settings.steps,
                "sizes": [list(s) for s in self.sizes], "latent_shape": list(self.latent_shape)}


def make_worker(settings: ServeSettings):
    """The worker of the settings' mode."""
    return PipelineWorker(settings) if settings.mode == "pipeline" else PresetWorker(settings)


def run_isolated(run_group, reqs: Sequence) -> list:
    """``run_group`` over each group of ``reqs`` (requests with one group_key) -> per-request results in
    request order: a finite float32 array, or the exception for that request alone. A group call that
    raises is retried request by request (one bad request must not fail the rest of its batch); a result
    with NaN/inf becomes a NonFiniteResult naming the request's settings."""
    out: list = [None] * len(reqs)
    for idx in group_indices(reqs):
        group = [reqs[i] for i in idx]
        try:
            results = list(run_group(group))
        except Exception as e:  # noqa: BLE001 - retried alone below; other groups go on
            if len(group) == 1:
                results = [e]
            else:
                results = []
                for r in group:
                    try:
                        results.append(run_group([r])[0])
                    except Exception as e1:  # noqa: BLE001 - this request's own error
                        results.append(e1)
        for i, r, x in zip(idx, group, results):
            out[i] = x if isinstance(x, Exception) else finite_or_error(r, x)
    return out


def finite_or_error(req, x: np.ndarray) -> np.ndarray | NonFiniteResult:
    """``x`` when every value is finite, else the error answer for the request that produced it."""
    if np.isfinite(x).all():
        return x
    bad = int((~np.isfinite(x)).sum())
    return NonFiniteResult(f"the result is not finite ({bad} of {x.size} values NaN/inf): lam={req.lam:g}, "
                           f"cfg={req.cfg:g} overflow float32 inside the guidance math; pass a smaller cfg "
                           "(e.g. the default 7.5)")


class CostGate:
    """Admission by in-flight cost on one replica (used from its event loop only).

    ``admit(cost)`` succeeds when the admitted total plus ``cost`` stays within ``budget``, or when
    nothing is in flight (a request costlier than the budget still runs, alone); ``release(cost)`` when
    its result is out."""

    def __init__(self, budget: int):
        self.budget, self.inflight = int(budget), 0

    def admit(self, cost: int) -> bool:
        if self.inflight and self.inflight + cost > self.budget:
            return False
        self.inflight += cost
        return True

    def release(self, cost: int) -> None:
        self.inflight -= cost


def group_indices(reqs: Sequence[SampleRequest]) -> list[list[int]]:
    """Indices of requests grouped by group_key, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.group_key, []).append(i)
    return list(groups.values())


def _stack(conds: Sequence[Cond]) -> Cond:
    """Rows of 1-row Conds stacked into one [B, ...] Cond (all share the preset's fields)."""
    return Cond(**{k: torch.cat([getattr(c, k) for c in conds]) for k in conds[0].tensors()})

"""SamplerWorker: what one replica holds (a model pair and its samplers) and how it runs a batch.

Independent of Ray, so it is tested directly and the Serve deployment stays a thin shell around it.
A batch from Serve's dynamic batching may mix requests with different (family, steps, guided_steps);
those cannot share a sampling call, so the batch is grouped by that key and each group runs as one
batched ``Sampler.sample`` call with per-sample seeds, lam and cfg.

Isolation: a failing group call is retried one request at a time, so a request that breaks the call
fails only itself and the others get exactly their single-request results; a result holding NaN/inf
(settings that overflow float32 inside the math) is an error for that request, never a success.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from ..denoiser import Cond
from ..sampler import Sampler
from .conditioning import prompt_cond
from .http import NonFiniteResult
from .request import SampleRequest, ServeSettings, parse_request, request_cost

# Samplers kept per replica (one per distinct (family, steps, guided_steps)); each holds only small
# schedule tables, the UNets are shared. The bound stops a stream of odd settings from growing memory.
MAX_SAMPLERS = 32


def resolve_device(setting: str) -> torch.device:
    """'auto' -> cuda when this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES per replica), else cpu."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class SamplerWorker:
    """One model pair and its samplers on one device.

    settings: ServeSettings (preset, device, defaults, kernel_impl).
    pair:     an already-built ModelPair (tests pass one to share weights); default builds the preset.
    """

    def __init__(self, settings: ServeSettings, pair=None):
        from ..presets import build_preset

        self.settings = settings
        self.device = resolve_device(settings.device)
        if pair is None:
            pair = build_preset(settings.preset, device=self.device, dtype=getattr(torch, settings.dtype),
                                weights=settings.weights)
        self.pair = pair
        self._samplers: OrderedDict[tuple, Sampler] = OrderedDict()
        self._default_key = (settings.family, settings.steps, settings.guided_steps)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.pair.info.latent_shape)

    def sampler(self, req: SampleRequest) -> Sampler:
        """The sampler for the request's (family, steps, guided_steps), built on first use."""
        key = req.group_key
        s = self._samplers.get(key)
        if s is None:
            s = Sampler(self.pair.student, self.pair.teacher, req.sampler_config(self.settings.kernel_impl),
                        device=self.device)
            self._samplers[key] = s
            while len(self._samplers) > MAX_SAMPLERS:
                oldest = next(k for k in self._samplers if k != self._default_key)
                del self._samplers[oldest]
        self._samplers.move_to_end(key)
        return s

    def warm(self) -> None:
        """Build the default sampler and run it once (first-call allocations, lazy inits)."""
        self.run_group([parse_request({"prompt": "warm-up"}, self.settings)])

    def run_group(self, reqs: Sequence[SampleRequest]) -> np.ndarray:
        """Sample requests that share a group key in one batched call -> [B, C, H, W] float32 (host)."""
        keys = {r.group_key for r in reqs}
        if len(keys) != 1:
            raise ValueError(f"run_group takes requests of one (family, steps, guided_steps), got {sorted(keys)}")
        sampler = self.sampler(reqs[0])
        info = self.pair.info
        cond = _stack([prompt_cond(info, r.prompt) for r in reqs])
        uncond = _stack([prompt_cond(info, r.negative_prompt) for r in reqs])
        x = sampler.sample(cond, uncond=uncond, latent_shape=self.latent_shape, seeds=[r.seed for r in reqs],
                           lam=[r.lam for r in reqs], cfg=[r.cfg for r in reqs])
        return x.cpu().numpy()

    def cost(self, req: SampleRequest) -> int:
        """The request's work in UNet rows x latent pixels (see ServeSettings.max_inflight_cost)."""
        _, h, w = self.latent_shape
        return request_cost(req.steps, req.guided_steps, h * w)

    def run_batch(self, reqs: Sequence[SampleRequest]) -> list[np.ndarray | Exception]:
        """Results in request order: [C, H, W] float32 arrays, or the exception that failed that request."""
        return run_isolated(self.run_group, reqs)


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

"""SamplerWorker: what one replica holds (a model pair and its samplers) and how it runs a batch.

Independent of Ray, so it is tested directly and the Serve deployment stays a thin shell around it.
A batch from Serve's dynamic batching may mix requests with different (family, steps, guided_steps);
those cannot share a sampling call, so the batch is grouped by that key and each group runs as one
batched ``Sampler.sample`` call with per-sample seeds, lam and cfg. A failing group fails only its own
requests.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from ..denoiser import Cond
from ..sampler import Sampler
from .conditioning import prompt_cond
from .request import SampleRequest, ServeSettings, parse_request

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

    def run_batch(self, reqs: Sequence[SampleRequest]) -> list[np.ndarray | Exception]:
        """Results in request order: [C, H, W] float32 arrays, or the exception that failed its group."""
        out: list[np.ndarray | Exception | None] = [None] * len(reqs)
        for idx in group_indices(reqs):
            try:
                xs = self.run_group([reqs[i] for i in idx])
            except Exception as e:  # noqa: BLE001 - the group's requests get the error; other groups go on
                for i in idx:
                    out[i] = e
                continue
            for j, i in enumerate(idx):
                out[i] = xs[j]
        return out


def group_indices(reqs: Sequence[SampleRequest]) -> list[list[int]]:
    """Indices of requests grouped by group_key, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.group_key, []).append(i)
    return list(groups.values())


def _stack(conds: Sequence[Cond]) -> Cond:
    """Rows of 1-row Conds stacked into one [B, ...] Cond (all share the preset's fields)."""
    return Cond(**{k: torch.cat([getattr(c, k) for c in conds]) for k in conds[0].tensors()})

"""Per-stage timers for the sampling loop: CUDA events on a GPU, perf_counter on a CPU.

The loop calls ``timer.lap(stage)`` after each stage (no sync: on CUDA it records an event); after the
call, ``timer.totals()`` synchronizes once and returns milliseconds per stage.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

STAGES = ("student", "teacher", "guidance", "scheduler", "other")


class StageTimer:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin(self) -> None:
        self._marks = [("", self._now())]

    def lap(self, stage: str) -> None:
        if not self._marks:
            self.begin()
            return
        self._marks.append((stage, self._now()))

    def totals(self) -> dict[str, float]:
        """Milliseconds per stage since ``begin`` (one host sync on CUDA), plus 'total'."""
        out: dict[str, float] = defaultdict(float)
        if len(self._marks) < 2:
            return dict(out)
        if self.cuda:
            self._marks[-1][1].synchronize()
        for (_, a), (stage, b) in zip(self._marks, self._marks[1:]):
            out[stage] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        out["total"] = sum(v for k, v in out.items())
        return dict(out)

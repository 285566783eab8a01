"""What every bench mode shares: one timed variant (per-stage medians and p90), interleaved timing,
device/dtype and environment resolution, the settings both modes read."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import SamplerConfig
from ..dtypes import parse_dtype
from ..errors import ConfigError
from ..timing import STAGES, StageTimer

PLOT_STAGES = STAGES + ("graph",)
E2E_STAGES = ("encode", "loop", "decode")
MAX_BATCH = 1024  # a latency bench; far past what one device call serves
NOISY_P90 = 1.5  # p90 / median above which a variant's timings are flagged as noisy


def percentile90(values) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))]


@dataclass
class Variant:
    name: str
    run: Callable[[StageTimer], object]
    stages: list[dict] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)

    def summary(self, batch: int, end_to_end: bool = False) -> dict:
        totals = [s["total"] for s in self.stages]
        med = statistics.median(totals)
        row = {"variant": self.name, "median_ms": med, "p90_ms": percentile90(totals),
               "images_per_s": 1e3 * batch / med, "repeats": len(totals)}
        if end_to_end:
            per = {"encode": [s.get("encode", 0.0) for s in self.stages],
                   "decode": [s.get("decode", 0.0) for s in self.stages]}
            per["loop"] = [s["total"] - s.get("encode", 0.0) - s.get("decode", 0.0) for s in self.stages]
            for st in E2E_STAGES:
                row[f"{st}_ms"], row[f"{st}_p90_ms"] = statistics.median(per[st]), percentile90(per[st])
        else:
            for st in PLOT_STAGES:
                row[f"{st}_ms"] = statistics.median(s.get(st, 0.0) for s in self.stages)
            fwd = row["student_ms"] + row["teacher_ms"]
            # a graph replay hides its forwards: filled in from forwards_graph by graph_metrics
            row["outside_forwards_pct"] = None if row["graph_ms"] > 0 else 100.0 * max(med - fwd, 0.0) / med
        if self.energy_j:
            row["energy_per_image_j"] = statistics.median(self.energy_j) / batch
            row["power_w"] = statistics.median(self.energy_j) / (med / 1e3)
        return row


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown --device {device!r}; pass auto, cuda or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; pass --device cpu")
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, parse_dtype(dtype, what="--dtype")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device_type": device.type,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node()}
    for mod in ("diffusers", "transformers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        env["device_name"] = _cpu_name()
    env["cpu_threads"] = torch.get_num_threads()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=__file__.rsplit("/", 2)[0], timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def selected(args, known: tuple[str, ...], default: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The --variants names (default ``default``) plus ``extra``; ConfigError for names not in ``known``."""
    names = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
    names += [n for n in extra if n not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; pass a subset of {', '.join(known)}")
    return names


def backend_options(args) -> dict:
    if args.backend != "compile":
        return {}
    from ..backends.compile import CompileConfig

    return {"compile": CompileConfig(mode=args.compile_mode, backend=args.compile_backend)}


def sampler_config(args, family: str | None = None, info=None) -> SamplerConfig:
    """The run's SamplerConfig: the options given on the command line over the preset's sampler defaults
    (``info``: a PresetInfo; flow presets bring family, schedule options, teacher guidance, w and lam)."""
    given = dict(family=family or args.family, steps=args.steps, guided_steps=args.guided_steps, lam=args.lam,
                 cfg=args.cfg, kernel_impl=args.kernel_impl)
    if info is not None:
        return info.sampler_config(**given)
    return SamplerConfig(**{**dict(family="lcm"), **{k: v for k, v in given.items() if v is not None}})


def time_variants(variants: list[Variant], device, warmup: int, repeats: int, progress: bool, telemetry=None) -> None:
    """Warm up, then time the variants interleaved (so drift hits all alike). With ``telemetry`` (a
    distpp.telemetry.Telemetry), each timed run's energy is read from the card's counter around it
    (``timer.totals()`` has synchronized the run before the second read)."""
    from tqdm.auto import tqdm

    energy = telemetry.energy_mj if telemetry is not None else (lambda: None)
    total = len(variants) * (warmup + repeats)
    with tqdm(total=total, desc="bench", disable=not progress, file=sys.stderr) as bar:
        for i in range(warmup + repeats):
            for v in variants:
                timer = StageTimer(device)
                e0 = energy()
                timer.begin()
                v.run(timer)
                timer.lap("other")
                totals = timer.totals()
                e1 = energy()
                if i >= warmup:
                    v.stages.append(totals)
                    if e0 is not None and e1 is not None:
                        v.energy_j.append((e1 - e0) / 1e3)
                bar.update(1)

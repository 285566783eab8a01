"""``python -m distpp.bench``: guided-sampling latency of distpp against baselines run in the same process.

Variants (all on the same models, seeds and settings):
  unguided   distpp, guided_steps = 0 (the plain student)
  distpp     distpp guided (fused ops, no host math in the loop)
  eager      the idiomatic diffusers way (distpp.baselines): the fair baseline
  research   the research code's way (batch-2B student, autograd on, host math)
Per variant: per-stage ms (student forward, teacher forward, guidance math, scheduler math, other),
median and p90 of the total over repeats, images/s, and the share of time outside model forwards.
Ratios: distpp/eager, distpp/research, guided/unguided (distpp/unguided).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import SamplerConfig
from .errors import ConfigError, DistppError
from .timing import STAGES, StageTimer


@dataclass
class Variant:
    name: str
    run: Callable[[StageTimer], torch.Tensor]
    stages: list[dict] = field(default_factory=list)

    def summary(self, batch: int) -> dict:
        totals = sorted(s["total"] for s in self.stages)
        med = statistics.median(totals)
        p90 = totals[min(len(totals) - 1, int(round(0.9 * (len(totals) - 1))))]
        row = {"variant": self.name, "median_ms": med, "p90_ms": p90, "images_per_s": 1e3 * batch / med,
               "repeats": len(totals)}
        for st in STAGES:
            row[f"{st}_ms"] = statistics.median(s.get(st, 0.0) for s in self.stages)
        fwd = row["student_ms"] + row["teacher_ms"]
        row["outside_forwards_pct"] = 100.0 * max(med - fwd, 0.0) / med
        return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distpp.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="tiny (default), tiny_xl, sd15, sdxl")
    p.add_argument("--weights", default=None, help="local folder with student/ and teacher/ UNets (else random)")
    p.add_argument("--family", default="lcm", help="student family: lcm, dmd2, euler, euler_a, ddim")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guided-steps", type=int, default=1)
    p.add_argument("--lam", type=float, default=None, help="proximal weight (default: the family's)")
    p.add_argument("--cfg", type=float, default=7.5, help="teacher CFG scale")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--kernel-impl", default="auto", help="auto, torch, triton, cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 20 GPU / 5 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="unguided,distpp,eager,research")
    p.add_argument("--force", action="store_true", help="build large presets on CPU anyway")
    p.add_argument("--json", default=None, metavar="PATH", help="write result rows as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; pass --device cpu")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise ConfigError(f"unknown dtype {dtype!r}; pass auto, float32, float16 or bfloat16")
    return dev, dt


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device_type": device.type,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=__file__.rsplit("/", 2)[0], timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def build_variants(args, pair, device, dtype) -> tuple[list[Variant], dict]:
    from .baselines import baseline_sample
    from .sampler import Sampler

    B = args.batch
    cond, uncond = pair.random_cond(B)
    shape = pair.info.latent_shape
    seeds = list(range(B))
    base = dict(family=args.family, steps=args.steps, lam=args.lam, cfg=args.cfg, kernel_impl=args.kernel_impl)
    guided_cfg = SamplerConfig(guided_steps=args.guided_steps, **base)
    plain_cfg = SamplerConfig(guided_steps=0, **base)
    guided = Sampler(pair.student, pair.teacher, guided_cfg, device=device, dtype=dtype)
    plain = Sampler(pair.student, None, plain_cfg, device=device, dtype=dtype)
    makers = {
        "unguided": lambda tm: plain.sample(cond, latent_shape=shape, seeds=seeds, timer=tm),
        "distpp": lambda tm: guided.sample(cond, uncond=uncond, latent_shape=shape, seeds=seeds, timer=tm),
        "eager": lambda tm: baseline_sample(pair.student, pair.teacher, guided_cfg, cond, uncond, shape, seeds,
                                            device=device, dtype=dtype, timer=tm),
        "research": lambda tm: baseline_sample(pair.student, pair.teacher, guided_cfg, cond, uncond, shape, seeds,
                                               device=device, dtype=dtype, research=True, timer=tm),
    }
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; pass a subset of {', '.join(makers)}")
    settings = {"preset": args.preset, "family": args.family, "steps": args.steps, "guided_steps": args.guided_steps,
                "lam": guided_cfg.resolved_lam, "cfg": args.cfg, "batch": B, "dtype": str(dtype).replace("torch.", ""),
                "kernel_impl": guided.ops.name, "latent_shape": list(shape)}
    return [Variant(n, makers[n]) for n in names], settings


def time_variants(variants: list[Variant], device, warmup: int, repeats: int, progress: bool) -> None:
    """Warm up, then time the variants interleaved (so drift hits all alike)."""
    from tqdm.auto import tqdm

    total = len(variants) * (warmup + repeats)
    with tqdm(total=total, desc="bench", disable=not progress, file=sys.stderr) as bar:
        for i in range(warmup + repeats):
            for v in variants:
                timer = StageTimer(device)
                timer.begin()
                v.run(timer)
                timer.lap("other")
                if i >= warmup:
                    v.stages.append(timer.totals())
                bar.update(1)


def format_table(rows: list[dict]) -> str:
    cols = ["variant", "median_ms", "p90_ms", "images_per_s", "student_ms", "teacher_ms", "guidance_ms",
            "scheduler_ms", "other_ms", "outside_forwards_pct"]
    head = ["variant", "median ms", "p90 ms", "img/s", "student", "teacher", "guidance", "sched", "other", "outside %"]
    lines = [" | ".join(f"{h:>9}" for h in head)]
    for r in rows:
        lines.append(" | ".join(f"{r[c]:>9}" if isinstance(r[c], str) else f"{r[c]:>9.3f}" for c in cols))
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict:
    med = {r["variant"]: r["median_ms"] for r in rows}
    out = {}
    for a, b, name in (("distpp", "eager", "distpp/eager"), ("distpp", "research", "distpp/research"),
                       ("distpp", "unguided", "guided/unguided")):
        if a in med and b in med:
            out[name] = med[a] / med[b]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from .presets import build_preset

        device, dtype = resolve_device_dtype(args.device, args.dtype)
        repeats = args.repeats or (20 if device.type == "cuda" else 5)
        if repeats < 1 or args.warmup < 0 or args.batch < 1:
            raise ConfigError("--repeats and --batch must be >= 1 and --warmup >= 0")
        t0 = time.perf_counter()
        pair = build_preset(args.preset, device=device, dtype=dtype, weights=args.weights, force=args.force)
        build_s = time.perf_counter() - t0
        variants, settings = build_variants(args, pair, device, dtype)
    except DistppError as e:
        print(f"distpp.bench: {e}", file=sys.stderr)
        return 2
    time_variants(variants, device, args.warmup, repeats, progress=not args.no_progress)
    rows = [v.summary(args.batch) for v in variants]
    env = environment(device)
    r = ratios(rows)
    print(f"distpp.bench  preset={settings['preset']} family={settings['family']} steps={settings['steps']} "
          f"G={settings['guided_steps']} lam={settings['lam']} cfg={settings['cfg']} batch={settings['batch']} "
          f"dtype={settings['dtype']} ops={settings['kernel_impl']}  device={env['device_name']} "
          f"(model build {build_s:.1f} s, {repeats} repeats)")
    print(format_table(rows))
    print("  ".join(f"{k} = {v:.3f}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "settings": settings, "build_s": build_s, "rows": rows, "ratios": r}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

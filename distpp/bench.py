"""``python -m distpp.bench``: guided-sampling latency of distpp against baselines run in the same process.

Variants (all on the same models, seeds and settings):
  unguided   distpp, guided_steps = 0 (the plain student)
  distpp     distpp guided (fused ops, no host math in the loop)
  eager      the idiomatic diffusers way (distpp.baselines): the fair baseline
  research   the research code's way (batch-2B student, autograd on, host math)
Per variant: per-stage ms (student forward, teacher forward, guidance math, scheduler math, other),
median and p90 of the total over repeats, images/s, and the share of time outside model forwards.
Ratios: distpp/eager, distpp/research, guided/unguided (distpp/unguided).

With ``--graphs on`` three more variants run through distpp.graphs.GraphRunner (whole-loop CUDA graphs
on a GPU, timed per replay with CUDA events as stage "graph"; eager over static buffers on a CPU):
  distpp_graph    distpp guided
  unguided_graph  distpp unguided
  forwards_graph  the model forwards of the guided loop alone (no-op fused ops), the yardstick for the
                  time outside model forwards under graphs
and the issue's targets are evaluated (a: time outside forwards <= 3% of the loop; b: distpp_graph >= 2x
faster than eager; c: guided/unguided <= 1 + teacher forward / student loop + 0.02). ``--backend`` runs
the distpp variants on another UNet backend (distpp.backends; compile time reported apart); the
baselines always run the eager UNets. NVML telemetry (distpp.telemetry) is sampled while timing.
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

GRAPH_VARIANTS = ("distpp_graph", "unguided_graph", "forwards_graph")
PLOT_STAGES = STAGES + ("graph",)


@dataclass
class Variant:
    name: str
    run: Callable[[StageTimer], torch.Tensor]
    stages: list[dict] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)

    def summary(self, batch: int) -> dict:
        totals = sorted(s["total"] for s in self.stages)
        med = statistics.median(totals)
        p90 = totals[min(len(totals) - 1, int(round(0.9 * (len(totals) - 1))))]
        row = {"variant": self.name, "median_ms": med, "p90_ms": p90, "images_per_s": 1e3 * batch / med,
               "repeats": len(totals)}
        for st in PLOT_STAGES:
            row[f"{st}_ms"] = statistics.median(s.get(st, 0.0) for s in self.stages)
        fwd = row["student_ms"] + row["teacher_ms"]
        # a graph replay hides its forwards: filled in from forwards_graph by graph_metrics
        row["outside_forwards_pct"] = None if row["graph_ms"] > 0 else 100.0 * max(med - fwd, 0.0) / med
        if self.energy_j:
            row["energy_per_image_j"] = statistics.median(self.energy_j) / batch
            row["power_w"] = statistics.median(self.energy_j) / (med / 1e3)
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
    p.add_argument("--backend", default="eager", help="UNet backend of the distpp variants: eager (default), compile, "
                   "onnxruntime, tensorrt (distpp.backends)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode with --backend compile: default, "
                   "max-autotune-no-cudagraphs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --backend compile: "
                   "inductor; aot_eager / eager trace without codegen (fast, to test the plumbing)")
    p.add_argument("--graphs", default="off", choices=("on", "off"),
                   help="on: also run the distpp variants through whole-loop CUDA graphs (distpp.graphs)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the per-stage latency breakdown")
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

    from .graphs import GraphRunner, noop_ops

    B = args.batch
    cond, uncond = pair.random_cond(B)
    student, teacher, backend = pair.student, pair.teacher, {"backend": "eager", "build_s": 0.0}
    if args.backend != "eager":
        from .backends import make_pair

        kw = {}
        if args.backend == "compile":
            from .backends.compile import CompileConfig

            kw["compile"] = CompileConfig(mode=args.compile_mode, backend=args.compile_backend)
        student, teacher, backend = make_pair(pair.student, pair.teacher, args.backend, batch=B,
                                              resolutions=(tuple(pair.info.latent_shape[1:]),),
                                              tokens=pair.info.tokens, device=device, **kw)
    shape = pair.info.latent_shape
    seeds = list(range(B))
    base = dict(family=args.family, steps=args.steps, lam=args.lam, cfg=args.cfg, kernel_impl=args.kernel_impl)
    guided_cfg = SamplerConfig(guided_steps=args.guided_steps, **base)
    plain_cfg = SamplerConfig(guided_steps=0, **base)
    guided = Sampler(student, teacher, guided_cfg, device=device, dtype=dtype)
    plain = Sampler(student, None, plain_cfg, device=device, dtype=dtype)
    label = dict(model=args.preset, backend=backend["backend"])
    runners = {"distpp_graph": GraphRunner(guided, **label), "unguided_graph": GraphRunner(plain, **label),
               "forwards_graph": GraphRunner(guided, ops=noop_ops(), **label)}
    makers = {
        "unguided": lambda tm: plain.sample(cond, latent_shape=shape, seeds=seeds, timer=tm),
        "distpp": lambda tm: guided.sample(cond, uncond=uncond, latent_shape=shape, seeds=seeds, timer=tm),
        "eager": lambda tm: baseline_sample(pair.student, pair.teacher, guided_cfg, cond, uncond, shape, seeds,
                                            device=device, dtype=dtype, timer=tm),
        "research": lambda tm: baseline_sample(pair.student, pair.teacher, guided_cfg, cond, uncond, shape, seeds,
                                               device=device, dtype=dtype, research=True, timer=tm),
        "distpp_graph": lambda tm: runners["distpp_graph"].sample(cond, uncond=uncond, latent_shape=shape,
                                                                  seeds=seeds, timer=tm),
        "unguided_graph": lambda tm: runners["unguided_graph"].sample(cond, latent_shape=shape, seeds=seeds, timer=tm),
        "forwards_graph": lambda tm: runners["forwards_graph"].sample(cond, uncond=uncond, latent_shape=shape,
                                                                      seeds=seeds, timer=tm),
    }
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.graphs == "on":
        names += [n for n in GRAPH_VARIANTS if n not in names]
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; pass a subset of {', '.join(makers)}")
    settings = {"preset": args.preset, "family": args.family, "steps": args.steps, "guided_steps": args.guided_steps,
                "lam": guided_cfg.resolved_lam, "cfg": args.cfg, "batch": B, "dtype": str(dtype).replace("torch.", ""),
                "kernel_impl": guided.ops.name, "latent_shape": list(shape), "backend": backend["backend"],
                "graphs": args.graphs, "cuda_graphs": runners["distpp_graph"].use_cuda_graphs}
    settings["_models"] = (student, teacher)  # for compile_s after timing; dropped before JSON
    settings["_runners"] = runners
    settings["backend_build_s"] = backend.get("export_s", 0.0) + backend.get("build_s", 0.0)
    return [Variant(n, makers[n]) for n in names], settings


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


def format_table(rows: list[dict]) -> str:
    cols = ["variant", "median_ms", "p90_ms", "images_per_s", "student_ms", "teacher_ms", "guidance_ms",
            "scheduler_ms", "other_ms", "graph_ms", "outside_forwards_pct", "energy_per_image_j", "power_w"]
    head = ["variant", "median ms", "p90 ms", "img/s", "student", "teacher", "guidance", "sched", "other", "graph",
            "outside %", "J/img", "W"]
    lines = [" | ".join(f"{h:>14}" if i == 0 else f"{h:>9}" for i, h in enumerate(head))]
    for r in rows:
        cells = []
        for i, c in enumerate(cols):
            v = r.get(c)
            w = 14 if i == 0 else 9
            cells.append(f"{v:>{w}}" if isinstance(v, str) else f"{'n/a':>{w}}" if v is None else f"{v:>{w}.3f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict:
    med = {r["variant"]: r["median_ms"] for r in rows}
    out = {}
    for a, b, name in (("distpp", "eager", "distpp/eager"), ("distpp", "research", "distpp/research"),
                       ("distpp", "unguided", "guided/unguided")):
        if a in med and b in med:
            out[name] = med[a] / med[b]
    for a, b, name in (("distpp_graph", "eager", "distpp_graph/eager"), ("distpp_graph", "distpp", "distpp_graph/distpp"),
                       ("distpp_graph", "unguided_graph", "graph guided/unguided")):
        if a in med and b in med:
            out[name] = med[a] / med[b]
    return out


def graph_metrics(rows: list[dict]) -> dict:
    """Fill the graph rows' time outside forwards from forwards_graph and evaluate the issue's targets.

    a: loop time outside model forwards under graphs, 100 * (replay(distpp) - replay(forwards)) / replay(distpp),
       <= 3 (and per call, prepare and copies included, reported beside it);
    b: eager / distpp_graph median >= 2;
    c: distpp_graph / unguided_graph <= 1 + teacher_ms / student_ms (from the eager distpp row) + 0.02.
    """
    by = {r["variant"]: r for r in rows}
    out: dict = {}
    g, f = by.get("distpp_graph"), by.get("forwards_graph")
    if g and f:
        fwd = f["graph_ms"] if f["graph_ms"] > 0 else f["student_ms"] + f["teacher_ms"]
        loop = g["graph_ms"] if g["graph_ms"] > 0 else g["median_ms"] - g["other_ms"]
        g["outside_forwards_pct"] = 100.0 * max(g["median_ms"] - fwd, 0.0) / g["median_ms"]
        out["a_outside_forwards_loop_pct"] = 100.0 * max(loop - fwd, 0.0) / loop
        out["a_outside_forwards_call_pct"] = g["outside_forwards_pct"]
        out["a_pass"] = out["a_outside_forwards_loop_pct"] <= 3.0
    if g and "eager" in by:
        out["b_speedup_vs_eager"] = by["eager"]["median_ms"] / g["median_ms"]
        out["b_pass"] = out["b_speedup_vs_eager"] >= 2.0
    if g and "unguided_graph" in by and by.get("distpp", {}).get("student_ms"):
        d = by["distpp"]
        out["c_guided_over_unguided"] = g["median_ms"] / by["unguided_graph"]["median_ms"]
        out["c_bound"] = 1.0 + d["teacher_ms"] / d["student_ms"] + 0.02
        out["c_pass"] = out["c_guided_over_unguided"] <= out["c_bound"]
    return out


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """A PNG of stacked per-stage median ms per variant (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    for st in PLOT_STAGES:
        vals = [r.get(f"{st}_ms", 0.0) for r in rows]
        if any(vals):
            ax.barh(names, vals, left=left, label=st)
            left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.text(left[i], i, f" {r['median_ms']:.2f} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median ms per call (stages: medians over repeats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    from .telemetry import Telemetry

    tel = Telemetry(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if tel is not None:
            with tel.sampling():
                time_variants(variants, device, args.warmup, repeats, not args.no_progress, tel)
        else:
            time_variants(variants, device, args.warmup, repeats, progress=not args.no_progress)
    except DistppError as e:
        print(f"distpp.bench: {e}", file=sys.stderr)
        return 2
    rows = [v.summary(args.batch) for v in variants]
    env = environment(device)
    r = ratios(rows)
    targets = graph_metrics(rows)
    models, runners = settings.pop("_models"), settings.pop("_runners")
    settings["compile_s"] = sum(getattr(m, "compile_s", 0.0) for m in models)
    settings["graph_capture_s"] = sum(rn.stats.capture_s for rn in runners.values())
    if tel is not None:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        # the sampling window spans warm-ups (and graph captures) too: divide by every image made in it
        telemetry = tel.summary(images=args.batch * (args.warmup + repeats) * len(variants), peak_allocated_mb=peak)
    else:
        telemetry = {"available": False, "reason": f"no NVML telemetry on device type {device.type!r}"}
    print(f"distpp.bench  preset={settings['preset']} family={settings['family']} steps={settings['steps']} "
          f"G={settings['guided_steps']} lam={settings['lam']} cfg={settings['cfg']} batch={settings['batch']} "
          f"dtype={settings['dtype']} ops={settings['kernel_impl']}  device={env['device_name']} "
          f"(model build {build_s:.1f} s, {repeats} repeats)")
    print(format_table(rows))
    print("  ".join(f"{k} = {v:.3f}" for k, v in r.items()))
    if targets:
        print(("targets (defined for a GPU; CPU figures only exercise the code): " if device.type != "cuda" else
               "targets: ") + "  ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                      for k, v in targets.items()))
    if settings["compile_s"] or settings["graph_capture_s"] or settings["backend_build_s"]:
        print(f"compile {settings['compile_s']:.1f} s, graph capture {settings['graph_capture_s']:.2f} s, "
              f"backend build {settings['backend_build_s']:.1f} s (not in the timings)")
    print("telemetry: " + ("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in telemetry.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "settings": settings, "build_s": build_s, "rows": rows, "ratios": r,
                       "targets": targets, "telemetry": telemetry}, f, indent=1)
    if args.plot:
        try:
            write_plot(rows, args.plot, f"{settings['preset']} {settings['dtype']} B={settings['batch']} "
                       f"steps={settings['steps']} G={settings['guided_steps']} backend={settings['backend']} "
                       f"on {env['device_name']}")
        except ImportError:
            print("--plot skipped: matplotlib is not installed (pip install 'distpp[plot]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

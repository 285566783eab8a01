"""The command line: arguments, one run (build, time, summarize) and its output; errors as one line."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..errors import ConfigError, DistppError
from . import common, e2e, latent
from .common import MAX_BATCH, environment, resolve_device_dtype
from .report import noisy_warnings, report, speedups, write_plot


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line on stderr, exit code 2 (it prints the whole usage block otherwise)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    from ..pipeline import KNOWN_PAIRS, STUDENT_KINDS

    p = _Parser(prog="python -m distpp.bench",
                                description="guided-sampling latency of distpp against baselines run in the same process")
    p.add_argument("--preset", default="tiny", help="tiny (default), tiny_xl, sd15, sdxl; flow transformers tiny_sd3, "
                   "tiny_flux, sd35, flux (their family, schedule and teacher from the preset) (--pipeline: tiny, sd15)")
    p.add_argument("--weights", default=None, help="local folder with student/ and teacher/ UNets (else random)")
    p.add_argument("--family", default=None, help="student family: lcm (default; flow presets: flow), dmd2, euler, "
                   "euler_a, ddim")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guided-steps", type=int, default=1)
    p.add_argument("--lam", type=float, default=None, help="proximal weight (default: the family's)")
    p.add_argument("--cfg", type=float, default=None, help="teacher guidance scale w: CFG, or an embedded-guidance "
                   "teacher's input (default: the preset's, else 7.5)")
    p.add_argument("--batch", type=int, default=1, help=f"images per call, 1..{MAX_BATCH}")
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--kernel-impl", default="auto", help="auto, torch, triton, cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 20 GPU / 5 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=None, help="comma-separated subset (default: unguided,distpp,eager,research; "
                   "with --pipeline: " + ",".join(e2e.PIPELINE_VARIANTS) + ")")
    p.add_argument("--force", action="store_true", help="build large presets on CPU anyway")
    p.add_argument("--backend", default="eager", help="UNet backend of the distpp variants: eager (default), compile, "
                   "onnxruntime, tensorrt (distpp.backends)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode with --backend compile: default, "
                   "max-autotune-no-cudagraphs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --backend compile: "
                   "inductor; aot_eager / eager trace without codegen (fast, to test the plumbing)")
    p.add_argument("--graphs", default="off", choices=("on", "off"),
                   help="on: also run the distpp variants through whole-loop CUDA graphs (distpp.graphs); "
                   "latent mode (--pipeline runs distpp_graph unless --variants leaves it out)")
    g = p.add_argument_group("end to end (--pipeline)")
    g.add_argument("--pipeline", action="store_true", help="time prompt -> image (encode, loop, decode) against "
                   "diffusers' own unguided pipeline; default model: a tiny random SD1.5-style LCM pipeline")
    g.add_argument("--pair", default=None, choices=sorted(KNOWN_PAIRS), help="a known student/teacher pair (README)")
    g.add_argument("--student", default=None, help="student: folder or Hub id (as distpp.generate)")
    g.add_argument("--teacher", default=None, help="teacher: a diffusers pipeline folder or Hub id")
    g.add_argument("--student-kind", default="auto", choices=STUDENT_KINDS,
                   help="auto (default), pipeline, unet, unet_file, lora")
    g.add_argument("--student-weights", default=None, help="file inside --student (UNet state dict or LoRA)")
    g.add_argument("--negative-prompt", default="", help="the teacher's CFG negative prompt (default empty)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the per-stage latency breakdown")
    p.add_argument("--json", default=None, metavar="PATH", help="write result rows as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_args(args) -> None:
    """ConfigError (one line, CLI spelling) for out-of-range numbers, before anything is built."""
    for name, v, lo, hi in (("--batch", args.batch, 1, MAX_BATCH), ("--repeats", args.repeats, 1, None),
                            ("--warmup", args.warmup, 0, None), ("--threads", args.threads, 1, None)):
        if v is not None and (v < lo or (hi is not None and v > hi)):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{name} must be {rng}, got {v}")
    if not args.pipeline and (args.pair or args.student or args.teacher):
        raise ConfigError("--pair / --student / --teacher time the end-to-end pipeline: add --pipeline")


def _is_alloc_error(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(e, MemoryError) or (oom is not None and isinstance(e, oom)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run(args) -> dict:
    """Build, time and summarize one run; returns the JSON document (printing is main's)."""
    from ..presets import build_preset
    from ..telemetry import Telemetry

    check_args(args)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    t0 = time.perf_counter()
    if args.pipeline:
        variants, settings = e2e.build_pipeline_variants(args, device, dtype)
    else:
        pair = build_preset(args.preset, device=device, dtype=dtype, weights=args.weights, force=args.force)
        variants, settings = latent.build_variants(args, pair, device, dtype)
    build_s = time.perf_counter() - t0
    tel = Telemetry(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if tel is not None:
        with tel.sampling():
            common.time_variants(variants, device, args.warmup, repeats, not args.no_progress, tel)
    else:
        common.time_variants(variants, device, args.warmup, repeats, progress=not args.no_progress)
    rows = [v.summary(args.batch, end_to_end=args.pipeline) for v in variants]
    runtimes, runners = settings.pop("_runtimes"), settings.pop("_runners")
    settings["compile_s"] = sum(getattr(m, "compile_s", 0.0) for rt in runtimes for m in (rt.student, rt.teacher))
    settings["graph_capture_s"] = sum(rt.stats.capture_s for rt in runtimes) + sum(r.stats.capture_s for r in runners)
    settings["repeats"], settings["warmup"], settings["threads"] = repeats, args.warmup, torch.get_num_threads()
    for r in runners:
        r.clear()
    for rt in runtimes:  # graphs, pools, engines and sessions go before the process does other work
        rt.close()
    if tel is not None:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        # the sampling window spans warm-ups (and graph captures) too: divide by every image made in it
        telemetry = tel.summary(images=args.batch * (args.warmup + repeats) * len(variants), peak_allocated_mb=peak)
    else:
        telemetry = {"available": False, "reason": f"no NVML telemetry on device type {device.type!r}"}
    if args.pipeline:
        ups, ratios, targets = speedups(rows, e2e.PIPELINE_SPEEDUPS, ("total", "loop")), {}, \
            e2e.pipeline_targets(rows)
    else:
        ups, ratios, targets = speedups(rows, latent.LATENT_SPEEDUPS), latent.time_ratios(rows), \
            latent.graph_metrics(rows)
    return {"env": environment(device), "settings": settings, "build_s": build_s, "rows": rows,
            "speedup_convention": "speed-up = baseline ms / distpp ms (> 1: distpp is faster)", "speedups": ups,
            "time_ratios": ratios, "targets": targets, "warnings": noisy_warnings(rows), "telemetry": telemetry}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        doc = run(args)
    except DistppError as e:
        msg = _first_line(e)
        if args.pipeline:  # Pipeline messages name from_pretrained's keywords: say them as options
            from ..generate import cli_message

            msg = cli_message(msg)
        print(f"distpp.bench: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - allocation failures only, re-raised otherwise
        if not _is_alloc_error(e):
            raise
        print(f"distpp.bench: out of memory at --batch {args.batch} ({_first_line(e)}); pass a smaller --batch",
              file=sys.stderr)
        return 2
    print(report(doc))
    for w in doc["warnings"]:
        print(f"distpp.bench: warning: {w}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        s = doc["settings"]
        try:
            write_plot(doc["rows"], args.plot, f"{s.get('model', s['preset'])} {s['dtype']} B={s['batch']} "
                       f"steps={s['steps']} G={s['guided_steps']} backend={s['backend']} on {doc['env']['device_name']}")
        except ImportError:
            print("--plot skipped: matplotlib is not installed (pip install 'distpp[plot]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m distpp.bench``: guided-sampling latency of distpp against baselines run in the same process.

One speed convention everywhere (table, JSON, README): **speed-up = baseline ms / distpp ms**, so > 1
means distpp is faster. Cost ratios (what guidance costs over the plain student) are named as time
ratios ("guided/unguided time ratio" = guided ms / unguided ms).

Latent loop (default): the sampling loop on latents, per stage (student forward, teacher forward,
guidance math, scheduler math, other), median and p90 over repeats, images/s, and the share of time
outside model forwards. Variants, all on the same models, seeds and settings:
  unguided   distpp, guided_steps = 0 (the plain student)        } sampled through a distpp Runtime
  distpp     distpp guided (fused ops, no host math in the loop) } (graphs off; ``--backend``)
  eager      the idiomatic diffusers way (distpp.baselines): the fair baseline } outside the Runtime
  research   the research code's way (batch-2B student, autograd on, host math) } on purpose
With ``--graphs on``, through a Runtime with graphs on, warmed before timing (whole-loop CUDA graphs on a
GPU, timed per replay as stage "graph"; eager over static buffers on a CPU):
  distpp_graph    distpp guided
  unguided_graph  distpp unguided
  forwards_graph  the model forwards of the guided loop alone (no-op fused ops, a GraphRunner over the
                  Runtime's sampler): the yardstick for the time outside model forwards under graphs
and the issue's targets are evaluated (a: time outside forwards <= 3% of the loop; b: distpp_graph >= 2x
faster than eager; c: guided/unguided <= 1 + teacher forward / student loop + 0.02).

End to end (``--pipeline``): prompt -> image per stage (text encode, loop, VAE decode), with a tiny
random-weight SD1.5-style LCM pipeline built in memory by default (``--preset sd15``: the SD1.5
architecture with CLIP-L and the SD1.5 VAE, random weights), or any pair by path (``--student
--teacher --family``, or ``--pair``). Variants, from the very same modules:
  diffusers_unguided  diffusers' own pipeline for the student alone (LatentConsistencyModelPipeline for
                      an SD1.5 LCM; else the SD/SDXL pipeline with the student's scheduler), its own loop
  eager_guided        the eager guided baseline loop inside the Pipeline's encode / decode
  distpp              distpp.Pipeline, graphs off
  distpp_graph        distpp.Pipeline, graphs on, warmed before timing
Every timed call of every variant encodes prompts no call has encoded before ("a photo of object {i}"),
so no variant skips encoding through the Pipeline's prompt cache.

Timing: CUDA events on a GPU, perf_counter on a CPU; warm-up first, variants interleaved; a variant whose
p90 exceeds 1.5x its median is reported with a warning (a shared or busy machine). NVML telemetry
(distpp.telemetry) is sampled while timing on a GPU.
"""

from __future__ import annotations

import argparse
import itertools
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
from .dtypes import dtype_name, parse_dtype
from .errors import ConfigError, DistppError
from .timing import STAGES, StageTimer

GRAPH_VARIANTS = ("distpp_graph", "unguided_graph", "forwards_graph")
LATENT_VARIANTS = ("unguided", "distpp", "eager", "research") + GRAPH_VARIANTS
PIPELINE_VARIANTS = ("diffusers_unguided", "eager_guided", "distpp", "distpp_graph")
PLOT_STAGES = STAGES + ("graph",)
E2E_STAGES = ("encode", "loop", "decode")
MAX_BATCH = 1024  # a latency bench; far past what one device call serves
NOISY_P90 = 1.5  # p90 / median above which a variant's timings are flagged as noisy

# (variant, baseline) pairs whose speed-up (baseline ms / variant ms) is reported.
LATENT_SPEEDUPS = (("distpp", "eager"), ("distpp", "research"), ("distpp_graph", "eager"),
                   ("distpp_graph", "distpp"))
PIPELINE_SPEEDUPS = (("distpp", "eager_guided"), ("distpp_graph", "eager_guided"), ("distpp", "diffusers_unguided"),
                     ("distpp_graph", "diffusers_unguided"), ("distpp_graph", "distpp"))
# (guided, unguided, name): cost ratios, guided ms / unguided ms.
TIME_RATIOS = (("distpp", "unguided", "guided/unguided time ratio"),
               ("distpp_graph", "unguided_graph", "graph guided/unguided time ratio"))


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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distpp.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="tiny (default), tiny_xl, sd15, sdxl (--pipeline: tiny, sd15)")
    p.add_argument("--weights", default=None, help="local folder with student/ and teacher/ UNets (else random)")
    p.add_argument("--family", default=None, help="student family: lcm (default), dmd2, euler, euler_a, ddim")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guided-steps", type=int, default=1)
    p.add_argument("--lam", type=float, default=None, help="proximal weight (default: the family's)")
    p.add_argument("--cfg", type=float, default=7.5, help="teacher CFG scale")
    p.add_argument("--batch", type=int, default=1, help=f"images per call, 1..{MAX_BATCH}")
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--kernel-impl", default="auto", help="auto, torch, triton, cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 20 GPU / 5 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=None, help="comma-separated subset (default: unguided,distpp,eager,research; "
                   "with --pipeline: " + ",".join(PIPELINE_VARIANTS) + ")")
    p.add_argument("--force", action="store_true", help="build large presets on CPU anyway")
    p.add_argument("--backend", default="eager", help="UNet backend of the distpp variants: eager (default), compile, "
                   "onnxruntime, tensorrt (distpp.backends)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode with --backend compile: default, "
                   "max-autotune-no-cudagraphs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --backend compile: "
                   "inductor; aot_eager / eager trace without codegen (fast, to test the plumbing)")
    p.add_argument("--graphs", default="off", choices=("on", "off"),
                   help="on: also run the distpp variants through whole-loop CUDA graphs (distpp.graphs)")
    e2e = p.add_argument_group("end to end (--pipeline)")
    e2e.add_argument("--pipeline", action="store_true", help="time prompt -> image (encode, loop, decode) against "
                     "diffusers' own unguided pipeline; default model: a tiny random SD1.5-style LCM pipeline")
    e2e.add_argument("--pair", default=None, help="a known student/teacher pair (distpp.pipeline.KNOWN_PAIRS)")
    e2e.add_argument("--student", default=None, help="student: folder or Hub id (as distpp.generate)")
    e2e.add_argument("--teacher", default=None, help="teacher: a diffusers pipeline folder or Hub id")
    e2e.add_argument("--student-kind", default="auto", help="auto (default), pipeline, unet, unet_file, lora")
    e2e.add_argument("--student-weights", default=None, help="file inside --student (UNet state dict or LoRA)")
    e2e.add_argument("--negative-prompt", default="", help="the teacher's CFG negative prompt (default empty)")
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


def _selected(args, known: tuple[str, ...], default: str) -> list[str]:
    names = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
    if not args.pipeline and args.graphs == "on":
        names += [n for n in GRAPH_VARIANTS if n not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; pass a subset of {', '.join(known)}")
    return names


def _backend_options(args) -> dict:
    if args.backend != "compile":
        return {}
    from .backends.compile import CompileConfig

    return {"compile": CompileConfig(mode=args.compile_mode, backend=args.compile_backend)}


def sampler_config(args, family: str | None = None) -> SamplerConfig:
    return SamplerConfig(family=family or args.family or "lcm", steps=args.steps, guided_steps=args.guided_steps,
                         lam=args.lam, cfg=args.cfg, kernel_impl=args.kernel_impl)


# ------------------------------------------------------------------------------------------------------
# Latent loop.
# ------------------------------------------------------------------------------------------------------
def build_variants(args, pair, device, dtype) -> tuple[list[Variant], dict]:
    """The latent-loop variants (module docstring) and the run's settings."""
    from .baselines import BaselineSampler
    from .graphs import GraphRunner, noop_ops
    from .runtime import CondSpec, Runtime

    names = _selected(args, LATENT_VARIANTS, "unguided,distpp,eager,research")
    B, info = args.batch, pair.info
    cond, uncond = pair.random_cond(B)
    shape, seeds = info.latent_shape, list(range(B))
    guided_cfg = sampler_config(args)
    plain = {"guided_steps": 0}
    spec = CondSpec(info.tokens, info.width, pooled=info.pooled, time_ids=6 if info.pooled else None)
    options = _backend_options(args)

    def runtime(graphs: bool) -> Runtime:
        return Runtime(pair.student, pair.teacher, cond_spec=spec, config=guided_cfg, backend=args.backend,
                       graphs=graphs, batch_sizes=(B,), resolutions=(tuple(shape[1:]),), device=device, dtype=dtype,
                       backend_options=options, label=args.preset)

    runtimes = {}
    if {"unguided", "distpp"} & set(names):
        runtimes["eager"] = runtime(False)
    if set(GRAPH_VARIANTS) & set(names):
        runtimes["graphs"] = runtime(True)
    # the eager and research baselines run the eager UNets, outside the Runtime, on purpose
    baselines = {n: BaselineSampler(pair.student, pair.teacher, guided_cfg, device=device, dtype=dtype,
                                    research=n == "research") for n in ("eager", "research") if n in names}
    guided_kw = dict(uncond=uncond, latent_shape=shape, seeds=seeds)
    plain_kw = dict(latent_shape=shape, seeds=seeds)
    forwards = None
    if "graphs" in runtimes:
        rt = runtimes["graphs"]
        rt.warmup([guided_cfg, plain], progress=False)
        forwards = GraphRunner(rt.sampler(guided_cfg), graphs=True, ops=noop_ops(), model=rt.label,
                               backend=rt.backend)
        forwards.warmup(cond, batch_sizes=[B], uncond=uncond, latent_shape=shape)
    eager, graphs = runtimes.get("eager"), runtimes.get("graphs")
    makers = {
        "unguided": lambda tm: eager.sample(plain, cond, timer=tm, **plain_kw),
        "distpp": lambda tm: eager.sample(guided_cfg, cond, timer=tm, **guided_kw),
        "eager": lambda tm: baselines["eager"].sample(cond, uncond, shape, seeds, timer=tm),
        "research": lambda tm: baselines["research"].sample(cond, uncond, shape, seeds, timer=tm),
        "distpp_graph": lambda tm: graphs.sample(guided_cfg, cond, timer=tm, **guided_kw),
        "unguided_graph": lambda tm: graphs.sample(plain, cond, timer=tm, **plain_kw),
        "forwards_graph": lambda tm: forwards.sample(cond, timer=tm, **guided_kw),
    }
    any_rt = next(iter(runtimes.values()), None)
    settings = {"mode": "latent", "preset": args.preset, "family": guided_cfg.family, "steps": args.steps,
                "guided_steps": args.guided_steps, "lam": guided_cfg.resolved_lam, "cfg": args.cfg, "batch": B,
                "dtype": dtype_name(dtype), "latent_shape": list(shape),
                "kernel_impl": any_rt.sampler(guided_cfg).ops.name if any_rt else args.kernel_impl,
                "backend": any_rt.backend if any_rt else args.backend, "graphs": args.graphs,
                "cuda_graphs": graphs.stats.cuda_graphs if graphs else False,
                "backend_build_s": sum(r.stats.build_s for r in runtimes.values() if r.backend != "eager"),
                "_runtimes": list(runtimes.values()), "_runners": [forwards] if forwards else []}
    return [Variant(n, makers[n]) for n in names], settings


# ------------------------------------------------------------------------------------------------------
# End to end: prompt -> image.
# ------------------------------------------------------------------------------------------------------
@dataclass
class PipelineSource:
    """The modules one end-to-end run shares between every variant."""

    student_unet: object
    teacher_unet: object
    vae: object
    student_text: object  # distpp PromptEncoder
    teacher_text: object | None
    config: SamplerConfig
    w_embed: float
    force_zeros: bool
    label: str


def _random_source(args, device, dtype) -> PipelineSource:
    from .pipeline import PromptEncoder
    from .presets import random_pipeline_parts

    if args.family not in (None, "lcm"):
        raise ConfigError(f"the built-in --pipeline models are LCM students; --family {args.family} needs "
                          "--student/--teacher (or --pair)")
    parts = random_pipeline_parts(args.preset, device=device, dtype=dtype, force=args.force)
    return PipelineSource(parts.student_unet, parts.teacher_unet, parts.vae,
                          PromptEncoder([parts.tokenizer], [parts.text_encoder]), None, sampler_config(args, "lcm"),
                          7.5, False, f"random {args.preset}")


def _loaded_source(args, device, dtype) -> PipelineSource:
    from . import generate
    from .pipeline import Pipeline

    ns = argparse.Namespace(pair=args.pair, student=args.student, teacher=args.teacher, family=args.family,
                            steps=args.steps, guided_steps=args.guided_steps, lam=args.lam, cfg=args.cfg,
                            student_weights=args.student_weights, vae=None, upcast_vae=None, offline=None,
                            device=str(device), dtype=None, student_kind=args.student_kind)
    kw = generate.resolve(ns)
    kw.update(dtype=dtype, kernel_impl=args.kernel_impl)
    pipe = Pipeline.from_pretrained(**kw, graphs=False)
    return PipelineSource(pipe.student.unet, pipe.teacher.unet, pipe.vae, pipe.student_text, pipe.teacher_text,
                          pipe.config, pipe.student.w_embed, pipe.force_zeros_for_empty_prompt,
                          args.pair or f"{args.student} <- {args.teacher}")


def diffusers_student_pipeline(src: PipelineSource, device):
    """diffusers' own text-to-image pipeline for the student alone, on the very same modules: the LCM
    pipeline for an SD1.5-style LCM student, else the SD / SDXL pipeline with the family's scheduler.
    Returns (pipeline, guidance_scale): with it no student CFG runs (an LCM's w-embedding gets w_embed)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from .schedules import make_scheduler

    cfg = src.config
    sched = make_scheduler(cfg.family, cfg.scheduler_config, cfg.prediction_type)
    text = src.student_text
    unet = src.student_unet
    lcm_embedding = getattr(unet.config, "time_cond_proj_dim", None) is not None
    # diffusers runs CFG only when guidance_scale > 1 and the UNet has no w-embedding; an LCM's
    # embedding gets guidance_scale - 1 = w_embed, as distpp's UNetDenoiser passes it.
    scale = src.w_embed + 1.0 if lcm_embedding else 1.0
    if text.sdxl:
        pipe = StableDiffusionXLPipeline(vae=src.vae, text_encoder=text.encoders[0], text_encoder_2=text.encoders[1],
                                         tokenizer=text.tokenizers[0], tokenizer_2=text.tokenizers[1], unet=unet,
                                         scheduler=sched, force_zeros_for_empty_prompt=src.force_zeros,
                                         add_watermarker=False)
    else:
        common = dict(vae=src.vae, text_encoder=text.encoders[0], tokenizer=text.tokenizers[0], unet=unet,
                      scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        cls = LatentConsistencyModelPipeline if cfg.family == "lcm" else StableDiffusionPipeline
        pipe = cls(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), scale


class _DiffusersStages:
    """Stage laps inside one diffusers pipeline call: "encode" when its ``encode_prompt`` returns (this
    instance's method is wrapped; nothing global changes), "loop" at each step's end (its
    ``callback_on_step_end``); the caller laps "decode" when the call returns (VAE decode + postprocess)."""

    def __init__(self, pipe):
        self.timer = None
        encode = pipe.encode_prompt

        def encode_prompt(*a, **k):
            out = encode(*a, **k)
            self.timer.lap("encode")
            return out

        pipe.encode_prompt = encode_prompt

    def step_end(self, pipe, step, timestep, tensors):
        self.timer.lap("loop")
        return tensors


def check_pipeline_imports() -> None:
    """BackendUnavailableError naming every missing package ``--pipeline`` needs, before anything loads."""
    import importlib

    from .errors import BackendUnavailableError

    missing = []
    for name in ("diffusers", "transformers", "tokenizers"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    if missing:
        raise BackendUnavailableError(f"--pipeline needs diffusers, transformers and tokenizers; missing: "
                                      f"{'; '.join(missing)}. pip install 'distpp[pipeline]' (offline: their wheels)")


def build_pipeline_variants(args, device, dtype) -> tuple[list[Variant], dict]:
    """The end-to-end variants (module docstring) and the run's settings."""
    check_pipeline_imports()
    from .baselines import BaselineSampler
    from .denoiser import UNetDenoiser
    from .pipeline import Pipeline

    names = _selected(args, PIPELINE_VARIANTS, ",".join(PIPELINE_VARIANTS))
    src = _loaded_source(args, device, dtype) if (args.pair or args.student or args.teacher) \
        else _random_source(args, device, dtype)
    B, neg = args.batch, args.negative_prompt
    seeds = list(range(B))
    counter = itertools.count()

    def prompts() -> list[str]:  # never seen before by any variant: every call encodes
        return [f"a photo of object {next(counter)}" for _ in range(B)]

    def pipeline(graphs: bool) -> Pipeline:
        return Pipeline(src.student_unet, src.teacher_unet, src.vae, src.student_text, src.teacher_text,
                        config=src.config, device=device, dtype=dtype, w_embed=src.w_embed,
                        force_zeros_for_empty_prompt=src.force_zeros, backend=args.backend, graphs=graphs,
                        batch_sizes=(B,), backend_options=_backend_options(args))

    pipes = {"distpp": pipeline(False)}
    if "distpp_graph" in names:
        pipes["distpp_graph"] = pipeline(True)
    ref = pipes["distpp"]
    height = width = ref.default_size
    f = ref.vae_scale_factor
    latent_shape = (ref.latent_channels, height // f, width // f)
    if "distpp_graph" in names:
        pipes["distpp_graph"].warmup(progress=False)  # the native size at batch B: captured before timing

    def distpp_run(pipe):
        return lambda tm: pipe(prompts(), negative_prompt=neg, seeds=seeds, output_type="pt", timer=tm)

    makers = {n: distpp_run(p) for n, p in pipes.items()}
    if "eager_guided" in names:
        if src.teacher_text is not None:
            raise ConfigError("the eager_guided baseline conditions the teacher on the student's text encoders; this "
                              "pair has its own teacher encoders: leave eager_guided out of --variants")
        base = BaselineSampler(UNetDenoiser(src.student_unet, w_embed=src.w_embed), UNetDenoiser(src.teacher_unet),
                               src.config, device=device, dtype=dtype)

        def eager_guided(tm):
            c = ref.encode(prompts(), [neg] * B, height, width)
            tm.lap("encode")
            latents = base.sample(c["cond"], c["uncond"], latent_shape, seeds, timer=tm)
            images = ref.decode(latents)
            tm.lap("decode")
            return images

        makers["eager_guided"] = eager_guided
    if "diffusers_unguided" in names:
        dpipe, scale = diffusers_student_pipeline(src, device)
        hooks = _DiffusersStages(dpipe)
        gen_device = "cpu" if device.type == "cpu" else device
        timesteps = list(src.config.timesteps) if src.config.timesteps is not None else None

        def diffusers_unguided(tm):
            hooks.timer = tm
            gens = [torch.Generator(gen_device).manual_seed(s) for s in seeds]
            images = dpipe(prompt=prompts(), num_inference_steps=src.config.steps, timesteps=timesteps,
                           guidance_scale=scale, height=height, width=width, generator=gens, output_type="pt",
                           callback_on_step_end=hooks.step_end).images
            tm.lap("decode")
            return images

        makers["diffusers_unguided"] = diffusers_unguided
    cfg = src.config
    settings = {"mode": "pipeline", "model": src.label, "preset": args.preset, "family": cfg.family,
                "steps": cfg.steps, "guided_steps": cfg.guided_steps, "lam": cfg.resolved_lam, "cfg": cfg.cfg,
                "batch": B, "dtype": dtype_name(dtype), "height": height, "width": width,
                "latent_shape": list(latent_shape), "kernel_impl": ref.sampler().ops.name, "backend": args.backend,
                "graphs": "on" if "distpp_graph" in names else "off", "negative_prompt": neg,
                "_runtimes": [p.runtime for p in pipes.values()], "_runners": []}
    settings["cuda_graphs"] = pipes["distpp_graph"].runtime.stats.cuda_graphs if "distpp_graph" in pipes else False
    settings["backend_build_s"] = sum(p.runtime.stats.build_s for p in pipes.values()) if args.backend != "eager" \
        else 0.0
    return [Variant(n, makers[n]) for n in names], settings


# ------------------------------------------------------------------------------------------------------
# Timing and reporting.
# ------------------------------------------------------------------------------------------------------
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


def format_table(rows: list[dict], end_to_end: bool = False) -> str:
    if end_to_end:
        cols = ["variant", "median_ms", "p90_ms", "images_per_s"] + [f"{s}{p}_ms" for s in E2E_STAGES
                                                                     for p in ("", "_p90")]
        head = ["variant", "median ms", "p90 ms", "img/s"] + [f"{s}{p}" for s in E2E_STAGES for p in ("", " p90")]
        cols += ["energy_per_image_j", "power_w"]
        head += ["J/img", "W"]
        first = 18
    else:
        cols = ["variant", "median_ms", "p90_ms", "images_per_s", "student_ms", "teacher_ms", "guidance_ms",
                "scheduler_ms", "other_ms", "graph_ms", "outside_forwards_pct", "energy_per_image_j", "power_w"]
        head = ["variant", "median ms", "p90 ms", "img/s", "student", "teacher", "guidance", "sched", "other", "graph",
                "outside %", "J/img", "W"]
        first = 14
    lines = [" | ".join(f"{h:>{first}}" if i == 0 else f"{h:>10}" for i, h in enumerate(head))]
    for r in rows:
        cells = []
        for i, c in enumerate(cols):
            v = r.get(c)
            w = first if i == 0 else 10
            cells.append(f"{v:>{w}}" if isinstance(v, str) else f"{'n/a':>{w}}" if v is None else f"{v:>{w}.3f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def speedups(rows: list[dict], pairs, stages=("total",)) -> list[dict]:
    """One entry per (variant, baseline, stage) present: speed-up = baseline ms / variant ms (> 1: the
    variant is faster). stage "total" compares whole calls (median_ms), others their ``<stage>_ms``."""
    by = {r["variant"]: r for r in rows}
    out = []
    for variant, baseline in pairs:
        if variant not in by or baseline not in by:
            continue
        for st in stages:
            col = "median_ms" if st == "total" else f"{st}_ms"
            b, v = by[baseline][col], by[variant][col]
            if v > 0:
                out.append({"name": f"{variant} vs {baseline}" + ("" if st == "total" else f" ({st})"),
                            "variant": variant, "baseline": baseline, "stage": st, "baseline_ms": b,
                            "variant_ms": v, "speedup": b / v})
    return out


def time_ratios(rows: list[dict]) -> dict:
    med = {r["variant"]: r["median_ms"] for r in rows}
    return {name: med[a] / med[b] for a, b, name in TIME_RATIOS if a in med and b in med}


def noisy_warnings(rows: list[dict]) -> list[str]:
    """A message per variant whose p90 exceeds NOISY_P90 x its median (the row is marked ``noisy``)."""
    out = []
    for r in rows:
        r["noisy"] = r["p90_ms"] > NOISY_P90 * r["median_ms"]
        if r["noisy"]:
            out.append(f"{r['variant']}: p90 {r['p90_ms']:.2f} ms is {r['p90_ms'] / r['median_ms']:.2f}x its median "
                       f"{r['median_ms']:.2f} ms (> {NOISY_P90}x): noisy timings, e.g. a shared or busy machine; "
                       "compare medians with care, pin --threads or raise --repeats")
    return out


def graph_metrics(rows: list[dict]) -> dict:
    """Fill the graph rows' time outside forwards from forwards_graph and evaluate the issue's targets.

    a: loop time outside model forwards under graphs, 100 * (replay(distpp) - replay(forwards)) / replay(distpp),
       <= 3 (and per call, prepare and copies included, reported beside it);
    b: speed-up of distpp_graph vs eager (eager ms / distpp_graph ms) >= 2;
    c: distpp_graph / unguided_graph time ratio <= 1 + teacher_ms / student_ms (from the eager distpp row) + 0.02.
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


def pipeline_targets(rows: list[dict]) -> dict:
    """The end-to-end targets (SD1.5 512 fp16, 4 steps + 1 guided, batch 1, on a GPU): the Pipeline's loop
    >= 2.5x faster than the eager guided baseline's (end to end beside it), and distpp's guided Pipeline
    end to end faster than diffusers' own unguided student pipeline. distpp_graph, else distpp."""
    by = {r["variant"]: r for r in rows}
    d = by.get("distpp_graph") or by.get("distpp")
    out: dict = {}
    if d is None:
        return out
    out["distpp_variant"] = d["variant"]
    if "eager_guided" in by:
        e = by["eager_guided"]
        out["loop_speedup_vs_eager_guided"] = e["loop_ms"] / d["loop_ms"]
        out["loop_pass"] = out["loop_speedup_vs_eager_guided"] >= 2.5
        out["e2e_speedup_vs_eager_guided"] = e["median_ms"] / d["median_ms"]
    if "diffusers_unguided" in by:
        out["e2e_speedup_vs_diffusers_unguided"] = by["diffusers_unguided"]["median_ms"] / d["median_ms"]
        out["e2e_vs_diffusers_pass"] = out["e2e_speedup_vs_diffusers_unguided"] > 1.0
    return out


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """A PNG of stacked per-stage median ms per variant (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    for st in PLOT_STAGES + E2E_STAGES:
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


def _is_alloc_error(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(e, MemoryError) or (oom is not None and isinstance(e, oom)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _run(args) -> dict:
    """Build, time and summarize one run; returns the JSON document (printing is main's)."""
    from .presets import build_preset
    from .telemetry import Telemetry

    check_args(args)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    t0 = time.perf_counter()
    if args.pipeline:
        variants, settings = build_pipeline_variants(args, device, dtype)
    else:
        pair = build_preset(args.preset, device=device, dtype=dtype, weights=args.weights, force=args.force)
        variants, settings = build_variants(args, pair, device, dtype)
    build_s = time.perf_counter() - t0
    tel = Telemetry(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if tel is not None:
        with tel.sampling():
            time_variants(variants, device, args.warmup, repeats, not args.no_progress, tel)
    else:
        time_variants(variants, device, args.warmup, repeats, progress=not args.no_progress)
    rows = [v.summary(args.batch, end_to_end=args.pipeline) for v in variants]
    runtimes, runners = settings.pop("_runtimes"), settings.pop("_runners")
    settings["compile_s"] = sum(getattr(m, "compile_s", 0.0) for rt in runtimes for m in (rt.student, rt.teacher))
    settings["graph_capture_s"] = sum(rt.stats.capture_s for rt in runtimes) + sum(r.stats.capture_s for r in runners)
    settings["repeats"], settings["warmup"], settings["threads"] = repeats, args.warmup, torch.get_num_threads()
    if tel is not None:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        # the sampling window spans warm-ups (and graph captures) too: divide by every image made in it
        telemetry = tel.summary(images=args.batch * (args.warmup + repeats) * len(variants), peak_allocated_mb=peak)
    else:
        telemetry = {"available": False, "reason": f"no NVML telemetry on device type {device.type!r}"}
    if args.pipeline:
        ups, ratios, targets = speedups(rows, PIPELINE_SPEEDUPS, ("total", "loop")), {}, pipeline_targets(rows)
    else:
        ups, ratios, targets = speedups(rows, LATENT_SPEEDUPS), time_ratios(rows), graph_metrics(rows)
    return {"env": environment(device), "settings": settings, "build_s": build_s, "rows": rows,
            "speedup_convention": "speed-up = baseline ms / distpp ms (> 1: distpp is faster)", "speedups": ups,
            "time_ratios": ratios, "targets": targets, "warnings": noisy_warnings(rows), "telemetry": telemetry}


def report(doc: dict) -> str:
    """The printed report of one run: settings line, table, speed-ups, time ratios, targets, extras."""
    s, env, rows = doc["settings"], doc["env"], doc["rows"]
    e2e = s["mode"] == "pipeline"
    what = (f"end to end ({s['model']}, {s['height']}x{s['width']})" if e2e else f"latent loop preset={s['preset']}")
    lines = [f"distpp.bench  {what} family={s['family']} steps={s['steps']} G={s['guided_steps']} lam={s['lam']} "
             f"cfg={s['cfg']} batch={s['batch']} dtype={s['dtype']} ops={s['kernel_impl']} backend={s['backend']}  "
             f"device={env['device_name']} threads={env['cpu_threads']} (build {doc['build_s']:.1f} s, "
             f"{s['repeats']} repeats)", format_table(rows, end_to_end=e2e)]
    if doc["speedups"]:
        lines.append(doc["speedup_convention"] + ":")
        lines.append("  " + "  ".join(f"{u['name']} = {u['speedup']:.3f}" for u in doc["speedups"]))
    if doc["time_ratios"]:
        lines.append("cost of guidance: " + "  ".join(f"{k} = {v:.3f}" for k, v in doc["time_ratios"].items()))
    t = doc["targets"]
    if t:
        where = ("GPU, SD1.5 512 fp16, 4 steps + 1 guided, batch 1" if e2e else "GPU")
        lead = (f"targets (defined for a {where}; these figures only exercise the code): "
                if env["device_type"] != "cuda" else "targets: ")
        lines.append(lead + "  ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in t.items()))
    if s["compile_s"] or s["graph_capture_s"] or s["backend_build_s"]:
        lines.append(f"compile {s['compile_s']:.1f} s, graph capture {s['graph_capture_s']:.2f} s, "
                     f"backend build {s['backend_build_s']:.1f} s (not in the timings)")
    lines.append("telemetry: " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in doc["telemetry"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        doc = _run(args)
    except DistppError as e:
        print(f"distpp.bench: {_first_line(e)}", file=sys.stderr)
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

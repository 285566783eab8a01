"""The end-to-end bench (``--pipeline``): prompt -> image per stage (encode, loop, decode) for diffusers'
own unguided student pipeline, the eager guided baseline inside the Pipeline's encode/decode, and
distpp.Pipeline with graphs off and on, all on the very same modules."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..config import SamplerConfig
from ..dtypes import dtype_name
from ..errors import ConfigError
from .common import Variant, backend_options, sampler_config, selected

PIPELINE_VARIANTS = ("diffusers_unguided", "eager_guided", "distpp", "distpp_graph")
# (variant, baseline) pairs whose speed-up (baseline ms / variant ms) is reported, end to end and loop.
PIPELINE_SPEEDUPS = (("distpp", "eager_guided"), ("distpp_graph", "eager_guided"), ("distpp", "diffusers_unguided"),
                     ("distpp_graph", "diffusers_unguided"), ("distpp_graph", "distpp"))


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


def random_source(args, device, dtype) -> PipelineSource:
    from ..pipeline import PromptEncoder
    from ..presets import random_pipeline_parts

    if args.family not in (None, "lcm"):
        raise ConfigError(f"the built-in --pipeline models are LCM students; --family {args.family} needs "
                          "--student/--teacher (or --pair)")
    parts = random_pipeline_parts(args.preset, device=device, dtype=dtype, force=args.force)
    return PipelineSource(parts.student_unet, parts.teacher_unet, parts.vae,
                          PromptEncoder([parts.tokenizer], [parts.text_encoder]), None, sampler_config(args, "lcm"),
                          7.5, False, f"random {args.preset}")


def loaded_source(args, device, dtype) -> PipelineSource:
    """The modules of a pair loaded by ``Pipeline.from_pretrained``, its options read as distpp.generate
    reads them (one place turns --pair / --student / --teacher ... into from_pretrained's arguments)."""
    from .. import generate
    from ..pipeline import Pipeline

    argv = ["--prompt", "bench", "--device", str(device), "--dtype", dtype_name(dtype), "--backend", "eager",
            "--graphs", "off", "--student-kind", args.student_kind, "--batch-size", str(args.batch)]
    for flag, value in (("--pair", args.pair), ("--student", args.student), ("--teacher", args.teacher),
                        ("--family", args.family), ("--student-weights", args.student_weights),
                        ("--steps", args.steps), ("--guided-steps", args.guided_steps), ("--lam", args.lam),
                        ("--cfg", args.cfg)):
        if value is not None:
            argv += [flag, str(value)]
    kw = generate.resolve(generate.parse_args(argv))
    # loaded once, eager and without graphs: the bench composes its own Pipelines from these modules
    pipe = Pipeline.from_pretrained(**kw, kernel_impl=args.kernel_impl)
    return PipelineSource(pipe.student.unet, pipe.teacher.unet, pipe.vae, pipe.student_text, pipe.teacher_text,
                          pipe.config, pipe.student.w_embed, pipe.force_zeros_for_empty_prompt,
                          args.pair or f"{args.student} <- {args.teacher}")


def diffusers_student_pipeline(src: PipelineSource, device):
    """diffusers' own text-to-image pipeline for the student alone, on the very same modules: the LCM
    pipeline for an SD1.5-style LCM student, else the SD / SDXL pipeline with the family's scheduler.
    Returns (pipeline, guidance_scale): with it no student CFG runs (an LCM's w-embedding gets w_embed)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..schedules import make_scheduler

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

    from ..errors import BackendUnavailableError

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
    from ..baselines import BaselineSampler
    from ..denoiser import UNetDenoiser
    from ..pipeline import Pipeline

    names = selected(args, PIPELINE_VARIANTS, ",".join(PIPELINE_VARIANTS))
    src = loaded_source(args, device, dtype) if (args.pair or args.student or args.teacher) \
        else random_source(args, device, dtype)
    B, neg = args.batch, args.negative_prompt
    seeds = list(range(B))
    counter = itertools.count()

    def prompts() -> list[str]:  # never seen before by any variant: every call encodes
        return [f"a photo of object {next(counter)}" for _ in range(B)]

    def pipeline(graphs: bool) -> Pipeline:
        return Pipeline(src.student_unet, src.teacher_unet, src.vae, src.student_text, src.teacher_text,
                        config=src.config, device=device, dtype=dtype, w_embed=src.w_embed,
                        force_zeros_for_empty_prompt=src.force_zeros, backend=args.backend, graphs=graphs,
                        batch_sizes=(B,), backend_options=backend_options(args))

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

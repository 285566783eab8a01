"""The text-to-image ``Pipeline``: encode prompts -> sample latents (through the Runtime) -> decode.

``Pipeline.from_pretrained`` runs in two phases: ``resolve`` (every config read and checked, no
weights: distpp.pipeline.resolve) then ``load`` (distpp.pipeline.load). Per call, prompts are encoded
once per distinct encoder set (LRU cache keyed by prompt text), the sampler loop runs on latents only,
and the VAE decodes after it (eagerly: no capture or compile of the decode).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..config import SamplerConfig
from ..denoiser import SDXL_TIME_IDS, Cond, UNetDenoiser, sdxl_time_ids
from ..errors import BackendUnavailableError, ConfigError, InputError
from ..runtime import CondSpec, Runtime, WarmupRecord
from ..sampler import Sampler
from ..transformer import FluxDenoiser, SD3Denoiser
from .encode import FluxPromptEncoder, PromptEncoder, SD3PromptEncoder
from .load import LoadReport, load
from .resolve import FLUX_SAMPLE_SIZE, check_pair_configs, check_transformer_configs, resolve

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class _Hooks:
    """A timer-shaped hook for the sampling loop: forwards every lap to ``timer`` and advances
    ``progress`` by one per student step (``steps`` at once for a graph replay, which laps only "graph")."""

    def __init__(self, timer, progress: Callable[[int], Any] | None, steps: int):
        self.timer, self.progress, self.steps = timer, progress, steps

    def lap(self, stage: str) -> None:
        if self.timer is not None:
            self.timer.lap(stage)
        if self.progress is not None and stage in ("student", "graph"):
            self.progress(1 if stage == "student" else self.steps)


class Pipeline:
    """prompt -> image with a guided student, sampling through one :class:`~distpp.runtime.Runtime`.

    Build with :meth:`from_pretrained`, or directly from loaded parts (student/teacher UNets, a VAE,
    PromptEncoders: ``teacher_text`` None means the student's encoders serve the teacher too), or from
    SD3 / FLUX transformers with SD3PromptEncoders / FluxPromptEncoders and family "flow". The
    runtime options (backend, graphs, batch_sizes, max_graphs, on_miss, backend_options, cache) are
    the Runtime's; ``sizes`` ((height, width) pixels, default the student's native size) are what it
    builds backends for and warms up.
    """

    def __init__(self, student_unet, teacher_unet, vae, student_text, teacher_text=None, *,
                 config: SamplerConfig | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, w_embed: float = 7.5,
                 force_zeros_for_empty_prompt: bool = False, report: LoadReport | None = None,
                 backend: str = "auto", graphs: bool | str = "auto", batch_sizes: Sequence[int] = (1,),
                 max_graphs: int = 8, on_miss: str = "eager", backend_options: dict | None = None, cache=None,
                 sizes: Sequence[tuple[int, int]] | None = None):
        self.config = config or SamplerConfig()
        self.device, self.dtype = torch.device(device), dtype
        self.student, self.teacher = _denoisers(student_unet, teacher_unet, student_text, teacher_text, w_embed)
        self.vae = vae
        self.student_text, self.teacher_text = student_text, teacher_text
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.latent_channels = int(self.student.spec.in_channels)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # pixels an image side must be a multiple of: the VAE factor x the transformer's patch (1 for UNets)
        self.size_multiple = self.vae_scale_factor * int(getattr(self.student, "spatial_multiple", 1))
        # FLUX transformer configs have no sample_size: FluxPipeline's default (128 latents) stands in
        sample = getattr(student_unet.config, "sample_size", None) or FLUX_SAMPLE_SIZE
        self.default_size = int(sample) * self.vae_scale_factor
        self.report = report
        sizes = [self.image_size(h, w) for h, w in sizes or [(None, None)]]
        self.runtime = Runtime(self.student, self.teacher, cond_spec=_cond_spec(student_text),
                               teacher_cond_spec=_cond_spec(teacher_text) if teacher_text is not None else None,
                               config=self.config, backend=backend, graphs=graphs, batch_sizes=batch_sizes,
                               resolutions=[(h // self.vae_scale_factor, w // self.vae_scale_factor) for h, w in sizes],
                               latent_channels=self.latent_channels,
                               max_graphs=max_graphs, on_miss=on_miss, device=self.device, dtype=dtype,
                               teacher_dtype=dtype, backend_options=backend_options, cache=cache, label="pipeline")

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, student: str, teacher: str, family: str, *, warmup: bool = False,
                        **kwargs) -> "Pipeline":
        """Load a student/teacher pair: every config is read and checked first, then the weights load.

        student, teacher:  local folders or Hub ids (teacher: a full diffusers pipeline).
        family:            the student's sampler family (lcm, dmd2, euler, euler_a, ddim, tcd; flow for SD3 / FLUX).
                           A teacher whose model_index.json lists a ``transformer`` is an SD3 / SD3.5 or FLUX.1
                           pipeline: family "flow", a full student pipeline (its scheduler config sets the
                           schedule), the flow options of diffusers' pipeline for it (SD3: timestep_scale 1000,
                           sigmas "scheduler"; FLUX: 1, "linspace"), CFG for SD3, embedded guidance for a
                           ``guidance_embeds`` FLUX teacher (FLUX.1-dev; cfg default 3.5, no uncond).
        max_sequence_length: T5 tokens of a prompt (transformer pipelines; diffusers' SD3 256, FLUX 512).
        student_kind:      auto (default) | pipeline | unet | unet_file | lora:
                           "pipeline": a full diffusers pipeline (e.g. SDXL-Turbo); its text encoders and VAE
                           are kept only when they differ from the teacher's (tokenizers or weights);
                           "unet": a UNet folder (config.json at the root or in ``student_subfolder``);
                           "unet_file": a UNet state-dict file ``student_weights`` in the teacher's UNet
                           architecture (SDXL-Lightning, DMD2), its shapes checked against that config;
                           "lora": a LoRA file on the teacher's weights (LCM-LoRA), kept as a fused copy.
        student_weights:   a file inside ``student`` (UNet state dict or LoRA).
        allow_family_mismatch: sample a student pipeline with a family that does not step with its own
                           scheduler class (default False: ConfigError naming the family that fits).
        vae:               another VAE (folder/Hub id or AutoencoderKL), e.g. "madebyollin/sdxl-vae-fp16-fix".
        upcast_vae:        decode in float32; default: when the model dtype is float16 and the VAE's config
                           says ``force_upcast`` (the SDXL VAE overflows in fp16), as diffusers does.
        lora_scale:        LoRA strength fused into the student copy (on top of the file's alpha / rank).
        device, dtype:     default cuda+float16 when a GPU is present, else cpu+float32.
        w_embed:           the LCM student's guidance-scale embedding input (diffusers' 8.5 - 1).
        local_files_only:  never touch the network (default: the HF_HUB_OFFLINE setting).
        prediction_type, teacher_prediction_type: default from the scheduler configs, else epsilon.
        backend:           UNet backend: auto (= eager), eager, compile, onnxruntime, tensorrt (distpp.backends).
        graphs:            "auto" (whole-loop CUDA graphs on a GPU), True, False.
        batch_sizes:       the batch buckets ``warmup`` prepares (default (1,)); smaller calls are padded.
        sizes:             (height, width) pixel sizes to build backends for and warm up (default: native).
        max_graphs:        captured loops kept at most, across every guided_steps (default 8).
        warmup:            run :meth:`warmup` (the config's guided_steps, native size) before returning.
        other keywords:    the rest of SamplerConfig (steps, guided_steps, lam, cfg, teacher_rule, ...).
        """
        plan = resolve(student, teacher, family, **kwargs)
        parts = load(plan)
        pipe = cls(parts.student_unet, parts.teacher_unet, parts.vae, parts.student_text, parts.teacher_text,
                   config=plan.config, device=plan.device, dtype=plan.dtype, w_embed=plan.w_embed,
                   force_zeros_for_empty_prompt=plan.force_zeros_for_empty_prompt, report=parts.report,
                   backend=plan.backend, graphs=plan.graphs, batch_sizes=plan.batch_sizes, max_graphs=plan.max_graphs,
                   sizes=plan.sizes)
        if warmup:
            pipe.warmup()
        return pipe

    # -- the runtime -----------------------------------------------------------------------------------
    def sampler(self, guided_steps: int | None = None) -> Sampler:
        """The Runtime's Sampler for this pipeline's config with ``guided_steps`` (built once, then reused)."""
        return self.runtime.sampler(_overrides(guided_steps))

    def warmup(self, batch_sizes: Sequence[int] | None = None, sizes: Sequence[tuple[int, int]] | None = None,
               guided_steps: Sequence[int] | None = None, progress: bool = True) -> list[WarmupRecord]:
        """Prepare every (guided_steps, size, batch bucket) before traffic: CUDA graphs are captured (graphs
        on), a compile backend compiles, and anything else runs once. sizes: (height, width) in pixels
        (default: the pipeline's sizes); guided_steps: default the config's; batch_sizes: default the
        pipeline's buckets. A progress bar counts the items (``progress=False``: none)."""
        res = None if sizes is None else [tuple(v // self.vae_scale_factor for v in self.image_size(h, w))
                                          for h, w in sizes]
        configs = None if guided_steps is None else [_overrides(g) for g in guided_steps]
        return self.runtime.warmup(configs, batch_sizes=batch_sizes, resolutions=res, progress=progress)

    def close(self) -> None:
        """Release the Runtime (graphs, engines, samplers); the pipeline cannot sample afterwards."""
        self.runtime.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, height: int,
               width: int, *, teacher: bool | None = None) -> dict[str, Cond | None]:
        """Conditioning for one batch: cond / teacher_cond [B], uncond / teacher_uncond [B] (None when
        ``negative_prompts`` is None). teacher_* is None when the teacher shares the student's encoders, and
        teacher_cond also when ``teacher`` is False (default: True when negative prompts are given; an
        embedded-guidance teacher needs teacher_cond without negatives)."""
        # SDXL micro-conditioning: original size, crop top-left, target size, in pixels.
        time_ids = sdxl_time_ids(height, width, len(prompts), self.device)

        def conds(enc, texts, zero_empty: bool) -> Cond:
            states, pooled = enc.encode(texts)
            if zero_empty:
                keep = torch.tensor([t != "" for t in texts], device=states.device, dtype=states.dtype)
                states = states * keep[:, None, None]
                pooled = None if pooled is None else pooled * keep[:, None]
            if pooled is None:
                return Cond(states.to(self.device))
            return Cond(states.to(self.device), pooled.to(self.device), time_ids if enc.time_ids else None)

        zero = self.force_zeros_for_empty_prompt
        out = {"cond": conds(self.student_text, prompts, False), "uncond": None,
               "teacher_cond": None, "teacher_uncond": None}
        if teacher is None:
            teacher = negative_prompts is not None
        if self.teacher_text is not None and teacher:
            out["teacher_cond"] = conds(self.teacher_text, prompts, False)
        if negative_prompts is not None:
            if self.teacher_text is None:
                out["uncond"] = conds(self.student_text, negative_prompts, zero)
            else:
                out["teacher_uncond"] = conds(self.teacher_text, negative_prompts, zero)
        return out

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] float32 latents -> [B, 3, h*f, w*f] float32 images in [0, 1] (f = VAE scale).

        Undoes the VAE's latent normalization as diffusers' SDXL pipeline does: with ``latents_mean`` and
        ``latents_std`` in its config, z = latents * std / scaling_factor + mean; else
        z = latents / scaling_factor (+ shift_factor when set)."""
        cfg = self.vae.config
        vdtype = next(self.vae.parameters()).dtype
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(view)
            std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(view)
            z = latents * std / cfg.scaling_factor + mean
        else:
            z = latents / cfg.scaling_factor
            if getattr(cfg, "shift_factor", None) is not None:
                z = z + cfg.shift_factor
        img = self.vae.decode(z.to(vdtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 height: int | None = None, width: int | None = None, seeds: Sequence[int] | None = None,
                 guided_steps: int | None = None, lam: float | Sequence[float] | None = None,
                 cfg: float | Sequence[float] | None = None, output_type: str = "pil",
                 progress: Callable[[int], Any] | None = None, timer=None):
        """Generate one image per prompt.

        prompt:          a string or a list of B strings; negative_prompt: one string or B strings.
        height, width:   pixels, multiples of the VAE scale factor (default: the student's native size).
        seeds:           one int per image (default 0..B-1); guided and unguided runs with the same
                         seeds share the base noise.
        guided_steps, lam, cfg: overrides of the pipeline config.
        output_type:     "pil" (list of PIL images), "np" ([B, H, W, 3] float32 numpy in [0, 1], as
                         diffusers' "np"), "pt" ([B, 3, H, W] float32 in [0, 1]) or "latent"
                         ([B, C, H/f, W/f] float32).
        progress:        called with the number of student steps done (1 per step; all steps at once
                         for a CUDA-graph replay), e.g. a tqdm bar's ``update``.
        timer:           an optional distpp.timing.StageTimer (``begin()`` it before the call): laps
                         "encode" after the text encoders, the loop's own stages (student, teacher,
                         guidance, scheduler, other; "graph" for a replay), and "decode" after the VAE.
        """
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"unknown output_type {output_type!r}; pass one of {', '.join(OUTPUT_TYPES)}")
        if output_type == "pil":
            _require_pil()
        height, width = self.image_size(height, width)
        f = self.vae_scale_factor
        overrides = _overrides(guided_steps)
        sampler = self.sampler(guided_steps)  # checks guided_steps before the encoders run
        guided = sampler.config.guided_steps > 0
        cfg_teacher = guided and sampler.config.teacher_guidance == "cfg"  # an embedded one takes no uncond
        c = self.encode(prompts, negatives if cfg_teacher else None, height, width, teacher=guided)
        if timer is not None:
            timer.lap("encode")
        hooks = _Hooks(timer, progress, sampler.schedule.steps) if timer is not None or progress is not None else None
        latents = self.runtime.sample(overrides, c["cond"], uncond=c["uncond"], teacher_cond=c["teacher_cond"],
                                      teacher_uncond=c["teacher_uncond"],
                                      latent_shape=(self.latent_channels, height // f, width // f),
                                      seeds=None if seeds is None else list(seeds), lam=lam, cfg=cfg, timer=hooks)
        if output_type == "latent":
            return latents
        images = self.decode(latents)
        if timer is not None:
            timer.lap("decode")
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        return to_pil(images)

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) in pixels of a call (default: the student's native size), checked."""
        f = self.size_multiple
        h = self.default_size if height is None else int(height)
        w = self.default_size if width is None else int(width)
        if h < f or w < f or h % f or w % f:
            raise InputError(f"height and width must be positive multiples of {f} (the VAE scale factor "
                             f"{self.vae_scale_factor} x the transformer's patch size); got {h}x{w}"
                             if f != self.vae_scale_factor else
                             f"height and width must be positive multiples of the VAE scale factor {f}; got {h}x{w}")
        return h, w


# ------------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------------
def _overrides(guided_steps: int | None) -> dict | None:
    """The Runtime's config overrides of a call: its guided_steps, or None (the pipeline's config)."""
    return None if guided_steps is None else {"guided_steps": guided_steps}


def _cond_spec(text) -> CondSpec:
    """One row of the conditioning ``text`` gives: [tokens, width] states (+ pooled; time_ids for SDXL)."""
    return CondSpec(text.tokens, text.width, text.pooled_width, SDXL_TIME_IDS if text.time_ids else None)


def _denoisers(student, teacher, student_text, teacher_text, w_embed: float):
    """(student, teacher) Denoisers of the models, after checking they fit each other and their encoders:
    UNetDenoisers (LCM students get ``w_embed``), SD3Denoisers or FluxDenoisers."""
    import diffusers

    t_text = teacher_text or student_text
    for cls, encoder, denoiser in ((diffusers.SD3Transformer2DModel, SD3PromptEncoder, SD3Denoiser),
                                   (diffusers.FluxTransformer2DModel, FluxPromptEncoder, FluxDenoiser)):
        kinds = [isinstance(m, cls) for m in (student, teacher)]
        if not any(kinds):
            continue
        if not all(kinds) or not all(isinstance(t, encoder) for t in (student_text, t_text)):
            raise ConfigError(f"a Pipeline over a {cls.__name__} takes two of them and {encoder.__name__}s; got "
                              f"{type(student).__name__} / {type(teacher).__name__} with "
                              f"{type(student_text).__name__} / {type(t_text).__name__}")
        check_transformer_configs(dict(student.config), dict(teacher.config), _t5_dims(student_text),
                                  _t5_dims(t_text))
        return denoiser(student), denoiser(teacher)
    if not all(isinstance(t, PromptEncoder) for t in (student_text, t_text)):
        raise ConfigError("UNet Pipelines take PromptEncoders (CLIP); SD3 / FLUX prompt encoders are for their "
                          "transformers")
    check_pair_configs(dict(student.config), dict(teacher.config), (student_text.width, student_text.pooled_width),
                       (t_text.width, t_text.pooled_width))
    return UNetDenoiser(student, w_embed=w_embed), UNetDenoiser(teacher)


def _t5_dims(text) -> tuple[int, int, int]:
    """(T5 width, pooled width, CLIP states width padded into the T5 rows: SD3's two encoders, none for FLUX)."""
    clip = sum(int(e.config.hidden_size) for e in text.encoders[:2]) if isinstance(text, SD3PromptEncoder) else 0
    return text.width, text.pooled_width, clip


def _prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InputError("no prompts: pass a prompt string or a non-empty list of prompts")
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be strings")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
        raise InputError(f"negative_prompt must be one string or {len(prompts)} strings (one per prompt)")
    return prompts, negatives


def _require_pil():
    try:
        import PIL.Image  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError("output_type='pil' needs pillow: pip install 'distpp[pipeline]', "
                                      "or pass output_type='pt'") from e


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] float in [0, 1] -> list of B RGB PIL images (rounded as diffusers' numpy_to_pil)."""
    from PIL import Image

    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]

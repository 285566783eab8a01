"""Model presets: a student/teacher UNet pair with its conditioning shapes and family defaults.

tiny: random-weight tiny UNets built from configs (seconds on a CPU; the default everywhere).
sd15: the SD1.5 UNet architecture (teacher) and an LCM-style student (same architecture plus the
      w-embedding, time_cond_proj_dim=256), random weights unless ``weights`` points to a local folder.
sdxl: the SDXL UNet architecture likewise. About 2.6 B parameters per UNet: ~20 GB for the pair in
      float32, so on a CPU it is refused unless forced.
tiny_sd3, tiny_flux: tiny random flow-matching transformers (SD3Denoiser / FluxDenoiser over
      ``_TINY_SD3`` / ``_TINY_FLUX``; seconds on a CPU) with their family settings (``sampler_defaults``):
      tiny_sd3 a CFG teacher, tiny_flux an embedded-guidance teacher (FLUX.1-dev style, guidance_embeds).
sd35, flux: the SD3.5-Large transformer (8.1 B parameters each) and FLUX.1 transformer (11.9 B each; the
      teacher is FLUX.1-dev with guidance_embeds) with random weights, for latency work: 65 / 95 GB for
      the pair in float32, 33 / 48 GB in bfloat16. Built directly on the target device in the target dtype
      (no host copy, never both models in float32); refused on a CPU unless forced, and on a GPU with
      less free memory than the pair needs.
A user's models come through :func:`load_pair` (diffusers ``from_pretrained``, local path or Hub id).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .denoiser import Cond, UNetDenoiser, sdxl_time_ids, text_time_dims
from .dtypes import dtype_name
from .errors import ConfigError
from .pipeline.fetch import load_unet  # the one UNet loader (local folders and Hub ids)

_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
_TINY_XL = dict(_TINY, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1)

# Tiny random flow-matching transformers (seconds on a CPU), 4 latent channels like the tiny UNets; configs
# only, for presets built from them later. SD3: 2x2 patches, position table up to 16 patches (32 latent
# pixels) a side. FLUX: in_channels is the packed width (4 latent channels x 2x2 patch), axes_dims_rope
# sums to attention_head_dim; the teacher (FLUX.1-dev style) adds guidance_embeds=True.
_TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    pos_embed_max_size=16,
)
_TINY_FLUX = dict(
    patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)

# The released architectures (random weights): SD3.5-Large's transformer (the Turbo student has the
# same), and FLUX.1's (schnell; FLUX.1-dev adds guidance_embeds=True).
_SD35 = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
_FLUX = dict(
    patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)

_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
_SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


# PresetInfo.kind -> (diffusers model class, distpp Denoiser adapter) for the transformer presets.
TRANSFORMER_KINDS = {"sd3": ("SD3Transformer2DModel", "SD3Denoiser"),
                     "flux": ("FluxTransformer2DModel", "FluxDenoiser")}
CPU_LIMIT_GB = 8.0  # a preset whose pair needs more (float32) is refused on a CPU unless forced


@dataclass(frozen=True)
class PresetInfo:
    """A preset's architecture and defaults.

    unet_config:   the teacher's model config: a UNet's (the student adds time_cond_proj_dim), or for kind
                   "sd3" / "flux" the transformer's (student and teacher alike, plus ``teacher_config``).
    latent_shape:  (C, H, W) latents at the preset's native resolution.
    tokens, width: text-encoder states shape [B, tokens, width]; pooled: the pooled text width (SDXL's
                   text_embeds, SD3/FLUX's pooled projection) or None.
    fp32_gb:       approximate memory of the pair's weights in float32 (GB = 1e9 bytes), checked on CPU;
                   bf16_gb the same in bfloat16 / float16 (default: half of fp32_gb).
    kind:          "unet" (UNetDenoiser; SDXL-style time_ids when pooled), "sd3" or "flux" (transformer
                   adapters; pooled only, no time_ids).
    teacher_config: overrides of ``unet_config`` for the teacher (FLUX.1-dev: guidance_embeds=True).
    teacher_tokens: the teacher's text tokens when its pipeline encodes a longer sequence than the
                   student's (FLUX.1-dev 512 T5 tokens, schnell 256); None: the student's ``tokens``.
    sampler_defaults: SamplerConfig fields the pair samples with unless a caller overrides them (family,
                   family_options, teacher_guidance, cfg, lam); see :meth:`sampler_config`.
    """

    name: str
    unet_config: dict
    latent_shape: tuple[int, int, int]
    tokens: int
    width: int
    pooled: int | None
    fp32_gb: float
    time_cond_proj_dim: int | None = 256
    resolution: int = 0
    kind: str = "unet"
    bf16_gb: float | None = None
    teacher_config: dict | None = None
    teacher_tokens: int | None = None
    sampler_defaults: dict = field(default_factory=dict)

    @property
    def time_ids(self) -> bool:
        """Whether conditioning carries SDXL micro-conditioning time_ids (UNet presets with pooled)."""
        return self.kind == "unet" and self.pooled is not None

    @property
    def embedded_guidance(self) -> bool:
        """Whether the teacher takes w as an input (one batch-B forward, no unconditional half)."""
        return self.sampler_defaults.get("teacher_guidance", "cfg") == "embedded"

    def memory_gb(self, dtype: torch.dtype) -> float:
        """Approximate memory of the pair's weights in ``dtype`` (GB)."""
        if dtype.itemsize >= 4:
            return self.fp32_gb * dtype.itemsize / 4
        return self.bf16_gb if self.bf16_gb is not None else self.fp32_gb / 2

    def cond_spec(self, teacher: bool = False):
        """The Runtime's CondSpec of one conditioning row of this preset (``teacher``: the teacher's, None
        when it takes the student's conditioning)."""
        from .denoiser import SDXL_TIME_IDS
        from .runtime import CondSpec

        if teacher and self.teacher_tokens is None:
            return None
        return CondSpec(self.teacher_tokens if teacher else self.tokens, self.width, pooled=self.pooled,
                        time_ids=SDXL_TIME_IDS if self.time_ids else None)

    def sampler_config(self, **overrides):
        """A SamplerConfig of ``sampler_defaults`` with ``overrides`` on top (None values are dropped, so a
        CLI's unset options keep the preset's defaults). Overriding ``family`` drops the preset's
        family_options (they belong to its family); a transformer preset samples with its own family only."""
        from .config import SamplerConfig

        kw = dict(self.sampler_defaults)
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("family", kw.get("family")) != kw.get("family"):
            if self.kind != "unet":
                raise ConfigError(f"preset {self.name!r} holds flow-matching transformers (velocity prediction): "
                                  f"family {kw.get('family')!r} samples them, got {given['family']!r} (drop --family)")
            kw.pop("family_options", None)
        kw.update(given)
        return SamplerConfig(**kw)


# Flow presets' lam and w (issue 15): not published for these pairs, unmeasured here. lam: the flow
# family's 0.05 (ALGORITHM.md: start from the Lightning/Turbo 0.05-0.1; SD3.5-Large-Turbo and FLUX.1-schnell
# are adversarially distilled, like SDXL-Turbo). w: CFG 4.0 for an SD3.5-Large teacher (ALGORITHM.md: ~3.5-4.5),
# embedded 3.5 for FLUX.1-dev (its pipeline's default guidance_scale). Sweep them with --lam / --cfg.
FLOW_LAM = 0.05
SD3_CFG = 4.0
FLUX_GUIDANCE = 3.5
SD3_FAMILY_OPTIONS = {"shift": 3.0, "timestep_scale": 1000.0}  # StableDiffusion3Pipeline: t = sigma * 1000


def flux_family_options(latent_hw: tuple[int, int]) -> dict:
    """FluxPipeline's schedule for latents H x W: linspace sigmas, dynamic shift from the packed sequence
    length H/2 * W/2, the transformer's timestep input sigma itself."""
    h, w = latent_hw
    return {"use_dynamic_shifting": True, "image_seq_len": (h // 2) * (w // 2), "sigmas": "linspace",
            "timestep_scale": 1.0}


def _sd3_defaults() -> dict:
    return dict(family="flow", family_options=SD3_FAMILY_OPTIONS, cfg=SD3_CFG, lam=FLOW_LAM)


def _flux_defaults(latent_hw) -> dict:
    return dict(family="flow", family_options=flux_family_options(latent_hw), teacher_guidance="embedded",
                cfg=FLUX_GUIDANCE, lam=FLOW_LAM)


PRESETS: dict[str, PresetInfo] = {
    "tiny": PresetInfo("tiny", _TINY, (4, 16, 16), 8, 32, None, 0.01, time_cond_proj_dim=32, resolution=128),
    "tiny_xl": PresetInfo("tiny_xl", _TINY_XL, (4, 16, 16), 8, 32, 32, 0.01, time_cond_proj_dim=32, resolution=128),
    "sd15": PresetInfo("sd15", _SD15, (4, 64, 64), 77, 768, None, 6.9, resolution=512),
    "sdxl": PresetInfo("sdxl", _SDXL, (4, 128, 128), 77, 2048, 1280, 20.6, resolution=1024),
    # flow-matching transformers: 8 text tokens of width joint_attention_dim, pooled projection, no time_ids
    "tiny_sd3": PresetInfo("tiny_sd3", _TINY_SD3, (4, 16, 16), 8, 32, 32, 0.01, None, 128, kind="sd3",
                           sampler_defaults=_sd3_defaults()),
    # (the tiny FLUX teacher reads a longer text sequence than its student, as FLUX.1-dev does)
    "tiny_flux": PresetInfo("tiny_flux", _TINY_FLUX, (4, 16, 16), 8, 32, 32, 0.01, None, 128, kind="flux",
                            teacher_config={"guidance_embeds": True}, teacher_tokens=16,
                            sampler_defaults=_flux_defaults((16, 16))),
    # 1024 x 1024: latents 16 x 128 x 128. SD3.5: 77 CLIP + 256 T5 tokens (StableDiffusion3Pipeline's
    # default max_sequence_length), pooled CLIP-L + CLIP-G 2048. FLUX: 256 T5 tokens for the schnell
    # student, 512 for the dev teacher (FluxPipeline's caps for each), pooled CLIP-L 768. Memory from the
    # parameter counts (SD3.5: 8.06 B + 0.09 B position buffer each; FLUX: 11.89 B + 11.90 B).
    "sd35": PresetInfo("sd35", _SD35, (16, 128, 128), 333, 4096, 2048, 65.2, None, 1024, kind="sd3", bf16_gb=32.6,
                       sampler_defaults=_sd3_defaults()),
    "flux": PresetInfo("flux", _FLUX, (16, 128, 128), 256, 4096, 768, 95.2, None, 1024, kind="flux", bf16_gb=47.6,
                       teacher_config={"guidance_embeds": True}, teacher_tokens=512,
                       sampler_defaults=_flux_defaults((128, 128))),
}


def preset_info(name: str) -> PresetInfo:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; pass one of {', '.join(PRESETS)} or a model path/id")
    return PRESETS[name]


@dataclass
class ModelPair:
    """A student/teacher pair ready for a Sampler, with conditioning makers for benchmarks and tests."""

    student: Any
    teacher: Any
    info: PresetInfo
    device: torch.device
    dtype: torch.dtype

    def random_cond(self, batch: int, seed: int = 0, *, teacher: bool = False) -> tuple[Cond | None, Cond | None]:
        """(cond, uncond) with random text states of the right shapes (benchmarks and tests): pooled
        text_embeds when the preset has them, SDXL time_ids only for SDXL-style UNets. uncond is None for
        an embedded-guidance teacher (it takes no unconditional half). ``teacher``: the teacher's own
        (teacher_cond, teacher_uncond) when it has ``teacher_tokens``, else (None, None)."""
        i = self.info
        if teacher and i.teacher_tokens is None:
            return None, None
        g = torch.Generator().manual_seed(seed + (1 if teacher else 0))
        tokens = i.teacher_tokens if teacher else i.tokens

        def one(rows):
            ehs = torch.randn(rows, tokens, i.width, generator=g)
            te = torch.randn(rows, i.pooled, generator=g) if i.pooled is not None else None
            tid = sdxl_time_ids(i.resolution, i.resolution, rows) if i.time_ids else None
            return Cond(ehs, te, tid).to(self.device, self.dtype)

        cond = one(batch)
        return cond, None if i.embedded_guidance else one(1)

    def sampler_config(self, **overrides):
        """The preset's SamplerConfig (``PresetInfo.sampler_config``)."""
        return self.info.sampler_config(**overrides)


def _build_unet(config: dict, time_cond_proj_dim: int | None, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = dict(config)
    if time_cond_proj_dim is not None:
        cfg["time_cond_proj_dim"] = time_cond_proj_dim
    return UNet2DConditionModel(**cfg).eval().requires_grad_(False)


def build_preset(name: str = "tiny", *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 weights: str | os.PathLike | None = None, force: bool = False, seed: int = 0) -> ModelPair:
    """Build the preset's student/teacher pair on ``device`` in ``dtype`` (random weights unless
    ``weights`` is a local diffusers folder with ``student/`` and ``teacher/`` UNet subfolders)."""
    info = preset_info(name)
    device = torch.device(device)
    check_fits(info, device, dtype, force)
    if info.kind in TRANSFORMER_KINDS:
        if weights is not None:
            raise ConfigError(f"preset {name!r} has random weights only (latency work); load a real pair with "
                              "distpp.Pipeline.from_pretrained (or drop --weights)")
        return _transformer_pair(info, device, dtype, seed)
    if weights is not None:
        return load_pair(os.path.join(weights, "student"), os.path.join(weights, "teacher"), info=info,
                         device=device, dtype=dtype)
    student = _to(_build_unet(info.unet_config, info.time_cond_proj_dim, seed + 1), device, dtype)
    teacher = _to(_build_unet(info.unet_config, None, seed + 2), device, dtype)
    return ModelPair(UNetDenoiser(student), UNetDenoiser(teacher), info, device, dtype)


def check_fits(info: PresetInfo, device: torch.device, dtype: torch.dtype, force: bool = False) -> None:
    """ConfigError before anything is built when the pair cannot fit: on a CPU above CPU_LIMIT_GB in
    float32 (unless forced), on a GPU when its free memory is below the pair's weights in ``dtype``."""
    models = "two UNets" if info.kind == "unet" else "two transformers"
    need = f"about {info.fp32_gb:.0f} GB for its {models} in float32"
    if info.kind != "unet":
        need += f" ({info.memory_gb(torch.bfloat16):.0f} GB in bfloat16)"
    if device.type == "cpu" and info.fp32_gb > CPU_LIMIT_GB and not force:
        raise ConfigError(f"preset {info.name!r} needs {need}; refused on CPU (pass force=True / --force to build "
                          "anyway, or use a GPU)")
    if device.type == "cuda" and torch.cuda.is_available() and not force:
        free = torch.cuda.mem_get_info(device)[0] / 1e9
        if free < info.memory_gb(dtype):
            raise ConfigError(f"preset {info.name!r} needs {need}; {device} has {free:.1f} GB free, less than "
                              f"{info.memory_gb(dtype):.1f} GB in {dtype_name(dtype)} (pass --dtype "
                              "bfloat16, free the GPU, or force=True / --force)")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(info: PresetInfo, *, teacher: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """One random-weight transformer of ``info`` built directly on ``device`` in ``dtype``: parameters are
    created there (``torch.device`` context, ``dtype`` as the default dtype), so a 12 B FLUX model never
    has a host copy nor a float32 copy on the GPU; the final ``.to`` only casts what a constructor kept
    in float32 (SD3's position table)."""
    import diffusers

    cls = getattr(diffusers, TRANSFORMER_KINDS[info.kind][0])
    cfg = {**info.unet_config, **(info.teacher_config or {})} if teacher else dict(info.unet_config)
    torch.manual_seed(seed)
    init_dtype = dtype if dtype.is_floating_point else torch.float32
    with torch.device(device), _default_dtype(init_dtype):
        model = cls(**cfg).eval().requires_grad_(False)
    # torch's own Module.to: diffusers' override only adds a keep-in-float32 warning meant for loaded weights
    return torch.nn.Module.to(model, device=device, dtype=dtype)


def _transformer_pair(info: PresetInfo, device: torch.device, dtype: torch.dtype, seed: int) -> ModelPair:
    from . import transformer as adapters

    adapter = getattr(adapters, TRANSFORMER_KINDS[info.kind][1])
    # one at a time: the student is built (in dtype) before the teacher starts
    student = adapter(build_transformer(info, teacher=False, device=device, dtype=dtype, seed=seed + 1))
    teacher = adapter(build_transformer(info, teacher=True, device=device, dtype=dtype, seed=seed + 2))
    return ModelPair(student, teacher, info, device, dtype)


def _to(module, device, dtype):
    return module.to(device=device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)


def load_pair(student: str, teacher: str, *, info: PresetInfo | None = None, device="cpu",
              dtype=torch.float32, student_subfolder: str | None = None,
              teacher_subfolder: str | None = "unet") -> ModelPair:
    """A pair from local folders or Hub ids (the teacher's UNet usually lives in ``unet/``)."""
    s = load_unet(student, subfolder=student_subfolder, device=device, dtype=dtype)
    t = load_unet(teacher, subfolder=teacher_subfolder, device=device, dtype=dtype)
    if info is None:
        cfg = t.config
        pooled = text_time_dims(cfg)[0]
        ss = int(cfg.sample_size)
        info = PresetInfo("custom", dict(cfg), (int(cfg.in_channels), ss, ss), 77, int(cfg.cross_attention_dim),
                          pooled, 0.0, s.config.time_cond_proj_dim, resolution=ss * 8)
    return ModelPair(UNetDenoiser(s), UNetDenoiser(t), info, torch.device(device), dtype)


# ------------------------------------------------------------------------------------------------------
# Whole random-weight pipelines (text encoder, tokenizer, VAE, UNets) from configs: no downloads.
# ------------------------------------------------------------------------------------------------------
# CLIP text encoders: "tiny" (width 32 = the tiny UNets' cross_attention_dim; 32 tokens, so the bench's
# prompts of one token per character are not truncated, which diffusers would log per call) and "sd15"
# (CLIP ViT-L/14's text tower: width 768, 12 layers, 77 tokens, as SD1.5 uses).
TEXT_CONFIGS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=32),
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu"),
}
# AutoencoderKL configs: "tiny" (2 blocks: scale 2) and "sd15" (SD1.5's VAE: 4 blocks, scale 8).
VAE_CONFIGS = {
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32),
    "sd15": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
}


def clip_byte_symbols() -> list[str]:
    """CLIP's byte-to-unicode table: the 256 symbols a byte-level BPE vocabulary must hold."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def tiny_tokenizer(folder: str | os.PathLike, max_length: int = 8):
    """A CLIPTokenizer over a small generated vocabulary (the 256 byte symbols alone and with ``</w>``,
    and the two specials), written to ``folder``. Real prompts tokenize to one token per character: for
    latency this matches a real vocabulary, whose cost does not depend on the vocabulary's size."""
    import json

    from transformers import CLIPTokenizer

    chars = clip_byte_symbols()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(vocab_path, merges_path, model_max_length=max_length)


def random_text_encoder(name: str = "tiny", *, vocab_size: int, seed: int = 0):
    """A random-weight CLIPTextModel of ``TEXT_CONFIGS[name]`` (specials: the vocabulary's last two ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in TEXT_CONFIGS:
        raise ConfigError(f"no text encoder config {name!r}; pass one of {', '.join(TEXT_CONFIGS)}")
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, projection_dim=TEXT_CONFIGS[name]["hidden_size"],
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         **TEXT_CONFIGS[name])
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def random_vae(name: str = "tiny", *, seed: int = 0):
    """A random-weight AutoencoderKL of ``VAE_CONFIGS[name]`` (RGB, 4 latent channels)."""
    from diffusers import AutoencoderKL

    if name not in VAE_CONFIGS:
        raise ConfigError(f"no VAE config {name!r}; pass one of {', '.join(VAE_CONFIGS)}")
    cfg = VAE_CONFIGS[name]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval().requires_grad_(False)


@dataclass
class PipelineParts:
    """The modules of a random-weight SD1.5-style LCM pipeline (all on one device and dtype)."""

    student_unet: Any
    teacher_unet: Any
    vae: Any
    tokenizer: Any
    text_encoder: Any
    info: PresetInfo


def random_pipeline_parts(name: str = "tiny", folder: str | os.PathLike | None = None, *,
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          force: bool = False, seed: int = 0) -> PipelineParts:
    """UNets of preset ``name`` (tiny or sd15; the student with the LCM w-embedding), a CLIP text encoder
    and VAE of the same name's configs, and a generated tokenizer written into ``folder`` (default: a
    new temporary folder). Random weights: for latency and plumbing, not images."""
    import tempfile

    if name not in TEXT_CONFIGS:
        raise ConfigError(f"random pipelines exist for presets {', '.join(TEXT_CONFIGS)}; got {name!r}")
    info = preset_info(name)
    device = torch.device(device)
    if device.type == "cpu" and info.fp32_gb > 8 and not force:
        raise ConfigError(f"preset {name!r} is too large for a CPU (pass --force to build it anyway)")
    tok = tiny_tokenizer(folder or tempfile.mkdtemp(prefix="distpp_tokenizer_"),
                         TEXT_CONFIGS[name]["max_position_embeddings"])
    # weights are drawn on ``device`` itself: on a GPU the random init of SD1.5's ~2 B parameters runs
    # there instead of on the host before a copy (the GPU check builds this once per end-to-end stage)
    with torch.device(device):
        modules = [_build_unet(info.unet_config, info.time_cond_proj_dim, seed + 1),
                   _build_unet(info.unet_config, None, seed + 2),
                   random_vae(name, seed=seed + 3), random_text_encoder(name, vocab_size=len(tok), seed=seed + 4)]
    s, t, vae, enc = (_to(m, device, dtype) for m in modules)
    return PipelineParts(s, t, vae, tok, enc, info)

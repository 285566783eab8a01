"""Model presets: a student/teacher UNet pair with its conditioning shapes and family defaults.

tiny: random-weight tiny UNets built from configs (seconds on a CPU; the default everywhere).
sd15: the SD1.5 UNet architecture (teacher) and an LCM-style student (same architecture plus the
      w-embedding, time_cond_proj_dim=256), random weights unless ``weights`` points to a local folder.
sdxl: the SDXL UNet architecture likewise. About 2.6 B parameters per UNet: ~20 GB for the pair in
      float32, so on a CPU it is refused unless forced.
A user's models come through :func:`load_pair` (diffusers ``from_pretrained``, local path or Hub id).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .denoiser import Cond, UNetDenoiser, sdxl_time_ids, text_time_dims
from .errors import ConfigError
from .pipeline.fetch import load_unet  # the one UNet loader (local folders and Hub ids)

_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
_TINY_XL = dict(_TINY, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1)

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


@dataclass(frozen=True)
class PresetInfo:
    """A preset's architecture and defaults.

    unet_config:   the teacher UNet config (the student adds time_cond_proj_dim when lcm_student).
    latent_shape:  (C, H, W) latents at the preset's native resolution.
    tokens, width: text-encoder states shape [B, tokens, width]; pooled: SDXL pooled width (or None).
    fp32_gb:       approximate memory of the pair's weights in float32 (GB), checked on CPU.
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


PRESETS: dict[str, PresetInfo] = {
    "tiny": PresetInfo("tiny", _TINY, (4, 16, 16), 8, 32, None, 0.01, time_cond_proj_dim=32, resolution=128),
    "tiny_xl": PresetInfo("tiny_xl", _TINY_XL, (4, 16, 16), 8, 32, 32, 0.01, time_cond_proj_dim=32, resolution=128),
    "sd15": PresetInfo("sd15", _SD15, (4, 64, 64), 77, 768, None, 6.9, resolution=512),
    "sdxl": PresetInfo("sdxl", _SDXL, (4, 128, 128), 77, 2048, 1280, 20.6, resolution=1024),
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

    def random_cond(self, batch: int, seed: int = 0) -> tuple[Cond, Cond]:
        """(cond, uncond) with random text states of the right shapes (benchmarks and tests)."""
        g = torch.Generator().manual_seed(seed)
        i = self.info

        def one(rows):
            ehs = torch.randn(rows, i.tokens, i.width, generator=g)
            te = tid = None
            if i.pooled is not None:
                te = torch.randn(rows, i.pooled, generator=g)
                tid = sdxl_time_ids(i.resolution, i.resolution, rows)
            return Cond(ehs, te, tid).to(self.device, self.dtype)

        return one(batch), one(1)


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
    if device.type == "cpu" and info.fp32_gb > 8 and not force:
        raise ConfigError(f"preset {name!r} needs about {info.fp32_gb:.0f} GB for its two UNets in float32; "
                          "refused on CPU (pass force=True / --force to build anyway, or use a GPU)")
    if weights is not None:
        return load_pair(os.path.join(weights, "student"), os.path.join(weights, "teacher"), info=info,
                         device=device, dtype=dtype)
    student = _to(_build_unet(info.unet_config, info.time_cond_proj_dim, seed + 1), device, dtype)
    teacher = _to(_build_unet(info.unet_config, None, seed + 2), device, dtype)
    return ModelPair(UNetDenoiser(student), UNetDenoiser(teacher), info, device, dtype)


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

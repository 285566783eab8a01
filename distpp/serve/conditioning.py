"""Preset mode's prompt -> conditioning, and the output encodings of both modes.

The presets carry UNets but no text encoder, so :func:`prompt_cond` is a deterministic stand-in: the
prompt's SHA-256 seeds random text states of the preset's shape. Equal prompts give equal
conditioning on every replica and machine, which is what batching and routing need; it is NOT a text
encoder (pipeline mode encodes prompts with the Pipeline's own text encoders and decodes with its VAE).
"""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import torch

from ..denoiser import Cond, sdxl_time_ids
from ..presets import PresetInfo


def prompt_seed(prompt: str) -> int:
    """A 63-bit generator seed from the prompt's UTF-8 SHA-256 (stable across processes)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little") >> 1


def prompt_cond(info: PresetInfo, prompt: str) -> Cond:
    """Conditioning of one prompt, 1 row, float32 on CPU.

    encoder_hidden_states [1, tokens, width]; for SDXL-style presets also text_embeds [1, pooled] and
    time_ids [1, 6] (native resolution, no crop), as ``ModelPair.random_cond`` makes them.
    """
    g = torch.Generator().manual_seed(prompt_seed(prompt))
    ehs = torch.randn(1, info.tokens, info.width, generator=g)
    if info.pooled is None:
        return Cond(ehs)
    te = torch.randn(1, info.pooled, generator=g)
    return Cond(ehs, te, sdxl_time_ids(info.resolution, info.resolution, 1))


def latent_b64(latent: np.ndarray) -> str:
    """Base64 of an array's raw little-endian float32 bytes (C order; latents and float images); decode
    with ``np.frombuffer(base64.b64decode(s), "<f4").reshape(shape)``."""
    return base64.b64encode(np.ascontiguousarray(latent, dtype="<f4").tobytes()).decode("ascii")


def latent_image(latent: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 view of a [C, H, W] latent: its first three channels (grey for C < 3) mapped from
    [-3, 3] (3 standard deviations of unit-variance latents) to [0, 255]. A visualization, not a decode."""
    x = np.asarray(latent, dtype=np.float32)
    rgb = np.stack([x[min(c, x.shape[0] - 1)] for c in range(3)], axis=-1)
    return np.round((np.clip(rgb, -3.0, 3.0) + 3.0) * (255.0 / 6.0)).astype(np.uint8)


def png_bytes(latent: np.ndarray) -> bytes:
    """PNG file bytes of :func:`latent_image` (needs pillow: ``pip install ".[serve]"``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(latent_image(latent)).save(buf, format="PNG")
    return buf.getvalue()


def image_png(image: np.ndarray) -> bytes:
    """PNG file bytes of a [H, W, 3] float image in [0, 1], rounded to 8 bits as ``distpp.pipeline.to_pil``
    rounds (so the PNG is within 1/255 of the float image)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

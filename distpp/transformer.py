"""Denoiser adapters for diffusers' flow-matching transformers: SD3 / SD3.5 and FLUX.1.

Both take and return unpacked latents [b, C, H, W] like every distpp Denoiser, so the sampler, the
GraphRunner and the Runtime see no difference from a UNet. What is specific to a transformer stays here:

- ``SD3Denoiser`` wraps ``SD3Transformer2DModel``: joint-attention text states ``encoder_hidden_states``
  [b, L, joint_attention_dim] and the pooled CLIP projection ``text_embeds`` [b, pooled_projection_dim]
  (fed as ``pooled_projections``). ``t`` is the transformer's own timestep input, which
  StableDiffusion3Pipeline passes as sigma * 1000.
- ``FluxDenoiser`` wraps ``FluxTransformer2DModel``: it packs 2x2 latent patches into the token sequence
  [b, H/2 * W/2, 4C] (FluxPipeline's layout), passes the position ids ``img_ids`` [H/2 * W/2, 3] and
  ``txt_ids`` [L, 3], and unpacks the output. The ids have no batch axis, so they are constants of the
  adapter per (H, W, L, device, dtype), built on the first call of a shape and reused afterwards (a
  GraphRunner's warm-up builds them before capture). ``t`` is sigma, as FluxPipeline passes it (the
  transformer scales it by 1000). A guidance-distilled transformer (FLUX.1-dev, ``guidance_embeds``)
  reads its guidance scale from ``cond.guidance`` [b].

This module is named ``transformer`` (singular) so it never shadows the Hugging Face ``transformers``
package when a script's folder is on ``sys.path``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .denoiser import Cond, DenoiserBase, ModelSpec
from .errors import ConfigError, InputError

# Distinct (H, W, L, device, dtype) shapes whose FLUX position ids are kept; a GraphRunner holds a few
# buckets, so this bound is only reached by a caller cycling through many shapes.
IDS_CACHE_SIZE = 32


class TransformerDenoiser(DenoiserBase):
    """What the SD3 and FLUX adapters share: the class check, the spec from the transformer's config
    (pooled projection as ``text_embeds``, no time_ids), and the checks of a call's inputs.

    Subclasses set ``model_class`` (the diffusers class name), ``latent_channels`` from the config, and
    ``spatial_multiple`` (what H and W must be divisible by).
    """

    model_class: str = ""
    spatial_multiple: int = 1

    def __init__(self, transformer):
        import diffusers

        cls = getattr(diffusers, self.model_class)
        if not isinstance(transformer, cls):
            raise ConfigError(f"{type(self).__name__} wraps a diffusers {self.model_class}, got "
                              f"{type(transformer).__name__}; pass the pipeline's .transformer "
                              "(wrap UNets with UNetDenoiser, a compiled module with distpp's compile backend)")
        self.transformer = transformer
        cfg = transformer.config
        self.latent_channels = self._latent_channels(cfg)
        param = next(transformer.parameters())
        self.spec = ModelSpec(
            in_channels=self.latent_channels,
            cross_attention_dim=int(cfg.joint_attention_dim),
            text_embeds_dim=int(cfg.pooled_projection_dim),
            dtype=param.dtype,
            device=param.device,
            prediction_type="flow",
        )

    def _latent_channels(self, cfg) -> int:
        raise NotImplementedError

    def check_call(self, x: torch.Tensor, cond: Cond) -> None:
        """InputError unless ``x`` [b, C, H, W] and ``cond`` fit (host metadata only: no sync)."""
        who = type(self).__name__
        if x.dim() != 4 or x.shape[1] != self.latent_channels:
            raise InputError(f"{who} takes latents [b, {self.latent_channels}, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.spatial_multiple
        if h % m or w % m:
            raise InputError(f"{who} needs latent height and width divisible by {m}, got {h}x{w}; "
                             f"pass a latent size that is a multiple of {m} (an image size multiple of {8 * m})")
        if cond.text_embeds is None:
            raise InputError(f"{who} needs the pooled text projection: pass Cond(text_embeds=[b, "
                             f"{self.spec.text_embeds_dim}]) (the CLIP pooled output)")


class SD3Denoiser(TransformerDenoiser):
    """Adapter from diffusers ``SD3Transformer2DModel`` (SD3, SD3.5 and their Turbo students).

    t: [b] the transformer's timestep input as StableDiffusion3Pipeline passes it, sigma * 1000.
    cond: encoder_hidden_states [b, L, joint_attention_dim] (CLIP-L/G + T5 states), text_embeds
          [b, pooled_projection_dim] (pooled CLIP-L/G).
    Latent H and W must be multiples of the patch size and at most ``pos_embed_max_size`` patches.
    """

    model_class = "SD3Transformer2DModel"

    def __init__(self, transformer):
        super().__init__(transformer)
        cfg = transformer.config
        self.spatial_multiple = int(cfg.patch_size)
        self.max_patches = cfg.pos_embed_max_size

    def _latent_channels(self, cfg) -> int:
        out = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
        if out != cfg.in_channels:
            raise ConfigError(f"SD3Denoiser needs out_channels == in_channels (a velocity in the latent space), "
                              f"got in_channels={cfg.in_channels}, out_channels={out}")
        return int(cfg.in_channels)

    def check_call(self, x: torch.Tensor, cond: Cond) -> None:
        super().check_call(x, cond)
        p, m = self.spatial_multiple, self.max_patches
        if m is not None and max(x.shape[-2:]) // p > m:
            raise InputError(f"SD3Denoiser: latents {x.shape[-2]}x{x.shape[-1]} exceed the transformer's "
                             f"position table ({m} patches of {p} = {m * p} latent pixels a side); pass a smaller size")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.check_call(x, cond)
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.encoder_hidden_states,
                                pooled_projections=cond.text_embeds, return_dict=False)[0]


class FluxDenoiser(TransformerDenoiser):
    """Adapter from diffusers ``FluxTransformer2DModel`` (FLUX.1-schnell, FLUX.1-dev).

    t: [b] sigma, as FluxPipeline passes it (the transformer multiplies by 1000).
    cond: encoder_hidden_states [b, L, joint_attention_dim] (T5 states), text_embeds
          [b, pooled_projection_dim] (pooled CLIP-L); guidance [b] when the transformer has
          ``guidance_embeds`` (FLUX.1-dev; InputError without it), ignored otherwise (as FluxPipeline
          passes no guidance to schnell).
    Latent H and W must be even (2x2 patches).
    """

    model_class = "FluxTransformer2DModel"
    spatial_multiple = 2

    def __init__(self, transformer):
        super().__init__(transformer)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self._ids: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.ids_builds = 0  # how many (img_ids, txt_ids) pairs were built (tests: reuse across calls)

    def _latent_channels(self, cfg) -> int:
        out = cfg.out_channels or cfg.in_channels
        if int(cfg.patch_size) != 1 or cfg.in_channels % 4 or out != cfg.in_channels:
            raise ConfigError("FluxDenoiser supports FLUX's packed layout: patch_size 1, in_channels = 4 x the "
                              f"latent channels, out_channels == in_channels; got patch_size={cfg.patch_size}, "
                              f"in_channels={cfg.in_channels}, out_channels={out}")
        return int(cfg.in_channels) // 4

    def position_ids(self, h: int, w: int, tokens: int, device: torch.device, dtype: torch.dtype):
        """(img_ids [h/2 * w/2, 3], txt_ids [tokens, 3]) for latents h x w: built once per shape.

        img_ids rows are (0, row, column) of each 2x2 patch in row-major order, txt_ids all zero, as
        FluxPipeline builds them."""
        key = (h, w, tokens, device, dtype)
        ids = self._ids.get(key)
        if ids is not None:
            self._ids.move_to_end(key)
            return ids
        hp, wp = h // 2, w // 2
        img = torch.zeros(hp, wp, 3)
        img[..., 1] = torch.arange(hp, dtype=img.dtype)[:, None]
        img[..., 2] = torch.arange(wp, dtype=img.dtype)[None, :]
        ids = (img.reshape(hp * wp, 3).to(device=device, dtype=dtype), torch.zeros(tokens, 3, device=device, dtype=dtype))
        self._ids[key] = ids
        self.ids_builds += 1
        while len(self._ids) > IDS_CACHE_SIZE:
            self._ids.popitem(last=False)
        return ids

    def check_call(self, x: torch.Tensor, cond: Cond) -> None:
        super().check_call(x, cond)
        if self.guidance_embeds and cond.guidance is None:
            raise InputError("FluxDenoiser: this transformer embeds a guidance scale (guidance_embeds, FLUX.1-dev): "
                             "pass Cond(guidance=[b]) (the sampler fills it for an embedded-guidance teacher)")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.check_call(x, cond)
        b, c, h, w = x.shape
        img_ids, txt_ids = self.position_ids(h, w, cond.encoder_hidden_states.shape[1], x.device, x.dtype)
        out = self.transformer(hidden_states=pack_latents(x), timestep=t,
                               guidance=cond.guidance if self.guidance_embeds else None,
                               pooled_projections=cond.text_embeds, encoder_hidden_states=cond.encoder_hidden_states,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, h, w)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[b, C, H, W] -> [b, H/2 * W/2, 4C]: each 2x2 patch one token, features ordered (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: [b, H/2 * W/2, 4C] -> [b, C, H, W]."""
    b, _, f = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, h, w)

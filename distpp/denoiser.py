"""The Denoiser protocol, its capability base class, and the diffusers UNet adapter.

A model is any callable ``(x, t, cond) -> prediction``:
  x:    [batch, C, H, W] model input in the model's dtype, already scaled to VP variables
        (x = a_t x0 + s_t e), so Euler-family scaling is the sampler's job, not the model's;
  t:    [batch] float32 timesteps on the model's device (per-sample: the teacher may get mixed levels);
  cond: a :class:`Cond` whose tensors have ``batch`` rows;
  returns [batch, C, H, W] (epsilon, v or x0 as the model's prediction type says), any float dtype.

What a caller relies on beyond the call (``spec``, ``capturable``, ``reuses_output``, ``prepare``,
``close``) is declared on :class:`DenoiserBase` with defaults; adapters subclass it, and
:func:`as_denoiser` wraps any other callable once (docs/ARCHITECTURE.md, "Denoiser protocol").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import ConfigError, InputError


@dataclass(frozen=True)
class Cond:
    """Conditioning of one batch; every tensor's first dimension is the batch.

    encoder_hidden_states: [B, L, D] text-encoder states (D = the UNet's cross_attention_dim).
    text_embeds:           [B, P] pooled text embedding (SDXL-style ``text_time`` models), else None.
    time_ids:              [B, 6] SDXL size/crop conditioning, else None.
    timestep_cond:         [B, time_cond_proj_dim] LCM guidance-scale embedding, else None (the UNet
                           adapter fills it in ``prepare``).
    guidance:              [B] embedded guidance scale of a guidance-distilled teacher (FLUX.1-dev: its
                           "CFG" is an input, one batch-B forward), else None. The sampler fills it from
                           the call's device-resident cfg, so a captured graph replays with a new w.
    """

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def batch(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    def map(self, fn) -> "Cond":
        return Cond(**{k: fn(v) for k, v in self.tensors().items()})

    def to(self, device=None, dtype=None) -> "Cond":
        return self.map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def expand(self, batch: int) -> "Cond":
        """Rows broadcast to ``batch`` (from 1 or ``batch`` rows), materialized once."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise InputError(f"conditioning has {self.batch} rows; pass 1 (shared) or {batch} (one per sample)")
        return self.map(lambda v: v.expand((batch,) + tuple(v.shape[1:])).contiguous())

    @staticmethod
    def cat(a: "Cond", b: "Cond") -> "Cond":
        ka, kb = set(a.tensors()), set(b.tensors())
        if ka != kb:
            raise InputError(f"conditionings to stack differ in fields: {sorted(ka)} vs {sorted(kb)}")
        for k in ka:
            if getattr(a, k).shape[1:] != getattr(b, k).shape[1:]:
                raise InputError(f"{k} of the uncond rows is {tuple(getattr(a, k).shape)} but of the cond rows "
                                 f"{tuple(getattr(b, k).shape)}; encode both with the same tokens and width")
        return Cond(**{k: torch.cat([getattr(a, k), getattr(b, k).to(getattr(a, k).device)]) for k in ka})


@dataclass(frozen=True)
class ModelSpec:
    """What a model accepts, for validation before any forward runs (None: not checked)."""

    in_channels: int | None = None
    cross_attention_dim: int | None = None
    text_embeds_dim: int | None = None  # set for SDXL-style "text_time" conditioning
    time_ids_dim: int | None = None
    time_cond_proj_dim: int | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    prediction_type: str | None = None


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...


class DenoiserBase:
    """Base of every distpp Denoiser: the capabilities callers rely on, as class attributes with defaults.

    spec:          what the model accepts (validated before anything runs; None fields are not checked).
    capturable:    False for a model whose forward synchronizes the host (ONNX Runtime): a GraphRunner
                   then runs its loops eagerly over the static buffers.
    reuses_output: True when the returned tensor is a buffer the next call overwrites (TensorRT): the
                   student and teacher must then be distinct objects.
    prepare(cond): called once per sampling call, before the loop (default: ``cond`` unchanged).
    close():       release sessions / engines (default: nothing to release).
    """

    spec: ModelSpec = ModelSpec()
    capturable: bool = True
    reuses_output: bool = False

    @property
    def name(self) -> str:
        """A label for messages and graph keys: the model's class name."""
        return type(self).__name__

    def prepare(self, cond: Cond) -> Cond:
        return cond

    def close(self) -> None:
        return None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(x, t, cond)")


class CallableDenoiser(DenoiserBase):
    """A plain callable (an analytic test model, a lambda, a user's function) as a DenoiserBase.

    Its ``spec`` and ``prepare``, when it has them, are read once here; the capability flags keep the
    base class defaults unless the callable declares them (an object with ``capturable = False``).
    """

    def __init__(self, fn):
        if not callable(fn):
            raise ConfigError(f"a Denoiser must be a callable (x, t, cond) -> prediction, got {type(fn).__name__}")
        self.fn = fn
        self.spec = getattr(fn, "spec", None) or ModelSpec()
        self.capturable = bool(getattr(fn, "capturable", True))
        self.reuses_output = bool(getattr(fn, "reuses_output", False))
        self._prepare = getattr(fn, "prepare", None)
        self._close = getattr(fn, "close", None)

    @property
    def name(self) -> str:
        return type(self.fn).__name__

    def prepare(self, cond: Cond) -> Cond:
        return self._prepare(cond) if self._prepare is not None else cond

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def __call__(self, x, t, cond):
        return self.fn(x, t, cond)


def as_denoiser(model: Any) -> DenoiserBase | None:
    """``model`` itself when it is a DenoiserBase (or None), else the callable wrapped once."""
    if model is None or isinstance(model, DenoiserBase):
        return model
    return CallableDenoiser(model)


def check_cond(who: str, spec: ModelSpec, cond: Cond, batch: int | None) -> None:
    """Raise InputError unless ``cond`` fits ``spec`` with ``batch`` rows (None: its own row count)."""
    if not isinstance(cond, Cond):
        raise InputError(f"{who} conditioning must be a distpp.Cond, got {type(cond).__name__}")
    ehs = cond.encoder_hidden_states
    if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3:
        raise InputError(f"{who} encoder_hidden_states must be a [batch, tokens, width] tensor, "
                         f"got {getattr(ehs, 'shape', type(ehs).__name__)}")
    batch = ehs.shape[0] if batch is None else batch
    for name, v in cond.tensors().items():
        if not isinstance(v, torch.Tensor) or v.dim() < 1 or v.numel() == 0 or v.device.type == "meta":
            raise InputError(f"{who} {name} must be a non-empty [batch, ...] tensor holding data (not meta), got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
        if v.shape[0] != batch:
            raise InputError(f"{who} {name} has batch {v.shape[0]}; expected {batch} (one row per sample)")
        if not v.is_floating_point():
            raise InputError(f"{who} {name} must be a float tensor, got {v.dtype}")
    if spec.cross_attention_dim is not None and ehs.shape[-1] != spec.cross_attention_dim:
        raise InputError(f"{who} encoder_hidden_states width is {ehs.shape[-1]}; the model's "
                         f"cross_attention_dim is {spec.cross_attention_dim}: encode with the matching text encoder")
    if spec.text_embeds_dim is not None:
        if cond.text_embeds is None or cond.time_ids is None:
            raise InputError(f"{who} is an SDXL-style model: pass Cond(text_embeds=[B, {spec.text_embeds_dim}], "
                             f"time_ids=[B, {spec.time_ids_dim}])")
        if tuple(cond.text_embeds.shape[1:]) != (spec.text_embeds_dim,):
            raise InputError(f"{who} text_embeds has shape {tuple(cond.text_embeds.shape)}; "
                             f"expected [B, {spec.text_embeds_dim}]")
        if tuple(cond.time_ids.shape[1:]) != (spec.time_ids_dim,):
            raise InputError(f"{who} time_ids has shape {tuple(cond.time_ids.shape)}; expected [B, {spec.time_ids_dim}]")


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LCM's guidance-scale embedding of ``w`` ([B]) -> [B, dim]: the sinusoidal embedding of 1000*w
    that diffusers' LCM pipeline feeds as ``timestep_cond`` (tested equal to its implementation; kept
    here so the core does not import transformers through the pipeline module)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = (w.to(dtype) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


SDXL_TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


def text_time_dims(cfg) -> tuple[int | None, int | None]:
    """(pooled text_embeds width, time_ids width) of a diffusers UNet config (object or dict):
    (None, None) for SD1.5-style UNets, from ``projection_class_embeddings_input_dim`` for SDXL-style
    ("text_time") ones; ConfigError for other ``addition_embed_type`` values."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    kind = get("addition_embed_type")
    if kind is None:
        return None, None
    if kind != "text_time":
        raise ConfigError(f"UNet addition_embed_type {kind!r} is not supported "
                          "(supported: none for SD1.5-style, 'text_time' for SDXL-style)")
    pooled = int(get("projection_class_embeddings_input_dim")) - SDXL_TIME_IDS * int(get("addition_time_embed_dim"))
    return pooled, SDXL_TIME_IDS


def sdxl_time_ids(height: float, width: float, rows: int, device=None) -> torch.Tensor:
    """[rows, 6] float32 SDXL micro-conditioning at native size, no crop: (h, w, 0, 0, h, w) in pixels."""
    row = torch.tensor([[float(height), float(width), 0.0, 0.0, float(height), float(width)]], device=device)
    return row.expand(rows, SDXL_TIME_IDS).contiguous()


class UNetDenoiser(DenoiserBase):
    """Adapter from a diffusers ``UNet2DConditionModel`` to the Denoiser protocol.

    Handles SD1.5-style (encoder states only) and SDXL-style (``text_time``: pooled text_embeds and
    time_ids) conditioning, and LCM's guidance-scale embedding for UNets with ``time_cond_proj_dim``:
    ``w_embed`` is the student's w (diffusers' LCM pipeline passes guidance_scale - 1; its default
    guidance_scale 8.5 gives the default 7.5). The embedding is computed once per call in ``prepare``.
    """

    def __init__(self, unet, *, w_embed: float = 7.5, prediction_type: str | None = None):
        cfg = unet.config
        self.unet = unet
        self.w_embed = float(w_embed)
        text_dim, time_dim = text_time_dims(cfg)
        cad = cfg.cross_attention_dim
        param = next(unet.parameters())
        self.spec = ModelSpec(
            in_channels=int(cfg.in_channels),
            cross_attention_dim=int(cad) if isinstance(cad, int) else None,
            text_embeds_dim=text_dim,
            time_ids_dim=time_dim,
            time_cond_proj_dim=cfg.time_cond_proj_dim,
            dtype=param.dtype,
            device=param.device,
            prediction_type=prediction_type,
        )

    def prepare(self, cond: Cond) -> Cond:
        dim = self.spec.time_cond_proj_dim
        if dim is None or cond.timestep_cond is not None:
            return cond
        w = torch.full((cond.batch,), self.w_embed, dtype=torch.float32)
        emb = guidance_scale_embedding(w, dim).to(device=cond.encoder_hidden_states.device,
                                                  dtype=cond.encoder_hidden_states.dtype)
        return replace(cond, timestep_cond=emb)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return unet_forward(self.unet, x, t, cond)


def unet_forward(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """One diffusers UNet2DConditionModel call (``unet`` may be compiled or wrapped) -> [b, C, H, W]:
    SDXL-style ``added_cond_kwargs`` when ``cond`` carries pooled text_embeds, LCM's timestep_cond as is.
    The one place the eager, compile and ONNX-export paths call a UNet."""
    added = None
    if cond.text_embeds is not None:
        added = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
    return unet(x, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=cond.timestep_cond,
                added_cond_kwargs=added, return_dict=False)[0]


class CFGDenoiser(DenoiserBase):
    """A Denoiser with classifier-free guidance: one batch-2b forward of ``model`` on [uncond; cond],
    combined as m_u + scale * (m_c - m_u). For students that are run with CFG on request (ALGORITHM.md:
    distilled students run without CFG by default). It concatenates its inputs each call, so unlike the
    default path it allocates per step; the teacher's CFG does not go through it (the sampler stacks
    the teacher's batch once per call and fuses the combine).

    uncond: the negative conditioning, 1 row (shared) or b rows.
    """

    def __init__(self, model, scale: float, uncond: Cond):
        from .config import check_cfg

        self.model, self.scale = as_denoiser(model), check_cfg(scale)
        self.uncond = uncond
        self.spec = self.model.spec
        self.capturable = False  # the uncond rows are prepared (host-to-device copy) on every call

    def prepare(self, cond: Cond) -> Cond:
        return self.model.prepare(cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b = x.shape[0]
        unc = self.model.prepare(self.uncond.expand(b).to(x.device, cond.encoder_hidden_states.dtype))
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), Cond.cat(unc, cond))
        mu, mc = out[:b], out[b:]
        return torch.lerp(mu, mc, self.scale) if self.scale != 1.0 else mc

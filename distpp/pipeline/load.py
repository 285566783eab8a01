"""Phase 2 of ``Pipeline.from_pretrained``: load the weights a :class:`~.resolve.LoadPlan` names.

Everything that can be checked from configs was checked by ``resolve``; here the UNets, text encoders
and VAE load, a LoRA is fused into a copy of the teacher UNet (with the file's adapter metadata, as
diffusers reads it), and a student pipeline's encoders / VAE are dropped for the teacher's when they
are the same (same tokenizers and same weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .encode import FluxPromptEncoder, PromptEncoder, SD3PromptEncoder, same_tokenizers
from .fetch import from_pretrained, load_state_dict, load_unet
from .resolve import LoadPlan


@dataclass(frozen=True)
class LoadReport:
    """What ``from_pretrained`` loaded and shared (for logs and tests).

    lora_mode:     "fused_copy" for a LoRA student, else None.
    lora_metadata: the LoRA file carried diffusers' adapter metadata (rank, alpha), which set its scale.
    """

    student_kind: str
    sdxl: bool
    shared_text_encoders: bool
    vae_source: str
    vae_dtype: torch.dtype
    lora_mode: str | None = None
    lora_metadata: bool = False


@dataclass
class Loaded:
    """The loaded parts of a pipeline; ``teacher_text`` None means the student's encoders serve both."""

    student_unet: Any  # a UNet, or an SD3 / FLUX transformer (plan.arch "sd3" / "flux")
    teacher_unet: Any
    vae: Any
    student_text: PromptEncoder | SD3PromptEncoder | FluxPromptEncoder
    teacher_text: PromptEncoder | SD3PromptEncoder | FluxPromptEncoder | None
    report: LoadReport


def load(plan: LoadPlan) -> Loaded:
    """Load every part of ``plan`` onto its device (UNets / transformers and encoders in ``plan.dtype``; the
    VAE in float32 when upcast)."""
    lfo = dict(local_files_only=plan.offline)
    if plan.arch != "unet":
        return _load_transformers(plan, lfo)
    t_unet = load_unet(plan.teacher, subfolder="unet", dtype=plan.dtype, **lfo)
    lora_mode, lora_meta = None, False
    if plan.kind == "pipeline":
        s_unet = load_unet(plan.student, subfolder="unet", dtype=plan.dtype, **lfo)
    elif plan.kind == "unet":
        s_unet = load_unet(plan.student, subfolder=plan.student_subfolder, dtype=plan.dtype, **lfo)
    elif plan.kind == "unet_file":
        s_unet = unet_from_file(t_unet, plan.student_file)
    else:
        s_unet, lora_meta = fused_lora_copy(t_unet, plan.student_file, plan.lora_scale, plan.sdxl)
        lora_mode = "fused_copy"
    texts = _texts(plan, lambda ref, names: load_text(ref, names, plan.dtype, lfo))
    return _finish(plan, lfo, s_unet, t_unet, *texts, lora_mode, lora_meta)


def _load_transformers(plan: LoadPlan, lfo: dict) -> Loaded:
    """An SD3 or FLUX teacher pipeline and its full student pipeline; the student's encoders are dropped for
    the teacher's when they are the same (tokenizers and weights)."""
    import diffusers

    cls = diffusers.SD3Transformer2DModel if plan.arch == "sd3" else diffusers.FluxTransformer2DModel

    def transformer(ref: str, who: str):
        return from_pretrained(cls.from_pretrained, ref, f"{who} transformer", subfolder="transformer",
                               torch_dtype=plan.dtype, **lfo).eval().requires_grad_(False)

    t_model, s_model = transformer(plan.teacher, "teacher"), transformer(plan.student, "student")
    texts = _texts(plan, lambda ref, names: load_t5_text(plan.arch, ref, plan.dtype, plan.max_sequence_length, lfo))
    return _finish(plan, lfo, s_model, t_model, *texts, None, False)


def _texts(plan: LoadPlan, load_set):
    """(student encoders or None, teacher encoders, shared): ``load_set(ref, names)`` loads one encoder set;
    a student pipeline's own set is dropped (None, shared) when it equals the teacher's."""
    t_text = load_set(plan.teacher, plan.teacher_encoders)
    if not plan.student_encoders:
        return None, t_text, True
    s_text = load_set(plan.student, plan.student_encoders)
    shared = same_text(s_text, t_text)
    return (None if shared else s_text), t_text, shared


def _finish(plan: LoadPlan, lfo: dict, s_model, t_model, s_text, t_text, shared: bool, lora_mode, lora_meta) -> Loaded:
    """Load the VAE (upcast when asked), move every part to the plan's device, and report what is shared."""
    vae, vae_source = load_vae(plan, lfo)
    upcast = plan.upcast_vae
    if upcast is None:
        upcast = plan.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    vae_dtype = torch.float32 if upcast else plan.dtype
    vae = vae.to(device=plan.device)
    if next(vae.parameters()).dtype != vae_dtype:  # loaded in plan.dtype: cast only to upcast
        vae = vae.to(dtype=vae_dtype)
    for m in (t_model, s_model, *t_text.encoders, *(s_text.encoders if s_text else ())):
        m.to(device=plan.device)
    report = LoadReport(plan.kind, plan.sdxl, shared, vae_source, next(vae.parameters()).dtype, lora_mode, lora_meta)
    if shared:
        return Loaded(s_model, t_model, vae, t_text, None, report)
    return Loaded(s_model, t_model, vae, s_text, t_text, report)


def same_weights(a, b) -> bool:
    """True when two modules are the same object or have the same class, config and parameters."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    ca, cb = getattr(a, "config", None), getattr(b, "config", None)
    if ca is not None and cb is not None:
        da, db = (c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in (ca, cb))
        drop = ("_name_or_path", "_commit_hash", "transformers_version", "_diffusers_version", "dtype", "torch_dtype")
        if {k: v for k, v in da.items() if k not in drop} != {k: v for k, v in db.items() if k not in drop}:
            return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_text(a, b) -> bool:
    """Two encoder sets give the same conditioning for every prompt: same tokenizers and same weights."""
    return len(a.encoders) == len(b.encoders) and same_tokenizers(a.tokenizers, b.tokenizers) and all(
        same_weights(x, y) for x, y in zip(a.encoders, b.encoders))


def unet_from_file(teacher_unet, path: str):
    """The teacher's UNet architecture with a student's state dict (SDXL-Lightning, DMD2); its keys and
    shapes were checked by ``resolve.check_unet_file``."""
    unet = copy.deepcopy(teacher_unet)
    unet.load_state_dict(load_state_dict(path), strict=True)
    return unet.eval().requires_grad_(False)


def fused_lora_copy(teacher_unet, path: str, scale: float, sdxl: bool):
    """(the teacher UNet deep-copied with the LoRA fused in and the adapter layers removed, whether the file
    carried adapter metadata). The file's ``lora_adapter_metadata`` (rank, alpha, targets) sets the adapter
    config as in diffusers' ``load_lora_weights``; without it, rank and alpha come from the keys."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kw = dict(unet_config=teacher_unet.config) if sdxl else {}
    # lora_state_dict converts kohya / A1111 key layouts to diffusers' "unet.*" keys.
    state, alphas, metadata = loader.lora_state_dict(path, return_lora_metadata=True, **kw)
    if any(k.startswith("text_encoder") for k in state):
        raise ConfigError(f"{path!r} also adapts the text encoders, which distpp does not support; "
                          "pass a UNet-only LoRA (LCM-LoRA is one)")
    prefix = "unet" if any(k.startswith("unet.") for k in state) else None
    if prefix is None and metadata:
        metadata = {k.removeprefix("unet."): v for k, v in metadata.items()}
    unet = copy.deepcopy(teacher_unet)
    try:
        unet.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, metadata=metadata,
                               adapter_name="student")
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"the LoRA {path!r} does not fit the teacher's UNet ({e}); pass a LoRA trained on this "
                          "teacher") from e
    unet.fuse_lora(lora_scale=float(scale))
    unet.unload_lora()
    return unet.eval().requires_grad_(False), bool(metadata)


def load_text(ref: str, names: tuple[str, ...], dtype: torch.dtype, lfo: dict) -> PromptEncoder:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    toks, encs = [], []
    for i, name in enumerate(names):
        tok_sub = "tokenizer" if i == 0 else "tokenizer_2"
        toks.append(from_pretrained(CLIPTokenizer.from_pretrained, ref, "tokenizer", subfolder=tok_sub, **lfo))
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        # Cast after loading: transformers 4.x takes torch_dtype=, 5.x dtype=.
        encs.append(from_pretrained(cls.from_pretrained, ref, name, subfolder=name, **lfo).to(dtype).eval()
                    .requires_grad_(False))
    return PromptEncoder(toks, encs)


def load_t5_text(arch: str, ref: str, dtype: torch.dtype, max_sequence_length: int, lfo: dict):
    """The text encoders of a transformer pipeline with their tokenizers: SD3 CLIP-L, CLIP-G (both
    CLIPTextModelWithProjection) and T5; FLUX CLIP-L (CLIPTextModel) and T5 (T5EncoderModel)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    clips = (CLIPTextModelWithProjection,) * 2 if arch == "sd3" else (CLIPTextModel,)
    names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")]
    toks, encs = [], []
    for i, cls in enumerate((*clips, T5EncoderModel)):
        tok_sub, name = names[i]
        tok_cls = CLIPTokenizer if cls is not T5EncoderModel else AutoTokenizer
        toks.append(from_pretrained(tok_cls.from_pretrained, ref, tok_sub, subfolder=tok_sub, **lfo))
        encs.append(from_pretrained(cls.from_pretrained, ref, name, subfolder=name, **lfo).to(dtype).eval()
                    .requires_grad_(False))
    encoder = SD3PromptEncoder if arch == "sd3" else FluxPromptEncoder
    return encoder(toks, encs, max_sequence_length=max_sequence_length)


def load_vae(plan: LoadPlan, lfo: dict):
    """(AutoencoderKL, source): the given VAE, else the student pipeline's when its weights differ from
    the teacher's (its latents are decoded), else the teacher's."""
    from diffusers import AutoencoderKL

    if plan.vae is not None:
        if not isinstance(plan.vae, str):
            return plan.vae, "given"
        return from_pretrained(AutoencoderKL.from_pretrained, plan.vae, "VAE", torch_dtype=plan.dtype, **lfo), plan.vae
    t_vae = from_pretrained(AutoencoderKL.from_pretrained, plan.teacher, "VAE", subfolder="vae", torch_dtype=plan.dtype,
                            **lfo)
    if plan.student_vae:
        s_vae = from_pretrained(AutoencoderKL.from_pretrained, plan.student, "VAE", subfolder="vae",
                                torch_dtype=plan.dtype, **lfo)
        if not same_weights(s_vae, t_vae):
            return s_vae, "student"
    return t_vae, "teacher"

"""Text-to-image with a distilled student and its teacher: ``Pipeline.from_pretrained`` + ``pipe(prompts)``.

Loading (diffusers / transformers ``from_pretrained``; local folders or Hub ids):
  teacher: a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, and for
           SDXL text_encoder_2/, tokenizer_2/; scheduler/ gives its prediction type).
  student, by ``student_kind`` ("auto" detects it):
    "pipeline": a full diffusers pipeline (e.g. SDXL-Turbo); its text encoders and VAE are kept only
                when their weights differ from the teacher's, else the teacher's are shared;
    "unet":     a UNet folder (config.json at the root or in ``student_subfolder``; e.g. LCM-SDXL);
    "unet_file": a UNet state-dict file ``student_weights`` loaded into the teacher's UNet config
                (SDXL-Lightning, DMD2);
    "lora":     a LoRA file on the teacher's base weights (LCM-LoRA). distpp keeps a *fused copy*: the
                teacher UNet deep-copied, the adapter fused into it and the adapter layers removed, so
                the student is a plain UNet (no per-forward LoRA matmuls, no adapter switching between
                the student and teacher forwards, nothing special for graph capture) at the cost of one
                more UNet in memory (SDXL fp16: ~5.1 GB). See README "Text-to-image pipeline".
All configs are read and checked (family, latent channels, conditioning widths) before any weights load.

Calling: prompts are encoded once per call per distinct encoder set, with an LRU cache keyed by prompt
text; negative prompts likewise; the sampler loop runs on latents only; the VAE decodes after the loop.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from .config import SamplerConfig
from .denoiser import Cond, ModelSpec, UNetDenoiser, sdxl_time_ids, text_time_dims
from .errors import ConfigError, InputError, WeightsNotFoundError
from .sampler import Sampler, _check_device_dtype
from .schedules import build_schedule

STUDENT_KINDS = ("auto", "pipeline", "unet", "unet_file", "lora")
LORA_FILE = "pytorch_lora_weights.safetensors"
OUTPUT_TYPES = ("pil", "pt", "latent")

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class KnownPair:
    """A released student with its teacher and the paper's settings (ALGORITHM.md "Defaults and ranges").

    None of these was run in distpp's CPU tests (no weights can be downloaded there); ids as published.
    """

    student: str
    teacher: str
    family: str
    lam: float
    steps: int = 4
    guided_steps: int = 1
    cfg: float = 7.5
    student_weights: str | None = None
    note: str = ""


KNOWN_PAIRS: dict[str, KnownPair] = {
    "lcm-sdxl": KnownPair("latent-consistency/lcm-sdxl", SDXL_BASE, "lcm", 0.01, note="UNet folder"),
    "lcm-lora-sdxl": KnownPair("latent-consistency/lcm-lora-sdxl", SDXL_BASE, "lcm", 0.01,
                               note="LoRA, fused into a copy of the teacher UNet"),
    "dmd2": KnownPair("tianweiy/DMD2", SDXL_BASE, "dmd2", 0.01, student_weights="dmd2_sdxl_4step_unet_fp16.bin",
                      note="UNet state dict; timesteps 999, 749, 499, 249"),
    "sdxl-lightning": KnownPair("ByteDance/SDXL-Lightning", SDXL_BASE, "euler", 0.1,
                                student_weights="sdxl_lightning_4step_unet.safetensors", note="UNet state dict"),
    "sdxl-turbo": KnownPair("stabilityai/sdxl-turbo", SDXL_BASE, "euler_a", 0.05,
                            note="full pipeline, 512x512; shares the teacher's text encoders when identical"),
    "sd15-lcm-lora": KnownPair("latent-consistency/lcm-lora-sdv1-5", SD15_BASE, "lcm", 0.01,
                               note="LoRA, fused into a copy of the teacher UNet"),
    "sd15-lcm-dreamshaper": KnownPair("SimianLuo/LCM_Dreamshaper_v7", "Lykon/dreamshaper-7", "lcm", 0.01,
                                      note="full pipeline distilled from Dreamshaper v7 (an SD1.5 fine-tune)"),
}


# ------------------------------------------------------------------------------------------------------
# Where weights live: local folders or Hub ids, with clear errors offline.
# ------------------------------------------------------------------------------------------------------
def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_local(ref: str) -> bool:
    """A path that exists, or one that cannot be a Hub id ("owner/name" or "name"); ``ref`` is expanded
    (``~``) by ``Pipeline.from_pretrained`` before it gets here."""
    ref = str(ref)
    return (os.path.exists(ref) or ref.startswith(("/", ".", "~")) or ref.count("/") > 1
            or (os.sep != "/" and os.sep in ref))


def _fetch(ref: str, filename: str, subfolder: str | None, offline: bool) -> str | None:
    """Local path of ``subfolder/filename`` in ``ref`` (Hub files are downloaded or read from the
    cache); None when the repo has no such file. Raises WeightsNotFoundError when ``ref`` itself is
    missing (no folder; Hub id not cached offline)."""
    if _is_local(ref):
        if not os.path.isdir(ref) and not os.path.isfile(ref):
            raise WeightsNotFoundError(f"no model folder at {ref!r}; pass an existing diffusers folder or a Hub id")
        path = os.path.join(ref, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(ref, filename, subfolder=subfolder, local_files_only=offline)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: must come first
        if offline:
            return None
        raise WeightsNotFoundError(f"could not reach the Hub for {ref!r}; pass a local folder or pre-download it")
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError as e:
        raise WeightsNotFoundError(f"no Hub repository {ref!r}; pass a local folder or an existing Hub id") from e
    except OSError as e:
        raise WeightsNotFoundError(f"could not fetch {filename!r} from {ref!r}: {e}") from e


def _read_json(ref: str, filename: str, subfolder: str | None, offline: bool, what: str) -> dict:
    path = _fetch(ref, filename, subfolder, offline)
    if path is None:
        where = f"{subfolder}/{filename}" if subfolder else filename
        hint = " (offline: the Hub id is not in the local cache; pre-download it or pass a folder)" \
            if offline and not _is_local(ref) else ""
        raise WeightsNotFoundError(f"{what}: {ref!r} has no {where}{hint}")
    with open(path) as f:
        return json.load(f)


def _load(loader: Callable, ref: str, what: str, **kw):
    try:
        return loader(ref, **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise WeightsNotFoundError(f"could not load the {what} from {ref!r}"
                                   f"{' (' + kw['subfolder'] + ')' if kw.get('subfolder') else ''}: {e}. "
                                   "Offline, pass a local folder or pre-download the model") from e


# ------------------------------------------------------------------------------------------------------
# Prompt encoding with a per-prompt LRU cache.
# ------------------------------------------------------------------------------------------------------
class PromptEncoder:
    """One set of CLIP tokenizers/encoders: SD1.5-style (one encoder, last hidden state) or SDXL-style
    (two encoders, penultimate hidden states concatenated, pooled text_embeds from the second).

    encode(prompts) -> (states [B, L, D] float32, pooled [B, P] float32 | None) on the encoders' device.
    Rows are cached per prompt text (LRU of ``cache_size`` prompts); only unseen prompts run the encoders,
    in one batch.
    """

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], *, cache_size: int = 256):
        if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
            raise ConfigError("a prompt encoder takes one (SD1.5) or two (SDXL) tokenizer/encoder pairs")
        self.tokenizers, self.encoders = tuple(tokenizers), tuple(encoders)
        self.sdxl = len(encoders) == 2
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.encoder_calls = 0  # batches run through the encoders (tests check the cache with it)

    @property
    def width(self) -> int:
        return sum(int(e.config.hidden_size) for e in self.encoders)

    @property
    def pooled_width(self) -> int | None:
        return int(self.encoders[-1].config.projection_dim) if self.sdxl else None

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        new = list(OrderedDict.fromkeys(p for p in prompts if p not in self._cache))
        if new:
            states, pooled = self._run(new)
            for i, p in enumerate(new):
                self._cache[p] = (states[i], None if pooled is None else pooled[i])
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        while len(self._cache) > max(self.cache_size, len(set(prompts))):
            self._cache.popitem(last=False)
        states = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if self.sdxl else None
        return states, pooled

    @torch.inference_mode()
    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.encoder_calls += 1
        states, pooled = [], None
        for i, (tok, enc) in enumerate(zip(self.tokenizers, self.encoders)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=self.sdxl)
            # SDXL conditions on the penultimate layer of both encoders; SD1.5 on the last (normed) one.
            states.append((out.hidden_states[-2] if self.sdxl else out.last_hidden_state).float())
            if self.sdxl and i == 1:
                pooled = out.text_embeds.float()
        return torch.cat(states, dim=-1), pooled


# ------------------------------------------------------------------------------------------------------
# Components and checks.
# ------------------------------------------------------------------------------------------------------
def _same_weights(a, b) -> bool:
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


# Keys of a student pipeline's scheduler_config.json that define its noise schedule and step spacing.
_STUDENT_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                          "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "original_inference_steps",
                          "timestep_scaling")


def _unet_cond_dims(cfg: dict) -> tuple[int, int | None]:
    """(cross_attention_dim, pooled text_embeds width or None) of a UNet config."""
    return int(cfg["cross_attention_dim"]), text_time_dims(cfg)[0]


def check_pair_configs(student_unet: dict, teacher_unet: dict, student_text: tuple[int, int | None],
                       teacher_text: tuple[int, int | None]) -> None:
    """Raise ConfigError unless the UNet configs fit each other and their text encoders.

    *_unet: UNet config dicts; *_text: (states width, pooled width or None) of the encoders each uses.
    """
    cs, ct = int(student_unet["in_channels"]), int(teacher_unet["in_channels"])
    if cs != ct:
        raise ConfigError(f"the student takes {cs} latent channels but the teacher {ct}: they must share a "
                          "latent space (pick a student distilled from this teacher)")
    for who, cfg, (width, pooled) in (("student", student_unet, student_text), ("teacher", teacher_unet, teacher_text)):
        cad, upooled = _unet_cond_dims(cfg)
        if cad != width:
            raise ConfigError(f"the {who} UNet's cross_attention_dim is {cad} but its text encoders give width "
                              f"{width}: pass a {who} whose conditioning matches the encoders (SD1.5 vs SDXL?)")
        if upooled != pooled:
            raise ConfigError(f"the {who} UNet expects pooled text_embeds of width {upooled} but its text "
                              f"encoders give {pooled}: SD1.5-style and SDXL-style models cannot be mixed")


@dataclass(frozen=True)
class LoadReport:
    """What ``from_pretrained`` loaded and shared (for logs and tests)."""

    student_kind: str
    sdxl: bool
    shared_text_encoders: bool
    vae_source: str
    vae_dtype: torch.dtype
    lora_mode: str | None


class _StepProgress:
    """A timer-shaped hook for ``Sampler.sample(timer=...)`` that advances a progress bar per student
    forward (one per step)."""

    def __init__(self, update: Callable[[int], Any]):
        self.update = update

    def lap(self, stage: str) -> None:
        if stage == "student":
            self.update(1)


# ------------------------------------------------------------------------------------------------------
# The pipeline.
# ------------------------------------------------------------------------------------------------------
class Pipeline:
    """prompt -> image with a guided student (see module docstring for loading).

    Build with :meth:`from_pretrained`, or directly from loaded parts (student/teacher UNets, a VAE,
    PromptEncoders: ``teacher_text`` None means the student's encoders serve the teacher too).
    """

    def __init__(self, student_unet, teacher_unet, vae, student_text: PromptEncoder,
                 teacher_text: PromptEncoder | None = None, *, config: SamplerConfig | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, w_embed: float = 7.5,
                 force_zeros_for_empty_prompt: bool = False, report: LoadReport | None = None):
        self.config = config or SamplerConfig()
        self.device, self.dtype = torch.device(device), dtype
        check_pair_configs(dict(student_unet.config), dict(teacher_unet.config),
                           (student_text.width, student_text.pooled_width),
                           ((teacher_text or student_text).width, (teacher_text or student_text).pooled_width))
        self.student = UNetDenoiser(student_unet, w_embed=w_embed)
        self.teacher = UNetDenoiser(teacher_unet)
        self.vae = vae
        self.student_text, self.teacher_text = student_text, teacher_text
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.latent_channels = int(student_unet.config.in_channels)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.default_size = int(student_unet.config.sample_size) * self.vae_scale_factor
        self.report = report
        self._samplers: dict[SamplerConfig, Sampler] = {}

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, student: str, teacher: str, family: str, *, student_kind: str = "auto",
                        student_weights: str | None = None, student_subfolder: str | None = None,
                        vae: str | None = None, upcast_vae: bool | None = None, lora_scale: float = 1.0,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        w_embed: float = 7.5, local_files_only: bool | None = None,
                        prediction_type: str | None = None, teacher_prediction_type: str | None = None,
                        **sampler_kwargs) -> "Pipeline":
        """Load a student/teacher pair.

        student, teacher:  local folders or Hub ids (teacher: a full diffusers pipeline).
        family:            the student's sampler family (lcm, dmd2, euler, euler_a, ddim).
        student_kind:      auto | pipeline | unet | unet_file | lora (module docstring).
        student_weights:   a file inside ``student`` (UNet state dict or LoRA), e.g.
                           "sdxl_lightning_4step_unet.safetensors".
        vae:               another VAE (folder/Hub id), e.g. "madebyollin/sdxl-vae-fp16-fix".
        upcast_vae:        decode in float32; default: when the model dtype is float16 and the VAE's
                           config says ``force_upcast`` (the SDXL VAE overflows in fp16).
        lora_scale:        LoRA strength fused into the student copy.
        device, dtype:     default cuda+float16 when a GPU is present, else cpu+float32.
        w_embed:           the LCM student's guidance-scale embedding input (diffusers' 8.5 - 1).
        local_files_only:  never touch the network (default: the HF_HUB_OFFLINE setting).
        sampler_kwargs:    the rest of SamplerConfig (steps, guided_steps, lam, cfg, teacher_rule, ...).
        """
        if student_kind not in STUDENT_KINDS:
            raise ConfigError(f"unknown student_kind {student_kind!r}; pass one of {', '.join(STUDENT_KINDS)}")
        student, teacher = os.path.expanduser(str(student)), os.path.expanduser(str(teacher))
        if isinstance(vae, (str, os.PathLike)):
            vae = os.path.expanduser(str(vae))
        # Family, sampler settings, device and dtype first: nothing loads for a config that cannot run.
        config = SamplerConfig(family=family, **sampler_kwargs)
        offline = _offline(local_files_only)
        try:
            device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {device!r} is not a torch device ({e}); pass 'cpu' or 'cuda'") from e
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        _check_device_dtype("pipeline", ModelSpec(), device, dtype)

        index = _read_json(teacher, "model_index.json", None, offline, "teacher (a diffusers pipeline folder)")
        t_unet_cfg = _read_json(teacher, "config.json", "unet", offline, "teacher UNet")
        kind = student_kind if student_kind != "auto" else _detect_kind(student, student_weights,
                                                                        student_subfolder, offline)
        s_index = None
        if kind == "pipeline":
            s_index = _read_json(student, "model_index.json", None, offline, "student pipeline")
            s_unet_cfg = _read_json(student, "config.json", "unet", offline, "student UNet")
        elif kind == "unet":
            s_unet_cfg = _read_json(student, "config.json", student_subfolder, offline, "student UNet")
        else:
            if kind == "unet_file" and not student_weights:
                raise ConfigError("student_kind='unet_file' needs student_weights='<file in the student repo>'")
            s_unet_cfg = dict(t_unet_cfg)
        t_sched = _read_json_or_empty(teacher, "scheduler_config.json", "scheduler", offline)
        if teacher_prediction_type is None and "prediction_type" not in t_sched:
            warnings.warn(f"the teacher {teacher!r} has no scheduler/scheduler_config.json with a prediction_type "
                          "(not in the local cache offline?); assuming 'epsilon'. Pass teacher_prediction_type= "
                          "for a v-prediction teacher", stacklevel=2)
        teacher_prediction_type = teacher_prediction_type or t_sched.get("prediction_type", "epsilon")
        s_sched = _read_json_or_empty(student, "scheduler_config.json", "scheduler", offline) \
            if kind == "pipeline" else {}
        if prediction_type is None:
            prediction_type = s_sched.get("prediction_type", "epsilon")
        config = replace(config, prediction_type=prediction_type, teacher_prediction_type=teacher_prediction_type)
        carried = {k: s_sched[k] for k in _STUDENT_SCHEDULE_KEYS if k in s_sched}
        if carried and config.scheduler_config is None:
            # a full student pipeline ships the schedule it was distilled for (betas, timestep spacing, ...);
            # only those keys carry over: its scheduler class may differ from the family's
            config = replace(config, scheduler_config=carried)
        build_schedule(config.family, config.steps, timesteps=config.timesteps, prediction_type=prediction_type,
                       scheduler_config=config.scheduler_config)  # e.g. LCM steps > 50: refused before loading

        sdxl = _has(index, "text_encoder_2")
        enc_names = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
        t_text_cfgs = [_read_json(teacher, "config.json", n, offline, f"teacher {n}") for n in enc_names]
        t_text_dims = _text_dims(t_text_cfgs)
        s_own_text = kind == "pipeline" and _has(s_index, "text_encoder")
        s_text_dims = t_text_dims
        if s_own_text:
            s_sdxl = _has(s_index, "text_encoder_2")
            s_names = ("text_encoder", "text_encoder_2") if s_sdxl else ("text_encoder",)
            s_text_dims = _text_dims([_read_json(student, "config.json", n, offline, f"student {n}") for n in s_names])
        check_pair_configs(s_unet_cfg, t_unet_cfg, s_text_dims, t_text_dims)

        # --- every config checked: load weights -------------------------------------------------------
        lfo = dict(local_files_only=offline)
        t_unet = _load_unet(teacher, "unet", dtype, lfo)
        lora_mode = None
        if kind == "pipeline":
            s_unet = _load_unet(student, "unet", dtype, lfo)
        elif kind == "unet":
            s_unet = _load_unet(student, student_subfolder, dtype, lfo)
        elif kind == "unet_file":
            s_unet = _unet_from_file(t_unet, student, student_weights, student_subfolder, offline)
        else:
            s_unet, lora_mode = _fused_lora_copy(t_unet, student, student_weights, student_subfolder, offline,
                                                 lora_scale), "fused_copy"
        t_text = _load_text(teacher, enc_names, dtype, lfo)
        s_text, shared = None, True
        if s_own_text:
            s_text = _load_text(student, s_names, dtype, lfo)
            shared = len(s_text.encoders) == len(t_text.encoders) and all(
                _same_weights(a, b) for a, b in zip(s_text.encoders, t_text.encoders))
            if shared:
                s_text = None

        s_vae_ref = student if kind == "pipeline" and _has(s_index, "vae") else None
        vae_model, vae_source = _load_vae(vae, teacher, s_vae_ref, dtype, lfo)
        if upcast_vae is None:
            upcast_vae = dtype == torch.float16 and bool(getattr(vae_model.config, "force_upcast", False))
        vae_dtype = torch.float32 if upcast_vae else dtype
        vae_model = vae_model.to(device=device)
        if next(vae_model.parameters()).dtype != vae_dtype:
            vae_model = vae_model.to(dtype=vae_dtype)

        for m in (t_unet, s_unet, *t_text.encoders, *((s_text.encoders) if s_text else ())):
            m.to(device=device)
        report = LoadReport(kind, sdxl, shared, vae_source, next(vae_model.parameters()).dtype, lora_mode)
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", sdxl))
        if shared:
            return cls(s_unet, t_unet, vae_model, t_text, None, config=config, device=device, dtype=dtype,
                       w_embed=w_embed, force_zeros_for_empty_prompt=force_zeros, report=report)
        return cls(s_unet, t_unet, vae_model, s_text, t_text, config=config, device=device, dtype=dtype,
                   w_embed=w_embed, force_zeros_for_empty_prompt=force_zeros, report=report)

    # -- sampling ------------------------------------------------------------------------------------
    def sampler(self, guided_steps: int | None = None) -> Sampler:
        """The Sampler for this pipeline's config with ``guided_steps`` (built once, then reused)."""
        cfg = self.config if guided_steps is None else replace(self.config, guided_steps=int(guided_steps))
        if cfg not in self._samplers:
            self._samplers[cfg] = Sampler(self.student, self.teacher, cfg, device=self.device, dtype=self.dtype)
        return self._samplers[cfg]

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, height: int,
               width: int) -> dict[str, Cond | None]:
        """Conditioning for one batch: cond / teacher_cond [B], uncond / teacher_uncond [B] (None when
        ``negative_prompts`` is None). teacher_* is None when the teacher shares the student's encoders."""
        # SDXL micro-conditioning: original size, crop top-left, target size, in pixels.
        time_ids = sdxl_time_ids(height, width, len(prompts), self.device)

        def conds(enc: PromptEncoder, texts, zero_empty: bool) -> Cond:
            states, pooled = enc.encode(texts)
            if zero_empty:
                keep = torch.tensor([t != "" for t in texts], device=states.device, dtype=states.dtype)
                states = states * keep[:, None, None]
                pooled = None if pooled is None else pooled * keep[:, None]
            if pooled is None:
                return Cond(states.to(self.device))
            return Cond(states.to(self.device), pooled.to(self.device), time_ids)

        zero = self.force_zeros_for_empty_prompt
        out = {"cond": conds(self.student_text, prompts, False), "uncond": None,
               "teacher_cond": None, "teacher_uncond": None}
        if negative_prompts is not None:
            if self.teacher_text is None:
                out["uncond"] = conds(self.student_text, negative_prompts, zero)
            else:
                out["teacher_cond"] = conds(self.teacher_text, prompts, False)
                out["teacher_uncond"] = conds(self.teacher_text, negative_prompts, zero)
        return out

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] float32 latents -> [B, 3, h*f, w*f] float32 images in [0, 1] (f = VAE scale)."""
        cfg = self.vae.config
        vdtype = next(self.vae.parameters()).dtype
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:
            z = z + cfg.shift_factor
        img = self.vae.decode(z.to(vdtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 height: int | None = None, width: int | None = None, seeds: Sequence[int] | None = None,
                 guided_steps: int | None = None, lam: float | Sequence[float] | None = None,
                 cfg: float | Sequence[float] | None = None, output_type: str = "pil",
                 progress: Callable[[int], Any] | None = None):
        """Generate one image per prompt.

        prompt:          a string or a list of B strings; negative_prompt: one string or B strings.
        height, width:   pixels, multiples of the VAE scale factor (default: the student's native size).
        seeds:           one int per image (default 0..B-1); guided and unguided runs with the same
                         seeds share the base noise.
        guided_steps, lam, cfg: overrides of the pipeline config.
        output_type:     "pil" (list of PIL images), "pt" ([B, 3, H, W] float32 in [0, 1]) or "latent"
                         ([B, C, H/f, W/f] float32).
        progress:        called with 1 after each student step (e.g. a tqdm bar's ``update``).
        """
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"unknown output_type {output_type!r}; pass one of {', '.join(OUTPUT_TYPES)}")
        if output_type == "pil":
            _require_pil()
        height, width = self._size(height, width)
        f = self.vae_scale_factor
        sampler = self.sampler(guided_steps)
        guided = sampler.config.guided_steps > 0
        c = self.encode(prompts, negatives if guided else None, height, width)
        latents = sampler.sample(c["cond"], uncond=c["uncond"], teacher_cond=c["teacher_cond"],
                                 teacher_uncond=c["teacher_uncond"],
                                 latent_shape=(self.latent_channels, height // f, width // f),
                                 seeds=None if seeds is None else list(seeds), lam=lam, cfg=cfg,
                                 timer=_StepProgress(progress) if progress is not None else None)
        if output_type == "latent":
            return latents
        images = self.decode(latents)
        return images if output_type == "pt" else to_pil(images)

    def _size(self, height, width) -> tuple[int, int]:
        f = self.vae_scale_factor
        h = self.default_size if height is None else int(height)
        w = self.default_size if width is None else int(width)
        if h < f or w < f or h % f or w % f:
            raise InputError(f"height and width must be positive multiples of the VAE scale factor {f}; "
                             f"got {h}x{w}")
        return h, w


# ------------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------------
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
        from .errors import BackendUnavailableError

        raise BackendUnavailableError("output_type='pil' needs pillow: pip install 'distpp[pipeline]', "
                                      "or pass output_type='pt'") from e


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] float in [0, 1] -> list of B RGB PIL images."""
    from PIL import Image

    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _has(index: dict, component: str) -> bool:
    """Whether a model_index.json lists ``component`` (absent ones are missing or [null, null])."""
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and any(v is not None for v in entry)


def _read_json_or_empty(ref, filename, subfolder, offline) -> dict:
    path = _fetch(ref, filename, subfolder, offline)
    if path is None:
        return {}
    with open(path) as f:
        return json.load(f)


def _text_dims(cfgs: list[dict]) -> tuple[int, int | None]:
    width = sum(int(c["hidden_size"]) for c in cfgs)
    return width, (int(cfgs[-1]["projection_dim"]) if len(cfgs) == 2 else None)


def _detect_kind(student: str, weights: str | None, subfolder: str | None, offline: bool) -> str:
    if weights:
        path = _fetch(student, weights, subfolder, offline)
        if path is None:
            raise WeightsNotFoundError(f"student weights {weights!r} not found in {student!r}"
                                       f"{' (offline: not in the Hub cache)' if offline else ''}")
        return "lora" if any("lora" in k for k in _state_dict_keys(path)) else "unet_file"
    if _fetch(student, "model_index.json", None, offline):
        return "pipeline"
    if _fetch(student, "config.json", subfolder, offline):
        return "unet"
    if _fetch(student, LORA_FILE, subfolder, offline):
        return "lora"
    hint = " (offline: not in the Hub cache; pre-download it or pass a local folder)" \
        if offline and not _is_local(student) else ""
    raise WeightsNotFoundError(f"found no diffusers pipeline, UNet config or {LORA_FILE} in {student!r}{hint}; "
                               "pass student_kind=... and student_weights='<file>'")


def _state_dict_keys(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    try:  # memory-mapped: reading the key names must not load a multi-GB state dict
        return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys())
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be mapped
        return list(torch.load(path, map_location="cpu", weights_only=True).keys())


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_unet(ref, subfolder, dtype, lfo):
    from diffusers import UNet2DConditionModel

    unet = _load(UNet2DConditionModel.from_pretrained, ref, "UNet", subfolder=subfolder, torch_dtype=dtype, **lfo)
    return unet.eval().requires_grad_(False)


def _unet_from_file(teacher_unet, ref, weights, subfolder, offline):
    """The teacher's UNet architecture with a student's state dict (SDXL-Lightning, DMD2)."""
    path = _fetch(ref, weights, subfolder, offline)
    if path is None:
        raise WeightsNotFoundError(f"student weights {weights!r} not found in {ref!r}")
    unet = copy.deepcopy(teacher_unet)
    sd = _load_state_dict(path)
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights!r} does not fit the teacher's UNet ({len(missing)} missing keys, e.g. "
                          f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): pass a UNet "
                          "distilled from this teacher, or student_kind='lora' for a LoRA file")
    return unet.eval().requires_grad_(False)


def _fused_lora_copy(teacher_unet, ref, weights, subfolder, offline, scale):
    """The teacher UNet deep-copied with the LoRA fused in and the adapter layers removed."""
    from diffusers.utils import is_peft_available

    if not is_peft_available():
        from .errors import BackendUnavailableError

        raise BackendUnavailableError("LoRA students need peft: pip install 'distpp[pipeline]' (or pip install peft)")
    from diffusers import StableDiffusionXLPipeline

    weights = weights or LORA_FILE
    path = _fetch(ref, weights, subfolder, offline)
    if path is None:
        raise WeightsNotFoundError(f"LoRA file {weights!r} not found in {ref!r}")
    # lora_state_dict converts kohya / A1111 key layouts to diffusers' "unet.*" keys.
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(path)
    if any(k.startswith("text_encoder") for k in state):
        raise ConfigError(f"{weights!r} also adapts the text encoders, which distpp does not support; "
                          "pass a UNet-only LoRA (LCM-LoRA is one)")
    prefix = "unet" if any(k.startswith("unet.") for k in state) else None
    unet = copy.deepcopy(teacher_unet)
    unet.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, adapter_name="student")
    unet.fuse_lora(lora_scale=float(scale))
    unet.unload_lora()
    return unet.eval().requires_grad_(False)


def _load_text(ref, names, dtype, lfo) -> PromptEncoder:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    toks, encs = [], []
    for i, name in enumerate(names):
        tok_sub = "tokenizer" if i == 0 else "tokenizer_2"
        toks.append(_load(CLIPTokenizer.from_pretrained, ref, "tokenizer", subfolder=tok_sub, **lfo))
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        # Cast after loading: transformers 4.x takes torch_dtype=, 5.x dtype=.
        encs.append(_load(cls.from_pretrained, ref, name, subfolder=name, **lfo).to(dtype).eval()
                    .requires_grad_(False))
    return PromptEncoder(toks, encs)


def _load_vae(vae, teacher, student_pipeline, dtype, lfo):
    """(AutoencoderKL, source): the given VAE, else the student pipeline's when its weights differ from
    the teacher's (its latents are decoded), else the teacher's."""
    from diffusers import AutoencoderKL

    if vae is not None:
        if not isinstance(vae, str):
            return vae, "given"
        return _load(AutoencoderKL.from_pretrained, vae, "VAE", torch_dtype=dtype, **lfo), vae
    t_vae = _load(AutoencoderKL.from_pretrained, teacher, "VAE", subfolder="vae", torch_dtype=dtype, **lfo)
    if student_pipeline is not None:
        s_vae = _load(AutoencoderKL.from_pretrained, student_pipeline, "VAE", subfolder="vae", torch_dtype=dtype, **lfo)
        if not _same_weights(s_vae, t_vae):
            return s_vae, "student"
    return t_vae, "teacher"

"""Phase 1 of ``Pipeline.from_pretrained``: read every config and check everything, load no weights.

``resolve(...)`` returns a frozen :class:`LoadPlan` or raises (ConfigError, WeightsNotFoundError,
BackendUnavailableError) before any weights are read. It reads: the teacher's ``model_index.json``, UNet,
text-encoder, VAE and scheduler configs; the student's configs (pipeline / UNet folder), or the header of
its state-dict / LoRA file (key names and shapes, via the safetensors header or a memory-mapped torch
file). It checks: the student kind, the sampler config and schedule (diffusers' scheduler builds it, so
its refusals come here), the family against a student pipeline's scheduler class, device and dtype,
latent channels and conditioning widths of both UNets against their encoders and the VAE, a state-dict
file's keys and shapes against the teacher's UNet config, a LoRA's target shapes, and the backend.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..config import SamplerConfig
from ..denoiser import ModelSpec, text_time_dims
from ..errors import BackendUnavailableError, ConfigError, WeightsNotFoundError
from ..sampler import _check_device_dtype
from ..schedules import FAMILIES, build_schedule, family_scheduler_class
from .encode import check_max_sequence_length
from .fetch import check_exists, fetch, fetch_required, is_hub_id, offline as _offline, read_json, \
    read_json_or_empty, state_dict_shapes

STUDENT_KINDS = ("auto", "pipeline", "unet", "unet_file", "lora")
LORA_FILE = "pytorch_lora_weights.safetensors"

# Keys of a student pipeline's scheduler_config.json that define its noise schedule and step spacing.
_STUDENT_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                          "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "original_inference_steps",
                          "timestep_scaling")
_LORA_KEY = re.compile(r"^(?:unet\.)?(.+)\.lora_([AB])\.weight$")  # peft / diffusers layout


@dataclass(frozen=True)
class LoadPlan:
    """Everything ``load`` needs, decided from configs alone.

    kind:              pipeline | unet | unet_file | lora (the student's form).
    student_file:      local path of the student's UNet state dict or LoRA file (unet_file, lora).
    config:            the SamplerConfig, with prediction types and a student pipeline's schedule keys.
    sdxl:              SDXL-style conditioning (two text encoders, pooled embeds, time_ids).
    teacher_encoders:  the teacher's text-encoder subfolders; student_encoders: a student pipeline's own
                       (empty: the teacher's serve the student).
    student_vae:       the student pipeline has its own VAE (used when its weights differ).
    vae:               None, a VAE folder / Hub id, or a loaded AutoencoderKL.
    vae_scale_factor:  pixels per latent (2 ** (len(block_out_channels) - 1)).
    sizes:             the (height, width) pixel sizes the Runtime builds backends for and warms up.
    arch:              "unet" (SD1.5 / SDXL UNets), "sd3" (SD3Transformer2DModel) or "flux"
                       (FluxTransformer2DModel); for transformers the *_unet_config fields hold their configs.
    max_sequence_length: T5 tokens of a prompt (diffusers' defaults: SD3 256, FLUX 512); None for UNets.
    """

    student: str
    teacher: str
    kind: str
    student_subfolder: str | None
    student_file: str | None
    config: SamplerConfig
    device: torch.device
    dtype: torch.dtype
    offline: bool
    sdxl: bool
    teacher_encoders: tuple[str, ...]
    student_encoders: tuple[str, ...]
    student_vae: bool
    vae: Any
    vae_scale_factor: int
    upcast_vae: bool | None
    lora_scale: float
    w_embed: float
    force_zeros_for_empty_prompt: bool
    backend: str
    graphs: Any
    batch_sizes: tuple[int, ...]
    max_graphs: int
    sizes: tuple[tuple[int, int], ...]
    student_unet_config: dict = field(compare=False, repr=False)
    teacher_unet_config: dict = field(compare=False, repr=False)
    arch: str = "unet"
    max_sequence_length: int | None = None


def resolve(student: str, teacher: str, family: str, *, student_kind: str = "auto",
            student_weights: str | None = None, student_subfolder: str | None = None, vae: Any = None,
            upcast_vae: bool | None = None, lora_scale: float = 1.0, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None, w_embed: float = 7.5, local_files_only: bool | None = None,
            prediction_type: str | None = None, teacher_prediction_type: str | None = None,
            allow_family_mismatch: bool = False, backend: str = "auto", graphs: Any = "auto",
            batch_sizes=(1,), max_graphs: int = 8, sizes=None, max_sequence_length: int | None = None,
            **sampler_kwargs) -> LoadPlan:
    """The LoadPlan of ``Pipeline.from_pretrained``'s arguments (see there); raises before any weights load."""
    # Settings first: nothing is read for a config that cannot run.
    if student_kind not in STUDENT_KINDS:
        raise ConfigError(f"unknown student_kind {student_kind!r}; pass one of {', '.join(STUDENT_KINDS)}")
    unknown = sorted(set(sampler_kwargs) - {f.name for f in fields(SamplerConfig)})
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for Pipeline.from_pretrained; pass its own options "
                          "(see its docstring) or SamplerConfig fields (steps, guided_steps, lam, cfg, timesteps, ...)")
    config = SamplerConfig(family=family, **sampler_kwargs)
    device, dtype = _device_dtype(device, dtype)
    backend, graphs, batch_sizes, max_graphs = _runtime_options(backend, graphs, batch_sizes, max_graphs)
    student, teacher = os.path.expanduser(str(student)), os.path.expanduser(str(teacher))
    if isinstance(vae, (str, os.PathLike)):
        vae = os.path.expanduser(str(vae))
    is_offline = _offline(local_files_only)
    check_exists(teacher)
    check_exists(student)

    index = read_json(teacher, "model_index.json", None, is_offline, "teacher (a diffusers pipeline folder)")
    if _has(index, "transformer"):
        if student_weights or student_subfolder:
            raise ConfigError("student_weights / student_subfolder are for UNet students; a transformer teacher "
                              "takes a full student pipeline folder: drop them")
        return _resolve_transformer(student, teacher, index, config, student_kind=student_kind, vae=vae,
                                    allow_family_mismatch=allow_family_mismatch, is_offline=is_offline,
                                    max_sequence_length=max_sequence_length,
                                    common=dict(device=device, dtype=dtype, upcast_vae=upcast_vae,
                                                lora_scale=float(lora_scale), w_embed=float(w_embed),
                                                backend=backend, graphs=graphs, batch_sizes=batch_sizes,
                                                max_graphs=max_graphs),
                                    sizes=sizes, prediction_types=(prediction_type, teacher_prediction_type),
                                    given=set(sampler_kwargs))
    t_unet_cfg = read_json(teacher, "config.json", "unet", is_offline, "teacher UNet")
    kind = student_kind if student_kind != "auto" else _detect_kind(student, student_weights, student_subfolder,
                                                                    is_offline)
    s_index, student_file = {}, None
    if kind == "pipeline":
        s_index = read_json(student, "model_index.json", None, is_offline, "student pipeline")
        s_unet_cfg = read_json(student, "config.json", "unet", is_offline, "student UNet")
    elif kind == "unet":
        s_unet_cfg = read_json(student, "config.json", student_subfolder, is_offline, "student UNet")
    elif kind == "unet_file":
        if not student_weights:
            raise ConfigError("student_kind='unet_file' needs student_weights='<file in the student repo>'")
        student_file = fetch_required(student, student_weights, student_subfolder, is_offline, "student weights")
        s_unet_cfg = dict(t_unet_cfg)
        check_unet_file(student_file, t_unet_cfg, student_weights)
    else:
        _require_peft()
        name = student_weights or LORA_FILE
        student_file = fetch_required(student, name, student_subfolder, is_offline, "LoRA file")
        s_unet_cfg = dict(t_unet_cfg)
        check_lora_file(student_file, t_unet_cfg, name)

    # Prediction types and the schedule.
    t_sched = read_json_or_empty(teacher, "scheduler_config.json", "scheduler", is_offline)
    if teacher_prediction_type is None and "prediction_type" not in t_sched:
        warnings.warn(f"the teacher {teacher!r} has no scheduler/scheduler_config.json with a prediction_type "
                      "(not in the local cache offline?); assuming 'epsilon'. Pass teacher_prediction_type= "
                      "for a v-prediction teacher", stacklevel=3)
    teacher_prediction_type = teacher_prediction_type or t_sched.get("prediction_type", "epsilon")
    s_sched = read_json_or_empty(student, "scheduler_config.json", "scheduler", is_offline) \
        if kind == "pipeline" else {}
    if s_sched:
        check_family_fits(config.family, s_sched.get("_class_name"), student, allow_family_mismatch)
    if prediction_type is None:
        prediction_type = s_sched.get("prediction_type", "epsilon")
    config = replace(config, prediction_type=prediction_type, teacher_prediction_type=teacher_prediction_type)
    carried = {k: s_sched[k] for k in _STUDENT_SCHEDULE_KEYS if k in s_sched}
    if carried and config.scheduler_config is None:
        # a full student pipeline ships the schedule it was distilled for (betas, timestep spacing, ...);
        # only those keys carry over: its scheduler class may differ from the family's
        config = replace(config, scheduler_config=carried)
    check_schedule(config)

    # Text encoders, UNets and VAE fit each other.
    sdxl = _has(index, "text_encoder_2")
    t_names = _encoder_names(sdxl)
    t_text_dims = _text_dims([read_json(teacher, "config.json", n, is_offline, f"teacher {n}") for n in t_names])
    s_names: tuple[str, ...] = ()
    s_text_dims = t_text_dims
    if kind == "pipeline" and _has(s_index, "text_encoder"):
        s_names = _encoder_names(_has(s_index, "text_encoder_2"))
        s_text_dims = _text_dims([read_json(student, "config.json", n, is_offline, f"student {n}") for n in s_names])
    check_pair_configs(s_unet_cfg, t_unet_cfg, s_text_dims, t_text_dims)
    student_vae = kind == "pipeline" and _has(s_index, "vae")
    vae_cfgs = _vae_configs(vae, teacher, student, student_vae, is_offline)
    factor = _vae_factor(vae_cfgs, int(s_unet_cfg["in_channels"]))
    sizes = _sizes(sizes, int(s_unet_cfg["sample_size"]) * factor, factor)
    return LoadPlan(student=student, teacher=teacher, kind=kind, student_subfolder=student_subfolder,
                    student_file=student_file, config=config, device=device, dtype=dtype, offline=is_offline,
                    sdxl=sdxl, teacher_encoders=t_names, student_encoders=s_names, student_vae=student_vae, vae=vae,
                    vae_scale_factor=factor, upcast_vae=upcast_vae, lora_scale=float(lora_scale),
                    w_embed=float(w_embed), force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                                                      sdxl)),
                    backend=backend, graphs=graphs, batch_sizes=batch_sizes, max_graphs=max_graphs, sizes=sizes,
                    student_unet_config=s_unet_cfg, teacher_unet_config=t_unet_cfg)


# ------------------------------------------------------------------------------------------------------
# Settings.
# ------------------------------------------------------------------------------------------------------
def _device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device ({e}); pass 'cpu' or 'cuda'") from e
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    _check_device_dtype("pipeline", ModelSpec(), device, dtype)
    return device, dtype


def _runtime_options(backend, graphs, batch_sizes, max_graphs):
    """Checked (backend, graphs, batch_sizes, max_graphs), with the Runtime's own checks; a named backend
    that cannot run here raises BackendUnavailableError now, before any weights load."""
    from ..backends import backend_names, get_backend
    from ..graphs import GraphBudget
    from ..runtime import _positive_ints

    if backend != "auto":
        if backend not in backend_names():
            raise ConfigError(f"unknown backend {backend!r}; pass auto or one of {', '.join(backend_names())}")
        get_backend(backend)
    if not (isinstance(graphs, bool) or graphs == "auto"):
        raise ConfigError(f"graphs must be 'auto', True or False, got {graphs!r}")
    GraphBudget(max_graphs)
    return backend, graphs, _positive_ints("batch_sizes", batch_sizes), max_graphs


def _sizes(sizes, native: int, factor: int) -> tuple[tuple[int, int], ...]:
    """Checked (height, width) pixel sizes; None (or a None side) is the student's native size."""
    if sizes is None:
        return ((native, native),)
    try:
        out = tuple(dict.fromkeys((native if h is None else int(h), native if w is None else int(w))
                                  for h, w in sizes))
    except (TypeError, ValueError):
        out = ()
    if not out or any(v < factor or v % factor for hw in out for v in hw):
        raise ConfigError(f"sizes must be (height, width) pixel pairs, positive multiples of the VAE scale factor "
                          f"{factor}, got {sizes!r}")
    return out


def check_schedule(config: SamplerConfig) -> None:
    """Build the schedule once (diffusers' scheduler checks it); LCM's step cap is checked first, in
    distpp's own words (diffusers' message speaks of ``strength``, which distpp has no setting for)."""
    if config.family in ("lcm", "dmd2") and config.timesteps is None:
        from ..schedules import make_scheduler

        cap = int(make_scheduler(config.family, config.scheduler_config).config.original_inference_steps)
        if config.num_steps > cap:
            raise ConfigError(f"steps={config.num_steps} is more than the {config.family} schedule's "
                              f"original_inference_steps ({cap}): an LCM-style student takes at most {cap} steps "
                              f"(it was distilled for 1-8); pass at most steps={cap}")
    build_schedule(config.family, config.steps, timesteps=config.timesteps, prediction_type=config.prediction_type,
                   scheduler_config=config.scheduler_config, family_options=config.family_options)


def scheduler_families() -> dict[str, tuple[str, ...]]:
    """diffusers scheduler class name -> the distpp families that step with it."""
    out: dict[str, tuple[str, ...]] = {}
    for f in FAMILIES:
        name = family_scheduler_class(f).__name__
        out[name] = out.get(name, ()) + (f,)
    return out


def check_family_fits(family: str, scheduler_class: str | None, student: str, allow: bool) -> None:
    """Refuse a family that does not step with the student pipeline's own scheduler class (the student
    was distilled for that scheduler), unless ``allow``; then warn."""
    if scheduler_class is None:
        return
    fits = scheduler_families().get(scheduler_class, ())
    if family in fits:
        return
    if fits:
        msg = (f"the student pipeline {student!r} steps with {scheduler_class} (family {' or '.join(fits)}) but "
               f"family={family!r} was passed: pass family={fits[0]!r}")
    else:
        known = ", ".join(f"{'/'.join(fs)} = {c}" for c, fs in scheduler_families().items())
        msg = (f"the student pipeline {student!r} steps with {scheduler_class}, which no distpp family uses "
               f"({known}): pass the family it was distilled for")
    if not allow:
        raise ConfigError(f"{msg}, or allow_family_mismatch=True to sample it as {family!r} anyway")
    warnings.warn(f"{msg}; sampling it as {family!r} because allow_family_mismatch=True", stacklevel=4)


# ------------------------------------------------------------------------------------------------------
# Configs of the models.
# ------------------------------------------------------------------------------------------------------
def check_pair_configs(student_unet: dict, teacher_unet: dict, student_text: tuple[int, int | None],
                       teacher_text: tuple[int, int | None]) -> None:
    """Raise ConfigError unless the UNet configs fit each other and their text encoders.

    *_unet: UNet config dicts; *_text: (states width, pooled width or None) of the encoders each uses.
    """
    _check_latent_channels(student_unet, teacher_unet)
    for who, cfg, (width, pooled) in (("student", student_unet, student_text), ("teacher", teacher_unet, teacher_text)):
        cad, upooled = int(cfg["cross_attention_dim"]), text_time_dims(cfg)[0]
        if cad != width:
            raise ConfigError(f"the {who} UNet's cross_attention_dim is {cad} but its text encoders give width "
                              f"{width}: pass a {who} whose conditioning matches the encoders (SD1.5 vs SDXL?)")
        if upooled != pooled:
            raise ConfigError(f"the {who} UNet expects pooled text_embeds of width {upooled} but its text "
                              f"encoders give {pooled}: SD1.5-style and SDXL-style models cannot be mixed")


def _vae_configs(vae, teacher: str, student: str, student_vae: bool, is_offline: bool) -> list[tuple[str, dict]]:
    """(who, config) of every VAE that may decode: the given one, else the teacher's (+ the student's)."""
    if vae is not None:
        return [("the VAE", _vae_config(vae, is_offline))]
    cfgs = [("the teacher's VAE", read_json(teacher, "config.json", "vae", is_offline, "teacher VAE"))]
    if student_vae:
        cfgs.append(("the student's VAE", read_json(student, "config.json", "vae", is_offline, "student VAE")))
    return cfgs


def _vae_factor(vae_cfgs: list[tuple[str, dict]], channels: int) -> int:
    factors = {_check_vae(who, c, channels) for who, c in vae_cfgs}
    if len(factors) != 1:
        raise ConfigError(f"the student's and the teacher's VAEs downsample by different factors {sorted(factors)}; "
                          "pass vae=... to decode with one VAE")
    return factors.pop()


def _check_latent_channels(student: dict, teacher: dict) -> None:
    cs, ct = int(student["in_channels"]), int(teacher["in_channels"])
    if cs != ct:
        raise ConfigError(f"the student takes {cs} latent channels but the teacher {ct}: they must share a "
                          "latent space (pick a student distilled from this teacher)")


def _check_vae(who: str, cfg: dict, channels: int) -> int:
    """The VAE's scale factor after checking its latent channels against the UNets'."""
    lc = int(cfg.get("latent_channels", 4))
    if lc != channels:
        raise ConfigError(f"{who} has {lc} latent channels but the UNets take {channels}: pass the VAE of this "
                          "model family (vae=...)")
    return 2 ** (len(cfg.get("block_out_channels", (64,))) - 1)


def _vae_config(vae: Any, is_offline: bool) -> dict:
    if isinstance(vae, str):
        return read_json(vae, "config.json", None, is_offline, "VAE")
    cfg = getattr(vae, "config", None)
    if cfg is None:
        raise ConfigError(f"vae must be a folder, a Hub id or a diffusers AutoencoderKL, got {type(vae).__name__}")
    return dict(cfg)


def _encoder_names(sdxl: bool) -> tuple[str, ...]:
    return ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)


def _text_dims(cfgs: list[dict]) -> tuple[int, int | None]:
    width = sum(int(c["hidden_size"]) for c in cfgs)
    return width, (int(cfgs[-1]["projection_dim"]) if len(cfgs) == 2 else None)


def _has(index: dict, component: str) -> bool:
    """Whether a model_index.json lists ``component`` (absent ones are missing or [null, null])."""
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and any(v is not None for v in entry)


def _detect_kind(student: str, weights: str | None, subfolder: str | None, is_offline: bool) -> str:
    if weights:
        path = fetch_required(student, weights, subfolder, is_offline, "student weights")
        return "lora" if any("lora" in k for k in state_dict_shapes(path)) else "unet_file"
    if fetch(student, "model_index.json", None, is_offline):
        return "pipeline"
    if fetch(student, "config.json", subfolder, is_offline):
        return "unet"
    if fetch(student, LORA_FILE, subfolder, is_offline):
        return "lora"
    hint = " (offline: not in the Hub cache; pre-download it or pass a local folder)" \
        if is_offline and is_hub_id(student) else ""
    raise WeightsNotFoundError(f"found no diffusers pipeline, UNet config or {LORA_FILE} in {student!r}{hint}; "
                               "pass student_kind=... and student_weights='<file>'")


def _require_peft() -> None:
    from diffusers.utils import is_peft_available

    if not is_peft_available():
        raise BackendUnavailableError("LoRA students need peft: pip install 'distpp[pipeline]' (or pip install peft)")


# ------------------------------------------------------------------------------------------------------
# State-dict files against the teacher's UNet config (shapes only; the UNet is built on the meta device).
# ------------------------------------------------------------------------------------------------------
def unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer name -> shape of the UNet ``config`` describes, without allocating it."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def check_unet_file(path: str, teacher_config: dict, name: str) -> None:
    """ConfigError unless the state dict at ``path`` has exactly the teacher UNet's keys and shapes."""
    have = state_dict_shapes(path)
    if any("lora" in k for k in have):
        raise ConfigError(f"{name!r} is a LoRA file, not a UNet state dict: pass student_kind='lora'")
    want = unet_shapes(teacher_config)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and have[k] != want[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of another shape (e.g. {k!r}: {have[k]} in the file, {want[k]} in "
                         "the teacher's UNet config)")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        raise ConfigError(f"{name!r} does not fit the teacher's UNet: {'; '.join(parts)}. Pass a UNet state dict "
                          "distilled from this teacher in diffusers' key layout (an SDXL student on an SD1.5 "
                          "teacher, or the reverse, does not fit)")


def check_lora_file(path: str, teacher_config: dict, name: str) -> None:
    """ConfigError for a LoRA that adapts text encoders or whose (peft / diffusers layout) factors do not
    fit the teacher UNet's layers. Other layouts (kohya) are converted and checked by diffusers on load."""
    have = state_dict_shapes(path)
    if any(k.startswith(("text_encoder", "lora_te")) for k in have):
        raise ConfigError(f"{name!r} also adapts the text encoders, which distpp does not support; "
                          "pass a UNet-only LoRA (LCM-LoRA is one)")
    want = None
    for key, shape in have.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        want = want if want is not None else unet_shapes(teacher_config)
        module, factor = m.groups()
        target = want.get(module + ".weight")
        if target is None:
            raise ConfigError(f"{name!r} adapts {module!r}, which the teacher's UNet does not have: pass a LoRA "
                              "trained on this teacher")
        # lora_A: [r, in, (k, k)], lora_B: [out, r, (1, 1)]
        ok = shape[1] == target[1] if factor == "A" else shape[0] == target[0]
        if not ok:
            raise ConfigError(f"{name!r} does not fit the teacher's UNet: {key!r} has shape {shape} for a layer of "
                              f"shape {target}; pass a LoRA trained on this teacher (SD1.5 and SDXL LoRAs differ)")


# ------------------------------------------------------------------------------------------------------
# Transformer (flow-matching) pipelines: SD3 / SD3.5 and FLUX.1 teachers and their full-pipeline students.
# ------------------------------------------------------------------------------------------------------
SD3_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
FLUX_ENCODERS = ("text_encoder", "text_encoder_2")
# Per transformer kind: its text encoders, the family_options its diffusers pipeline's loop corresponds to,
# and that pipeline's default T5 length. SD3: timestep sigma * 1000, the scheduler's own sigma spacing;
# FLUX: timestep sigma, sigmas linspace(1, 1/N, N).
TRANSFORMER_KINDS = {
    "sd3": (SD3_ENCODERS, {"timestep_scale": 1000.0, "sigmas": "scheduler"}, 256),
    "flux": (FLUX_ENCODERS, {"timestep_scale": 1.0, "sigmas": "linspace"}, 512),
}
# FluxPipeline's default_sample_size (its transformer config has no sample_size): 128 latents = 1024 px.
FLUX_SAMPLE_SIZE = 128
# FluxPipeline's default guidance_scale, the teacher's embedded guidance when cfg is not passed (FLUX.1-dev).
FLUX_EMBEDDED_CFG = 3.5


def _resolve_transformer(student: str, teacher: str, index: dict, config: SamplerConfig, *, student_kind: str,
                         vae: Any, allow_family_mismatch: bool, is_offline: bool, max_sequence_length: int,
                         common: dict, sizes, prediction_types, given: set) -> LoadPlan:
    """The LoadPlan of a transformer teacher pipeline (model_index.json lists ``transformer``)."""
    t_cfg = read_json(teacher, "config.json", "transformer", is_offline, "teacher transformer")
    arch = _transformer_arch(t_cfg, teacher)
    if config.family != "flow":
        raise ConfigError(f"the teacher {teacher!r} is a flow-matching transformer pipeline; pass family='flow' "
                          f"(got family={config.family!r})")
    if student_kind not in ("auto", "pipeline"):
        raise ConfigError(f"student_kind={student_kind!r} is not supported for transformer pipelines; pass a full "
                          "student pipeline folder (student_kind='pipeline', e.g. SD3.5-Large-Turbo)")
    if any(p not in (None, "flow") for p in prediction_types):
        raise ConfigError(f"flow-matching transformers predict velocities: prediction_type and "
                          f"teacher_prediction_type must be 'flow' or None, got {prediction_types}")
    encoders, family_options, default_tokens = TRANSFORMER_KINDS[arch]
    if max_sequence_length is None:
        max_sequence_length = default_tokens
    max_sequence_length = check_max_sequence_length(max_sequence_length)
    s_index = read_json(student, "model_index.json", None, is_offline, "student pipeline (a diffusers pipeline "
                        "folder with a transformer)")
    if not _has(s_index, "transformer"):
        raise ConfigError(f"the student {student!r} has no transformer in its model_index.json; a transformer teacher "
                          "needs a transformer student pipeline of the same family (e.g. SD3.5-Large-Turbo)")
    s_cfg = read_json(student, "config.json", "transformer", is_offline, "student transformer")
    if _transformer_arch(s_cfg, student) != arch:
        raise ConfigError(f"the student's transformer is a {s_cfg.get('_class_name')} but the teacher's a "
                          f"{t_cfg.get('_class_name')}: pass a student distilled from this teacher")
    guidance = _teacher_guidance(arch, s_cfg, t_cfg, config, given)

    s_sched = read_json_or_empty(student, "scheduler_config.json", "scheduler", is_offline)
    if s_sched:
        check_family_fits(config.family, s_sched.get("_class_name"), student, allow_family_mismatch)
    if config.scheduler_config is None and s_sched:
        config = replace(config, scheduler_config=_flow_scheduler_keys(s_sched))
    config = replace(config, prediction_type="flow", teacher_prediction_type="flow",
                     family_options={**family_options, **(config.family_options or {})}, **guidance)
    check_schedule(config)

    t_text = _text_dims_of(arch, teacher, index, is_offline, "teacher")
    s_names: tuple[str, ...] = ()
    s_text = t_text
    if any(_has(s_index, n) for n in encoders):
        s_names, s_text = encoders, _text_dims_of(arch, student, s_index, is_offline, "student")
    check_transformer_configs(s_cfg, t_cfg, s_text, t_text)
    student_vae = _has(s_index, "vae")
    channels = int(s_cfg["in_channels"]) // (4 if arch == "flux" else 1)  # FLUX packs 2x2 latent patches
    factor = _vae_factor(_vae_configs(vae, teacher, student, student_vae, is_offline), channels)
    if arch == "flux":
        native, multiple = FLUX_SAMPLE_SIZE * factor, 2 * factor
    else:
        native, multiple = int(s_cfg["sample_size"]) * factor, int(s_cfg["patch_size"]) * factor
    sizes = _sizes(sizes, native, multiple)
    return LoadPlan(student=student, teacher=teacher, kind="pipeline", student_subfolder=None, student_file=None,
                    config=config, offline=is_offline, sdxl=False, teacher_encoders=encoders,
                    student_encoders=s_names, student_vae=student_vae, vae=vae, vae_scale_factor=factor,
                    force_zeros_for_empty_prompt=False, sizes=sizes, student_unet_config=s_cfg,
                    teacher_unet_config=t_cfg, arch=arch, max_sequence_length=max_sequence_length, **common)


def _transformer_arch(cfg: dict, ref: str) -> str:
    name = cfg.get("_class_name")
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise ConfigError(f"{ref!r} has a transformer of class {name!r}; Pipeline loads SD3Transformer2DModel (SD3 / "
                      "SD3.5), FluxTransformer2DModel (FLUX.1) and UNet pipelines (SD1.5 / SDXL)")


def _teacher_guidance(arch: str, student_cfg: dict, teacher_cfg: dict, config: SamplerConfig, given: set) -> dict:
    """SamplerConfig changes for how the teacher guides: a FLUX transformer with ``guidance_embeds``
    (FLUX.1-dev) takes its scale as an input (teacher_guidance "embedded", default cfg 3.5); others use CFG.
    A guidance-embedding student is refused (the Pipeline gives students no guidance input)."""
    if arch == "flux" and student_cfg.get("guidance_embeds"):
        raise ConfigError("the student transformer embeds a guidance scale (guidance_embeds); Pipeline runs "
                          "students without guidance: pass a student without guidance_embeds (e.g. FLUX.1-schnell)")
    embedded = arch == "flux" and bool(teacher_cfg.get("guidance_embeds"))
    want = "embedded" if embedded else "cfg"
    if "teacher_guidance" in given and config.teacher_guidance != want:
        raise ConfigError(f"teacher_guidance={config.teacher_guidance!r} does not fit the teacher transformer "
                          f"(guidance_embeds {embedded}): pass teacher_guidance={want!r} or leave it out")
    out: dict = {"teacher_guidance": want}
    if embedded and "cfg" not in given:
        out["cfg"] = FLUX_EMBEDDED_CFG
    return out


def _flow_scheduler_keys(sched: dict) -> dict:
    """The student scheduler config's FlowMatchEulerDiscreteScheduler settings (shift, dynamic shifting, ...):
    the student was distilled for this schedule."""
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler

    keys = set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters) - {"self"}
    return {k: v for k, v in sched.items() if k in keys}


def _text_dims_of(arch: str, ref: str, index: dict, is_offline: bool, who: str) -> tuple[int, int, int]:
    """(T5 width, pooled width, CLIP states width) of a transformer pipeline's encoders: SD3 pools both CLIP
    projections and pads their states to the T5 width; FLUX pools CLIP-L's hidden size and uses no CLIP states."""
    names = TRANSFORMER_KINDS[arch][0]
    missing = [n for n in names if not _has(index, n)]
    if missing:
        raise ConfigError(f"the {who} pipeline {ref!r} lacks {', '.join(missing)}; Pipeline runs {arch.upper()} "
                          f"with all its text encoders ({', '.join(names)}): pass a pipeline that ships them")
    clip = [read_json(ref, "config.json", n, is_offline, f"{who} {n}") for n in names[:-1]]
    t5 = read_json(ref, "config.json", names[-1], is_offline, f"{who} {names[-1]}")
    if arch == "flux":
        return int(t5["d_model"]), int(clip[0]["hidden_size"]), 0
    return (int(t5["d_model"]), sum(int(c["projection_dim"]) for c in clip), sum(int(c["hidden_size"]) for c in clip))


def check_transformer_configs(student: dict, teacher: dict, student_text: tuple[int, int, int],
                              teacher_text: tuple[int, int, int]) -> None:
    """Raise ConfigError unless the SD3 / FLUX transformer configs fit each other and their text encoders.

    *_text: (T5 width, pooled width, CLIP states width) of the encoders each transformer uses."""
    _check_latent_channels(student, teacher)
    for who, cfg, (width, pooled, clip) in (("student", student, student_text), ("teacher", teacher, teacher_text)):
        jad, pp = int(cfg["joint_attention_dim"]), int(cfg["pooled_projection_dim"])
        if jad != width:
            raise ConfigError(f"the {who} transformer's joint_attention_dim is {jad} but its T5 encoder gives width "
                              f"{width}: pass a {who} whose conditioning matches its encoders")
        if pp != pooled:
            raise ConfigError(f"the {who} transformer's pooled_projection_dim is {pp} but its CLIP projections give "
                              f"{pooled}: pass a {who} whose conditioning matches its encoders")
        if clip > width:
            raise ConfigError(f"the {who}'s CLIP states are {clip} wide, more than the T5 width {width} they are "
                              "zero-padded to: pass encoders of one SD3 pipeline")

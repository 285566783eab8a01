"""Serving settings and per-request validation (pure Python + torch; no Ray needed).

A request is a JSON object (HTTP) or a dict (Python handle) with the fields of :class:`SampleRequest`.
:func:`parse_request` turns it into a validated, frozen :class:`SampleRequest` or raises
``ConfigError`` / ``InputError`` (both ``ValueError``) whose message names the field, what was passed
and what to pass instead; the HTTP endpoint answers those with status 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from ..config import DEFAULT_LAM, SamplerConfig, check_cfg, check_lam
from ..errors import ConfigError, InputError
from ..families import FAMILIES, get_family
from ..schedules import check_family

OUTPUTS = ("latent", "latent_b64", "png")
GENERATE_OUTPUTS = ("png", "image_b64")
DTYPES = ("float32", "float16", "bfloat16")
# Seeds feed torch.Generator.manual_seed(seed) and (seed + 2**32); 2**32 keeps both in range and every
# seed exact in a JSON number (doubles hold integers up to 2**53).
MAX_SEED = 2**32
MAX_PROMPT_CHARS = 4096
# The fields a request may carry; anything else is refused so a typo ("sed") is not silently ignored.
REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "lam", "cfg", "family", "steps", "guided_steps", "output")
GENERATE_FIELDS = ("prompt", "negative_prompt", "seed", "lam", "cfg", "guided_steps", "height", "width", "output")


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one deployment (every replica holds the same models).

    Two modes. Pipeline mode (``student`` and ``teacher`` given): a replica holds a text-to-image
    ``distpp.Pipeline`` (text encoders, UNets, VAE) and serves ``POST /generate``. Preset mode (default):
    a replica holds a preset's UNet pair with hashed stand-in prompt states and serves ``POST /sample``
    (latents only: latency tests of the sampling loop). Both sample through one ``distpp.Runtime``.

    student, teacher:     pipeline mode: local folders or Hub ids, as ``Pipeline.from_pretrained`` takes
                          them (the teacher a full diffusers pipeline); ``family`` is the student's.
    local_files_only:     pipeline mode: never touch the network (default: the HF_HUB_OFFLINE setting).
    sizes:                pipeline mode: (height, width) image sizes in pixels a request may ask for,
                          all warmed at replica start (None: the student's native size only).
    batch_buckets:        the batch sizes the Runtime warms (CUDA graphs captured at replica start); a
                          batch is padded up to the smallest that fits. None: powers of two up to
                          max_batch_size, and max_batch_size itself.
    backend, graphs:      the Runtime's UNet backend ("auto" = eager) and CUDA-graph mode ("auto": on
                          a GPU).
    preset:               preset mode: distpp.presets name built at replica start (random weights for tiny*).
    replicas:             number of replicas (one sampler each).
    max_batch_size:       Serve's dynamic batching: most requests merged into one sampling call.
    batch_wait_timeout_s: how long a partial batch waits for more requests before it runs.
    max_ongoing_requests: per-replica queue Serve may fill (None: 2 * max_batch_size, so a replica
                          can collect a full batch while the previous one runs).
    device:               "auto" (CUDA when the replica sees a GPU, else CPU), "cpu" or "cuda".
    gpus_per_replica:     ray_actor_options num_gpus (None: 1 when the Ray cluster has GPUs, else 0).
    cpus_per_replica:     ray_actor_options num_cpus; also the replica's torch thread count on CPU.
    family, steps, guided_steps: request defaults (requests may override them; see SampleRequest).
    kernel_impl:          SamplerConfig.kernel_impl of every sampler.
    max_steps:            largest steps a request may ask for (bounds the cost of one request).
    warm:                 run one sample per replica at start so the first request is not slow.
    weights:              a local folder with student/ and teacher/ diffusers UNets (None: the preset's
                          random weights); must exist on every node that runs a replica.
    dtype:                model dtype: float32, float16 (GPU only) or bfloat16.
    max_queued_requests:  requests Serve queues at each caller (the HTTP proxy, a handle) beyond what the
                          replicas hold; the excess is refused at once with Serve's backpressure answer
                          (HTTP 503 + Retry-After). None: replicas * max_ongoing_requests; -1: unbounded.
    retry_after_s:        the Retry-After of those 503s and of the cost bound's.
    max_inflight_cost:    bound on one replica's admitted work, in UNet rows x latent pixels (a request
                          costs (steps + 2 guided_steps) * latent H * W): a request that would exceed it
                          while others are in flight gets a 503 + Retry-After instead of queueing behind
                          them. None: one max_steps request (all guided) plus two full default batches.
    """

    preset: str = "tiny"
    replicas: int = 1
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int | None = None
    device: str = "auto"
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    family: str = "lcm"
    steps: int = 4
    guided_steps: int = 1
    kernel_impl: str = "auto"
    max_steps: int = 50
    warm: bool = True
    weights: str | None = None
    dtype: str = "float32"
    max_queued_requests: int | None = None
    retry_after_s: float = 1.0
    max_inflight_cost: int | None = None
    student: str | None = None
    teacher: str | None = None
    local_files_only: bool | None = None
    sizes: tuple[tuple[int, int], ...] | None = None
    batch_buckets: tuple[int, ...] | None = None
    backend: str = "auto"
    graphs: bool | str = "auto"

    def __post_init__(self):
        from ..presets import preset_info

        if preset_info(self.preset).kind != "unet":  # /sample's stand-in prompt states and epsilon families
            raise ConfigError(f"preset {self.preset!r} is a flow transformer pair: the preset mode (/sample) serves "
                              "UNet presets (tiny, tiny_xl, sd15, sdxl); serve SD3.5 / FLUX pipelines with "
                              "student=/teacher= folders (/generate)")
        if (self.student is None) != (self.teacher is None):
            raise ConfigError("pipeline mode needs both student= and teacher= (folders or Hub ids); pass neither "
                              "for preset mode")
        if self.graphs not in ("auto", True, False):
            raise ConfigError(f"graphs must be 'auto', True or False, got {self.graphs!r}")
        if self.sizes is not None:
            try:
                sizes = tuple((int(h), int(w)) for h, w in self.sizes)
            except (TypeError, ValueError):
                raise ConfigError(f"sizes must be (height, width) pixel pairs, e.g. ((512, 512),), got "
                                  f"{self.sizes!r}") from None
            if not sizes or any(h < 1 or w < 1 for h, w in sizes):
                raise ConfigError(f"sizes must be non-empty (height, width) pairs >= 1, got {self.sizes!r}")
            object.__setattr__(self, "sizes", sizes)
        for name in ("replicas", "max_batch_size", "max_steps"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        mor, wait = self.max_ongoing_requests, self.batch_wait_timeout_s
        if mor is not None and (not _is_int(mor) or mor < 1):
            raise ConfigError(f"max_ongoing_requests must be an integer >= 1 or None, got {mor!r}")
        mq = self.max_queued_requests
        if mq is not None and (not _is_int(mq) or not (mq == -1 or mq >= 1)):
            raise ConfigError(f"max_queued_requests must be an integer >= 1, -1 (unbounded) or None, got {mq!r}")
        if not _is_number(self.retry_after_s) or not (0 <= self.retry_after_s <= 3600):
            raise ConfigError(f"retry_after_s must be seconds in [0, 3600], got {self.retry_after_s!r}")
        mc = self.max_inflight_cost
        if mc is not None and (not _is_int(mc) or mc < 1):
            raise ConfigError(f"max_inflight_cost must be an integer >= 1 or None (auto), got {mc!r}")
        if not _is_number(wait) or not (0 <= wait <= 60):
            raise ConfigError(f"batch_wait_timeout_s must be seconds in [0, 60] (e.g. 0.01), got {wait!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.gpus_per_replica is not None and (not _is_number(self.gpus_per_replica) or self.gpus_per_replica < 0):
            raise ConfigError(f"gpus_per_replica must be a number >= 0 or None (auto), got {self.gpus_per_replica!r}")
        if not _is_number(self.cpus_per_replica) or self.cpus_per_replica <= 0:
            raise ConfigError(f"cpus_per_replica must be a number > 0, got {self.cpus_per_replica!r}")
        if not _is_int(self.steps) or not (1 <= self.steps <= self.max_steps):
            raise ConfigError(f"steps must be an integer in [1, max_steps={self.max_steps}], got {self.steps!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device == "cpu" and self.dtype == "float16":
            raise ConfigError("dtype float16 does not run on CPU replicas; pass dtype='float32' (or 'bfloat16'), "
                              "or device='cuda'")
        b = self.batch_buckets
        if b is not None:
            if not isinstance(b, (tuple, list)) or self.max_batch_size not in b \
                    or not all(_is_int(v) and 1 <= v <= self.max_batch_size for v in b):
                raise ConfigError(f"batch_buckets must be batch sizes in [1, max_batch_size={self.max_batch_size}] "
                                  f"including max_batch_size, e.g. (1, 2, 4, {self.max_batch_size}), got {b!r}")
            object.__setattr__(self, "batch_buckets", tuple(sorted(set(b))))
        # The default sampler config must itself be valid (family, guided_steps, kernel_impl).
        self.default_config()

    @property
    def resolved_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def resolved_max_queued_requests(self) -> int:
        return self.max_queued_requests or self.replicas * self.resolved_max_ongoing_requests

    @property
    def mode(self) -> str:
        """"pipeline" (POST /generate) or "preset" (POST /sample)."""
        return "preset" if self.student is None else "pipeline"

    @property
    def resolved_batch_buckets(self) -> tuple[int, ...]:
        if self.batch_buckets is not None:
            return self.batch_buckets
        powers = [1 << k for k in range(self.max_batch_size.bit_length()) if 1 << k < self.max_batch_size]
        return (*powers, self.max_batch_size)

    def resolved_max_inflight_cost(self, heaviest: int, typical: int) -> int:
        """The cost bound given the heaviest admissible request's cost and a default request's."""
        if self.max_inflight_cost is not None:
            return self.max_inflight_cost
        return heaviest + 2 * self.max_batch_size * typical

    def default_config(self) -> SamplerConfig:
        return SamplerConfig(family=self.family, steps=self.steps, guided_steps=self.guided_steps,
                             kernel_impl=self.kernel_impl)


@dataclass(frozen=True)
class SampleRequest:
    """One validated request (one sample).

    prompt:          text; its conditioning comes from :func:`distpp.serve.conditioning.prompt_cond`.
    negative_prompt: the teacher's CFG negative prompt ("" = the empty prompt).
    seed:            int in [0, 2**32): the sample's generator seed (distpp's randomness contract).
    lam, cfg:        proximal weight in [0, 1] and teacher CFG scale >= 0 (may differ per request in one
                     batch: the sampler takes them per sample).
    family, steps, guided_steps: the sampler; requests that differ here run in separate calls.
    output:          HTTP only: "latent" (nested lists), "latent_b64" (raw little-endian float32) or
                     "png" (an image/png of the latent's first three channels).
    """

    prompt: str
    negative_prompt: str
    seed: int
    lam: float
    cfg: float
    family: str
    steps: int
    guided_steps: int
    output: str = "latent"

    @property
    def group_key(self) -> tuple[str, int, int]:
        """Requests with equal keys share one sampler and may be batched into one call."""
        return (self.family, self.steps, self.guided_steps)

    def sampler_config(self, kernel_impl: str = "auto") -> SamplerConfig:
        return SamplerConfig(family=self.family, steps=self.steps, guided_steps=self.guided_steps,
                             kernel_impl=kernel_impl)


@dataclass(frozen=True)
class GenerateRequest:
    """One validated /generate request (one image) for a pipeline-mode replica.

    prompt, negative_prompt, seed, lam, cfg, guided_steps: as SampleRequest (family and steps are the
                     deployment's: one Pipeline per replica).
    height, width:   image size in pixels, one of the sizes the replica warmed.
    output:          "png" (image/png) or "image_b64" (JSON: the float32 [H, W, 3] image in [0, 1],
                     raw little-endian bytes in base64).
    """

    prompt: str
    negative_prompt: str
    seed: int
    lam: float
    cfg: float
    guided_steps: int
    height: int
    width: int
    output: str = "png"

    @property
    def group_key(self) -> tuple[int, int, int]:
        """Requests with equal keys share one Pipeline call (one sampler, one latent size)."""
        return (self.guided_steps, self.height, self.width)


def request_cost(steps: int, guided_steps: int, latent_hw: int) -> int:
    """Work of one sample: UNet rows (one student row per step, two teacher rows per guided step)
    times latent pixels."""
    return (steps + 2 * guided_steps) * latent_hw


def parse_request(body: Any, settings: ServeSettings) -> SampleRequest:
    """Validate a /sample request dict against ``settings``; raises ConfigError / InputError (ValueError)."""
    _fields(body, REQUEST_FIELDS)
    family = body.get("family", settings.family)
    if not isinstance(family, str):
        raise ConfigError(f"family must be a string, got {type(family).__name__}")
    check_family(family)
    if "epsilon" not in get_family(family).prediction_types:  # the presets' UNets predict epsilon
        raise ConfigError(f"family {family!r} samples {'/'.join(get_family(family).prediction_types)} models; this "
                          "deployment's preset UNets predict epsilon: pass one of "
                          f"{', '.join(f for f in FAMILIES if 'epsilon' in get_family(f).prediction_types)}")
    steps = body.get("steps", settings.steps)
    if not _is_int(steps) or not (1 <= steps <= settings.max_steps):
        raise ConfigError(f"steps must be an integer in [1, {settings.max_steps}], got {_show(steps)}")
    common = _common(body, settings, family, steps)
    output = _choice(body, "output", OUTPUTS)
    return SampleRequest(**common, family=family, steps=int(steps), output=output)


def parse_generate(body: Any, settings: ServeSettings, sizes: Sequence[tuple[int, int]]) -> GenerateRequest:
    """Validate a /generate request dict; ``sizes``: the (height, width) pixel sizes the replica warmed
    (the first is the default)."""
    _fields(body, GENERATE_FIELDS)
    common = _common(body, settings, settings.family, settings.steps)
    h, w = body.get("height", sizes[0][0]), body.get("width", sizes[0][1])
    if not (_is_int(h) and _is_int(w)) or (h, w) not in sizes:
        offered = ", ".join(f"{a}x{b}" for a, b in sizes)
        raise InputError(f"height x width must be one of the sizes this deployment warmed ({offered}), got "
                         f"{_show(h)} x {_show(w)}")
    return GenerateRequest(**common, height=int(h), width=int(w), output=_choice(body, "output", GENERATE_OUTPUTS))


def _fields(body: Any, allowed: Sequence[str]) -> None:
    if not isinstance(body, Mapping):
        raise InputError(f"a request must be a JSON object like {{\"prompt\": \"a cat\", \"seed\": 0}}, "
                         f"got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InputError(f"unknown request field(s) {unknown}; allowed: {', '.join(allowed)}")


def _common(body: Mapping, settings: ServeSettings, family: str, steps: int) -> dict:
    """The fields /sample and /generate share: prompt, negative_prompt, seed, guided_steps, lam, cfg."""
    seed = body.get("seed", 0)
    if not _is_int(seed) or not (0 <= seed < MAX_SEED):
        raise InputError(f"seed must be an integer in [0, 2**32), got {_show(seed)}")
    guided = body.get("guided_steps", min(settings.guided_steps, steps))
    if not _is_int(guided) or not (0 <= guided <= steps):
        raise ConfigError(f"guided_steps must be an integer in [0, steps={steps}], got {_show(guided)}")
    return {"prompt": _string(body, "prompt", None), "negative_prompt": _string(body, "negative_prompt", ""),
            "seed": int(seed), "guided_steps": int(guided),
            # distpp.config's checks: real numbers only, lam in [0, 1], cfg in [0, float32 max] (the
            # sampler's precision: 1e39 is finite as a double and inf there).
            "lam": check_lam(body.get("lam", DEFAULT_LAM[family])), "cfg": check_cfg(body.get("cfg", 7.5))}


def _choice(body: Mapping, name: str, options: Sequence[str]) -> str:
    v = body.get(name, options[0])
    if not isinstance(v, str) or v not in options:
        raise InputError(f"{name} must be one of {', '.join(options)}, got {_show(v)}")
    return v


def _string(body: Mapping, name: str, default: str | None) -> str:
    if name not in body:
        if default is None:
            raise InputError(f"missing required field {name!r} (a string, e.g. \"a photo of a cat\")")
        return default
    v = body[name]
    if not isinstance(v, str):
        raise InputError(f"{name} must be a string, got {type(v).__name__}")
    if len(v) > MAX_PROMPT_CHARS:
        raise InputError(f"{name} has {len(v)} characters; pass at most {MAX_PROMPT_CHARS}")
    try:
        v.encode("utf-8")  # what the text encoders (and the prompt hash) do with it, later, in a batch
    except UnicodeEncodeError as e:
        raise InputError(f"{name} holds a lone surrogate {v[e.start]!r} at character {e.start}, which is not "
                         "text; send valid Unicode (in JSON, \\ud83d\\ude00 pairs, never one half)") from None
    return v


def _show(v: Any, n: int = 40) -> str:
    """repr of a value, cut to ``n`` characters (a 5000-digit number is not echoed whole)."""
    r = repr(v) if not (isinstance(v, int) and abs(v) > 10**30) else f"an integer of {len(str(abs(v)))} digits"
    return r if len(r) <= n else r[:n] + f"... ({len(r)} characters)"


def _is_int(v: Any) -> bool:
    # bool is an int subclass; true/false is never a meaningful seed or step count.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Non-string ServeSettings fields, for settings given as strings (CLI flags, ``serve run`` key=value args).
_SETTING_TYPES = {"replicas": int, "max_batch_size": int, "max_ongoing_requests": int, "steps": int,
                  "guided_steps": int, "max_steps": int, "batch_wait_timeout_s": float, "gpus_per_replica": float,
                  "cpus_per_replica": float, "warm": bool, "max_queued_requests": int, "retry_after_s": float,
                  "max_inflight_cost": int, "local_files_only": bool}


def settings_from_strings(args: Mapping[str, Any]) -> ServeSettings:
    """ServeSettings from ``{name: value}`` where values may be strings ("2", "0.01", "none", "false")."""
    known = {f.name for f in fields(ServeSettings)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown serve setting(s) {unknown}; known: {', '.join(sorted(known))}")
    return ServeSettings(**{k: _convert(k, v) for k, v in args.items()})


def _convert(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    v = value.strip().lower()
    if name in ("weights", "student", "teacher"):
        return None if v == "none" else value
    if name == "graphs":
        return {"true": True, "false": False}.get(v, v)
    if name == "sizes":  # "512x512,768x512"
        if v == "none":
            return None
        try:
            sizes = tuple(tuple(int(p) for p in hw.split("x")) for hw in v.split(","))
            if any(len(hw) != 2 for hw in sizes):
                raise ValueError(v)
            return sizes
        except ValueError:
            raise ConfigError(f"serve setting sizes={value!r}: pass HEIGHTxWIDTH pixel sizes, e.g. 512x512,768x512") \
                from None
    if name == "batch_buckets":  # "1,2,4,8"
        if v == "none":
            return None
        try:
            return tuple(int(b) for b in v.split(","))
        except ValueError:
            raise ConfigError(f"serve setting batch_buckets={value!r}: pass batch sizes, e.g. 1,2,4,8") from None
    kind = _SETTING_TYPES.get(name)
    if kind is None:
        return value
    if v == "none" and name in ("max_ongoing_requests", "gpus_per_replica", "max_queued_requests",
                                "max_inflight_cost", "local_files_only"):
        return None
    if kind is bool:
        if v not in ("true", "false", "1", "0"):
            raise ConfigError(f"serve setting {name}={value!r}: pass true or false")
        return v in ("true", "1")
    try:
        return kind(v)
    except ValueError:
        raise ConfigError(f"serve setting {name}={value!r} is not a{'n' if kind is int else ''} "
                          f"{kind.__name__}") from None

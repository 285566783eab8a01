"""Runtime: the one object that composes distpp's runtime, and what every entry point samples through.

A Runtime owns, for one student/teacher pair on one device:
  - the backend Denoisers (eager, compile, onnxruntime, tensorrt: ``distpp.backends.make_pair``), built
    once at construction (export and engine build seconds in ``stats.build_s``);
  - one ``Sampler`` per distinct ``SamplerConfig`` it is asked for (the Pipeline has one per
    guided_steps, serve one per family/steps/G), sharing those Denoisers;
  - with graphs on, one ``GraphRunner`` per sampler, all under ONE ``GraphBudget`` (a total LRU bound on
    captured loops, and one lock), so a service with many configs cannot grow without bound.
Lifecycle: construct -> ``warmup(configs)`` (captures / compiles for the declared batch buckets and
resolutions, with a progress bar) -> ``sample(...)`` any number of times -> ``close()``.

Entry points (Pipeline, generate, serve, bench's distpp variants) build a Runtime and add only what is
theirs (prompts, images, HTTP, tables); none builds samplers, graphs or engines on its own. The contract
is in docs/ARCHITECTURE.md, section "Runtime".
"""

from __future__ import annotations

import operator
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, Sequence

import torch

from .config import SamplerConfig
from .denoiser import Cond, as_denoiser
from .errors import ConfigError
from .graphs import ON_MISS, GraphBudget, GraphRunner
from .sampler import Sampler

GRAPH_MODES = ("auto", True, False)
# GraphStats counters a Runtime sums over its runners.
_COUNTERS = ("captures", "replays", "static_runs", "eager_runs", "padded_calls", "evictions", "oom_fallbacks",
             "capture_s")


@dataclass(frozen=True)
class CondSpec:
    """One row of the conditioning a caller passes (what ``warmup`` builds its stand-in conditioning from).

    tokens:   text tokens L of encoder_hidden_states [L, width] (e.g. 77 for CLIP).
    width:    encoder_hidden_states width (the UNet's cross_attention_dim).
    pooled:   width of the pooled text_embeds (SDXL; SD3/FLUX's pooled projection), else None.
    time_ids: width of SDXL micro-conditioning time_ids (6), else None; only together with ``pooled``.
    """

    tokens: int
    width: int
    pooled: int | None = None
    time_ids: int | None = None

    def __post_init__(self):
        for name in ("tokens", "width", "pooled", "time_ids"):
            v = getattr(self, name)
            if v is None and name in ("pooled", "time_ids"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"CondSpec.{name} must be an int >= 1{' or None' if name in ('pooled', 'time_ids') else ''}"
                                  f", got {v!r}")
        if self.time_ids is not None and self.pooled is None:
            raise ConfigError("CondSpec: SDXL-style conditioning has both pooled and time_ids (e.g. pooled=1280, "
                              "time_ids=6); SD3/FLUX-style has pooled only (e.g. pooled=2048), SD1.5-style neither")

    def stand_in(self, rows: int, *, seed: int = 0) -> Cond:
        """A random Cond of ``rows`` rows with these shapes (float32, CPU): warm-up conditioning."""
        g = torch.Generator().manual_seed(seed)
        ehs = torch.randn(rows, self.tokens, self.width, generator=g)
        if self.pooled is None:
            return Cond(ehs)
        pooled = torch.randn(rows, self.pooled, generator=g)
        return Cond(ehs, pooled, None if self.time_ids is None else torch.randn(rows, self.time_ids, generator=g))


@dataclass(frozen=True)
class WarmupRecord:
    """One warm-up item: a sampler config at one batch bucket and latent shape, and its seconds."""

    config: SamplerConfig
    batch: int
    latent_shape: tuple[int, int, int]
    seconds: float
    captured: bool  # a CUDA graph was captured (False: static buffers only, or graphs off)


@dataclass
class RuntimeStats:
    """Host counters of a Runtime (no device syncs to read them)."""

    backend: str
    graphs: bool
    cuda_graphs: bool
    samplers: int = 0
    calls: int = 0
    captures: int = 0
    replays: int = 0  # CUDA graph replays
    static_runs: int = 0  # loops run eagerly on a warmed bucket's static buffers (graphs on, off CUDA)
    eager_runs: int = 0  # loops run without a graph (static buffers or, for a miss, the call's own)
    padded_calls: int = 0
    evictions: int = 0
    oom_fallbacks: int = 0
    capture_s: float = 0.0
    build_s: float = 0.0
    warmups: list[WarmupRecord] = field(default_factory=list)

    @property
    def warmup_s(self) -> float:
        return sum(w.seconds for w in self.warmups)


def _positive_ints(name: str, values: Iterable[Any]) -> tuple[int, ...]:
    try:
        out = tuple(sorted({operator.index(v) for v in values}))
    except TypeError:
        raise ConfigError(f"{name} must be a sequence of ints >= 1, got {values!r}") from None
    if not out or out[0] < 1:
        raise ConfigError(f"{name} must be a non-empty sequence of ints >= 1, got {values!r}")
    return out


def _resolutions(values) -> tuple[tuple[int, int], ...] | None:
    if values is None:
        return None
    try:
        out = tuple(dict.fromkeys((operator.index(h), operator.index(w)) for h, w in values))
    except (TypeError, ValueError):
        raise ConfigError(f"resolutions must be latent (height, width) pairs, e.g. ((64, 64),), got {values!r}") \
            from None
    if not out or any(h < 1 or w < 1 for h, w in out):
        raise ConfigError(f"resolutions must be non-empty latent (height, width) pairs >= 1, got {values!r}")
    return out


class Runtime:
    """Backend Denoisers + Samplers + GraphRunners for one student/teacher pair (module docstring).

    student, teacher: eager Denoisers (a DenoiserBase, e.g. UNetDenoiser; any callable is wrapped once);
                      ``teacher`` None for a plain student. Non-eager backends need module-backed ones.
    cond_spec:        CondSpec of the student's conditioning rows; teacher_cond_spec: the teacher's when
                      it has its own text encoders (default: the same).
    config:           the SamplerConfig that ``sample(None, ...)`` and override mappings start from.
    backend:          "auto" (= eager: only what has run on hardware here), "eager", "compile",
                      "onnxruntime", "tensorrt" (distpp.backends); backend_options: that backend's own
                      options (compile=CompileConfig(...), engine=EngineConfig(...), ...).
    graphs:           "auto" (on for a CUDA device when both Denoisers are capturable), True (the
                      GraphRunner path everywhere; off CUDA its eager loop over static buffers), False
                      (Sampler.sample directly).
    batch_sizes:      the batch buckets ``warmup`` captures; a smaller call is padded to a warmed bucket.
    resolutions:      latent (H, W) sizes ``warmup`` captures (and the backends' build shapes).
    latent_channels:  latent C (default: the student's spec.in_channels).
    max_graphs:       total bound on cached loops over every config (LRU).
    max_samplers:     bound on the Samplers kept (one per distinct config; LRU, the Runtime's own config
                      is never dropped): a service fed odd settings cannot grow without bound.
    on_miss:          a call no warmed bucket fits: "eager" (default), "capture" (on first use), "error".
    device, dtype, teacher_dtype: as Sampler's (default: from the Denoisers' specs).
    cache:            an ArtifactCache for ONNX exports / engines (default: $DISTPP_CACHE).
    label:            the model pair's name in graph keys and stats (default: the student's class name).
    """

    def __init__(self, student, teacher=None, *, cond_spec: CondSpec, teacher_cond_spec: CondSpec | None = None,
                 config: SamplerConfig | None = None, backend: str = "auto", graphs: bool | str = "auto",
                 batch_sizes: Sequence[int] = (1,), resolutions: Sequence[tuple[int, int]] | None = None,
                 latent_channels: int | None = None, max_graphs: int = 8, max_samplers: int = 32,
                 on_miss: str = "eager",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 teacher_dtype: torch.dtype | None = None, backend_options: Mapping[str, Any] | None = None,
                 cache=None, label: str | None = None):
        from . import backends

        if not isinstance(cond_spec, CondSpec) or (teacher_cond_spec is not None
                                                   and not isinstance(teacher_cond_spec, CondSpec)):
            raise ConfigError("cond_spec (and teacher_cond_spec) must be distpp.runtime.CondSpec(tokens, width, "
                              "pooled=None, time_ids=None)")
        if config is not None and not isinstance(config, SamplerConfig):
            raise ConfigError(f"config must be a distpp.SamplerConfig, got {type(config).__name__}")
        if graphs not in GRAPH_MODES:
            raise ConfigError(f"graphs must be 'auto', True or False, got {graphs!r}")
        if on_miss not in ON_MISS:
            raise ConfigError(f"on_miss must be one of {', '.join(ON_MISS)}, got {on_miss!r}")
        if not isinstance(max_samplers, int) or isinstance(max_samplers, bool) or max_samplers < 1:
            raise ConfigError(f"max_samplers must be an int >= 1, got {max_samplers!r}")
        self.max_samplers = max_samplers
        self.config = config or SamplerConfig()
        self.cond_spec, self.teacher_cond_spec = cond_spec, teacher_cond_spec
        self.batch_sizes = _positive_ints("batch_sizes", batch_sizes)
        self.resolutions = _resolutions(resolutions)
        eager_s, eager_t = as_denoiser(student), as_denoiser(teacher)
        if eager_s is None:
            raise ConfigError("Runtime needs a student Denoiser")
        try:
            self.device = torch.device(device if device is not None else (eager_s.spec.device or "cpu"))
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {device!r} is not a torch device ({e}); pass 'cpu' or 'cuda'") from e
        self.dtype, self.teacher_dtype = dtype, teacher_dtype
        self.latent_channels = latent_channels if latent_channels is not None else eager_s.spec.in_channels
        self.on_miss, self.label = on_miss, label or eager_s.name
        self._budget = GraphBudget(max_graphs)  # validates max_graphs
        self.backend = backends.resolve_backend(backend, self.device)
        t0 = time.perf_counter()
        bs = self.batch_sizes
        s, t, timings = backends.make_pair(eager_s, eager_t, self.backend, batch=(bs[0], bs[0], bs[-1]),
                                           resolutions=self.resolutions, tokens=cond_spec.tokens, cache=cache,
                                           device=self.device, **dict(backend_options or {}))
        self.student, self.teacher = as_denoiser(s), as_denoiser(t)
        self._built = [m for m, e in ((self.student, eager_s), (self.teacher, eager_t)) if m is not None and m is not e]
        capturable = all(m.capturable for m in (self.student, self.teacher) if m is not None)
        on_cuda = self.device.type == "cuda"
        self.graphs = (on_cuda and capturable) if graphs == "auto" else bool(graphs)
        self._stats = RuntimeStats(backend=self.backend, graphs=self.graphs, cuda_graphs=self.graphs and on_cuda,
                                   build_s=timings.get("export_s", 0.0) + timings.get("build_s", 0.0)
                                   or time.perf_counter() - t0)
        self._samplers: OrderedDict[SamplerConfig, Sampler] = OrderedDict()
        self._runners: dict[SamplerConfig, GraphRunner] = {}
        self._dropped: dict[str, float] = {}  # counters of runners dropped with their samplers
        self._closed = False

    # -- configs and the objects built per config -------------------------------------------------------
    def resolve_config(self, config_or_overrides: SamplerConfig | Mapping[str, Any] | None) -> SamplerConfig:
        """A SamplerConfig from a config, a mapping of overrides of ``self.config``, or None (``self.config``)."""
        if config_or_overrides is None:
            return self.config
        if isinstance(config_or_overrides, SamplerConfig):
            return config_or_overrides
        if isinstance(config_or_overrides, Mapping):
            known = {f.name for f in fields(SamplerConfig)}
            unknown = sorted(set(config_or_overrides) - known)
            if unknown:
                raise ConfigError(f"unknown SamplerConfig field(s) {unknown}; pass some of {', '.join(sorted(known))}")
            return replace(self.config, **config_or_overrides)
        raise ConfigError(f"pass a SamplerConfig, a mapping of its fields (e.g. {{'guided_steps': 0}}) or None, got "
                          f"{type(config_or_overrides).__name__}")

    def sampler(self, config: SamplerConfig | Mapping[str, Any] | None = None) -> Sampler:
        """The Sampler of ``config`` (built on first use, on the Runtime's backend Denoisers)."""
        self._check_open()
        cfg = self.resolve_config(config)
        with self._budget.lock:
            s = self._samplers.get(cfg)
            if s is None:
                if cfg.guided_steps > 0 and self.teacher is None:
                    raise ConfigError("guided_steps > 0 needs a teacher; this Runtime has none (pass guided_steps=0)")
                s = Sampler(self.student, self.teacher, cfg, device=self.device, dtype=self.dtype,
                            teacher_dtype=self.teacher_dtype)
                self._samplers[cfg] = s
                while len(self._samplers) > self.max_samplers:
                    self._drop(next(c for c in self._samplers if c != self.config and c != cfg))
                self._stats.samplers = len(self._samplers)
            self._samplers.move_to_end(cfg)
            return s

    def _drop(self, cfg: SamplerConfig) -> None:
        """Forget ``cfg``'s sampler and runner (its graphs released; its counters kept). Caller holds the lock."""
        r = self._runners.pop(cfg, None)
        if r is not None:
            r.clear()  # releases its graphs (counted as evictions in its stats), then its counters are kept
            for name in _COUNTERS:
                self._dropped[name] = self._dropped.get(name, 0) + getattr(r.stats, name)
        del self._samplers[cfg]

    def runner(self, config: SamplerConfig | Mapping[str, Any] | None = None) -> GraphRunner:
        """The GraphRunner of ``config`` (graphs on only), under the Runtime's one budget."""
        if not self.graphs:
            raise ConfigError("this Runtime runs with graphs=False: it has no GraphRunner")
        cfg = self.resolve_config(config)
        with self._budget.lock:
            r = self._runners.get(cfg)
            if r is None:
                r = GraphRunner(self.sampler(cfg), graphs=True, budget=self._budget, pad=True, on_miss=self.on_miss,
                                model=self.label, backend=self.backend)
                self._runners[cfg] = r
            return r

    # -- the lifecycle --------------------------------------------------------------------------------------
    def sample(self, config_or_overrides: SamplerConfig | Mapping[str, Any] | None, cond: Cond,
               **kw) -> torch.Tensor:
        """Sample like ``Sampler.sample(cond, **kw)`` with the sampler of ``config_or_overrides``;
        returns [B, C, H, W] float32 latents (a tensor of the call's own; never a view of static buffers)."""
        self._check_open()
        cfg = self.resolve_config(config_or_overrides)
        self._stats.calls += 1
        if self.graphs:
            return self.runner(cfg).sample(cond, **kw)
        return self.sampler(cfg).sample(cond, **kw)

    def warmup(self, configs: SamplerConfig | Mapping[str, Any] | Sequence | None = None, *,
               batch_sizes: Sequence[int] | None = None, resolutions: Sequence[tuple[int, int]] | None = None,
               progress: bool = True) -> list[WarmupRecord]:
        """Capture (CUDA graphs on), compile (compile backend) or at least run once every (config, latent
        resolution, batch bucket), so traffic finds them ready; returns one WarmupRecord each (also in
        ``stats.warmups``). Defaults: the Runtime's config, batch_sizes and resolutions."""
        from tqdm.auto import tqdm

        self._check_open()
        if configs is None or isinstance(configs, (SamplerConfig, Mapping)):
            configs = [configs]
        cfgs = list(dict.fromkeys(self.resolve_config(c) for c in configs))
        sizes = _positive_ints("batch_sizes", batch_sizes) if batch_sizes is not None else self.batch_sizes
        res = _resolutions(resolutions) or self.resolutions
        if res is None:
            raise ConfigError("warmup needs latent resolutions: pass resolutions=((H, W), ...) here or to Runtime(...)")
        if self.latent_channels is None:
            raise ConfigError("the student's spec does not say its latent channels: pass Runtime(latent_channels=C)")
        items = [(c, hw, b) for c in cfgs for hw in res for b in sizes]
        records = []
        for cfg, (h, w), b in tqdm(items, desc="distpp warm-up", unit="shape", disable=not progress):
            shape = (int(self.latent_channels), h, w)
            kw = self._stand_in(cfg, b)
            t0 = time.perf_counter()
            captured = False
            cond = kw.pop("cond")
            if self.graphs:
                r = self.runner(cfg)
                key = r.warmup(cond, batch_sizes=[b], latent_shape=shape, **kw)[0]
                captured = r.is_captured(key)
                if not captured:  # run it once anyway: lazy compiles and first-call allocations happen here
                    r.sample(cond, latent_shape=shape, seeds=list(range(b)), **kw)
            else:
                self.sampler(cfg).sample(cond, latent_shape=shape, seeds=list(range(b)), **kw)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            records.append(WarmupRecord(cfg, b, shape, time.perf_counter() - t0, captured))
        self._stats.warmups.extend(records)
        return records

    def _stand_in(self, cfg: SamplerConfig, batch: int) -> dict[str, Cond]:
        out = {"cond": self.cond_spec.stand_in(batch)}
        if cfg.guided_steps > 0:
            cfg_pair = cfg.teacher_guidance == "cfg"  # an embedded-guidance teacher takes no uncond
            if cfg_pair:
                out["uncond"] = self.cond_spec.stand_in(1, seed=1)
            if self.teacher_cond_spec is not None:
                out["teacher_cond"] = self.teacher_cond_spec.stand_in(batch, seed=2)
                if cfg_pair:
                    out["teacher_uncond"] = self.teacher_cond_spec.stand_in(1, seed=3)
        return out

    @property
    def stats(self) -> RuntimeStats:
        """Counters summed over the Runtime's graph runners (host ints; no sync)."""
        st = self._stats
        for name in _COUNTERS:
            setattr(st, name, sum(getattr(r.stats, name) for r in self._runners.values()) + self._dropped.get(name, 0))
        return st

    def close(self) -> None:
        """Free graphs and their pools, close backend-built Denoisers, drop the samplers (idempotent)."""
        if self._closed:
            return
        with self._budget.lock:
            _ = self.stats  # fold the runners' counters in before the runners go
            for r in self._runners.values():
                r.clear()
            self._runners.clear()
            self._samplers.clear()
            for m in self._built:
                m.close()
            self._built = []
            self._closed = True
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this Runtime was closed; build a new one")

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Runtime({self.label}, backend={self.backend!r}, graphs={self.graphs}, device={self.device}, "
                f"batch_sizes={self.batch_sizes}, resolutions={self.resolutions}, samplers={len(self._samplers)})")


__all__ = ["Runtime", "CondSpec", "RuntimeStats", "WarmupRecord"]

"""TensorRT backend (``pip install "distpp[tensorrt]"``): engines built from distpp's ONNX exports.

This module is the thin part that needs TensorRT: parse + build (precision flags, one optimization
profile, a timing cache) and a runtime on ``execute_async_v3`` over static device buffers that distpp
owns, so every tensor address is fixed and the CUDA-graph runner can capture the forward. Profiles,
shape/dtype checks, buffer plans and cache keys live in distpp.backends.plan (TensorRT-free, tested
on CPU). NOT YET RUN: no machine distpp has been developed on could install TensorRT.

Engines are stored through distpp's ArtifactCache (kind ``trt_engine``), keyed by the ONNX bytes'
sha256, the profile, the builder settings (precision flags, optimization level, workspace limit),
TensorRT version and GPU name + compute capability; the timing cache (kind ``trt_timing``) by TensorRT
version and GPU.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..cache import ArtifactCache, cache_key
from ..denoiser import Cond, DenoiserBase, ModelSpec, UNetDenoiser
from ..errors import BackendUnavailableError, CacheError, ConfigError, DistppError
from .plan import (OUTPUT, SAMPLE, IOSpec, Profile, ShapeRange, check_feeds, compute_profile, cond_feeds,
                   engine_key, onnx_sha256, plan_buffers, read_io_spec, view)

EXTRA = "tensorrt"
ENGINE_FILE = "engine.plan"
TIMING_FILE = "timing.cache"
PRECISIONS = ("fp32", "fp16", "bf16")


class TrtExecutionError(DistppError, RuntimeError):
    """TensorRT refused to run a built engine (``execute_async_v3`` returned False; see its log)."""


def is_available() -> bool:
    """True when the tensorrt package is importable and a CUDA GPU is visible."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _trt():
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailableError("the tensorrt backend needs TensorRT >= 10; pip install 'distpp[tensorrt]' "
                                      "(or pass backend='onnxruntime' / 'eager')")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the tensorrt backend needs a CUDA GPU; pass backend='onnxruntime' or 'eager'")
    import tensorrt

    return tensorrt


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine.

    precision:        "fp32", "fp16" or "bf16": the builder flag allowing that precision in kernels
                      (IO dtypes stay those of the ONNX file; export fp16 for fp16 IO).
    workspace_bytes:  builder memory-pool limit for tactics (None: TensorRT's default, the GPU's memory).
    opt_level:        builder optimization level 0..5 (TensorRT's default 3).
    """

    precision: str = "fp16"
    workspace_bytes: int | None = None
    opt_level: int = 3

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is unknown; pass one of {PRECISIONS}")
        if not 0 <= int(self.opt_level) <= 5:
            raise ConfigError(f"opt_level must be 0..5, got {self.opt_level}")

    @property
    def flags(self) -> tuple[str, ...]:
        return () if self.precision == "fp32" else (self.precision.upper(),)


def gpu_identity(device: torch.device | str = "cuda") -> tuple[str, tuple[int, int]]:
    d = torch.device(device)
    return torch.cuda.get_device_name(d), tuple(torch.cuda.get_device_capability(d))


def build_engine(onnx_path: str | os.PathLike, profile: Profile, cfg: EngineConfig, out_folder: str | os.PathLike,
                 timing_cache: bytes = b"") -> bytes:
    """Parse ``onnx_path``, build with ``profile`` and ``cfg``, write ``out_folder/engine.plan``.

    Returns the serialized timing cache after the build (to persist). Parser and builder failures raise
    CacheError with TensorRT's messages.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CacheError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    for flag in cfg.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.builder_optimization_level = int(cfg.opt_level)
    if cfg.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_bytes))
    tc = config.create_timing_cache(timing_cache)
    config.set_timing_cache(tc, ignore_mismatch=False)
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes:
        prof.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CacheError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    with open(Path(out_folder) / ENGINE_FILE, "wb") as f:
        f.write(serialized)
    return bytes(config.get_timing_cache().serialize())


def cached_engine(onnx_path: str | os.PathLike, shapes: ShapeRange, rows_per_sample: int, cfg: EngineConfig,
                  cache: ArtifactCache | None = None, device: torch.device | str = "cuda",
                  build=build_engine, identity: tuple[str, str, tuple[int, int]] | None = None
                  ) -> tuple[Path, IOSpec, Profile]:
    """(engine folder, IO spec, profile) for ``onnx_path``: from the cache, or built into it.

    ``build`` and ``identity`` (TensorRT version, GPU name, compute capability; default: queried) are
    injectable so the caching around the build is testable without TensorRT or a GPU.
    """
    io = read_io_spec(onnx_path)  # missing / not-a-model / foreign-IO errors before anything else
    profile = compute_profile(io, shapes, rows_per_sample)
    trt_version, gpu, cc = identity if identity is not None else (_trt_version(), *gpu_identity(device))
    key = engine_key(onnx_sha256=onnx_sha256(onnx_path), profile=profile, precision=cfg.flags,
                     opt_level=cfg.opt_level, workspace_bytes=cfg.workspace_bytes, trt_version=trt_version,
                     gpu_name=gpu, compute_capability=cc)
    cache = cache or ArtifactCache()
    tkey = cache_key(artifact="trt_timing", tensorrt=trt_version, gpu=gpu, cc=list(cc))
    tfolder = cache.load("trt_timing", tkey)
    timing = (tfolder / TIMING_FILE).read_bytes() if tfolder is not None else b""
    produced: dict[str, bytes] = {}

    def _build(tmp: Path) -> None:
        produced["timing"] = build(onnx_path, profile, cfg, tmp, timing)

    meta = {"onnx": str(onnx_path), "profile": profile.shapes, "precision": cfg.flags, "opt_level": cfg.opt_level,
            "workspace_bytes": cfg.workspace_bytes, "tensorrt": trt_version, "gpu": gpu, "cc": list(cc)}
    folder = cache.get_or_build("trt_engine", key, _build, meta=meta)
    if produced.get("timing") and tfolder is None:
        cache.get_or_build("trt_timing", tkey, lambda tmp: (tmp / TIMING_FILE).write_bytes(produced["timing"]),
                           meta={"tensorrt": trt_version, "gpu": gpu})
    return folder, io, profile


def _trt_version() -> str:
    return _trt().__version__


class TrtDenoiser(DenoiserBase):
    """A Denoiser running a TensorRT engine on static device buffers owned by distpp.

    Each call checks dtypes and shapes against the engine's IO spec and profile (before any launch),
    copies the inputs into the static buffers, sets the input shapes and runs ``execute_async_v3`` on
    torch's current stream. The returned tensor is a view of the static output buffer, valid until the
    next call. Addresses never change, so a CUDA graph captured after one warm-up call stays valid;
    a call with new shapes must be warmed up outside capture first (TensorRT may re-plan).
    """

    reuses_output = True  # the Sampler refuses one object as both student and teacher

    def __init__(self, engine_folder: str | os.PathLike, io: IOSpec, profile: Profile, base: UNetDenoiser,
                 device: torch.device | str = "cuda"):
        trt = _trt()
        self.io, self.profile, self.base = io, profile, base
        self.device = torch.device(device)
        self.spec: ModelSpec = replace(base.spec, dtype=io.dtype, device=self.device)
        data = (Path(engine_folder) / ENGINE_FILE).read_bytes()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise CacheError(f"TensorRT could not deserialize {engine_folder}/{ENGINE_FILE}; delete that folder "
                             "to rebuild it (it was built by another TensorRT version or GPU)")
        self.context = self.engine.create_execution_context()
        self.buffers = plan_buffers(io, profile).allocate(self.device)
        for name, buf in self.buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self._shapes: dict[str, tuple[int, ...]] = {}

    def prepare(self, cond: Cond) -> Cond:
        return self.base.prepare(cond).to(device=self.device, dtype=self.spec.dtype)

    def close(self) -> None:
        """Release the execution context, the engine and the static buffers (in that order)."""
        self.context = self.engine = self.runtime = None
        self.buffers = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        feeds = cond_feeds(self.io, x, t, cond)
        check_feeds(self.io, feeds, self.profile, who="TensorRT UNet")
        for name, v in feeds.items():
            shape = tuple(v.shape)
            view(self.buffers[name], shape).copy_(v)
            if self._shapes.get(name) != shape:  # shapes are host state: set only when they change
                self.context.set_input_shape(name, shape)
                self._shapes[name] = shape
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.context.execute_async_v3(stream):
            raise TrtExecutionError(f"TensorRT execute_async_v3 failed for inputs {self._shapes} (see the TensorRT "
                                    "log above)")
        return view(self.buffers[OUTPUT], tuple(feeds[SAMPLE].shape))


def make_denoiser(base: UNetDenoiser, *, role: str = "student", shapes: ShapeRange | None = None,
                  tokens: int = 77, export=None, engine: EngineConfig | None = None, cache=None,
                  onnx_path: str | os.PathLike | None = None, device="cuda",
                  timings: dict | None = None) -> TrtDenoiser:
    """A TrtDenoiser for ``base``: export (cached) -> build (cached) -> load.

    role: "student" (profile batch = B) or "teacher" (profile batch = 2B, the CFG input).
    timings: if given, receives ``export_s`` and ``build_s`` (seconds, including cache lookups).
    """
    _trt()
    if role not in ("student", "teacher"):
        raise ConfigError(f"role must be 'student' or 'teacher', got {role!r}")
    shapes = shapes or ShapeRange()
    cache = cache or ArtifactCache()
    t0 = time.perf_counter()
    if onnx_path is None:
        from ..export import ExportConfig, cached_export

        onnx_path = cached_export(base, export or ExportConfig(), latent_hw=shapes.resolutions[0], tokens=tokens,
                                  cache=cache)
    t1 = time.perf_counter()
    rows, cfg = 2 if role == "teacher" else 1, engine or EngineConfig()
    folder, io, profile = cached_engine(onnx_path, shapes, rows, cfg, cache=cache, device=device)
    try:
        den = TrtDenoiser(folder, io, profile, base, device=device)
    except CacheError as e:  # an engine this TensorRT/GPU cannot load: remove it under the cache's lock
        warnings.warn(f"distpp: {e}; rebuilding the engine", stacklevel=2)
        cache.discard(folder.parent.name, folder.name)
        folder, io, profile = cached_engine(onnx_path, shapes, rows, cfg, cache=cache, device=device)
        den = TrtDenoiser(folder, io, profile, base, device=device)
    if timings is not None:
        timings["export_s"] = timings.get("export_s", 0.0) + (t1 - t0)
        timings["build_s"] = timings.get("build_s", 0.0) + (time.perf_counter() - t1)
    return den

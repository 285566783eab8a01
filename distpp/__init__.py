"""distpp: a fast, exact runtime for Distillation++ (inference-time teacher guidance for distilled
diffusion students). See docs/ARCHITECTURE.md for the contracts."""

from .config import SamplerConfig
from .denoiser import Cond, Denoiser, DenoiserBase, ModelSpec, UNetDenoiser, as_denoiser
from .errors import (BackendUnavailableError, CacheError, CaptureError, ConfigError, DistppError, InputError,
                     WeightsNotFoundError)
from .graphs import GraphRunner
from .pipeline import Pipeline
from .runtime import CondSpec, Runtime
from .sampler import Plan, Sampler, run_loop
from .schedules import Schedule, build_schedule

__version__ = "0.1.0"

__all__ = [
    "SamplerConfig", "Sampler", "GraphRunner", "Pipeline", "Runtime", "CondSpec", "DenoiserBase", "as_denoiser", "Plan", "run_loop", "Cond", "Denoiser", "ModelSpec", "UNetDenoiser", "Schedule",
    "build_schedule", "DistppError", "ConfigError", "InputError", "BackendUnavailableError", "WeightsNotFoundError",
    "CacheError", "CaptureError", "__version__",
]

"""Choice of the fused-op implementation (``kernel_impl``), resolved once when a sampler is built.

The sampling loop calls ``ops.student_update / guided_update / plain_update`` and never branches on
which implementation they are.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BackendUnavailableError, ConfigError

KERNEL_IMPLS = ("auto", "torch", "triton", "cuda")


@dataclass(frozen=True)
class FusedOps:
    name: str
    student_update: Callable
    guided_update: Callable
    plain_update: Callable


def torch_ops() -> FusedOps:
    from distpp.kernels import guided_update_ref, plain_update_ref, student_update_ref

    return FusedOps("torch", student_update_ref, guided_update_ref, plain_update_ref)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_ops() -> FusedOps:
    from distpp.kernels import guided_update, plain_update, student_update

    return FusedOps("triton", student_update.student_update, guided_update.guided_update,
                    plain_update.plain_update)


def cuda_ops() -> FusedOps:
    from distpp import csrc_ops

    return csrc_ops.fused_ops()


def resolve_ops(kernel_impl: str, device: torch.device) -> FusedOps:
    """The fused ops for ``kernel_impl`` on ``device``; 'auto' is triton on CUDA, torch elsewhere."""
    if kernel_impl not in KERNEL_IMPLS:
        raise ConfigError(f"unknown kernel_impl {kernel_impl!r}; pass one of {', '.join(KERNEL_IMPLS)}")
    if kernel_impl == "torch":
        return torch_ops()
    interpreted = _triton_interpreted()
    if kernel_impl == "auto":
        if device.type == "cuda" and triton_available():
            return triton_ops()
        if device.type == "cuda":
            warnings.warn("triton is not installed; using the torch reference ops (pip install triton)")
        return torch_ops()
    if kernel_impl == "triton":
        if not triton_available():
            raise BackendUnavailableError("kernel_impl='triton' needs triton: pip install 'distpp[triton]'")
        if device.type != "cuda" and not interpreted:
            raise BackendUnavailableError("kernel_impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 "
                                          "set before import, for testing); use kernel_impl='torch' on CPU")
        return triton_ops()
    if device.type != "cuda":
        raise BackendUnavailableError("kernel_impl='cuda' needs a CUDA device; use kernel_impl='torch' on CPU")
    return cuda_ops()


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

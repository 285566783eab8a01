"""Eager backend: the diffusers UNet run by PyTorch as is (distpp.denoiser.UNetDenoiser)."""

from __future__ import annotations

from ..denoiser import DenoiserBase

EXTRA = None


def is_available() -> bool:
    return True


def make_denoiser(base: DenoiserBase, *, role: str = "student", shapes=None, tokens: int | None = None,
                  cache=None, device=None, timings: dict | None = None) -> DenoiserBase:
    """``base`` itself: eager needs no export or build (the shared factory arguments are accepted and unused)."""
    return base

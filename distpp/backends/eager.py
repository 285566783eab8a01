"""Eager backend: the diffusers UNet run by PyTorch as is (distpp.denoiser.UNetDenoiser)."""

from __future__ import annotations

from ..denoiser import UNetDenoiser

EXTRA = None


def is_available() -> bool:
    return True


def make_denoiser(base: UNetDenoiser, **_ignored) -> UNetDenoiser:
    """``base`` itself: eager needs no export or build."""
    return base

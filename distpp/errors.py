"""Exception types users of distpp catch.

Every error raised for bad input or a missing piece derives from :class:`DistppError`, and also from the
builtin type a caller would expect (``ValueError``, ``ImportError``, ...), so ``except ValueError`` keeps
working. Messages say what was passed and what to pass instead.
"""

from __future__ import annotations


class DistppError(Exception):
    """Base class of every error distpp raises on purpose."""


class ConfigError(DistppError, ValueError):
    """A setting is out of range or inconsistent (lam, guided_steps, family, prediction type, ...)."""


class InputError(DistppError, ValueError):
    """A tensor handed to the sampler does not fit: shape, batch, width, dtype, device or non-finite values."""


class BackendUnavailableError(DistppError, ImportError):
    """An explicitly requested backend or kernel implementation cannot run here (names what to install)."""


class WeightsNotFoundError(DistppError, FileNotFoundError):
    """Model weights are missing (a local path that does not exist, or a Hub id that is not cached offline)."""


class CacheError(DistppError, RuntimeError):
    """An artifact in the on-disk cache is corrupt, stale or could not be written."""


class CaptureError(DistppError, RuntimeError):
    """A CUDA graph could not be captured or replayed for the given inputs."""

"""Backend registry: how a UNet runs (eager PyTorch, ONNX Runtime, TensorRT, ...), behind one
Denoiser interface, so the sampler never branches on the backend.

A backend is a module with ``is_available() -> bool``, ``EXTRA`` (the pip extra that provides it, or
None) and ``make_denoiser(base, *, role, shapes, tokens, cache, device, timings, <its options>) ->
DenoiserBase``; unknown keyword arguments raise (a typo is never silently ignored). Modules are imported
only when a backend is asked for, so heavy dependencies load lazily.

``resolve_backend("auto", device)`` picks only what has run on hardware in this project: eager (the
Runtime adds CUDA graphs on a GPU). compile, onnxruntime and tensorrt run when asked by name; a named
backend that cannot run raises BackendUnavailableError naming the extra to install.
"""

from __future__ import annotations

import importlib
import time
import warnings
from types import ModuleType

import torch

from ..errors import BackendUnavailableError, ConfigError
from .plan import ShapeRange

# name -> (module path, pip extra that provides it)
_REGISTRY: dict[str, tuple[str, str | None]] = {
    "eager": ("distpp.backends.eager", None),
    "onnxruntime": ("distpp.backends.onnxruntime", "onnx"),
    "tensorrt": ("distpp.backends.tensorrt", "tensorrt"),
    "compile": ("distpp.backends.compile", None),
}
# What "auto" prefers per device type, best first (eager always runs). Only backends measured on real
# hardware belong here: TensorRT has never run (README), so it is used only when asked for by name.
_AUTO = {"cuda": ("eager",), "cpu": ("eager",)}


def register_backend(name: str, module: str, extra: str | None = None) -> None:
    """Register backend ``name`` implemented by the importable ``module`` (installed with ``extra``)."""
    _REGISTRY[name] = (module, extra)


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_backend(name: str) -> ModuleType:
    """The module of backend ``name``; raises ConfigError for unknown names and BackendUnavailableError
    (naming the extra to install) when it cannot run here."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; pass one of {', '.join(_REGISTRY)} or 'auto'")
    path, extra = _REGISTRY[name]
    try:
        mod = importlib.import_module(path)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} could not be imported ({e}); "
                                      f"pip install 'distpp[{extra}]'" if extra else str(e)) from e
    if not mod.is_available():
        hint = f"pip install 'distpp[{extra}]'" if extra else "see its module docstring"
        gpu = " and a CUDA GPU" if name == "tensorrt" else ""
        raise BackendUnavailableError(f"backend {name!r} is not available here: it needs the {extra!r} extra{gpu} "
                                      f"({hint}); or pass backend='eager'")
    return mod


def is_available(name: str) -> bool:
    try:
        get_backend(name)
        return True
    except BackendUnavailableError:
        return False


def resolve_backend(name: str = "auto", device: torch.device | str = "cpu") -> str:
    """The backend to use: ``name`` itself (checked), or for "auto" the best one available on
    ``device``'s type, warning when a preferred one is missing."""
    if name != "auto":
        get_backend(name)
        return name
    prefs = _AUTO.get(torch.device(device).type, ("eager",))
    for cand in prefs:
        if is_available(cand):
            if cand != prefs[0]:
                _, extra = _REGISTRY[prefs[0]]
                warnings.warn(f"distpp: backend {prefs[0]!r} is not available (pip install 'distpp[{extra}]'); "
                              f"falling back to {cand!r}", stacklevel=2)
            return cand
    return "eager"


def make_denoiser(backend: str, base, **kw):
    """A Denoiser for the eager Denoiser ``base`` on ``backend`` (see each module's make_denoiser)."""
    return _factory(get_backend(resolve_backend(backend, kw.get("device") or base.spec.device or "cpu")),
                    backend)(base, **kw)


def _factory(mod: ModuleType, name: str):
    """``mod.make_denoiser`` with unknown keyword arguments refused by name (ConfigError)."""
    import inspect

    fn = mod.make_denoiser
    accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    def make(base, **kw):
        unknown = sorted(set(kw) - accepted)
        if unknown:
            raise ConfigError(f"backend {name!r} does not take {', '.join(unknown)}; it takes "
                              f"{', '.join(sorted(accepted))}")
        return fn(base, **kw)

    return make


def make_pair(student, teacher, backend: str = "auto", *, batch: tuple[int, int, int] | int | None = None,
              resolutions: tuple[tuple[int, int], ...] | None = None, tokens: int = 77, cache=None,
              device=None, **options):
    """(student, teacher, timings): the eager Denoisers ``student`` / ``teacher`` on ``backend``.

    student, teacher: eager Denoisers (non-eager backends need module-backed ones: UNetDenoiser);
                 ``teacher`` may be None (a plain student).
    batch:       sample batch B served: an int or (min, opt, max) (default (1, 1, 4)); the teacher's
                 profile covers 2B rows (its CFG input).
    resolutions: latent (H, W) sizes to serve (default: (64, 64)).
    tokens:      text tokens of the conditioning (the ONNX/TensorRT input shapes).
    options:     the backend's own options, e.g. compile=CompileConfig(...), export=ExportConfig(...),
                 engine=EngineConfig(...), providers=[...]; unknown ones raise ConfigError.
    timings:     {"backend": resolved name, "export_s": seconds exporting (or loading) ONNX, "build_s":
                 seconds building (or loading) engines and sessions}, to report apart from sampling.
    """
    device = device if device is not None else (student.spec.device if hasattr(student, "spec") else None) or "cpu"
    name = resolve_backend(backend, device)
    b = (batch, batch, batch) if isinstance(batch, int) else (batch or (1, 1, 4))
    shapes = ShapeRange(batch=b, resolutions=tuple(resolutions or ((64, 64),)))
    make = _factory(get_backend(name), name)
    timings = {"backend": name, "export_s": 0.0, "build_s": 0.0}
    out = []
    for role, base in (("student", student), ("teacher", teacher)):
        if base is None:
            out.append(None)
            continue
        before = timings["export_s"] + timings["build_s"]
        t0 = time.perf_counter()
        out.append(make(base, role=role, shapes=shapes, tokens=tokens, cache=cache, device=device, timings=timings,
                        **options))
        if timings["export_s"] + timings["build_s"] == before:  # a backend that does not split its time
            timings["build_s"] += time.perf_counter() - t0
    return out[0], out[1], timings


__all__ = ["ShapeRange", "register_backend", "backend_names", "get_backend", "is_available", "resolve_backend",
           "make_denoiser", "make_pair"]

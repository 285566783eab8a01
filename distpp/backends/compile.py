"""torch.compile backend: the diffusers UNet compiled by TorchDynamo/Inductor, behind the Denoiser protocol.

Compilation is lazy: the first call for each input signature (shapes and dtypes) compiles, and its
wall time (synchronized on CUDA) is added to ``CompiledDenoiser.compile_s``, so benchmarks report it
apart from sampling (the bench's warm-up absorbs it). Composable with distpp's own CUDA graphs
(distpp.graphs): only Inductor modes that do not capture graphs themselves are allowed, because
Inductor's CUDA-graph trees cannot nest inside distpp's whole-loop capture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..denoiser import Cond, DenoiserBase, UNetDenoiser, as_denoiser, unet_forward
from ..errors import ConfigError

EXTRA = None
MODES = ("default", "max-autotune-no-cudagraphs")


def is_available() -> bool:
    """torch.compile exists (torch >= 2.0; distpp needs >= 2.4 anyway)."""
    return hasattr(torch, "compile")


@dataclass(frozen=True)
class CompileConfig:
    """How the UNets are compiled.

    mode:      Inductor mode: "default" (fast to compile) or "max-autotune-no-cudagraphs" (autotuned
               GEMMs/convs; cold compiles take minutes). Modes that capture CUDA graphs are refused:
               distpp captures the whole loop itself (distpp.graphs).
    backend:   torch.compile backend: "inductor"; "aot_eager" / "eager" trace without codegen (tests).
    fullgraph: require one graph per UNet call (no graph breaks).
    dynamic:   False compiles one graph per shape (recompiles count into compile_s).
    """

    mode: str = "default"
    backend: str = "inductor"
    fullgraph: bool = False
    dynamic: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"compile mode {self.mode!r} is not supported here; pass one of {', '.join(MODES)} "
                              "(distpp captures its own CUDA graphs, so Inductor's cudagraph modes "
                              "'reduce-overhead' / 'max-autotune' would nest inside them)")
        if self.backend not in ("inductor", "aot_eager", "eager"):
            raise ConfigError(f"compile backend {self.backend!r}: pass 'inductor' (or 'aot_eager'/'eager' to test)")

    def kwargs(self) -> dict:
        kw = dict(backend=self.backend, fullgraph=self.fullgraph, dynamic=self.dynamic)
        if self.backend == "inductor":
            kw["mode"] = self.mode
        return kw


def _signature(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple:
    return (tuple(x.shape), x.dtype, tuple(t.shape)) + tuple(
        (k, tuple(v.shape), v.dtype) for k, v in sorted(cond.tensors().items()))


class CompiledDenoiser(DenoiserBase):
    """A Denoiser running ``base``'s UNet through torch.compile (same inputs, outputs and ``prepare``).

    base:    a UNetDenoiser (its ``unet`` module is compiled) or any Denoiser callable (compiled as is).
    compile_s: seconds spent in first calls of new signatures (compile + one run), synchronized on CUDA.
    """

    def __init__(self, base, config: CompileConfig | None = None):
        self.base, self.config = as_denoiser(base), config or CompileConfig()
        self.spec = self.base.spec
        self.compile_s = 0.0
        self.compiles = 0
        self._seen: set[tuple] = set()
        if isinstance(base, UNetDenoiser):
            self._compiled_unet = torch.compile(base.unet, **self.config.kwargs())
            self._call = self._unet_call
        else:
            self._call = torch.compile(self.base, **self.config.kwargs())

    def prepare(self, cond: Cond) -> Cond:
        return self.base.prepare(cond)

    def _unet_call(self, x, t, cond):
        return unet_forward(self._compiled_unet, x, t, cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        sig = _signature(x, t, cond)
        if sig in self._seen:
            return self._call(x, t, cond)
        t0 = time.perf_counter()
        out = self._call(x, t, cond)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.compile_s += time.perf_counter() - t0
        self.compiles += 1
        self._seen.add(sig)
        return out


def make_denoiser(base, *, compile: CompileConfig | None = None, role: str = "student", shapes=None,
                  tokens: int | None = None, cache=None, device=None,
                  timings: dict | None = None) -> CompiledDenoiser:
    """A CompiledDenoiser for ``base`` (compiles lazily on first calls; see ``compile_s``)."""
    if compile is not None and not isinstance(compile, CompileConfig):
        raise ConfigError(f"compile= must be a distpp.backends.compile.CompileConfig, got {type(compile).__name__}")
    return CompiledDenoiser(base, compile)

"""ONNX Runtime backend: a UNet exported by distpp.export, run as a Denoiser.

Inputs and the output are bound in place through ONNX Runtime's IO binding (torch tensors' memory,
no copies), on the CPU provider, or the CUDA provider when onnxruntime-gpu is installed and the model
lives on a GPU. ``prepare`` is the eager UNetDenoiser's (LCM's w-embedding), followed by a cast of the
conditioning to the model's dtype, so the loop's calls only check and bind.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..denoiser import Cond, DenoiserBase, ModelSpec, UNetDenoiser
from ..errors import BackendUnavailableError, ConfigError
from .plan import OUTPUT, SAMPLE, IOSpec, ShapeRange, check_feeds, cond_feeds, read_io_spec

EXTRA = "onnx"


def is_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _ort():
    if not is_available():
        raise BackendUnavailableError("the onnxruntime backend needs onnxruntime and onnx; "
                                      "pip install 'distpp[onnx]' (onnxruntime-gpu for the CUDA provider)")
    import onnxruntime

    return onnxruntime


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    if dtype not in (torch.float32, torch.float16):
        raise ConfigError(f"onnxruntime binding supports float32 and float16 models, got {dtype}; "
                          "export with --dtype fp32 or fp16")
    return np.float32 if dtype == torch.float32 else np.float16


class OrtSession:
    """An ONNX Runtime session over a distpp UNet export, binding torch tensors by name.

    onnx_path: the ``model.onnx`` (external data beside it); device: where inputs and the output
    live ("cpu" or "cuda[:i]"; cuda needs onnxruntime-gpu's CUDAExecutionProvider).
    """

    def __init__(self, onnx_path: str | os.PathLike, device: torch.device | str = "cpu",
                 providers: list | None = None, threads: int | None = None):
        ort = _ort()
        self.io: IOSpec = read_io_spec(onnx_path)  # missing / not-a-model errors before the session
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if providers is None:
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise BackendUnavailableError("onnxruntime has no CUDAExecutionProvider here; "
                                                  "pip install onnxruntime-gpu, or pass device='cpu'")
                providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                             "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(Path(onnx_path)), sess_options=opts, providers=providers)
        self._dev = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)

    def run(self, feeds: dict[str, torch.Tensor], who: str = "model") -> torch.Tensor:
        """Run on ``feeds`` (by ONNX name); returns a fresh [b, C, H, W] output in the model dtype."""
        check_feeds(self.io, feeds, who=who)
        for name, v in feeds.items():
            if v.device != self.device:
                raise ConfigError(f"{who} input {name!r} is on {v.device}; this session binds {self.device}")
        feeds = {n: feeds[n].contiguous() for n in self.io.names}
        out = torch.empty(feeds[SAMPLE].shape, dtype=self.io.output.dtype, device=self.device)
        binding = self.session.io_binding()
        for name, v in feeds.items():
            binding.bind_input(name, self._dev[0], self._dev[1], _np_dtype(v.dtype), tuple(v.shape), v.data_ptr())
        binding.bind_output(OUTPUT, self._dev[0], self._dev[1], _np_dtype(out.dtype), tuple(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            # ORT runs on its own stream: inputs written on torch's stream must be complete first.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return out


class OrtDenoiser(DenoiserBase):
    """A Denoiser running a distpp ONNX export in ONNX Runtime.

    base: the eager UNetDenoiser of the same UNet: its spec (dims, prediction type) and prepare (LCM's
    w-embedding) are reused; the exported dtype replaces its dtype.
    """

    capturable = False  # ORT runs on its own stream after a host sync: no CUDA graph capture

    def __init__(self, onnx_path: str | os.PathLike, base: UNetDenoiser, *, device: torch.device | str | None = None,
                 providers: list | None = None, threads: int | None = None):
        device = torch.device(device if device is not None else (base.spec.device or "cpu"))
        self.session = OrtSession(onnx_path, device=device, providers=providers, threads=threads)
        self.base = base
        self.onnx_path = Path(onnx_path)
        self.spec: ModelSpec = replace(base.spec, dtype=self.session.io.dtype, device=device)

    @property
    def io(self) -> IOSpec:
        return self.session.io

    def prepare(self, cond: Cond) -> Cond:
        cond = self.base.prepare(cond)
        return cond.to(device=self.spec.device, dtype=self.spec.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.session.run(cond_feeds(self.io, x, t, cond), who="onnxruntime UNet")

    def close(self) -> None:
        """Drop the inference session (its arena and, on CUDA, its device memory)."""
        self.session = None


def make_denoiser(base: UNetDenoiser, *, role: str = "student", shapes: ShapeRange | None = None,
                  tokens: int = 77, export=None, cache=None, onnx_path: str | os.PathLike | None = None,
                  device=None, providers=None, threads: int | None = None,
                  timings: dict | None = None) -> OrtDenoiser:
    """An OrtDenoiser for ``base``: ``onnx_path`` if given, else the cached export of its UNet.

    shapes: only its first resolution is used (the traced example's size); ``role`` is unused here
    (onnxruntime has no build-time profiles). timings: if given, receives ``export_s`` (export or cache
    lookup) and ``build_s`` (session creation), added to what it holds.
    """
    t0 = time.perf_counter()
    if onnx_path is None:
        from ..export import ExportConfig, cached_export

        hw = (shapes or ShapeRange()).resolutions[0]
        onnx_path = cached_export(base, export or ExportConfig(), latent_hw=hw, tokens=tokens, cache=cache)
    t1 = time.perf_counter()
    den = OrtDenoiser(onnx_path, base, device=device, providers=providers, threads=threads)
    if timings is not None:
        timings["export_s"] = timings.get("export_s", 0.0) + (t1 - t0)
        timings["build_s"] = timings.get("build_s", 0.0) + (time.perf_counter() - t1)
    return den

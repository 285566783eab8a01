"""``kernel_impl="cuda"``: the fused ops of ``csrc/`` (libdistpp_kernels) called through ctypes.

ctypes, not a torch extension: the library has a C ABI (csrc/distpp_kernels.h) and links the CUDA runtime
statically, so one build serves every torch version. Where the library is looked for, in order:

1. ``$DISTPP_KERNELS_LIB`` (a file path; when set, nothing else is tried);
2. ``<checkout>/build/libdistpp_kernels.so`` (``cmake -S . -B build && cmake --build build``);
3. ``libdistpp_kernels.so`` on the system loader path (after ``cmake --install``, via LD_LIBRARY_PATH).

The same binding also loads the host build (libdistpp_kernels_host: same ABI, host pointers, CPU
tensors), which the CPU tests use to check the C++ math and argument checks from Python.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .errors import BackendUnavailableError, DistppError, InputError

ENV_VAR = "DISTPP_KERNELS_LIB"
ABI_VERSION = 2  # DISTPP_ABI_VERSION of csrc/distpp_kernels.h this binding matches
LIB_NAME = "libdistpp_kernels.so"

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# How statuses surface: the caller's input (null pointer, size, dtype, misaligned, step, invalid
# argument) -> InputError; CUDA launch refused -> KernelLaunchError; UNSUPPORTED (reserved) and
# ABI_MISMATCH (a library built from another header) -> BackendUnavailableError; anything else -> DistppError.
_ARG_ERRORS = {1, 2, 3, 4, 5, 8}
_STATUS_CUDA = 6
_BACKEND_ERRORS = {7, 9}


class KernelLaunchError(DistppError, RuntimeError):
    """A csrc kernel launch was refused by the CUDA runtime (the message has the CUDA error)."""


_p, _i64, _i32, _u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32
_HEADER = [("struct_size", _u32), ("abi_version", _u32)]


class _Params(ctypes.Structure):
    """A params struct with its header filled: struct_size = sizeof, abi_version = ABI_VERSION.

    Defaults follow the Python ops' convention: draws_noise = (z is not None) and teacher_rows =
    2 * batch (the CFG pair), unless given.
    """

    def __init__(self, *args, **fields):
        names = {f[0] for f in self._fields_}
        fields.setdefault("struct_size", ctypes.sizeof(type(self)))
        fields.setdefault("abi_version", ABI_VERSION)
        if "draws_noise" in names:
            fields.setdefault("draws_noise", int(fields.get("z") is not None))
        if "teacher_rows" in names:
            fields.setdefault("teacher_rows", 2 * int(fields.get("batch", 0)))
        super().__init__(*args, **fields)


class StudentUpdateParams(_Params):
    """distpp_student_update_params (field order and types as in csrc/distpp_kernels.h)."""

    _fields_ = _HEADER + [("x", _p), ("m_s", _p), ("n", _p), ("coef", _p), ("gcoef", _p), ("out", _p),
                          ("batch", _i64), ("numel", _i64), ("num_steps", _i64), ("num_guided", _i64),
                          ("step", _i64), ("teacher_rows", _i64), ("m_s_dtype", _i32), ("out_dtype", _i32)]


class GuidedUpdateParams(_Params):
    """distpp_guided_update_params."""

    _fields_ = _HEADER + [("x", _p), ("m_s", _p), ("n", _p), ("m_t", _p), ("z", _p), ("coef", _p), ("gcoef", _p),
                          ("lam", _p), ("cfg", _p), ("x_out", _p), ("xin_out", _p),
                          ("batch", _i64), ("numel", _i64), ("num_steps", _i64), ("num_guided", _i64),
                          ("step", _i64), ("teacher_rows", _i64),
                          ("m_s_dtype", _i32), ("m_t_dtype", _i32), ("xin_dtype", _i32), ("draws_noise", _i32)]


class PlainUpdateParams(_Params):
    """distpp_plain_update_params."""

    _fields_ = _HEADER + [("x", _p), ("m_s", _p), ("z", _p), ("coef", _p), ("x_out", _p), ("xin_out", _p),
                          ("batch", _i64), ("numel", _i64), ("num_steps", _i64), ("step", _i64),
                          ("m_s_dtype", _i32), ("xin_dtype", _i32), ("draws_noise", _i32)]


_PARAMS = {"student_update": StudentUpdateParams, "guided_update": GuidedUpdateParams,
           "plain_update": PlainUpdateParams}


def candidate_paths() -> list[str]:
    """Where the CUDA library is looked for, in order (see the module docstring)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [env]
    return [str(Path(__file__).resolve().parent.parent / "build" / LIB_NAME), LIB_NAME]


def is_available() -> bool:
    """True when a CUDA build of libdistpp_kernels loads and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        return load().is_cuda
    except BackendUnavailableError:
        return False


class KernelLibrary:
    """A loaded libdistpp_kernels (CUDA) or libdistpp_kernels_host; ops take torch tensors.

    Each op has the signature of its distpp.kernels twin. Tensors are checked in Python first (clear
    InputErrors); the library checks again and any error code it returns is raised with its message.
    """

    def __init__(self, path: str):
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise BackendUnavailableError(
                f"cannot load the distpp kernels library {path!r} ({e}); build it with "
                f"`cmake -S . -B build && cmake --build build` or set {ENV_VAR}=/path/to/{LIB_NAME}") from e
        for name in ("distpp_abi_version", "distpp_is_cuda"):
            getattr(lib, name).restype = ctypes.c_int
        for name in ("distpp_error_string", "distpp_last_error_message"):
            getattr(lib, name).restype = ctypes.c_char_p
        lib.distpp_error_string.argtypes = [ctypes.c_int]
        version = lib.distpp_abi_version()
        if version != ABI_VERSION:
            raise BackendUnavailableError(f"{path} has ABI version {version}, distpp needs {ABI_VERSION}: "
                                          "rebuild csrc from this checkout")
        for op, params in _PARAMS.items():
            fn = getattr(lib, f"distpp_{op}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(params), ctypes.c_void_p]
        self.path, self._lib = path, lib
        self.is_cuda = bool(lib.distpp_is_cuda())

    # --------------------------------------------------------------------------------------------------
    def call(self, op: str, params: ctypes.Structure, stream: int | None = None) -> None:
        """Run ``distpp_<op>`` with a filled params struct; raise on any error status."""
        status = getattr(self._lib, f"distpp_{op}")(ctypes.byref(params), ctypes.c_void_p(stream or None))
        if status == 0:
            return
        msg = (f"distpp_{op}: {self._lib.distpp_error_string(status).decode()} "
               f"({self._lib.distpp_last_error_message().decode()})")
        if status in _ARG_ERRORS:
            raise InputError(msg)
        if status in _BACKEND_ERRORS:
            raise BackendUnavailableError(f"{msg}; rebuild csrc from this checkout")
        if status == _STATUS_CUDA:
            raise KernelLaunchError(msg)
        raise DistppError(msg)

    def _stream(self, x: torch.Tensor) -> int | None:
        want = "cuda" if self.is_cuda else "cpu"
        if x.device.type != want:
            raise InputError(f"{Path(self.path).name} takes {want} tensors, got {x.device}; "
                             f"{'move the tensors to the GPU' if self.is_cuda else 'use the CUDA build'}")
        return torch.cuda.current_stream(x.device).cuda_stream if self.is_cuda else None

    def student_update(self, x, m_s, n, coef, gcoef, k, out):
        from distpp.kernels.student_update import check_student_update

        check_student_update(x, m_s, n, coef, gcoef, k, out)
        stream = self._stream(x)
        p = StudentUpdateParams(x=x.data_ptr(), m_s=m_s.data_ptr(), n=n.data_ptr(), coef=coef.data_ptr(),
                                gcoef=gcoef.data_ptr(), out=out.data_ptr(), batch=x.shape[0], numel=x.numel(),
                                num_steps=coef.shape[0], num_guided=gcoef.shape[0], step=int(k),
                                teacher_rows=out.shape[0], m_s_dtype=_DTYPES[m_s.dtype], out_dtype=_DTYPES[out.dtype])
        self.call("student_update", p, stream)
        return out

    def guided_update(self, x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out):
        from distpp.kernels.guided_update import check_guided_update

        check_guided_update(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, x_out, xin_out)
        stream = self._stream(x)
        p = GuidedUpdateParams(x=x.data_ptr(), m_s=m_s.data_ptr(), n=n.data_ptr(), m_t=m_t.data_ptr(), z=_ptr(z),
                               coef=coef.data_ptr(), gcoef=gcoef.data_ptr(), lam=lam.data_ptr(), cfg=cfg.data_ptr(),
                               x_out=x_out.data_ptr(), xin_out=_ptr(xin_out), batch=x.shape[0], numel=x.numel(),
                               num_steps=coef.shape[0], num_guided=gcoef.shape[0], step=int(k),
                               teacher_rows=m_t.shape[0], m_s_dtype=_DTYPES[m_s.dtype], m_t_dtype=_DTYPES[m_t.dtype],
                               xin_dtype=_xin_dtype(xin_out), draws_noise=int(z is not None))
        self.call("guided_update", p, stream)
        return x_out

    def plain_update(self, x, m_s, z, coef, k, x_out, xin_out):
        from distpp.kernels.plain_update import check_plain_update

        check_plain_update(x, m_s, z, coef, k, x_out, xin_out)
        stream = self._stream(x)
        p = PlainUpdateParams(x=x.data_ptr(), m_s=m_s.data_ptr(), z=_ptr(z), coef=coef.data_ptr(),
                              x_out=x_out.data_ptr(), xin_out=_ptr(xin_out), batch=x.shape[0], numel=x.numel(),
                              num_steps=coef.shape[0], step=int(k), m_s_dtype=_DTYPES[m_s.dtype],
                              xin_dtype=_xin_dtype(xin_out), draws_noise=int(z is not None))
        self.call("plain_update", p, stream)
        return x_out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _xin_dtype(xin_out: torch.Tensor | None) -> int:
    return _DTYPES[xin_out.dtype] if xin_out is not None else 0  # ignored by the library when NULL


@functools.cache
def load_path(path: str) -> KernelLibrary:
    """The library at ``path`` (loaded once per process)."""
    return KernelLibrary(path)


def load() -> KernelLibrary:
    """The first library of :func:`candidate_paths` that loads; BackendUnavailableError if none does."""
    errors = []
    for path in candidate_paths():
        if os.sep in path and not os.path.exists(path):
            errors.append(f"{path}: not found")
            continue
        try:
            return load_path(path)
        except BackendUnavailableError as e:
            errors.append(str(e))
    raise BackendUnavailableError(
        "kernel_impl='cuda' needs libdistpp_kernels built with CUDA: run `cmake -S . -B build && cmake --build "
        f"build` in the distpp checkout, or set {ENV_VAR}=/path/to/{LIB_NAME}. Tried: " + "; ".join(errors))


def fused_ops():
    """distpp.ops.FusedOps backed by the CUDA library."""
    from .ops import FusedOps

    lib = load()
    if not lib.is_cuda:
        raise BackendUnavailableError(f"{lib.path} is the host build of distpp_kernels; kernel_impl='cuda' needs "
                                      f"the CUDA build ({LIB_NAME}, built where nvcc is found)")
    return FusedOps("cuda", lib.student_update, lib.guided_update, lib.plain_update)

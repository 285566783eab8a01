"""Fused per-step ops of the guided sampler (installed as ``distpp.kernels``).

Each op lives in its own module: a Triton kernel ``_<op>_kernel``, a launcher ``<op>(...)`` and a
pure-torch ``<op>_ref(...)`` with the same signature, which is also the CPU fallback. The signature
convention (device buffers + host step index + device-resident lam/cfg) is in docs/ARCHITECTURE.md.
Triton is imported lazily, only when a Triton launcher is first called.
"""

from .guided_update import guided_update_ref
from .plain_update import plain_update_ref
from .student_update import student_update_ref

__all__ = ["student_update_ref", "guided_update_ref", "plain_update_ref"]

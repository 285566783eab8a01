"""The one table of dtype names distpp accepts (CLIs, serve settings, configs) and how they print."""

from __future__ import annotations

import torch

from .errors import ConfigError

# Canonical names first (what messages and JSON print); short aliases accepted on input.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_dtype(name: str, *, what: str = "dtype") -> torch.dtype:
    """torch dtype of ``name`` (float32 / float16 / bfloat16, or fp32 / fp16 / bf16); ConfigError otherwise."""
    key = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise ConfigError(f"unknown {what} {name!r}; pass one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: the spelling CLIs and messages use."""
    return str(dtype).replace("torch.", "")

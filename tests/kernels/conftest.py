"""Fixtures of the fused-op tests. TRITON_INTERPRET=1 is set by tests/conftest.py (collected first,
before anything imports triton) when no CUDA GPU is present; asserted here so a reordering shows."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _interpreter_set_without_gpu():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1 on CPU"

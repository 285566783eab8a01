import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """torch intra-op threads = 1 for the test, restored after. These tests overlap many calls (Python
    threads, or a CPU shared with other jobs); with 2 intra-op threads on our oversubscribed 2-core box a
    tiny-preset call took ~4 s instead of ~0.07 s (OpenMP spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy two-core machine OpenMP's
    threads wait on each other: measured 3x slower for this folder with two threads than with one.
    The previous setting comes back after each module, for the other tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

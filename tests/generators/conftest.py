"""Shared by the generator tests."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models, many small ops: intra-op threads cost more than they save (much more on a busy
    2-core machine, where two threads made single tests 10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

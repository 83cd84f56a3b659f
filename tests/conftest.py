"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core runner, OpenMP's spinning barriers make multi-threaded
    small kernels up to tens of times slower (training subprocesses get OMP_NUM_THREADS=1 for the same
    reason). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

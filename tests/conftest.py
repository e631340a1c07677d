"""Suite-wide settings.

Every test process (this one and the subprocesses the tests start: fresh-process loading, the two-process
accelerate run, kill -9 resumes) uses one OpenMP thread unless OMP_NUM_THREADS is already set. On a 2-core
machine, two processes with two threads each oversubscribe the cores, which made small convolutions 10-50x
slower in our measurements; the tests use tiny models, for which one thread is also the fastest.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one torch thread and restore the caller's setting afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

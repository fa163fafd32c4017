"""Suite-wide guard: DeepSpeed's CPU allreduce segments in /dev/shm (69 MB of RAM each).

alam_dist.deepspeed.initialize unlinks them (tests/test_deepspeed.py checks it), but runs
that fail before that point, and plain ``deepspeed.initialize`` runs, leave them behind;
a suite that leaked them ran the machine out of memory. After each test, segments that
appeared during the session are removed (the test's processes have exited by then).
"""
from __future__ import annotations

import glob
import os

import pytest

_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*"
_BEFORE = set(glob.glob(_PATTERN))


@pytest.fixture(autouse=True)
def _no_leaked_shm_segments():
    yield
    for path in set(glob.glob(_PATTERN)) - _BEFORE:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

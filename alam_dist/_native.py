"""Loads the compiled kernel modules, remembering why one is missing."""
from __future__ import annotations

from types import ModuleType

cpu: ModuleType | None
cuda: ModuleType | None
cpu_error: str | None = None
cuda_error: str | None = None

try:
    from alam_dist import _C as cpu
except ImportError as err:  # not built: ALAM_NO_NATIVE=1 or no compiler at install
    cpu, cpu_error = None, str(err)

try:
    from alam_dist import _C_cuda as cuda
except ImportError as err:  # not built: no nvcc at install, or ALAM_NO_CUDA=1
    cuda, cuda_error = None, str(err)

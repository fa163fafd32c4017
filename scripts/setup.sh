#!/usr/bin/env bash
# Installs alam_dist and everything its tests and launchers need, into the current
# Python. Idempotent: re-running it only rebuilds the native kernels.
#
# torch goes first and pinned: an unpinned torch on a machine without one makes pip
# resolve a multi-GB CUDA build. An already installed torch is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${ALAM_TORCH_VERSION:-2.13.0}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi
echo "[setup] installing alam_dist (builds csrc/: C++ kernels, and CUDA ones where nvcc is found)"
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" - <<'PY'
import torch, alam_dist
from alam_dist import codec
print(f"[setup] torch {torch.__version__}; alam_dist backends: {codec.available_backends()}")
import shutil
from alam_dist import _native
if _native.cuda is None and (shutil.which("nvcc") or torch.cuda.is_available()):
    bar = "!" * 78
    print(f"{bar}\n[setup] WARNING: the CUDA kernels were NOT built ({_native.cuda_error}).\n"
          "[setup] CUDA tensors would use the slow torch reference codec. See the nvcc error\n"
          "[setup] with: ALAM_REQUIRE_CUDA=1 pip install -v -e .   (CUDA_HOME picks the toolkit)\n"
          f"{bar}")
PY

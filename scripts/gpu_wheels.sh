#!/usr/bin/env bash
# Wheels the GPU machine lacks (it reaches no package index): DeepSpeed, built here as a
# pure-Python wheel (no ops compiled: DS_BUILD_OPS=0), and its dependencies missing from
# that image. scripts/gpu_check.sh installs them from .whl/ (ignored by git; carried).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
DS_VERSION=$("$PY" -c "import deepspeed; print(deepspeed.__version__)" 2>/dev/null || echo 0.19.8)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$DS_VERSION"
# the device runs Python 3.12 (see the device tool's KINDS.md)
for pkg in hjson pydantic pydantic-core annotated-types typing-inspection; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -la .whl

#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job. Extra arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" benchmarks/codec.py "$@"

#!/usr/bin/env bash
# The prepared GPU check: run it first thing in any session that is lent a CUDA device.
#
#   bash scripts/gpu_check.sh            # log in $OUT/gpu_check.log (or runs/gpu_check.log)
#
# Builds the kernels with ALAM_REQUIRE_CUDA=1, lists the embedded images, runs the CUDA
# tests (bit-identity with the reference, special values, side stream, 2 devices when
# present), checks n = 2**31 + 5 at 8 bits and 2**31 + 7 in AQ (bf16) against the CPU
# kernel, prints the codec benchmark's GPU rows (GB/s vs a device-to-device copy), and
# runs compute-sanitizer memcheck on small sizes. Budget: about 5 minutes on one H100.
# Every step runs even if an earlier one failed; the summary at the end lists each.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-runs}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
declare -a SUMMARY=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-28s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  tail -n 5 "$LOG"
}

{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  nvcc --version 2>&1 | tail -n 2
} >> "$LOG"

step setup 240 env ALAM_REQUIRE_CUDA=1 bash scripts/setup.sh
SO=$("$PY" -c "import alam_dist._C_cuda as m; print(m.__file__)" 2>/dev/null)
if command -v cuobjdump >/dev/null && [ -n "$SO" ]; then
  step cuobjdump 30 cuobjdump --list-elf --list-ptx "$SO"
fi
step cuda_tests 240 "$PY" -m pytest tests/test_codec.py tests/test_codec_rotated.py -q -k "cuda or special"

step large_n 240 "$PY" - <<'PYEOF'
# Sizes past 2**31: 64-bit indexing in every kernel, compared byte for byte with the
# CPU kernel (itself tested bit-identical to the reference).
import time, torch
from alam_dist import codec
for n, bits, fam in ((2**31 + 5, 8, "seed"), (2**31 + 7, 0.5, "seed"), (2**31 + 9, 2, "rotated")):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
    t = time.time()
    dev = codec.encode(x, bits, seed=3, backend="cuda", formats=fam)
    y = codec.decode(dev, backend="cuda")
    torch.cuda.synchronize()
    gpu_s = time.time() - t
    cpu = codec.encode(x.cpu(), bits, seed=3, backend="cpp", formats=fam)
    same_payload = torch.equal(cpu.data, dev.data.cpu())
    view = torch.int32 if cpu.meta.dtype == torch.float32 else torch.int16
    same_meta = torch.equal(cpu.meta.view(view), dev.meta.cpu().view(view))
    same_out = torch.equal(codec.decode(cpu, backend="cpp").view(torch.int16), y.cpu().view(torch.int16))
    print(f"n={n} {fam} bits={bits}: payload {same_payload} meta {same_meta} decode {same_out} "
          f"(gpu round trip {gpu_s:.2f}s)")
    assert same_payload and same_meta and same_out
    del x, y, dev, cpu
    torch.cuda.empty_cache()
PYEOF

step codec_benchmark 180 "$PY" benchmarks/codec.py --sizes 1 64 --repeats 5

if command -v compute-sanitizer >/dev/null; then
  step memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" - <<'PYEOF'
import torch
from alam_dist import codec
for n in (1, 3, 127, 129, 1001, 4099):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(n, device="cuda").to(dtype)
        for bits in (0.5, 2, 4, 8):
            codec.decode(codec.encode(x, bits, backend="cuda"), backend="cuda")
        for bits in (1, 2, 4, 8):
            codec.decode(codec.encode(x, bits, backend="cuda", formats="rotated"), backend="cuda")
    m = torch.rand(n, device="cuda") > 0.5
    codec.decode(codec.encode(m, 32, backend="cuda"), backend="cuda")
torch.cuda.synchronize()
print("memcheck sizes done")
PYEOF
fi

{
  echo
  echo "=== summary"
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
# non-zero when any step failed
for line in "${SUMMARY[@]}"; do
  case "$line" in *"rc=0 "*) ;; *) exit 1 ;; esac
done

#!/usr/bin/env bash
# The prepared GPU check: the whole stack on one CUDA device, in one script, one log and
# one summary table. Run it first thing in any session that is lent a GPU.
#
#   bash scripts/gpu_wheels.sh          # here (with network): wheels the device lacks -> .whl/
#   bash scripts/gpu_check.sh           # there: log and JSON in $OUT (or runs/)
#
# Steps, each with its own timeout (the sum stays under 8 minutes, leaving room to run it
# twice in a 15-minute slot); every step runs even if an earlier one failed:
#   deps       wheels from .whl/ (DeepSpeed and what the device image lacks) when present
#   build      the kernels with ALAM_REQUIRE_CUDA=1 for this GPU's architecture only
#   cuda_tests the CUDA codec tests (bit-identity with the reference, special values)
#   syncs      host-sync ops and live packed tensors of a compressed step, under CUDA
#   codec_GBps encode+decode GB/s per format beside clone (the device's copy bandwidth)
#   hook_us    host microseconds per packed / unpacked tensor besides the kernel launch
#              (benchmarks/hook_overhead.py, a tiny LLaMA with routed attention)
#   ds_zero2 / ds_zero3   deepspeed --num_gpus 1 launch/train.py --alam, NCCL, bf16
#   fsdp       torchrun --nproc_per_node 1 launch/train.py --fsdp --alam, bf16
#   memory_target  launch/train.py --alam_memory_target_gb on the GPU: the forecast's
#              predicted peak beside max_memory_allocated (summary.json)
#   compile    benchmarks/compile.py on the GPU (aot_eager): ALAM's encode/decode ops
#              inside compiled graphs, memory held after forward, gradient cosine
#   compare    benchmarks/compare.py on LLaMA-2-7B-shaped layers: step time and
#              max_memory_allocated for none / ckpt / ALAM 4, 2, 1 / ALAM 4 + ckpt
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-runs}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -a SUMMARY=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '| %-11s | %3s | %4ss |' "$name" "$rc" "$((SECONDS - start))")")
  tail -n 4 "$LOG"
}

{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  nvcc --version 2>&1 | tail -n 2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
} >> "$LOG"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step deps 40 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
step build 120 env ALAM_REQUIRE_CUDA=1 ALAM_CUDA_ARCH="$ARCH" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
step cuda_tests 60 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_codec.py \
  tests/test_codec_rotated.py -k "cuda or special"

step syncs 40 "$PY" - <<'PYEOF'
# A compressed step on the GPU: host-sync ops beside the same step without ALAM, and the
# packed tensors left after it (tests/test_step_hygiene.py does the same on the CPU).
import json, torch, alam_dist
from tests.helpers import tiny_llama, token_batch
from tests.step_probes import SyncCounter, live_step_objects
counts = {}
for on in (False, True):
    model = tiny_llama(layers=2).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = token_batch(2, 128).cuda()
    ctl = None
    if on:
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=256))
        ctl.probe(lambda: model(input_ids=x, labels=x).loss)
    for i in range(3):
        counter = SyncCounter() if i == 2 else None
        if counter: counter.__enter__()
        loss = model(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(); del loss
        if counter: counter.__exit__(None, None, None)
        if ctl: ctl.step_done()
    counts[on] = dict(counter.counts)
    if ctl:
        alive = live_step_objects()
        print("alive after the step:", alive, "ratio", round(ctl.memory_report()["ratio"], 2))
        assert alive["packed"] == 0, alive
        ctl.uninstall_hook()
print(json.dumps({"syncs_plain": counts[False], "syncs_alam": counts[True]}))
assert sum(counts[True].values()) <= sum(counts[False].values()), counts
PYEOF

step codec_GBps 40 "$PY" benchmarks/codec.py --sizes 64 --dtypes bf16 --repeats 5 --no-reference
step hook_us 30 "$PY" benchmarks/hook_overhead.py --device cuda --model llama --blocks 4 \
  --width 256 --tokens 256 --repeats 10

CFG_DIR=$(mktemp -d)
for zero in 2 3; do
  cat > "$CFG_DIR/z$zero.json" <<EOF
{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
 "zero_optimization": {"stage": $zero}, "zero_allow_untested_optimizer": true,
 "gradient_clipping": 1.0, "steps_per_print": 1000000000, "bf16": {"enabled": true},
 "alam": {"bits": 2}}
EOF
  step "ds_zero$zero" 50 deepspeed --num_gpus 1 --no_ssh_check --master_addr 127.0.0.1 \
    --master_port $((29500 + zero)) launch/train.py --deepspeed "$CFG_DIR/z$zero.json" \
    --alam --max_steps 8 --no_progress --output_dir "$LOG_DIR/ds_zero$zero"
done
step fsdp 50 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port 29510 \
  launch/train.py --fsdp --deepspeed "$CFG_DIR/z2.json" --alam --max_steps 8 --no_progress \
  --output_dir "$LOG_DIR/fsdp"

step memory_target 40 deepspeed --num_gpus 1 --no_ssh_check --master_addr 127.0.0.1 \
  --master_port 29511 launch/train.py --deepspeed "$CFG_DIR/z2.json" --alam --max_steps 5 \
  --seq_len 1024 --alam_memory_target_gb 0.25 --no_progress --output_dir "$LOG_DIR/memory_target"

step compile 40 "$PY" benchmarks/compile.py --device cuda --backend aot_eager --steps 3 \
  --rows eager compiled compiled+alam

step compare 90 "$PY" benchmarks/compare.py --model llama7b-2layer --dtype bf16 --seq 1024 \
  --batch 4 --steps 3 --rows none ckpt alam_4 alam_2 alam_1 alam_4+ckpt \
  --out "$LOG_DIR/compare_gpu.json"

{
  echo
  echo "=== summary"
  echo "| step        |  rc | time  |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
for line in "${SUMMARY[@]}"; do
  case "$line" in *"|   0 |"*) ;; *) exit 1 ;; esac
done

#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then fine-tune the tiny LLaMA on 2 CPU ranks
# with `deepspeed launch/train.py` three times on the same seed and data -- without ALAM,
# with ALAM at the config's budget (2 bits), and at 1 bit -- and print them side by side.
# Extra arguments go to every run (e.g. --max_steps 100). About 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
OUT=${ALAM_MAIN_OUT:-runs/main}
CONFIG=configs/ds_config_zero2_alam.json
# no sshd needed on one machine: --no_ssh_check, and the master on the loopback address
LAUNCH=(deepspeed --num_gpus 2 --no_ssh_check --master_addr 127.0.0.1 launch/train.py
        --deepspeed "$CONFIG" --max_steps 40 --seed 0)
run() {  # run NAME ARGS...: quiet DeepSpeed logs, keep the progress bar and our summary
  local name=$1; shift
  echo "== $name: ${LAUNCH[*]} --output_dir $OUT/$name $*"
  "${LAUNCH[@]}" --output_dir "$OUT/$name" "$@" 2>&1 \
    | grep --line-buffered -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|FutureWarning|return func|shm_comm_op' \
    || { echo "run $name failed (full log: re-run the command above)"; exit 1; }
}
run plain --no_alam "$@"
run alam_2bit --alam "$@"
run alam_1bit --alam --alam_bits 1 "$@"
echo
"$PY" launch/compare_runs.py "$OUT/plain" "$OUT/alam_2bit" "$OUT/alam_1bit"

"""Activation memory per GPU for LLaMA-2-7B under ZeRO-3 on 8 GPUs, for every compare row,
from bytes measured on a 2-layer model with LLaMA-2-7B's layer shapes.

    python benchmarks/compare.py --model llama7b-2layer --dtype bf16 --seq 512 --batch 1 \\
        --steps 2 --probe-seq 64 --out docs/results/compare_7b_bf16_s512.json
    python benchmarks/memory_model.py docs/results/compare_7b_bf16_s512.json \\
        --check docs/results/compare_7b_bf16_s256.json

The formula (bytes per GPU, sequence S, micro-batch B, L = 32 layers, hidden h = 4096,
vocabulary V = 32000, P = 6.74e9 parameters, N = 8 GPUs):

    activations(row) = S * B * (L * a_row + a_exact + 6 * V)
    model_state      = 16 * P / N            (bf16 params and grads, fp32 master, Adam m, v)
    fits             = model_state + reserve + activations <= capacity

* ``a_row``: saved-activation bytes per token per decoder layer of the row, measured
  (the row's saved bytes / (2 layers * S * B)); the 2-layer model's small embedding and
  head (vocabulary 512) are counted in it, which overstates a_row by under 1%.
* ``a_exact``: one layer's uncompressed saved bytes per token (the "none" row): a layer's
  working set during its backward -- a checkpointed layer's recompute, or the decoded
  tensors of the layer being back-propagated -- held at once, for every row.
* ``6 * V``: the logits in bf16 and their fp32 log-softmax for the loss, kept exact.
* ``reserve``: 4 GB for ZeRO-3's gathered layer parameters (two 7B layers in bf16: 0.8 GB),
  communication buffers, the CUDA context and fragmentation -- an assumption, stated.

Linearity in S * B holds because attention saves O(S) per token (scaled_dot_product_attention
or ALAM's recompute attention); ``--check`` compares the prediction from one measured run
with another measured at a different S * B.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

LAYERS, VOCAB, PARAMS, GPUS = 32, 32000, 6.74e9, 8
MEASURED_LAYERS = 2
GB = 1e9


def per_token_layer_bytes(result: dict, tokens: int) -> float:
    return result["saved_MB"] * 2 ** 20 / (MEASURED_LAYERS * tokens)


def activation_bytes(a_row: float, a_exact: float, seq: int, batch: int,
                     layers: int = LAYERS, vocab: int = VOCAB) -> float:
    return seq * batch * (layers * a_row + a_exact + 6 * vocab)


def model_state_bytes(params: float = PARAMS, gpus: int = GPUS) -> float:
    return 16 * params / gpus


def max_micro_batch(a_row: float, a_exact: float, seq: int, capacity_gb: float,
                    reserve_gb: float) -> int:
    free = capacity_gb * GB - model_state_bytes() - reserve_gb * GB
    per_sample = activation_bytes(a_row, a_exact, seq, 1)
    return max(0, int(free // per_sample))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_json", help="benchmarks/compare.py --out file (2-layer 7B-shaped model)")
    ap.add_argument("--check", default=None,
                    help="a second compare.py file at another seq x batch: measured vs predicted")
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--reserve-gb", type=float, default=4.0)
    ap.add_argument("--target-gb", type=float, default=None,
                    help="also: the budget alam.memory_target_gb would choose per seq x batch "
                         "(alam_dist.memory.solve_budget; GB here as in the table, 1e9 bytes)")
    args = ap.parse_args()
    from _util import print_json, print_table
    data = json.loads(Path(args.compare_json).read_text())
    tokens = data["seq"] * data["batch"]
    rows = [r for r in data["results"] if "saved_MB" in r]
    none = next(r for r in rows if r["row"] == "none")
    a_exact = per_token_layer_bytes(none, tokens)
    table = []
    for r in rows:
        a_row = per_token_layer_bytes(r, tokens)
        out = {"row": r["row"], "KB_per_token_layer": a_row / 1024}
        for seq in args.seqs:
            for batch in args.batches:
                out[f"GB_s{seq}_b{batch}"] = activation_bytes(a_row, a_exact, seq, batch) / GB
            for cap in (40, 80):
                out[f"max_b_s{seq}_{cap}GB"] = max_micro_batch(a_row, a_exact, seq, cap, args.reserve_gb)
        table.append(out)
    print(f"model state per GPU (ZeRO-3, {GPUS} GPUs): {model_state_bytes() / GB:.1f} GB; "
          f"reserve {args.reserve_gb} GB")
    print_table(table, list(table[0]))
    checks = []
    if args.check:
        other = json.loads(Path(args.check).read_text())
        other_tokens = other["seq"] * other["batch"]
        by_row = {r["row"]: r for r in other["results"] if "saved_MB" in r}
        for r in rows:
            if r["row"] in by_row:
                predicted = r["saved_MB"] * other_tokens / tokens
                measured = by_row[r["row"]]["saved_MB"]
                checks.append({"row": r["row"], "tokens_from": tokens, "tokens_to": other_tokens,
                               "predicted_MB": predicted, "measured_MB": measured,
                               "error": predicted / measured - 1 if measured else None})
        print_table(checks, list(checks[0]) if checks else ["row"])
    targeted = target_table(rows, tokens, a_exact, args) if args.target_gb else []
    if targeted:
        print(f"memory target {args.target_gb} GB per GPU: the budget alam_dist chooses")
        print_table(targeted, list(targeted[0]))
    print_json("memory_model", table, source=args.compare_json, check=checks,
               layers=LAYERS, vocab=VOCAB, params=PARAMS, gpus=GPUS, reserve_gb=args.reserve_gb,
               target_gb=args.target_gb, targeted=targeted)


ROW_BITS = {"none": 16.0, "alam_4": 4.0, "alam_2": 2.0, "alam_1": 1.0}
"""Measured rows by budget (bf16 activations: exact is 16 bits)."""


def target_table(rows: list[dict], tokens: int, a_exact: float, args) -> list[dict]:
    """Per seq x batch, what ``alam.memory_target_gb`` chooses, with the product's solver
    (alam_dist.memory.solve_budget): bytes per token-layer between measured budgets are
    interpolated linearly in bits; where no budget fits, activation checkpointing with ALAM
    at 1 bit (the ``alam_1+ckpt`` row) is tried."""
    from alam_dist.memory import solve_budget
    measured = sorted((ROW_BITS[r["row"]], per_token_layer_bytes(r, tokens))
                      for r in rows if r["row"] in ROW_BITS)
    by_row = {r["row"]: per_token_layer_bytes(r, tokens) for r in rows}

    def a_at(bits: float) -> float:
        bits = min(max(bits, measured[0][0]), measured[-1][0])
        for (b0, a0), (b1, a1) in zip(measured, measured[1:]):
            if bits <= b1:
                return a0 + (a1 - a0) * (bits - b0) / (b1 - b0)
        return measured[-1][1]

    target = args.target_gb * GB
    out = []
    for seq in args.seqs:
        for batch in args.batches:
            fixed = model_state_bytes() + args.reserve_gb * GB + activation_bytes(0, a_exact, seq, batch)
            numel = seq * batch * LAYERS * measured[-1][1] / 2  # bf16 elements saved exact
            budget, nbytes, fits = solve_budget(
                int(target), int(fixed), numel, lambda b: int(seq * batch * LAYERS * a_at(b)),
                measured[0][0])
            row = {"seq": seq, "batch": batch, "budget": round(min(budget, 16), 2) if fits else None,
                   "predicted_GB": round((fixed + nbytes) / GB, 1), "checkpointing": False}
            if not fits and "alam_1+ckpt" in by_row:
                ckpt = fixed + activation_bytes(by_row["alam_1+ckpt"], 0, seq, batch) - \
                    activation_bytes(0, 0, seq, batch)
                if ckpt <= target:
                    row.update(budget=1.0, predicted_GB=round(ckpt / GB, 1), checkpointing=True)
            row["fits"] = row["budget"] is not None
            out.append(row)
    return out


if __name__ == "__main__":
    main()

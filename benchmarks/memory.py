"""Saved-activation bytes: no compression vs ALAM budgets, side by side.

    python benchmarks/memory.py                  # tiny LLaMA + a 7B-shaped decoder layer
    python benchmarks/memory.py --seq 256 --budgets 2 1

For each model and dtype (fp32, bf16), one exact forward+backward measures the bytes
autograd saves (weights excluded); then one probe round, and per budget a plan
reallocated from its statistics and a compressed forward+backward measure the packed
bytes. The 7B-shaped model is one LLaMA-2-7B
decoder layer (hidden 4096, MLP 11008, 32 heads) with random init and a short sequence,
so it runs on a CPU. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import print_json, print_table  # noqa: E402

import alam_dist  # noqa: E402

MODELS = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "llama2-7b-layer": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=256),
}


def build(name: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, **MODELS[name])
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(dtype)


def saved_bytes(ctl, model, x) -> dict:
    """Memory report of one forward+backward under the controller's current plan."""
    model(input_ids=x, labels=x).loss.backward()
    ctl.step_done()
    model.zero_grad(set_to_none=True)
    return ctl.memory_report()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[8, 4, 2, 1, 0.5])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for name in args.models:
        for dname in args.dtypes:
            dtype = torch.float32 if dname == "fp32" else torch.bfloat16
            model = build(name, dtype)
            x = torch.randint(0, 256, (args.batch, args.seq))
            exact = alam_dist.Controller(model, config=alam_dist.ALAMConfig(bits=32, ladder=(32,)))
            with exact:
                raw = saved_bytes(exact, model, x)["saved_bytes_raw"]
            rows.append({"model": name, "dtype": dname, "budget": "none",
                         "saved_MB": raw / 2**20, "ratio": 1.0})
            ctl = alam_dist.Controller(model, config=alam_dist.ALAMConfig(bits=max(args.budgets)))
            with ctl:
                start = time.perf_counter()
                ctl.probe(lambda: model(input_ids=x, labels=x).loss)  # once; budgets reallocate
                probe_s = time.perf_counter() - start
                for budget in args.budgets:
                    ctl.reallocate(budget)
                    report = saved_bytes(ctl, model, x)
                    row = {"model": name, "dtype": dname, "budget": budget,
                           "saved_MB": report["saved_bytes_packed"] / 2**20,
                           "ratio": raw / report["saved_bytes_packed"],
                           "plan_bits": report["plan_average_bits"], "tensors": report["tensors"],
                           "probe_s": probe_s}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print_table(rows, ["model", "dtype", "budget", "saved_MB", "ratio", "plan_bits", "tensors", "probe_s"])
    print_json("memory", rows, batch=args.batch, seq=args.seq)


if __name__ == "__main__":
    main()

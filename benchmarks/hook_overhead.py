"""Per-tensor cost of ALAM's hooks: microseconds per saved tensor, packed and unpacked.

    python benchmarks/hook_overhead.py            # a deep stack of small layers, CPU

A stack of 64 small blocks (Linear 64 -> 64, GELU, LayerNorm) on 8 x 16 tokens: every
saved tensor is small, so a step's time is mostly per-tensor overhead -- the key, the
weight check, the seed, the codec call, the statistics. Times a step (forward + backward)
without ALAM and with ALAM at budget 2 (plan from one probe round), best of N, and
reports the difference per packed tensor (``us_per_tensor``: pack + unpack, the codec's
kernels included). On a GPU that overhead is host time the step pays per tensor.
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import print_json, print_table  # noqa: E402

import alam_dist  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return x + self.norm(torch.nn.functional.gelu(self.fc(x)))


def step_seconds(model, x, repeats: int, ctl=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(x).square().mean().backward()
        best = min(best, time.perf_counter() - t)
        if ctl is not None:
            ctl.step_done()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block(args.width) for _ in range(args.blocks)])
    x = torch.randn(args.tokens, args.width, requires_grad=True)
    plain = step_seconds(model, x, args.repeats)
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=256, probe="cheap"))
    ctl.probe(lambda: model(x).square().mean())
    alam = step_seconds(model, x, args.repeats, ctl)
    stats = ctl.memory_report(count_nonfinite=False)
    packed = stats["tensors"] + stats["deduplicated"] + stats["skipped_weights"] + stats["skipped_other"]
    row = {"blocks": args.blocks, "saved_tensors": packed, "compressed": stats["tensors"],
           "plain_ms": plain * 1e3, "alam_ms": alam * 1e3,
           "us_per_tensor": (alam - plain) / max(1, packed) * 1e6,
           "us_per_compressed": (alam - plain) / max(1, stats["tensors"]) * 1e6}
    print_table([row], list(row))
    print_json("hook_overhead", [row])


if __name__ == "__main__":
    main()

"""Per-tensor cost of ALAM's hooks: microseconds per saved tensor, packed and unpacked.

    python benchmarks/hook_overhead.py            # a deep stack of small layers, CPU
    python benchmarks/hook_overhead.py --width 16 --tokens 64   # tiny tensors: host cost
    python benchmarks/hook_overhead.py --model llama --blocks 4 --width 64 --tokens 128
                                                  # a tiny LLaMA: attention routed too
    python benchmarks/hook_overhead.py --model llama --width 128 --tokens 512 --bits 8 \
        --ladder 32 8 --attention recompute_all   # against the default: torch's kernel

A stack of 64 small blocks (Linear -> GELU -> LayerNorm) on a few tokens: every saved
tensor is small, so a step's time is mostly per-tensor overhead -- the key, the weight
check, the seed, the codec call, the statistics. Two measurements:

* the step: forward + backward without ALAM and with ALAM at budget --bits (2; plan from one
  probe round), best of N, and the difference per saved tensor (``us_per_tensor``);
* the hooks themselves, timed around every call in the compressed steps:
  ``pack_us`` / ``unpack_us`` per *compressed* tensor, ``kernel_pack_us`` /
  ``kernel_unpack_us`` of it spent inside the native kernels, and ``host_pack_us`` /
  ``host_unpack_us`` -- the rest, the host time a GPU step pays per tensor besides the
  kernel launch (on a GPU the kernel runs asynchronously, and the ``kernel_*`` columns
  are its launch). Medians over the steps.

Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import print_json, print_table  # noqa: E402

import alam_dist  # noqa: E402
from alam_dist.codec import backends  # noqa: E402
from alam_dist.hooks.policy import Saved  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return x + self.norm(torch.nn.functional.gelu(self.fc(x)))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_seconds(loss_fn, repeats: int, ctl=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        loss_fn().backward()
        _sync()
        best = min(best, time.perf_counter() - t)
        if ctl is not None:
            ctl.step_done()
    return best


class HookTimer:
    """Times the policy's pack/unpack hooks and the native kernels they call, per step."""

    def __init__(self, policy):
        self.policy, self.steps = policy, []
        self._pack, self._unpack = policy.pack, policy.unpack
        policy.pack, policy.unpack = self.pack, self.unpack  # the hooks bind these per forward
        # the native kernels of every built backend, timed through a stand-in module
        self._natives = [(b, b._m) for b in (backends.CPP, backends.CUDA) if b is not None]
        for backend, module in self._natives:
            backend._m = _TimedModule(self, module)
        self.new_step()

    def new_step(self) -> None:
        self.now = {"pack": [0, 0], "unpack": [0, 0], "kernel_pack": [0, 0], "kernel_unpack": [0, 0]}
        self.steps.append(self.now)

    def _add(self, what: str, ns: int) -> None:
        self.now[what][0] += ns
        self.now[what][1] += 1

    def pack(self, t):
        start = time.perf_counter_ns()
        out = self._pack(t)
        if isinstance(out, Saved) and out.packed is not None:
            self._add("pack", time.perf_counter_ns() - start)
        return out

    def unpack(self, saved):
        start = time.perf_counter_ns()
        out = self._unpack(saved)
        if isinstance(saved, Saved) and saved.packed is not None:
            self._add("unpack", time.perf_counter_ns() - start)
        return out

    def restore(self) -> None:
        self.policy.pack, self.policy.unpack = self._pack, self._unpack
        for backend, module in self._natives:
            backend._m = module

    def medians(self) -> dict:
        out = {}
        for what in ("pack", "unpack", "kernel_pack", "kernel_unpack"):
            per_step = [s[what][0] / s[what][1] / 1e3 for s in self.steps if s[what][1]]
            out[f"{what}_us"] = statistics.median(per_step) if per_step else 0.0
        out["host_pack_us"] = out["pack_us"] - out["kernel_pack_us"]
        out["host_unpack_us"] = out["unpack_us"] - out["kernel_unpack_us"]
        return out


class _TimedModule:
    """A native kernel module whose quantize/dequantize calls are timed."""

    def __init__(self, timer: HookTimer, module):
        self._timer, self._module = timer, module

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        what = {"quantize": "kernel_pack", "quantize_rotated": "kernel_pack",
                "dequantize": "kernel_unpack", "dequantize_rotated": "kernel_unpack"}.get(name)
        if what is None:
            return fn

        def timed(*args):
            start = time.perf_counter_ns()
            out = fn(*args)
            self._timer._add(what, time.perf_counter_ns() - start)
            return out
        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--formats", default="rotated", choices=["rotated", "minmax"])
    ap.add_argument("--model", default="stack", choices=["stack", "llama"],
                    help="stack: Linear/GELU/LayerNorm blocks; llama: a tiny LlamaForCausalLM "
                         "(--blocks layers, --width hidden, 2 sequences of --tokens), whose "
                         "attention calls are routed (alam_dist.attention)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=float, default=2, help="the budget (plan from one probe)")
    ap.add_argument("--ladder", type=float, nargs="+", default=None,
                    help="alam.ladder (e.g. 32 8: q and k at 8 bits or exact, where "
                         "--attention recompute runs torch's kernel)")
    ap.add_argument("--attention", default="recompute",
                    help="alam.attention: recompute | recompute_all | stock")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=args.width, intermediate_size=args.width * 2,
            num_hidden_layers=args.blocks, num_attention_heads=max(1, args.width // 32),
            num_key_value_heads=max(1, args.width // 32), max_position_embeddings=args.tokens,
            attn_implementation="sdpa")).to(device).train()
        ids = torch.randint(0, 256, (2, args.tokens),
                            generator=torch.Generator().manual_seed(0)).to(device)
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
        numel = 2 * args.tokens * args.width
    else:
        model = torch.nn.Sequential(*[Block(args.width) for _ in range(args.blocks)]).to(device)
        x = torch.randn(args.tokens, args.width, device=device, requires_grad=True)
        loss_fn = lambda: model(x).square().mean()  # noqa: E731
        numel = args.tokens * args.width
    plain = step_seconds(loss_fn, args.repeats)
    bits = int(args.bits) if args.bits == int(args.bits) else args.bits
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=bits, min_numel=256, probe="cheap",
                                                      formats=args.formats,
                                                      attention=args.attention,
                                                      ladder=args.ladder))
    ctl.probe(loss_fn)
    alam = step_seconds(loss_fn, args.repeats, ctl)
    stats = ctl.memory_report(count_nonfinite=False)
    saved = stats["tensors"] + stats["deduplicated"] + stats["skipped_weights"] + stats["skipped_other"]
    timer = HookTimer(ctl.policy)
    for _ in range(args.repeats):
        loss_fn().backward()
        ctl.step_done()
        timer.new_step()
    timer.steps.pop()
    timer.restore()
    row = {"device": str(device), "model": args.model, "blocks": args.blocks, "numel": numel,
           "formats": args.formats, "bits": bits, "attention": args.attention,
           "attention_stock_calls": stats.get("attention_stock_calls"),
           "packed_mib": stats["saved_bytes_packed"] / 2**20,
           "saved_tensors": saved, "compressed": stats["tensors"],
           "plain_ms": plain * 1e3, "alam_ms": alam * 1e3,
           "us_per_tensor": (alam - plain) / max(1, saved) * 1e6,
           "us_per_compressed": (alam - plain) / max(1, stats["tensors"]) * 1e6,
           **timer.medians()}
    print_table([row], list(row))
    print_json("hook_overhead", [row])


if __name__ == "__main__":
    main()

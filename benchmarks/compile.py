"""torch.compile with and without ALAM, side by side (docs/compile.md).

A LLaMA-shaped model (transformers' LlamaForCausalLM, random init, fp32 on CPU) trained
for a few steps on one batch in each of these setups:

* ``eager`` / ``eager+alam``: no compile;
* ``compiled`` / ``compiled+alam``: ``torch.compile(model)`` (``--how whole``) or every
  decoder block compiled in place (``--how blocks``, as torchtitan does).

ALAM rows: ``alam_dist.apply``, one probe round (which runs eagerly), then compile. Each
row reports the first step's time (compilation included), the median warm step time,
the memory held after the forward (RSS growth from before the forward to after it,
median over the warm steps; glibc returns freed blocks only with
``MALLOC_MMAP_THRESHOLD_=65536``, which this script sets for itself; with ``--device
cuda``, the growth of ``torch.cuda.memory_allocated``), ALAM's saved-
activation ratio and how many tensors were compressed inside compiled graphs, and the
gradient cosine of the first step against eager exact training. The noise floor of the
cosine is the ``compiled`` row (same math, other kernels). Prints a table and one JSON
line.

    python benchmarks/compile.py                      # inductor, whole model
    python benchmarks/compile.py --how blocks --budget 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # before any allocation
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import alam_dist  # noqa: E402
from alam_dist.probe.inputs import loss_of  # noqa: E402


DEVICE = torch.device("cpu")


def rss() -> int:
    """Bytes in use: the allocator's count on a GPU, the process's resident set on CPU."""
    if DEVICE.type == "cuda":
        return torch.cuda.memory_allocated(DEVICE)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def llama(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(DEVICE).train()


def run(row: str, args, batch: torch.Tensor, exact_grads: torch.Tensor | None) -> dict:
    import torch._dynamo
    torch._dynamo.reset()
    model = llama(args)
    ctl = None
    if row.endswith("+alam"):
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=args.budget))
        ctl.probe(lambda: loss_of(model(input_ids=batch, labels=batch)))
    run_model = model
    if row.startswith("compiled"):
        if args.how == "whole":
            run_model = torch.compile(model, backend=args.backend)
        else:
            for block in model.model.layers:
                block.compile(backend=args.backend)
    times, held, cosine = [], [], None
    for step in range(args.steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        before = rss()
        loss = run_model(input_ids=batch, labels=batch).loss
        held.append(rss() - before)
        loss.backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if ctl is not None:
            ctl.step_done()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        if step == 0:
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            if exact_grads is None:
                exact_grads = grads.clone()
            cosine = float(torch.nn.functional.cosine_similarity(grads.double(), exact_grads.double(), dim=0))
    out = {"row": row, "first_step_s": times[0], "step_s": statistics.median(times[1:]),
           "held_after_forward_mib": statistics.median(held[1:]) / 2**20,
           "grad_cosine": cosine}
    if ctl is not None:
        report = ctl.memory_report()
        out.update(ratio=report["ratio"], tensors=report["tensors"],
                   compiled_tensors=report["compiled_tensors"])
    return out, exact_grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="inductor", help="inductor or aot_eager")
    parser.add_argument("--how", default="whole", choices=["whole", "blocks"])
    parser.add_argument("--budget", type=float, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", nargs="*", default=["eager", "eager+alam", "compiled", "compiled+alam"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (memory: allocated bytes)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(DEVICE)
    results, exact = [], None
    if args.rows[0] != "eager":  # the cosine's reference is always eager exact training
        _, exact = run("eager", args, batch, None)
    for row in args.rows:
        result, exact = run(row, args, batch, exact)
        results.append(result)
        print(f"{row:16s} first {result['first_step_s']:6.1f}s  step {result['step_s']:6.3f}s  "
              f"held {result['held_after_forward_mib']:7.1f} MiB  cos {result['grad_cosine']:.5f}"
              + (f"  ratio {result['ratio']:.1f}  compiled tensors {result['compiled_tensors']}"
                 if "ratio" in result else ""), flush=True)
    by_row = {r["row"]: r for r in results}
    if "compiled" in by_row and "compiled+alam" in by_row:
        print(f"held after forward, compiled / compiled+alam: "
              f"{by_row['compiled']['held_after_forward_mib'] / max(by_row['compiled+alam']['held_after_forward_mib'], 1e-9):.2f}x")
    print(json.dumps({"benchmark": "compile", "backend": args.backend, "how": args.how,
                      "budget": args.budget, "layers": args.layers, "hidden": args.hidden,
                      "batch": args.batch, "seq": args.seq, "torch": torch.__version__,
                      "device": str(DEVICE),
                      "results": results}))


if __name__ == "__main__":
    main()

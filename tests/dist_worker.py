"""Multi-process worker for the DeepSpeed tests and benchmark (real ranks, gloo on CPU).

    torchrun --nproc_per_node 2 tests/dist_worker.py --out DIR --scenarios JSON
    deepspeed --num_gpus 2 tests/dist_worker.py --out DIR --scenarios JSON
    mpirun -n 2 python tests/dist_worker.py --out DIR --scenarios JSON

Each scenario trains a tiny LLaMA with alam_dist.deepspeed.initialize and records, per
rank: losses, the plan digest and bits, the memory report, the probe cost, a checksum
of the full parameters, and any error. Results go to DIR/<scenario>.rank<R>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import deepspeed  # noqa: E402
import alam_dist.deepspeed as ads  # noqa: E402
from tests.helpers import tiny_llama, token_batch  # noqa: E402
from tests.multiproc import install_fault, run_scenarios  # noqa: E402
from tests.step_probes import SyncCounter, live_step_objects  # noqa: E402


def ds_config(sc: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": sc.get("micro_batch", 2),
        "gradient_accumulation_steps": sc.get("grad_accum", 1),
        # persistence threshold 0: ZeRO-3 really partitions even this tiny model's weights
        "zero_optimization": {"stage": sc.get("zero", 0), "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
    }
    if "overlap_comm" in sc:
        cfg["zero_optimization"]["overlap_comm"] = sc["overlap_comm"]
    if sc.get("dtype") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if sc.get("offload"):
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if sc.get("alam") is not None:
        cfg["alam"] = sc["alam"]
    return cfg


def full_param_checksum(engine) -> float:
    total = 0.0
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params):
            return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(params)))
    for i, p in enumerate(params):
        total += float(p.detach().double().sum()) * (i + 1)
    return total


def run(sc: dict, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = tiny_llama(seed=0, layers=sc.get("layers", 2), hidden=sc.get("hidden", 128),
                       attn=sc.get("attn", "sdpa"))
    if sc.get("activation_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    alam = sc.get("alam")
    if alam is not None and sc.get("plan_per_rank"):
        alam = dict(alam, load_plan_path=sc["plan_per_rank"][rank])
        sc = dict(sc, alam=alam)
    opt = torch.optim.AdamW(model.parameters(), lr=sc.get("lr", 3e-3))
    engine, *_ = ads.initialize(model=model, optimizer=opt, config=ds_config(sc))
    if sc.get("load_ckpt"):
        engine.load_checkpoint(sc["load_ckpt"])
    if sc.get("new_path_at"):  # one rank's forward takes a path the plan was not made for
        where = sc["new_path_at"]

        def new_path(module, args, output):
            if rank == where["rank"] and engine.alam.controller.step == where["step"]:
                return (torch.tanh(output[0]), *output[1:]) if isinstance(output, tuple) \
                    else torch.tanh(output)
        engine.module.model.layers[0].register_forward_hook(new_path)
    if sc.get("fault"):
        install_fault(engine.module.model.layers[0], sc["fault"], rank,
                      lambda: engine.alam._in_probe, lambda: engine.alam.controller.step)
    losses, step_times = [], []
    ga = sc.get("grad_accum", 1)
    start_step = sc.get("start_step", 0)
    for step in range(start_step, start_step + sc.get("steps", 3)):
        start = time.perf_counter()
        step_loss = 0.0
        for micro in range(ga):
            # ranks may get different sequence lengths (uneven work, as real data gives)
            seq = sc["seq_per_rank"][rank] if "seq_per_rank" in sc else sc.get("seq", 32)
            x = token_batch(sc.get("micro_batch", 2), seq, seed=1000 * rank + 10 * step + micro)
            if sc.get("extra_probe_at") == step and micro == 0:
                # A probe round that does not adopt its plan: training must not change.
                ctl = engine.alam.controller
                kept = ctl.plan
                engine.alam.probe(lambda: engine.module(input_ids=x, labels=x).loss)
                ctl.set_plan(kept)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            step_loss += float(loss.detach()) / ga
        losses.append(step_loss)
        step_times.append(time.perf_counter() - start)
    if sc.get("count_syncs"):  # one more step, watched: host syncs, and what outlives it
        x = token_batch(sc.get("micro_batch", 2), sc.get("seq", 32), seed=999 + rank)
        with SyncCounter() as counter:
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        del loss
        out_syncs = {"syncs": dict(counter.counts), "sync_sites": counter.where, "alive_after_step": live_step_objects()}
    out = {"losses": losses, "step_seconds": step_times, "checksum": full_param_checksum(engine),
           "global_steps": engine.global_steps}
    if sc.get("count_syncs"):
        out.update(out_syncs)
    if hasattr(engine, "alam"):
        ctl = engine.alam.controller
        out["plan_digest"] = ctl.plan.digest() if ctl.plan else None
        out["plan_bits"] = ctl.plan.bits if ctl.plan else None
        out["plan_average_bits"] = ctl.plan.average_bits() if ctl.plan else None
        out["memory"] = {k: v for k, v in ctl.memory_report().items() if k != "bits"}
        out["per_key_bytes"] = (ctl._last_stats or ctl.policy.stats).per_key_bytes
        out["probe_cost"] = {k: v for k, v in vars(ctl.probe_cost).items()}
        out["controller_step"] = ctl.step
        if sc.get("save_plan") and rank == 0 and ctl.plan:
            ctl.plan.save(sc["save_plan"])
    if sc.get("save_ckpt"):
        engine.save_checkpoint(sc["save_ckpt"], tag="t")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", required=True, help="JSON list (or @file) of scenario dicts")
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()
    text = Path(args.scenarios[1:]).read_text() if args.scenarios.startswith("@") else args.scenarios
    scenarios = json.loads(text)
    deepspeed.init_distributed(dist_backend="gloo")
    run_scenarios(run, Path(args.out), scenarios)

if __name__ == "__main__":
    main()

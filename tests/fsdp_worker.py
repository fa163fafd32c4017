"""Multi-process worker for the FSDP2 tests (real ranks, gloo on CPU, launched by torchrun).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py --out DIR --scenarios JSON

Each scenario builds a tiny LLaMA, shards it with ``fully_shard`` per decoder block and at
the root (optionally bf16 ``MixedPrecisionPolicy``, activation checkpointing per block),
applies ALAM with ``alam_dist.fsdp.apply`` and trains with an unchanged loop. Per rank it
records losses, the plan, the memory report, the probe cost and a checksum of the full
parameters. Results go to DIR/<scenario>.rank<R>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

import alam_dist  # noqa: E402
import alam_dist.fsdp  # noqa: E402
from tests.helpers import tiny_llama, token_batch  # noqa: E402
from tests.multiproc import install_fault, run_scenarios  # noqa: E402
from tests.step_probes import SyncCounter, live_step_objects  # noqa: E402


def build(sc: dict) -> torch.nn.Module:
    model = tiny_llama(seed=0, layers=sc.get("layers", 3), hidden=sc.get("hidden", 128),
                       attn=sc.get("attn", "sdpa"))
    if sc.get("activation_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sc.get("no_shard"):
        return model
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if sc.get("dtype") == "bf16" else MixedPrecisionPolicy())
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    if not sc.get("skip_root_shard"):
        fully_shard(model, mp_policy=mp)
    return model


def full_param_checksum(model: torch.nn.Module) -> float:
    total = 0.0
    for i, p in enumerate(model.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(full.detach().double().sum()) * (i + 1)
    return total


def saved_keys_without_fsdp(sc: dict, x: torch.Tensor) -> list[str]:
    """The saved-tensor keys ALAM finds on the same model without FSDP (one probe)."""
    model = tiny_llama(seed=0, layers=sc.get("layers", 3), hidden=sc.get("hidden", 128))
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig.from_dict(sc["alam"]))
    ctl.probe(lambda: model(input_ids=x, labels=x).loss)
    ctl.uninstall_hook()
    return sorted(ctl.plan.bits)


def apply_errors() -> dict:
    """Orders and wrappers alam_dist.fsdp refuses, with their messages."""
    out = {}
    model = tiny_llama(seed=0, layers=2)
    try:
        alam_dist.fsdp.apply(model, {"bits": 2})
    except TypeError as err:
        out["not_sharded"] = str(err)
    for block in model.model.layers:
        fully_shard(block)
    try:
        alam_dist.fsdp.apply(model, {"bits": 2})
    except TypeError as err:
        out["root_not_sharded"] = str(err)
    from torch.distributed.fsdp import FullyShardedDataParallel
    fsdp1 = FullyShardedDataParallel(tiny_llama(seed=0, layers=2), device_id=torch.device("cpu"),
                                     use_orig_params=True)
    try:
        alam_dist.fsdp.apply(fsdp1, {"bits": 2})
    except TypeError as err:
        out["fsdp1"] = str(err)
    for name, bad in (("bad_ladder", {"bits": 2, "ladder": [8, 3]}), ("typo", {"probe_step": [0]})):
        try:  # the config is checked first, whatever the model
            alam_dist.fsdp.apply(model, bad)
        except ValueError as err:
            out[name] = str(err)
    return out


def dcp_state(model, opt, ctl) -> dict:
    """What a DCP checkpoint holds: model, optimizer and (with ALAM) the controller, a
    Stateful carrying the plan (the layout docs/fsdp.md shows users)."""
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    if ctl is not None:
        state["alam"] = ctl
    return state


def run(sc: dict, rank: int, world: int) -> dict:
    if sc.get("kind") == "apply_errors":
        return apply_errors()
    torch.manual_seed(0)
    model = build(sc)
    opt = torch.optim.AdamW(model.parameters(), lr=sc.get("lr", 3e-3))
    alam = sc.get("alam")
    ctl = None
    if alam is not None:
        if sc.get("plan_per_rank"):
            alam = dict(alam, load_plan_path=sc["plan_per_rank"][rank])
        ctl = alam_dist.fsdp.apply(model, alam,
                                   optimizer=None if sc.get("no_optimizer_hook") else opt)
    if sc.get("fault"):
        install_fault(model.model.layers[0], sc["fault"], rank,
                      lambda: ctl.fsdp._in_probe, lambda: ctl.step)
    if sc.get("load_dcp"):
        state = dcp_state(model, opt, ctl)
        dcp.load(state, checkpoint_id=sc["load_dcp"])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    losses, step_seconds = [], []
    ga = sc.get("grad_accum", 1)
    start_step = sc.get("start_step", 0)
    first_x = None
    for step in range(start_step, start_step + sc.get("steps", 3)):
        step_loss, start = 0.0, time.perf_counter()
        for micro in range(ga):
            seq = sc["seq_per_rank"][rank] if "seq_per_rank" in sc else sc.get("seq", 32)
            x = token_batch(sc.get("micro_batch", 2), seq, seed=1000 * rank + 10 * step + micro)
            first_x = x if first_x is None else first_x
            if ga > 1:  # gradient accumulation without communication until the last one
                model.set_requires_gradient_sync(micro == ga - 1)
            if sc.get("extra_probe_at") == step and micro == 0:
                # A probe round that does not adopt its plan: training must not change.
                kept = ctl.plan
                ctl.fsdp.probe(lambda: model(input_ids=x, labels=x).loss)
                ctl.set_plan(kept)
            loss = model(input_ids=x, labels=x).loss
            (loss / ga).backward()
            step_loss += float(loss.detach()) / ga
        opt.step()
        opt.zero_grad()
        losses.append(step_loss)
        step_seconds.append(time.perf_counter() - start)
    watched = {}
    if sc.get("count_syncs"):  # one more step, watched: host syncs, and what outlives it
        x = token_batch(sc.get("micro_batch", 2), sc.get("seq", 32), seed=999 + rank)
        with SyncCounter() as counter:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        del loss
        watched = {"syncs": dict(counter.counts), "sync_sites": counter.where, "alive_after_step": live_step_objects()}
    out = {**watched, "losses": losses, "step_seconds": step_seconds, "checksum": full_param_checksum(model),
           "param_types": sorted({type(p).__name__ for p in model.parameters()})}
    if ctl is not None:
        out["plan_digest"] = ctl.plan.digest() if ctl.plan else None
        out["plan_bits"] = ctl.plan.bits if ctl.plan else None
        out["memory"] = {k: v for k, v in ctl.memory_report().items() if k != "bits"}
        out["probe_cost"] = ctl.probe_cost_report()
        out["probed_steps"] = sorted(ctl.probed_steps)
        out["controller_step"] = ctl.step
        if sc.get("compare_keys"):
            out["keys_without_fsdp"] = saved_keys_without_fsdp(sc, first_x)
        if sc.get("save_plan") and rank == 0 and ctl.plan:
            ctl.plan.save(sc["save_plan"])
    if sc.get("save_dcp"):
        dcp.save(dcp_state(model, opt, ctl), checkpoint_id=sc["save_dcp"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", required=True, help="JSON list (or @file) of scenario dicts")
    args = ap.parse_args()
    text = Path(args.scenarios[1:]).read_text() if args.scenarios.startswith("@") else args.scenarios
    dist.init_process_group("gloo")
    try:
        run_scenarios(run, Path(args.out), json.loads(text))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

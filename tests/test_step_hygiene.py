"""GPU readiness, checked on the CPU: a compressed training step makes the host wait for
the device no more often than the same step without ALAM, and nothing of it (packed
tensors, exact copies) outlives its backward. Through ``alam_dist.apply`` in-process, and
through DeepSpeed (ZeRO-2 and ZeRO-3) and FSDP2 on 2 real ranks.

Host syncs are counted as the dispatched ops behind them (tests/step_probes.py): on the
CPU they cost nothing, but the same code on a GPU would stall the step at each one.
"""
from __future__ import annotations

import collections
import contextlib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import alam_dist
from tests import multiproc
from tests.helpers import tiny_llama, token_batch
from tests.multiproc import ok
from tests.step_probes import SyncCounter, live_step_objects

pytest.importorskip("transformers")
HERE = Path(__file__).resolve().parent
ALAM = {"bits": 2, "probe_steps": [0]}


def _step(model, opt, x, counter=None):
    with counter if counter is not None else contextlib.nullcontext():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    del loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_compressed_step_adds_no_host_sync_and_leaves_nothing_behind(attn):
    counts = {}
    for with_alam in (False, True):
        model = tiny_llama(seed=0, layers=2, attn=attn)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ctl = None
        if with_alam:
            ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=256,
                                                              attention="recompute"))
            x0 = token_batch(2, 48, seed=1)
            ctl.probe(lambda: model(input_ids=x0, labels=x0).loss)
            _step(model, opt, x0)
            ctl.step_done()
        counter = SyncCounter()
        _step(model, opt, token_batch(2, 48, seed=2), counter)
        if ctl is not None:
            alive = live_step_objects()
            assert alive == {"packed": 0, "saved": 0, "exact": 0}, alive
            report = ctl.memory_report(count_nonfinite=False)  # no device read
            assert report["ratio"] > 4 and report["nonfinite_tensors"] is None
            ctl.step_done()
            ctl.uninstall_hook()
        counts[with_alam] = counter.counts
    assert sum(counts[True].values()) <= sum(counts[False].values()), counts


class _OpCounter(TorchDispatchMode):
    """Every aten op dispatched: on a GPU each costs host time (a launch or an allocation)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_compressed_tensor_costs_at_most_three_ops_of_host_time():
    """Per compressed tensor, a step dispatches its payload and metadata allocations at
    pack and its output's at unpack, and nothing else: the NaN/inf flags of a forward are
    reduced together when it ends (before: detach, reshape, a metadata sum per pack and a
    view per unpack -- 7 ops). An odd batch of 37 tokens and 33 layers: nothing lines up."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(40, 40), torch.nn.GELU())
                                  for _ in range(33)])
    x = torch.randn(37, 40, requires_grad=True)
    counts = {}
    for with_alam in (False, True):
        if with_alam:
            ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=256, probe="cheap"))
            ctl.probe(lambda: model(x).square().mean())
            model(x).square().mean().backward()  # the first step (plan in use)
            ctl.step_done()
        model.zero_grad(set_to_none=True)
        x.grad = None
        counter = _OpCounter()
        with counter:
            model(x).square().mean().backward()
        counts[with_alam] = counter.ops
    report = ctl.memory_report(count_nonfinite=False)
    compressed = report["tensors"]
    assert compressed >= 33
    added = counts[True] - counts[False]
    # autograd detaches what an unpack hook returns, one per hooked save (any hook)
    assert added["detach"] <= compressed + report["skipped_weights"], added
    ours = sum(added.values()) - added["detach"]
    assert ours <= 3 * compressed + 8, (ours, compressed, added)
    assert added["sum"] <= 2, added  # the NaN/inf flags: one reduction per forward
    ctl.uninstall_hook()


def test_the_dedup_table_does_not_keep_packed_tensors_alive():
    """A tensor saved by several ops is packed once; the table that finds the second save
    holds it weakly, so it dies with the graph, not at the next forward."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
    q, k = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    holder = torch.nn.ModuleDict({"body": model, "q": q, "k": k})
    ctl = alam_dist.apply(holder, alam_dist.ALAMConfig(bits=2, min_numel=16))

    def forward(x):
        h = holder["body"](x)
        return (holder["q"](h) * holder["k"](h)).sum()

    holder.forward = forward  # a module call: the hooks see one top-level forward
    loss = holder(torch.randn(32, 64))
    assert ctl.policy.stats.deduplicated >= 1  # h went to q and k: packed once
    assert live_step_objects()["packed"] > 0
    loss.backward()
    del loss
    assert live_step_objects()["packed"] == 0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hygiene")
    ds = multiproc.launch(HERE / "dist_worker.py", [
        # ZeRO-3 probes at step 1 (once its parameter trace exists); the round's extra
        # forwards make DeepSpeed record its trace again over the next two steps, with
        # checks of its own that read the device (in plain runs too, at steps 0-1)
        {"name": f"{kind}_z{zero}", "zero": zero, "steps": 4 if zero == 3 else 2,
         "seq_per_rank": [32, 40],
         "count_syncs": True, **({"alam": ALAM} if kind == "alam" else {})}
        for zero in (2, 3) for kind in ("plain", "alam")], out / "ds", "torchrun", 600, 2)
    fsdp = multiproc.launch(HERE / "fsdp_worker.py", [
        {"name": f"{kind}_fsdp", "steps": 2, "seq_per_rank": [32, 40], "count_syncs": True,
         **({"alam": ALAM} if kind == "alam" else {})} for kind in ("plain", "alam")],
        out / "fsdp", "torchrun", 600, 2)
    return {**ds, **fsdp}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["z2", "z3", "fsdp"])
def test_integrations_add_no_host_sync_and_leave_nothing_behind(ranks, where):
    plain, alam = ok(ranks[f"plain_{where}"]), ok(ranks[f"alam_{where}"])
    for p, a in zip(plain, alam):
        assert a["memory"]["ratio"] > 4  # the watched step really was compressed
        assert sum(a["syncs"].values()) <= sum(p["syncs"].values()), (a["sync_sites"], p["sync_sites"])
        assert a["alive_after_step"] == {"packed": 0, "saved": 0, "exact": 0}


@pytest.mark.parametrize("probe, attn, per_pass", [
    ("local", "eager", ""),  # eager attention saves its probabilities: the largest round
    ("local", "sdpa", "per_pass"),  # ZeRO-3: a new forward per pass
])
def test_a_probe_round_needs_less_memory_than_a_plain_step(probe, attn, per_pass):
    """Peak resident-set growth on a 2-layer model (where the local round's two exact
    blocks are the whole stack), the round run as the integrations run it: on
    ``probe_batch_fraction`` of the micro-batch. A fresh process with
    MALLOC_MMAP_THRESHOLD_=65536, or freed memory would stay resident and hide the peaks."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HERE / "probe_peak_worker.py"), probe, attn, per_pass],
                          cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["share"] == [1, 4]
    assert 0 < peaks["round_MiB"] < peaks["plain_MiB"], peaks

"""The full and cheap probe rounds: one recorded forward, then three backward passes per
saved tensor (GradNormVar, alam_dist.probe.statistic).

* ``full``: every pass runs from the loss, over the whole micro-batch (the reference);
* ``cheap``: each pass restarts at the output of the transformer block its tensor belongs
  to (:class:`BlockRestarts`: the same statistic, a shorter backward); with
  ``probe_blocks=N`` only N blocks are probed and the others interpolated per role
  (alam_dist.probe.blocks).

Jobs are grouped by restart point; ranks take their share of each group and, where every
pass is a collective (ZeRO-3, FSDP), pad each group to its largest share.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from alam_dist.hooks.modes import Record
from alam_dist.hooks.policy import SavedTensorPolicy, TensorInfo
from alam_dist.probe.blocks import BlockStack, derive
from alam_dist.probe.statistic import (AQ, Q8, ProbeJob, ProbeResult, error_ratio,
                                       gradnormvar, grad_norms, probe_formats, record_forward)


class BlockRestarts:
    """Backward restart points at the outputs of probed transformer blocks.

    Compressing a tensor saved in block b changes only what backward computes below
    block b's output: the gradient reaching that output, dL/dh_b, is the same in every
    probe pass, and so are the gradients of every parameter above block b. So dL/dh_b is
    computed once per round (one exact backward), and each probe pass back-propagates
    ``grad(h_b, params, grad_outputs=dL/dh_b)``: the parameters above b get no gradient
    (their norms would be equal in all three passes, contributing exactly 0 to
    GradNormVar), the rest get the same gradients as a full pass. Same statistic, and a
    pass costs (b + 1) / L of a full backward.
    """

    def __init__(self, blocks: dict[int, torch.nn.Module]):
        self.outputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._capture(b)) for b, m in blocks.items()]

    def _capture(self, block: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                self.outputs[block] = out
        return hook

    def compute_grads(self, loss: torch.Tensor) -> None:
        """dL/dh_b for every captured block output (one backward, graph retained)."""
        blocks = sorted(self.outputs)
        grads = torch.autograd.grad(loss, [self.outputs[b] for b in blocks], retain_graph=True,
                                    allow_unused=True)
        self.grads = {b: g.detach() for b, g in zip(blocks, grads) if g is not None}

    def root(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outputs[block], self.grads[block]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()


class ProbeRound:
    """One recorded forward; then :meth:`run` any of its jobs (3 backward passes each)."""

    def __init__(self, policy: SavedTensorPolicy, loss: torch.Tensor,
                 params: list[torch.nn.Parameter], seed: int,
                 formats: tuple[float, ...] = (8, 4, 2), granularity: str = "row",
                 keys: list[str] | None = None,
                 forward: Callable[[], torch.Tensor] | None = None,
                 restarts: BlockRestarts | None = None):
        self.policy, self.loss, self.params, self.seed = policy, loss, params, seed
        self.restarts = restarts
        # With ``forward``, every backward pass gets a fresh recorded forward instead of
        # retaining one graph: needed where weights are re-partitioned after each
        # backward (ZeRO-3), at the cost of one forward per pass.
        self.forward = forward
        self.granularity = granularity
        self.formats = probe_formats(formats)
        self.keys = sorted(policy.seen if keys is None else keys)
        self._exact = policy.recorded_exact()

    def error_ratio(self, key: str) -> dict[float, float]:
        """MSE(format) / MSE(AQ) of this tensor's own values (see :func:`error_ratio`)."""
        return error_ratio(self.policy, self._exact.get(key), self.seed, self.formats)

    def has_exact(self, key: str) -> bool:
        """Whether this rank's forward recorded ``key`` exactly (a job needs that)."""
        return key in self._exact

    def jobs(self) -> list[ProbeJob]:
        return [ProbeJob(k, i) for i, k in enumerate(self.keys)]

    PASSES = ((AQ, 0), (AQ, 1), (Q8, 0))
    """A job's passes: (format, seed offset) of the probed tensor."""

    def _pass(self, target: tuple[str, float, int] | None, start: int | None) -> torch.Tensor:
        loss = self.loss if self.forward is None else self.forward()  # re-captures restarts
        root, grad_output = (loss, None) if start is None else self.restarts.root(start)
        try:
            with self.policy.targeting(target):
                return grad_norms(root, self.params, self.granularity,
                                  retain_graph=self.forward is None, grad_output=grad_output)
        finally:
            del loss, root

    def run(self, job: ProbeJob) -> ProbeResult:
        start = time.perf_counter()
        norms = [self._pass((job.key, fmt, self.seed + offset), job.start)
                 for fmt, offset in self.PASSES]
        return ProbeResult(job.key, gradnormvar(*norms), len(self.PASSES),
                           time.perf_counter() - start, self.error_ratio(job.key))

    def run_padding(self, start: int | None = None) -> int:
        """A job's passes with nothing compressed and the results dropped: the same
        forwards and backwards (so the same collectives) as :meth:`run` from ``start``.
        Returns the number of passes."""
        for _ in self.PASSES:
            self._pass(None, start)
        return len(self.PASSES)


def job_groups(keys: list[str], stack: BlockStack | None,
               probed_blocks: list[int]) -> list[list[ProbeJob]]:
    """Probe jobs grouped by restart point (the loss, or a probed block's output), in
    a fixed order: ranks take their share of each group and, where passes are
    collectives, pad each group to its largest share, so the passes of all ranks
    line up. Full rounds: one group, every key, from the loss."""
    if stack is None:
        return [[ProbeJob(k, i) for i, k in enumerate(sorted(keys))]]
    probed = set(probed_blocks)
    by_start: dict[int | None, list[str]] = {}
    for k in sorted(keys):
        block = stack.block_of(k)
        if block is None or block in probed:
            by_start.setdefault(block, []).append(k)
    order = sorted((s for s in by_start if s is not None), reverse=True)
    order += [None] if None in by_start else []
    groups, index = [], 0
    for start in order:  # indices run on across groups: shares stay within one job
        groups.append([ProbeJob(k, index + i, start) for i, k in enumerate(by_start[start])])
        index += len(by_start[start])
    return groups


def run_restart_round(ctx, kind: str):
    """The full (``kind="full"``) or cheap round on this rank: the round's outcome with
    every rank's results (alam_dist.probe.RoundOutcome)."""
    from alam_dist.probe import RoundOutcome, probe_state
    start = time.perf_counter()
    stack = ctx.blocks if kind == "cheap" else None
    probed_blocks = stack.choose(ctx.config.probe_blocks) if stack else []
    restarts = None
    policy, collective, beat = ctx.policy, ctx.collective, ctx.beat
    with probe_state(ctx):
        record = Record()
        if stack is not None:
            if len(probed_blocks) < stack.count:  # others are interpolated: no exact copy
                keep = set(probed_blocks)
                record = Record(exact=lambda key: stack.block_of(key) in keep
                                or stack.block_of(key) is None)
            restarts = BlockRestarts({b: stack.modules[b] for b in probed_blocks})
        try:
            beat("recording the probe forward")
            loss = record_forward(policy, ctx.closure, record)
            # Jobs come from the merged inventory so that job indices agree on all ranks.
            beat("gathering the saved-tensor inventory from every rank")
            seen = collective.gather_inventory(dict(policy.seen))
            small = collective.gather_inventory({k: TensorInfo(0, 0, "") for k in policy.seen_small})
            if restarts is not None:
                beat("the restart backward")
                restarts.compute_grads(loss)  # one exact backward (every rank)
            refresh = (lambda: record_forward(policy, ctx.closure, record)) if ctx.forward_per_pass else None
            if refresh is not None:
                # the first forward only served the inventory, ratios and restarts
                loss = loss.detach()
            groups = job_groups(list(seen), stack, probed_blocks)
            probe_round = ProbeRound(policy, loss, ctx.stat_params, ctx.seed, ctx.config.ladder,
                                     ctx.config.probe_granularity,
                                     keys=[j.key for g in groups for j in g],
                                     forward=refresh, restarts=restarts)
            fixed_seconds = time.perf_counter() - start
            local, padding, mine_count, group_cost = [], 0, 0, []
            for group in groups:
                group_start = time.perf_counter()
                mine = [j for j in collective.my_jobs(group) if probe_round.has_exact(j.key)]
                mine_count += len(mine)
                for job in mine:
                    beat(f"probe job {job.key!r} (job {job.index})")
                    local.append(probe_round.run(job))
                if ctx.collective_passes:
                    for _ in range(collective.jobs_per_rank(len(group)) - len(mine)):
                        beat("a padding pass (lockstep with ranks with more jobs)")
                        padding += probe_round.run_padding(group[0].start)
                group_cost.append({"start": group[0].start, "jobs": len(group),
                                   "jobs_this_rank": len(mine),
                                   "seconds": time.perf_counter() - group_start})
            del loss, probe_round
        finally:
            if restarts is not None:
                restarts.remove()
    beat("gathering probe results from every rank")
    results = collective.gather_results(local)
    sens = {r.key: r.sensitivity for r in results}
    ratios = {r.key: r.error_ratio for r in results}
    if stack is not None:
        sens, ratios = derive(stack, list(seen), sens, ratios)
    passes = sum(r.backward_passes for r in local) + padding
    return RoundOutcome(
        kind=kind, sens=sens, ratios=ratios, seen=seen, small=list(small),
        jobs=sum(len(g) for g in groups), jobs_this_rank=mine_count, padding_passes=padding,
        passes=passes, forwards=1 + (passes if ctx.forward_per_pass else 0),
        backwards=passes + (1 if restarts is not None else 0),
        probed_blocks=probed_blocks, restart_backward=restarts is not None,
        fixed_seconds=fixed_seconds, groups=group_cost)

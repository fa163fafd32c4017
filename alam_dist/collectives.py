"""Rank-consistent ALAM over torch.distributed: the one module every integration uses.

* probe jobs are split round-robin by key index (rank r runs jobs r, r+R, ...), so a
  probe round costs each rank about 3*L/R backward passes instead of 3*L; where probe
  passes are themselves collectives (ZeRO-3, FSDP), every rank runs ceil(L/R) jobs'
  worth of passes, padding included, so the collectives of all ranks line up;
* results and the inventory of saved tensors are all-gathered, so every rank allocates
  from identical inputs and gets the identical plan;
* before a plan is used its digest is compared across ranks; a mismatch raises
  :class:`~alam_dist.allocation.PlanMismatchError` naming the ranks and keys that
  differ (all ranks raise together: no hang, no silent drift).
"""
from __future__ import annotations

import torch.distributed as dist

from alam_dist.allocation import Plan, PlanMismatchError
from alam_dist.controller import Collective
from alam_dist.policy import TensorInfo
from alam_dist.sensitivity import ProbeJob, ProbeResult


class DistributedCollective(Collective):
    """Collective over the default (or a given) torch.distributed process group."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedCollective needs an initialized process group "
                               "(deepspeed.init_distributed() or torch.distributed.init_process_group())")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _all_gather(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj) -> list:
        return self._all_gather(obj)

    def my_jobs(self, jobs: list[ProbeJob]) -> list[ProbeJob]:
        return [j for j in jobs if j.index % self.world_size == self.rank]

    def jobs_per_rank(self, n_jobs: int) -> int:
        return -(-n_jobs // self.world_size)

    def gather_results(self, results: list[ProbeResult]) -> list[ProbeResult]:
        merged = {r.key: r for part in self._all_gather(results) for r in part}
        return [merged[k] for k in sorted(merged)]

    def gather_inventory(self, seen: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Union of every rank's saved tensors; sizes may differ (sequence lengths): max."""
        merged: dict[str, TensorInfo] = {}
        for part in self._all_gather(seen):
            for key, info in part.items():
                if key not in merged or info.numel > merged[key].numel:
                    merged[key] = info
        return dict(sorted(merged.items()))

    def gather_mismatches(self, mismatches: dict[str, str]) -> list[dict[str, str]]:
        return self._all_gather(mismatches)

    def check_plan(self, plan: Plan | None, error: Exception | None = None) -> None:
        local = (None, None, f"{type(error).__name__}: {error}") if error is not None \
            else (plan.digest(), plan.bits, None)
        gathered = self._all_gather(local)
        failed = [(rank, err) for rank, (_, _, err) in enumerate(gathered) if err]
        if failed:
            if error is not None and len(failed) == self.world_size:
                raise error
            raise PlanMismatchError("ALAM bit plan unavailable on rank(s) "
                                    + "; ".join(f"{rank}: {err}" for rank, err in failed))
        if len({d for d, _, _ in gathered}) == 1:
            return
        ref_digest, ref_bits, _ = gathered[0]
        lines = []
        for rank, (digest, bits, _) in enumerate(gathered):
            if digest == ref_digest:
                continue
            keys = sorted(k for k in set(bits) | set(ref_bits) if bits.get(k) != ref_bits.get(k))
            lines.append(f"rank {rank} differs from rank 0 on {len(keys)} key(s), e.g. "
                         + ", ".join(f"{k}: {ref_bits.get(k)} vs {bits.get(k)}" for k in keys[:4]))
        raise PlanMismatchError("ranks hold different ALAM bit plans: " + "; ".join(lines)
                                + ". Give every rank the same load_plan_path (or none) and model.")

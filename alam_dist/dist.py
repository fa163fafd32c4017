"""How ranks agree: the :class:`Collective` protocol the controller speaks, and its
torch.distributed implementation, the one every integration uses.

* probe jobs are split round-robin by key index (rank r runs jobs r, r+R, ...), so a
  probe round costs each rank about 3*L/R backward passes instead of 3*L; where probe
  passes are themselves collectives (ZeRO-3, FSDP), every rank runs ceil(L/R) jobs'
  worth of passes, padding included, so the collectives of all ranks line up;
* results and the inventory of saved tensors are all-gathered, so every rank allocates
  from identical inputs and gets the identical plan;
* before a plan is used its digest is compared across ranks; a mismatch raises
  :class:`~alam_dist.plan.PlanMismatchError` naming the ranks and keys that
  differ (all ranks raise together: no hang, no silent drift).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from alam_dist.plan import Plan, PlanMismatchError
from alam_dist.hooks.policy import TensorInfo
from alam_dist.probe.statistic import ProbeJob, ProbeResult


class Collective:
    """Single-process collective; distributed integrations subclass it."""

    rank, world_size = 0, 1

    def my_jobs(self, jobs: list[ProbeJob]) -> list[ProbeJob]:
        """The probe jobs this rank runs."""
        return jobs

    def jobs_per_rank(self, n_jobs: int) -> int:
        """The most jobs any rank gets out of ``n_jobs``: where probe passes are
        collectives, every rank runs this many (padding the rest)."""
        return n_jobs

    def gather_results(self, results: list[ProbeResult]) -> list[ProbeResult]:
        """Every rank's results, identical on all ranks."""
        return results

    def gather_inventory(self, seen: dict) -> dict:
        """Every rank's saved-tensor inventory merged, identical on all ranks."""
        return dict(sorted(seen.items()))

    def gather_mismatches(self, mismatches: dict[str, str]) -> list[dict[str, str]]:
        """Every rank's saved tensors of this step that were not in the plan."""
        return [mismatches]

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return [obj]

    def any_rank(self, flag: bool) -> "RankFlag":
        """Whether ``flag`` is set on any rank, without a host-device sync (see
        :class:`RankFlag`). Every rank must call it at the same point."""
        return RankFlag(torch.tensor([int(flag)], dtype=torch.int32), None)

    def check_plan(self, plan: Plan | None, error: Exception | None = None) -> None:
        """Raise if ranks hold different plans, or if any rank failed to get one
        (``error``): on every rank, so that none waits forever in a collective."""
        if error is not None:
            raise error



class RankFlag:
    """The result of :meth:`Collective.any_rank`: a flag all-reduced on the ranks' device.

    Reading a device value on the host waits for everything queued before it. Under NCCL
    the reduced flag is copied into pinned host memory behind a CUDA event instead, and
    read one step later (:attr:`immediate` is False), when the event has long completed:
    the step that raised it never waits. On the CPU (gloo) the value is there at once.
    Whether a flag is immediate depends only on the device, so every rank reads it at the
    same step and any collective that follows a set flag lines up across ranks."""

    def __init__(self, host: torch.Tensor, event):
        self._host, self._event = host, event

    @property
    def immediate(self) -> bool:
        return self._event is None

    def value(self) -> bool:
        if self._event is not None:
            self._event.synchronize()  # recorded a step ago: complete
        # numpy reads the host buffer without a dispatcher op (no _local_scalar_dense)
        return bool(self._host.numpy()[0])


class DistributedCollective(Collective):
    """Collective over the default (or a given) torch.distributed process group."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedCollective needs an initialized process group "
                               "(deepspeed.init_distributed() or torch.distributed.init_process_group())")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # collective tensors live where the backend reduces them: NCCL's on this rank's GPU
        nccl = "nccl" in str(dist.get_backend(group)).lower()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if nccl
                       else torch.device("cpu"))

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

    def any_rank(self, flag: bool) -> RankFlag:
        t = torch.full((1,), int(flag), dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if t.device.type != "cuda":
            return RankFlag(t, None)
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return RankFlag(host, event)

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


class MismatchCheck:
    """Whether any rank saved a tensor in a step that was not in the plan (kept exact
    there): one one-element all-reduce per step on the ranks' device, read without a host
    sync (:class:`RankFlag`: at once on the CPU, one step later on GPUs). Only when a flag
    is set do the ranks gather which keys, and all raise the same error -- raising on the
    one rank alone would leave the others waiting in the step's collectives."""

    def __init__(self, collective: Collective):
        self.collective = collective
        self._pending: tuple[int, RankFlag, dict[str, str]] | None = None

    def end_step(self, step: int, mismatches: dict[str, str]) -> None:
        """``mismatches``: this rank's keys of ``step`` not in the plan -> shape and dtype."""
        if self._pending is not None:
            self._resolve(*self._pending)
        flag = self.collective.any_rank(bool(mismatches))
        self._pending = (step, flag, mismatches)
        if flag.immediate:
            self._resolve(*self._pending)

    def close(self) -> None:
        """Read the last step's flag (on GPUs it waits a step): every rank calls it."""
        if self._pending is not None:
            self._resolve(*self._pending)

    def _resolve(self, step: int, flag: RankFlag, mine: dict[str, str]) -> None:
        self._pending = None
        if not flag.value():
            return
        gathered = self.collective.gather_mismatches(mine)
        bad = {rank: keys for rank, keys in enumerate(gathered) if keys}
        detail = "; ".join(f"rank {rank}: " + ", ".join(f"{k!r} {v}" for k, v in
                                                       list(keys.items())[:3])
                           + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                           for rank, keys in bad.items())
        raise PlanMismatchError(
            f"training step {step}: saved tensors not in the bit plan on rank(s) "
            f"{sorted(bad)} ({detail}); they were kept exact for this step. The model's "
            "forward took a path the plan was not made for. Re-probe (delete "
            "load_plan_path, or schedule a probe step) or set alam.on_plan_mismatch="
            "'warn' to keep such tensors exact and go on.")

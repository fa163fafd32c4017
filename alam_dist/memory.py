"""Budget from a memory target: "fit this step in X GiB" instead of "bits: 1".

With ``alam.memory_target_gb`` set, each probe round chooses the plan's budget instead of
taking ``alam.bits``: the highest average bits (so the allocator's own objective decides
which tensor gets them) whose predicted peak fits the target. The prediction is

    peak(budget) = beside + activations(budget)

* ``activations``: the saved bytes of the plan at that budget -- every planned tensor at
  its format's stored bits (metadata included), at training size (the round probes a slice
  of the micro-batch; its sizes are scaled by the slice's share);
* ``beside``: everything the step holds besides them -- model and optimizer state under
  whatever sharding the run uses, gradients, the largest transient of a layer's backward,
  the framework's buffers. It is *measured*: after the first two training steps that
  follow a round, as the step's peak minus the bytes the step saved (the largest of the
  two, the largest over ranks), and the budget is solved again from it. Until then it is
  estimated: memory in use now, plus gradients and two fp32 Adam moments for every
  trainable parameter that has no gradient yet (an over-estimate where the optimizer or
  DeepSpeed already holds them), plus one block's saved tensors uncompressed (its
  backward's working set). The estimate errs high, so the first steps fit too.

Memory is the allocator's own count where it has one (``torch.cuda.memory_allocated`` /
``max_memory_allocated``) and the process's resident set on the CPU (VmRSS / VmHWM; set
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed memory leaves the resident set). Reading
a step's peak resets the peak counter (``torch.cuda.reset_peak_memory_stats`` /
``/proc/self/clear_refs``): :func:`peak_so_far` keeps the run's overall peak across those
resets. The round's own peak is measured too and checked against the target.

The budget is the same on every rank: each rank's numbers are gathered and the largest
used. Where even the lowest format does not fit, :class:`MemoryTargetError` says by how
much and which share of the micro-batch's tokens would fit (activation checkpointing
keeps only block inputs: ``--gradient_checkpointing`` in launch/train.py).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch

GIB = 2 ** 30
HEADROOM = 0.01
"""Share of the target left unplanned: the measured ``beside`` varies by a percent or two
from step to step (allocator caching, bucket timing)."""
MAX_BUDGET = 32.0
"""A target with room for every tensor exact plans every tensor exact."""


class MemoryTargetError(RuntimeError):
    """No plan fits the memory target. ``tokens_share``: the share of this micro-batch's
    tokens (micro-batch x sequence) whose activations would fit at the lowest formats."""

    def __init__(self, message: str, tokens_share: float):
        super().__init__(message)
        self.tokens_share = tokens_share


# -- the device's own counters ----------------------------------------------------------
def _proc_bytes(path: str, field: str) -> int:
    """A "<field>: <n> kB" line of a /proc file, in bytes (0 where absent)."""
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def in_use(device: torch.device) -> int:
    """Bytes this process holds now: the CUDA caching allocator's allocated bytes on a
    GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_bytes("/proc/self/status", "VmRSS")


_overall_peak: dict[str, int] = {}


def peak(device: torch.device) -> int:
    """The peak since the last :func:`reset_peak` (``max_memory_allocated`` / VmHWM)."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device)
    else:
        value = _proc_bytes("/proc/self/status", "VmHWM")
    _overall_peak[str(device)] = max(_overall_peak.get(str(device), 0), value)
    return value


def peak_so_far(device: torch.device) -> int:
    """The run's peak, across the resets a memory target makes."""
    return max(_overall_peak.get(str(device), 0), peak(device))


def reset_peak(device: torch.device) -> None:
    peak(device)  # keep the overall peak first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5": reset the peak resident set size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then includes what came before: an over-estimate, still safe


def capacity_target(device: torch.device, reserve_gb: float) -> int:
    """``memory_target_gb: "auto"``: the device's memory (a GPU's total; on the CPU this
    process's share of what is available to the node's local ranks) minus the reserve."""
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
    else:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        total = _proc_bytes("/proc/meminfo", "MemAvailable") // local + in_use(device)
    return int(total - reserve_gb * GIB)


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.3f} GiB" if nbytes >= GIB else f"{nbytes / 2 ** 20:.1f} MiB"


# -- the forecast -----------------------------------------------------------------------
@dataclass
class MemoryForecast:
    """A budget chosen for a target, and the peak it predicts (bytes)."""

    target: int
    budget: float
    activations: int
    """Saved bytes of the plan at ``budget`` (training size)."""
    beside: int
    """Everything else the step holds at its peak."""
    beside_source: str
    """"estimated" (before training steps were measured) or "measured"."""
    round_peak: int = 0
    """The probe round's own peak (0: not measured)."""
    fits: bool = True

    @property
    def predicted_peak(self) -> int:
        return self.beside + self.activations

    def to_dict(self) -> dict:
        out = asdict(self)
        out["predicted_peak"] = self.predicted_peak
        for key in ("target", "activations", "beside", "round_peak", "predicted_peak"):
            out[key + "_gib"] = round(out.pop(key) / GIB, 4)
        return out


def solve_budget(target: int, beside: int, planned_numel: float,
                 activations_at: Callable[[float], int], lowest: float) -> tuple[float, int, bool]:
    """The highest budget whose activations fit ``target - beside`` (less the headroom):
    (budget, its activation bytes, fits). The allocator meets a budget b with at most
    b * numel / 8 bytes, so the budget of the room is direct; floors can keep a plan
    above its budget, so the result is checked and the budget lowered until it fits or
    the lowest format is reached (then ``fits`` is False)."""
    room = target * (1 - HEADROOM) - beside
    budget = MAX_BUDGET if planned_numel <= 0 else 8 * room / planned_numel
    budget = min(MAX_BUDGET, max(lowest, budget))
    for _ in range(8):
        nbytes = activations_at(budget)
        if nbytes <= room or budget <= lowest or nbytes <= 0:
            return budget, nbytes, nbytes <= room
        budget = max(lowest, budget * room / nbytes * 0.99)
    return budget, nbytes, nbytes <= room


def tokens_share(target: int, resident: int, scaled: int) -> float:
    """The share of the micro-batch's tokens that would fit: ``scaled`` (the step's
    transient and its activations at the lowest formats) scales with the tokens,
    ``resident`` (what stays between steps) does not."""
    room = target * (1 - HEADROOM) - resident
    if room <= 0:
        return 0.0
    return room / scaled if scaled > 0 else 1.0


class MemoryTarget:
    """A controller's memory target: the budget of each round, then re-solved from the
    first two measured steps after it (module docstring)."""

    MEASURED_STEPS = 2

    def __init__(self, target_gb: float | str, reserve_gb: float, collective,
                 device: torch.device):
        self.collective, self.device = collective, device
        self.target = (capacity_target(device, reserve_gb) if target_gb == "auto"
                       else int(float(target_gb) * GIB))
        self._target_agreed = False
        self.strict = True
        """False (--alam_plan_only): a target nothing fits is a forecast, not an error."""
        self.forecast: MemoryForecast | None = None
        self._to_measure = 0
        self._measured_beside = 0
        self._resident = 0
        self._activations_at: Callable[[float], int] | None = None
        self._planned_numel = 0.0
        self._lowest = 0.5

    # -- a round ------------------------------------------------------------------------
    def round_begins(self) -> None:
        reset_peak(self.device)

    def round_budget(self, activations_at: Callable[[float], int], planned_numel: float,
                     lowest: float, estimate: Callable[[], int]) -> float:
        """The budget of the round that just ended (same on every rank); raises
        :class:`MemoryTargetError` on every rank where nothing fits."""
        round_peak = peak(self.device)
        if not self._target_agreed:  # "auto" differs by rank (free memory): the smallest
            self.target = min(self.collective.gather(self.target))
            self._target_agreed = True
        mine = (int(estimate()), int(round_peak))
        beside, round_peak = (max(v) for v in zip(*self.collective.gather(mine)))
        self._activations_at, self._planned_numel, self._lowest = activations_at, planned_numel, lowest
        self._to_measure, self._measured_beside = self.MEASURED_STEPS, 0
        self._resident = 0
        if round_peak > self.target and self.collective.rank == 0:
            warnings.warn(
                f"alam_dist: the probe round itself peaked at {_size(round_peak)}, over "
                f"memory_target_gb={self.target / GIB:.3g}: lower alam.probe_batch_fraction "
                "(the share of the micro-batch a round runs on)", stacklevel=3)
        forecast = self._solve(beside, "estimated", round_peak)
        reset_peak(self.device)  # the next step's peak is measured from here
        return forecast.budget

    def _solve(self, beside: int, source: str, round_peak: int) -> MemoryForecast:
        budget, nbytes, fits = solve_budget(self.target, beside, self._planned_numel,
                                            self._activations_at, self._lowest)
        self.forecast = MemoryForecast(self.target, budget, nbytes, beside, source,
                                       round_peak, fits)
        if not fits and source == "estimated":
            # the estimate errs high: train the measured steps at the lowest formats and
            # decide on their measurement
            return self.forecast
        if not fits and not self.strict:
            return self.forecast  # --alam_plan_only: the table says what fits
        if not fits:
            resident = min(self._resident, beside) if source == "measured" else beside
            share = tokens_share(self.target, resident, beside - resident + nbytes)
            if share <= 0:
                raise MemoryTargetError(
                    f"alam_dist: no bit plan fits memory_target_gb={self.target / GIB:.3g}: "
                    f"the step holds {_size(beside)} beside its saved activations (measured), "
                    "more than the target before any activation is saved. Shard model and "
                    "optimizer state (ZeRO-3, FSDP), or raise the target.", 0.0)
            raise MemoryTargetError(
                f"alam_dist: no bit plan fits memory_target_gb={self.target / GIB:.3g}: at the "
                f"lowest formats the step's saved activations take {_size(nbytes)} beside "
                f"{_size(beside)} of everything else (measured), a predicted peak of "
                f"{_size(beside + nbytes)}. About {share:.0%} of this micro-batch's "
                "tokens (micro-batch x sequence) would fit: lower the micro-batch or the "
                "sequence length, turn on activation checkpointing (launch/train.py "
                "--gradient_checkpointing; ALAM then compresses what it keeps), or raise the "
                "target.", share)
        return self.forecast

    def estimate_beside(self, params: list[torch.Tensor], raw_bytes: dict[str, int],
                        block_of: Callable[[str], int | None] | None, scale: float) -> int:
        """Before measured steps: memory in use now, a gradient and two fp32 Adam moments
        for every trainable parameter without a gradient yet, and the largest block's
        saved tensors uncompressed (its backward's working set; ``raw_bytes`` per key at
        the probed size, times ``scale``). Meant to err high."""
        pending = sum(p.numel() * (p.element_size() + 8) for p in params if p.grad is None)
        if block_of is not None:
            per_block: dict = {}
            for key, nbytes in raw_bytes.items():
                per_block[block_of(key)] = per_block.get(block_of(key), 0) + nbytes
            working = max(per_block.values(), default=0)
        else:
            working = 2 * max(raw_bytes.values(), default=0)
        return in_use(self.device) + pending + int(working * scale)

    # -- training steps -------------------------------------------------------------------
    def step_measured(self, planned_bytes: int) -> float | None:
        """After a training step: its peak less the ``planned_bytes`` it saved (per
        forward) is what the step held beside them. Returns a new budget once the
        measured steps are in (same on every rank), else None."""
        if self._to_measure <= 0 or self._activations_at is None:
            return None
        beside = max(0, peak(self.device) - int(planned_bytes))
        resident = in_use(self.device)  # after the optimizer step: what stays between steps
        reset_peak(self.device)
        if beside >= self._measured_beside:
            self._measured_beside, self._resident = beside, resident
        self._to_measure -= 1
        if self._to_measure:
            return None
        measured = self.collective.gather((self._measured_beside, self._resident))
        beside, self._resident = max(measured)
        round_peak = self.forecast.round_peak if self.forecast else 0
        return self._solve(beside, "measured", round_peak).budget

    @property
    def measured(self) -> bool:
        return self.forecast is not None and self.forecast.beside_source == "measured"

    def candidates(self, scales: list[float]) -> list[dict]:
        """The forecast at other micro-batch sizes (``scales``: their ratio to this one)
        from the measured steps: the state that stays between steps as measured, the
        step's transient and saved activations scaled with the tokens."""
        if not self.measured:
            raise RuntimeError("candidates() needs the measured steps after a probe round")
        rows = []
        transient = max(0, self.forecast.beside - self._resident)
        for scale in scales:
            beside = int(self._resident + transient * scale)
            budget, nbytes, fits = solve_budget(
                self.target, beside, self._planned_numel * scale,
                lambda b: int(self._activations_at(b) * scale), self._lowest)
            rows.append({"scale": scale, "fits": fits, "budget": round(budget, 3) if fits else None,
                         "activations_gib": round(nbytes / GIB, 4),
                         "predicted_peak_gib": round((beside + nbytes) / GIB, 4)})
        return rows

    def state(self) -> dict:
        out = {"target_gib": round(self.target / GIB, 4)}
        if self.forecast is not None:
            out.update(self.forecast.to_dict())
        out["peak_so_far_gib"] = round(peak_so_far(self.device) / GIB, 4)
        return out

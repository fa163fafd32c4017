"""What ALAM reports: saved-activation bytes per step, probe cost, step timing.

``Controller.memory_report()`` is built here; :class:`SavedActivationMeter` gives the same
accounting without compressing anything (the uncompressed side of a comparison).
"""
from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch

from alam_dist.hooks.modes import Measure
from alam_dist.hooks.policy import SavedTensorPolicy, StepStats


@dataclass
class ProbeCost:
    rounds: int = 0
    jobs: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    padding_passes: int = 0
    """Passes whose results are dropped: they keep a rank with fewer jobs in step with
    the others' collectives (included in backward_passes)."""
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)



class StepClock:
    """Times training steps in which no probe round ran (from the first forward of a step
    to its end), so that probe seconds read in step-equivalents: the median of the last
    50 such steps."""

    def __init__(self):
        self._times: collections.deque[float] = collections.deque(maxlen=50)
        self.step_seconds: float | None = None
        self._start: float | None = None
        self._rounds_seen = 0

    def forward_started(self) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def end_step(self, rounds: int) -> None:
        """``rounds``: probe rounds so far; a step during which one ran is not timed."""
        if self._start is not None and rounds == self._rounds_seen:
            self.note(time.perf_counter() - self._start)
        self._start, self._rounds_seen = None, rounds

    def note(self, seconds: float) -> None:
        self._times.append(seconds)
        self.step_seconds = statistics.median_high(self._times)


def probe_cost_report(cost: ProbeCost, step_seconds: float | None) -> dict:
    """Probe rounds so far: passes, seconds, and the same in step-equivalents (probe
    seconds / the median training step's seconds, when steps were timed)."""
    out = dataclasses.asdict(cost)
    out["step_equivalents"] = out["seconds"] / step_seconds if step_seconds else None
    return out


def stats_report(s: StepStats, count_nonfinite: bool = True) -> dict:
    return {
        "saved_bytes_raw": s.raw_bytes,
        "saved_bytes_packed": s.packed_bytes,
        "ratio": s.raw_bytes / s.packed_bytes if s.packed_bytes else 1.0,
        "tensors": s.tensors,
        "compiled_tensors": s.compiled_tensors,
        "kept_exact_bytes": s.exact_bytes,
        "deduplicated": s.deduplicated,
        "skipped_weights": s.skipped_weights,
        "skipped_other": s.skipped_other,
        "forwards": s.forwards,
        "attention_stock_calls": s.attention_stock,
        "nonfinite_tensors": s.nonfinite_tensors() if count_nonfinite else None,
    }


class SavedActivationMeter:
    """Counts the activations autograd saves, changing nothing: the uncompressed side of
    an ALAM comparison, with the controller's accounting (weights excluded, shared
    tensors counted once).

        >>> import torch, alam_dist
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
        >>> meter = alam_dist.SavedActivationMeter(model)
        >>> model(torch.randn(32, 64)).sum().backward()
        >>> meter.step_done(); meter.memory_report()["saved_bytes_raw"] > 0
        True
    """

    def __init__(self, model: torch.nn.Module, *, min_numel: int = 1024):
        self.policy = SavedTensorPolicy(model, min_numel=min_numel, training=Measure())
        self.policy.install()
        self._last: StepStats | None = None

    def step_done(self) -> None:
        self._last, self.policy.stats = self.policy.stats, StepStats()

    def memory_report(self, count_nonfinite: bool = True) -> dict:
        return stats_report(self._last or self.policy.stats, count_nonfinite)

    def uninstall(self) -> None:
        self.policy.uninstall()

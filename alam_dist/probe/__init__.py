"""Probe rounds: GradNormVar sensitivities for every saved tensor, behind one interface.

    outcome = run_round(ctx)          # ctx: a RoundContext; outcome: a RoundOutcome

Three rounds compute the same statistic (alam_dist.probe.statistic) at different costs:
``local`` (alam_dist.probe.local, the default: one transformer block at a time),
``cheap`` and ``full`` (alam_dist.probe.restart). A model the local round does not apply
to (no block stack, or blocks that exchange more than the hidden state) gets the cheap
round, with one warning. The controller calls :func:`run_round` and never branches on
which round ran: every round gathers its results from all ranks and returns the merged
statistics, the inventory and its cost in a :class:`RoundOutcome`.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from alam_dist.hooks.policy import SavedTensorPolicy, TensorInfo
from alam_dist.probe.blocks import BlockStack
from alam_dist.probe.statistic import preserved_training_state

ROUNDS = ("local", "cheap", "full")


@dataclass
class RoundContext:
    """What a round works with. ``closure`` runs the model's forward and returns the loss;
    ``params`` are the trainable parameters (restored after the round); ``grad_params``
    the tensors whose gradient norms the statistic compares when they are not the
    parameters (FSDP2: the unsharded ones)."""

    policy: SavedTensorPolicy
    model: torch.nn.Module
    blocks: BlockStack | None
    collective: object
    config: object
    closure: Callable[[], object]
    beat: Callable[[str], None]
    seed: int
    params: list[torch.Tensor]
    grad_params: list[torch.Tensor] | None = None
    forward_per_pass: bool = False
    collective_passes: bool = False
    batch_share: tuple[int, int] = (1, 1)

    @property
    def stat_params(self) -> list[torch.Tensor]:
        """The tensors whose gradient norms the statistic compares."""
        return self.params if self.grad_params is None else list(self.grad_params)


@dataclass
class RoundOutcome:
    """A finished round, identical on every rank except the ``*_this_rank`` counts and
    the pass counts (a rank's own)."""

    kind: str
    """The round that ran (``local``, ``cheap`` or ``full``)."""
    sens: dict[str, float]
    ratios: dict[str, dict[float, float]]
    seen: dict[str, TensorInfo]
    """The merged inventory: every key any rank saved, at its largest size."""
    small: list[str]
    """Float tensors kept exact for being under min_numel (a plan remembers them)."""
    jobs: int
    jobs_this_rank: int
    padding_passes: int
    passes: int
    """Backward passes of the jobs and levels (padding included)."""
    forwards: int
    backwards: int
    """Backward passes to count in the cost (``passes`` plus a restart backward)."""
    probed_blocks: list[int] = field(default_factory=list)
    restart_backward: bool = False
    fixed_seconds: float = 0.0
    groups: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    """Round-specific cost fields for the history (the local round's)."""


@contextlib.contextmanager
def probe_state(ctx: RoundContext):
    """A probe round's policy state around it: a fresh inventory and byte count, the
    slice's share, and on exit every probe setting reset and every recorded copy
    released; training state (grads, RNG, buffers, modes) restored, for the parameters
    and the tensors the statistic differentiates."""
    tensors = ctx.params + list(ctx.grad_params or [])
    with preserved_training_state(ctx.model, tensors), ctx.policy.probe_scope(ctx.batch_share):
        yield


_warned_not_local: weakref.WeakSet = weakref.WeakSet()  # policies already warned about it


def run_round(ctx: RoundContext, kind: str) -> RoundOutcome:
    """Run the round ``kind`` (or the one that applies: see the module docstring)."""
    from alam_dist.probe.local import NotLocal, run_local_round
    from alam_dist.probe.restart import run_restart_round
    if kind not in ROUNDS:
        raise ValueError(f"probe round {kind!r}; choose one of {ROUNDS}")
    if kind == "local" and ctx.blocks is None:
        kind = "cheap"  # no transformer block stack: restarts cannot apply either
    if kind == "local":
        try:
            return run_local_round(ctx)
        except NotLocal as err:
            if ctx.policy not in _warned_not_local:
                _warned_not_local.add(ctx.policy)
                warnings.warn(f"alam_dist: the block-local probe round does not apply to this "
                              f"model ({err}); using probe='cheap'", stacklevel=4)
            kind = "cheap"
    return run_restart_round(ctx, kind)

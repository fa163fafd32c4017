"""What the pack hook does with an activation it keeps: one small strategy per mode.

* :class:`Compress` -- training: encode at the plan's bits (``bits_for(key, t)``) with a
  per-step, per-rank seed (``seed_for(key)``);
* :class:`Record` -- probe forwards: keep exact copies (``exact(key)``; all by default)
  that a probe pass can swap for a compressed one (``SavedTensorPolicy.targeting``), keep
  ``plain(key)`` tensors as autograd gave them, compress the rest as in training;
* :class:`Measure` -- keep everything, count bytes (the uncompressed side of a
  comparison, with the same accounting);
* :class:`Off` -- plain autograd, no hooks.

The policy holds one at a time; probe code swaps them with ``policy.using(mode)``, a
context manager, never by setting flags on the policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from alam_dist.hooks.policy import Saved, SavedTensorPolicy


class Mode:
    name = "?"
    hooks = True
    """Whether forwards run under the saved-tensor hooks at all."""
    routes_attention = False
    """Whether consistent-recompute attention is routed (when configured)."""

    def keep(self, policy: "SavedTensorPolicy", key: str, t: torch.Tensor, is_mask: bool,
             raw: int) -> "Saved | torch.Tensor":
        raise NotImplementedError


@dataclass
class Compress(Mode):
    bits_for: Callable[[str, torch.Tensor], float] = lambda key, t: 32
    seed_for: Callable[[str], int] = lambda key: 0
    compiled_bits_for: Callable[[str, str, str], float] = lambda path, key, op: 32
    """Bits of a compiled graph's saved value: (path of the module using it, relative to
    the compiled module; graph key; producing op) -> bits (alam_dist.hooks.compiled)."""
    compiled_seed_for: Callable[[str], int] = lambda key: 0
    planned_bits: Callable[[str], float | None] = lambda key: None
    """The plan's bits for a key, None where it has none (asked ahead of a save, without
    the mismatch handling of ``bits_for``: alam_dist.hooks.stock_attention)."""
    name = "compress"
    routes_attention = True

    def keep(self, policy, key, t, is_mask, raw):
        bits = 32 if is_mask else self.bits_for(key, t)
        return policy.encode(key, t, bits, self.seed_for(key), raw)


@dataclass
class Record(Mode):
    exact: Callable[[str], bool] | None = None
    """Keys kept as exact copies (None: all); the others are compressed as in training,
    so a probe forward holds little more than a step."""
    plain: Callable[[str], bool] | None = None
    """Keys kept as autograd gave them (not copied, not compressed): the block-local
    round's first forward, whose block graphs die at once."""
    name = "record"
    routes_attention = True

    def keep(self, policy, key, t, is_mask, raw):
        if self.plain is not None and self.plain(key):
            policy.stats.exact_bytes += raw
            return t.detach()
        if self.exact is None or self.exact(key):
            policy.stats.exact_bytes += raw
            return policy.record(key, t)
        return policy.training.keep(policy, key, t, is_mask, raw)


class Measure(Mode):
    name = "measure"

    def keep(self, policy, key, t, is_mask, raw):
        policy.stats.packed_bytes += raw
        policy.stats.exact_bytes += raw
        return t.detach()


class Off(Mode):
    name = "off"
    hooks = False

"""Torch's own attention kernel where the plan keeps q and k at 8 bits or more.

The consistent path (alam_dist.attention) saves q, k, v and reruns the attention forward
in backward, so that probabilities rebuilt from *compressed* q and k stay normalised.
At 8 bits or exact that error is negligible (gradient cosine 0.9995+ at 8 bits,
tests/test_attention.py) and the rerun is work nobody needs: torch's fused kernel
saves its output and logsumexp and its backward needs no forward.

The saved tensors must not change keys, or the plan would not find them: torch's kernel
saves q, k, v (in its own order), its output and the logsumexp, where the consistent path
saves q, k, v and the mask, and every later save of the module call is keyed by its
ordinal. So the kernel runs under saved-tensor hooks of its own (:class:`StockSaves`):
q, k, v (and a mask tensor) are packed under the keys the consistent path gives them
(q, k, v at their plan bits; a mask as the policy keeps it), the kernel's output and
logsumexp are kept exact (counted as activation memory), and afterwards the call takes
exactly the ordinals the consistent path takes. A call whose kernel saved more than that
(k and v expanded for grouped heads, say) takes the rerun path from then on.

Used only where the choice is safe to make ahead: training forwards (probe forwards
measure the consistent path) whose saves the policy's own hooks take (not inside an
activation checkpoint, whose recompute must see the same saves), no dropout, and a
fused kernel (flash, memory-efficient, cuDNN): torch's math fallback saves the whole
probability matrix.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from alam_dist.attention import _kernel_choice, sdpa_arguments
from alam_dist.hooks.classify import storage_ptr
from alam_dist.hooks.modes import Compress

if TYPE_CHECKING:
    from alam_dist.hooks.policy import SavedTensorPolicy

STOCK_MIN_BITS = 8
"""q and k planned at this or more (exact included): torch's kernel, no recompute."""


@functools.lru_cache(maxsize=1)
def _fused_backends() -> frozenset:
    from torch.nn.attention import SDPBackend
    return frozenset(getattr(SDPBackend, name) for name in (
        "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION") if hasattr(SDPBackend, name))


def stock_saves(policy: "SavedTensorPolicy", query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attn_mask, dropout_p: float,
                kwargs: dict) -> "StockSaves | None":
    """The saves context for torch's kernel on this call (its inputs already cast as
    autocast would), or None: the consistent path. Cheapest checks first: most calls of
    a low-bit plan stop at the plan's bits."""
    mode = policy.mode
    if mode is not policy.training or not isinstance(mode, Compress) or not policy.keys.in_forward:
        return None
    if dropout_p or (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool):
        # dropout: the rerun path replays the mask without storing it; a bool mask: the
        # kernel would save a float copy of it
        return None
    ordinals = 4 if isinstance(attn_mask, torch.Tensor) else 3  # as save_for_backward would
    keys = policy.keys.peek(ordinals)
    if keys[0] in policy.stock_refused:
        return None
    for k in keys[:2]:  # q and k
        bits = mode.planned_bits(k)
        if bits is None or bits < STOCK_MIN_BITS:
            return None
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return None
    if not policy.owns_top_hooks(_top_pack()):
        return None  # an activation checkpoint's (or the user's) hooks save this call
    if _kernel_choice(query, key, value, attn_mask, dropout_p, kwargs) not in _fused_backends():
        return None
    inputs = (query, key, value, attn_mask) if ordinals == 4 else (query, key, value)
    return StockSaves(policy, keys, inputs, ordinals)


def _top_pack():
    """The innermost saved-tensor pack hook (None if none, or if torch cannot say)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        hooks = top(False) if top is not None else None
    except (TypeError, RuntimeError):
        return None
    return hooks[0] if hooks else None


class StockSaves:
    """Saved-tensor hooks around one call of torch's attention kernel (module docstring)."""

    def __init__(self, policy: "SavedTensorPolicy", keys: list[str],
                 inputs: tuple[torch.Tensor, ...], ordinals: int):
        self.policy, self.keys, self.inputs, self.ordinals = policy, keys, inputs, ordinals
        self._views = [(storage_ptr(t), t.storage_offset(), t.shape, t.stride()) for t in inputs]
        self._packed: dict[str, object] = {}
        query, value = inputs[0], inputs[2]
        # what the kernel may save of its own: its output, the logsumexp, RNG state
        self._out_shape = (*query.shape[:-1], value.shape[-1])
        self._small = 2 * query.numel() // max(1, query.shape[-1]) + 64
        self.unexpected = False

    def __enter__(self) -> "StockSaves":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.policy.unpack)
        self._hooks.__enter__()
        self.policy.stats.attention_stock += 1
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.policy.keys.skip(self.ordinals)
        matched = sum(k in self._packed for k in self.keys[:3])
        if self.unexpected or matched < len({id(t) for t in self.inputs[:3]}):
            # the kernel saved something else, or copies instead of q, k, v (k and v
            # expanded for grouped heads, a padded head size): the rerun path from the
            # next step on, for this call
            self.policy.stock_refused.add(self.keys[0])

    def pack(self, t: torch.Tensor):
        for key, source, view in zip(self.keys, self.inputs, self._views):
            if t is source or (storage_ptr(t), t.storage_offset(), t.shape, t.stride()) == view:
                saved = self._packed.get(key)
                if saved is None:  # q is k (self-attention on one tensor): packed once
                    saved = self._packed[key] = self.policy.pack_as(key, t)
                return saved
        if tuple(t.shape) != self._out_shape and t.numel() > self._small:
            self.unexpected = True
        # the kernel's own (output, logsumexp, RNG state), or the unexpected: kept as is
        self.policy.stats.skipped_other += 1
        self.policy._count_kept(t.numel() * t.element_size())
        return t.detach()

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
                value: torch.Tensor, args: tuple, kwargs: dict) -> "StockSaves | None":
    """The saves context for torch's kernel on this call, or None (consistent path)."""
    mode = policy.mode
    if mode is not policy.training or not isinstance(mode, Compress) or not policy.keys.in_forward:
        return None
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return None
    if not _policy_hooks_on_top(policy):
        return None  # an activation checkpoint's (or the user's) hooks save this call
    attn_mask, dropout_p, rest = sdpa_arguments(args, kwargs)
    if dropout_p:
        return None  # the consistent path replays the dropout mask without storing it
    if _kernel_choice(query, key, value, attn_mask, dropout_p, rest) not in _fused_backends():
        return None
    ordinals = 4 if isinstance(attn_mask, torch.Tensor) else 3  # as save_for_backward would
    keys = policy.keys.peek(ordinals)
    if keys[0] in policy.stock_refused:
        return None
    for k in keys[:2]:  # q and k
        bits = mode.planned_bits(k)
        if bits is None or bits < STOCK_MIN_BITS:
            return None
    inputs = (query, key, value, attn_mask) if ordinals == 4 else (query, key, value)
    return StockSaves(policy, keys, inputs, ordinals)


def _policy_hooks_on_top(policy: "SavedTensorPolicy") -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks is not None and hooks[0] == policy.pack


class StockSaves:
    """Saved-tensor hooks around one call of torch's attention kernel (module docstring)."""

    def __init__(self, policy: "SavedTensorPolicy", keys: list[str],
                 inputs: tuple[torch.Tensor, ...], ordinals: int):
        self.policy, self.keys, self.inputs, self.ordinals = policy, keys, inputs, ordinals
        self._views = [(storage_ptr(t), t.storage_offset(), t.shape, t.stride()) for t in inputs]
        self._packed: dict[str, object] = {}
        self.kept_bytes = 0
        # what the kernel's own saves may hold: its output (q's size) and the logsumexp
        self._expected = query_bytes(inputs[0]) * 3 // 2 + (1 << 16)

    def __enter__(self) -> "StockSaves":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.policy.unpack)
        self._hooks.__enter__()
        self.policy.stats.attention_stock += 1
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.policy.keys.skip(self.ordinals)
        if self.kept_bytes > self._expected:
            # the kernel saved more than its output and logsumexp (k, v expanded for
            # grouped heads, say): the rerun path from the next step on, for this call
            self.policy.stock_refused.add(self.keys[0])

    def pack(self, t: torch.Tensor):
        for key, source, view in zip(self.keys, self.inputs, self._views):
            if t is source or (storage_ptr(t), t.storage_offset(), t.shape, t.stride()) == view:
                saved = self._packed.get(key)
                if saved is None:  # q is k (self-attention on one tensor): packed once
                    saved = self._packed[key] = self.policy.pack_as(key, t)
                return saved
        # the kernel's own: its output and logsumexp (and RNG state), kept as they are
        nbytes = t.numel() * t.element_size()
        self.kept_bytes += nbytes
        self.policy.stats.skipped_other += 1
        self.policy._count_kept(nbytes)
        return t.detach()


def query_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

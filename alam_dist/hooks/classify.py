"""What a saved tensor is: a weight (kept as is), an activation, a mask; and the stable
seeds and fingerprints keyed on it. No state: the policy asks, these answer."""
from __future__ import annotations

import hashlib
from typing import Callable, Container

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Autograd nodes that only view or cast their single input: a weight seen through them
# is still a weight.
VIEW_OR_CAST = frozenset({
    "ToCopyBackward0", "ViewBackward0", "TBackward0", "TransposeBackward0",
    "PermuteBackward0", "ExpandBackward0", "UnsafeViewBackward0", "AliasBackward0",
    "SliceBackward0", "SelectBackward0", "AsStridedBackward0", "ReshapeAliasBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
})

WeightDetector = Callable[[torch.Tensor], bool]


def is_weight(t: torch.Tensor, activation_leaves: dict[int, torch.Tensor],
              detectors: list[WeightDetector]) -> bool:
    """Whether a saved tensor is a weight (or anything else held elsewhere or unsafe to
    quantize) rather than an activation.

    Identity, never addresses: ZeRO-3 frees and re-gathers weight buffers, so an
    activation can land at a freed weight's address (a storage-pointer test made
    compression decisions, and so training, irreproducible). ``activation_leaves`` are
    leaves that stand for a hidden state (the block-local probe cuts the graph there)."""
    if t.is_leaf:
        if activation_leaves and activation_leaves.get(id(t)) is t:
            return False
        # Parameters, inputs, frozen weights and their autocast copies, and tensors
        # built without grad (additive attention masks holding finfo.min, rotary
        # tables): held elsewhere, or unsafe to quantize. Bool masks are packed before
        # this check.
        return True
    fn = t.grad_fn
    for _ in range(6):
        if fn is None:
            break
        kind = _NODE_KINDS.get(type(fn))
        if kind is None:
            kind = _NODE_KINDS[type(fn)] = _node_kind(fn)
        if kind == _ACCUMULATE:
            leaf = fn.variable if activation_leaves else None
            return not (leaf is not None and activation_leaves.get(id(leaf)) is leaf)
        if kind != _VIEW_OR_CAST:  # the usual activation: one dict lookup
            break
        nexts = [f for f, _ in fn.next_functions if f is not None]
        if len(nexts) != 1:
            break
        fn = nexts[0]
    return bool(detectors) and any(detect(t) for detect in detectors)


_OTHER, _VIEW_OR_CAST, _ACCUMULATE = 0, 1, 2
_NODE_KINDS: dict[type, int] = {}
"""Autograd node class -> its kind (each node class has one name): the weight check runs
for every saved tensor of every step."""


def _node_kind(fn) -> int:
    if type(fn).__name__ == "AccumulateGrad":
        return _ACCUMULATE
    return _VIEW_OR_CAST if fn.name() in VIEW_OR_CAST else _OTHER


ROLES = ("norm_input",)


def role(key: str, module_type: str, earlier: Container[str]) -> str:
    """What a saved activation is to the module that saved it, for floors ("role:<name>")
    that must not depend on how an op orders its saves: ``"norm_input"`` for the first
    activation a normalization layer saves in a call (its input: ``nn.LayerNorm`` saves
    it second, after its weight, so an ordinal pattern misses it; an RMSNorm first, as
    fp32), ``""`` otherwise. ``earlier``: the keys already seen -- the call's earlier
    saves are among them, as saves run in order. Once per key, not per step."""
    if "Norm" not in module_type:
        return ""
    frame, _, ordinal = key.rpartition(".")
    if any(f"{frame}.{i}" in earlier for i in range(int(ordinal))):
        return ""
    return "norm_input"


def storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return -1


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of parameter names and full shapes (ZeRO-3 and FSDP shards report theirs)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:16]


def key_seed(base: int, *parts) -> int:
    """A stable 64-bit seed from a base seed and any parts (never Python's salted hash)."""
    body = "|".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little")


class KeySeeds:
    """``key_seed(base, *parts, key)`` for many keys under one prefix, the prefix hashed
    once: the same numbers, for half the host time per saved tensor."""

    __slots__ = ("prefix", "_hash")

    def __init__(self, base: int, *parts):
        self.prefix = (base, *parts)
        self._hash = hashlib.blake2b("|".join(str(p) for p in self.prefix).encode(),
                                     digest_size=8)

    def __call__(self, key: str) -> int:
        h = self._hash.copy()
        h.update(b"|" + key.encode())
        return int.from_bytes(h.digest(), "little")

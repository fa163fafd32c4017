"""Transformer blocks: the repeats a cheap probe round exploits.

A decoder stack is one ``ModuleList`` of identical blocks (``model.layers`` in LLaMA).
Saved-tensor keys inside block ``i`` start with ``"<list>.<i>"``; replacing the index
with ``*`` gives the tensor's *role* (``model.layers.*.mlp.down_proj/0.1``), the same in
every block. A cheap round probes a few blocks and gives every other block's tensors the
sensitivity of their role interpolated between the nearest probed blocks.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockStack:
    prefix: str
    """Qualified name of the ModuleList holding the blocks (e.g. "model.layers")."""
    modules: tuple[torch.nn.Module, ...]

    @property
    def count(self) -> int:
        return len(self.modules)

    def block_of(self, key: str) -> int | None:
        """Index of the block a saved-tensor key belongs to (None: outside the stack)."""
        m = self._pattern().match(key)
        return int(m.group(1)) if m else None

    def role_of(self, key: str) -> str:
        return self._pattern().sub(lambda m: f"{self.prefix}.*" + m.group(2), key, count=1)

    def _pattern(self) -> re.Pattern:
        return re.compile(rf"^{re.escape(self.prefix)}\.(\d+)([./].*)$")

    def choose(self, n: int | None) -> list[int]:
        """``n`` blocks evenly spaced over the stack, first and last included (None:
        every block)."""
        if n is None or n >= self.count:
            return list(range(self.count))
        if n == 1:
            return [0]
        return sorted({round(i * (self.count - 1) / (n - 1)) for i in range(n)})


def find_blocks(model: torch.nn.Module) -> BlockStack | None:
    """The longest ModuleList of >= 2 modules of one type (the decoder stack), or None."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        return None
    return BlockStack(best[0], tuple(best[1]))


def interpolate(values: dict[int, float], block: int) -> float:
    """A role's sensitivity at ``block`` from the probed blocks' values: geometric
    interpolation between the nearest probed blocks below and above (sensitivities span
    orders of magnitude with depth), the nearest one outside their range."""
    below = [b for b in values if b <= block]
    above = [b for b in values if b >= block]
    if not below:
        return values[min(above)]
    if not above:
        return values[max(below)]
    lo, hi = max(below), min(above)
    if lo == hi:
        return values[lo]
    a, b = values[lo], values[hi]
    t = (block - lo) / (hi - lo)
    if a > 0 and b > 0:
        return math.exp(math.log(a) * (1 - t) + math.log(b) * t)
    return a * (1 - t) + b * t


def derive(stack: BlockStack, keys: list[str], sensitivity: dict[str, float],
           error_ratio: dict[str, dict[float, float]]) -> tuple[dict[str, float], dict[str, dict]]:
    """Fill in the keys of unprobed blocks from the probed keys of the same role.

    Returns complete (sensitivity, error_ratio) dicts. A key whose role no probed
    block has (blocks that differ) gets the median probed sensitivity, with a warning."""
    by_role: dict[str, dict[int, str]] = {}
    for key in sensitivity:
        block = stack.block_of(key)
        if block is not None:
            by_role.setdefault(stack.role_of(key), {})[block] = key
    sens, ratios = dict(sensitivity), dict(error_ratio)
    unmatched: list[str] = []
    for key in keys:
        if key in sens:
            continue
        block = stack.block_of(key)
        probed = by_role.get(stack.role_of(key)) if block is not None else None
        if not probed:
            unmatched.append(key)
            continue
        sens[key] = interpolate({b: sensitivity[k] for b, k in probed.items()}, block)
        nearest = min(probed, key=lambda b: (abs(b - block), b))
        ratios[key] = error_ratio.get(probed[nearest], {})
    if unmatched and sensitivity:
        values = sorted(sensitivity.values())
        for key in unmatched:
            sens[key], ratios[key] = values[len(values) // 2], {}
        warnings.warn(f"alam_dist: {len(unmatched)} saved tensor(s) of unprobed blocks have no "
                      f"counterpart in the probed blocks (e.g. {unmatched[:2]}); they get the median "
                      "sensitivity. Set alam.probe_blocks higher or alam.probe='full'.", stacklevel=3)
    return sens, ratios

"""PackedTensor: what one encoded activation holds."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False, slots=True)  # slots: built once per saved tensor per step
class PackedTensor:
    """An encoded tensor. Decode it with :func:`alam_dist.codec.decode`.

    ``format`` is one of ``"aq"`` (0.5 bit), ``"q2"``, ``"q4"``, ``"q8"`` (group
    quantization), ``"h1"``, ``"h2"``, ``"h4"``, ``"h8"`` (rotated groups), ``"mask"`` (1 bit, lossless), ``"bf16"`` (an fp32 tensor kept in
    bfloat16) or ``"raw"`` (kept as is; ``data`` is the original tensor).
    """

    format: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    data: torch.Tensor
    """uint8 payload for aq/q*/mask; the kept tensor for bf16/raw."""
    meta: torch.Tensor | None = None
    """fp32 [groups, 2] of (min, scale) for aq/q*; bfloat16 [groups, 2] of (step, mean) for h*; None
    otherwise."""
    seed: int = 0
    """h*: the encode seed, which fixes the sign flips decoding must undo (one int per
    tensor, not counted in ``nbytes``)."""

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Every byte this object holds: payload plus metadata."""
        meta = 0 if self.meta is None else self.meta.numel() * self.meta.element_size()
        return self.data.numel() * self.data.element_size() + meta

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def __repr__(self) -> str:
        return (f"PackedTensor(format={self.format!r}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, nbytes={self.nbytes}, "
                f"bits_per_element={self.bits_per_element:.3f})")

"""The format registry: every compressed format, its family, and what it stores.

The one source of these facts for the codec (buffer sizes, validation), the config (which
``bits`` a family accepts), the allocator (stored bits per element, metadata included)
and the kernels' C ABI (its own size functions are checked against these in the tests).

Two families name the ``bits`` values of a plan:

* ``"minmax"`` -- the ALAM paper's formats (the seed code's; ``"seed"`` is accepted as
  the old spelling): groups of 128 values with fp32 (min, scale), stochastic rounding,
  at 2, 4 and 8 bits, and average quantization at 0.5 bit;
* ``"rotated"`` -- each group of 128 sign-flipped and Walsh-Hadamard rotated, rounded to
  nearest on symmetric levels with a bfloat16 (step, mean) per group, at 1 (a sign
  code), 2, 4 and 8 bits; at 0.5 bit the sign code on half of the rotated values, with
  one (step, mean) per two groups ("h05", the same 0.625 stored bits as average
  quantization; issue 25).

So ``bits=1`` means one thing per family: the sign code in ``"rotated"``; in ``"minmax"``
it is the seed code's alias of 0.5 (average quantization) and is normalised to 0.5
before anything else sees it. 16 keeps a tensor in 16 bits (bfloat16 for fp32 inputs),
32 keeps it as is; neither is a registry entry. Masks (bool, uint8 0/1) are bit-packed
whatever the plan says (``MASK``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP = 128
"""Values per group: one set of metadata each."""
AQ_AVG = 4
"""Average quantization keeps the mean of this many consecutive values."""

FAMILIES = ("minmax", "rotated")
FAMILY_ALIASES = {"seed": "minmax"}
"""Old spellings accepted wherever a family is named (configs, plans, the codec API)."""
EXACT_BITS = (16, 32)


@dataclass(frozen=True)
class Format:
    """One compressed format. ``kernel_bits`` is the C ABI's code (0: average
    quantization, or for rotated formats the half sign code); ``meta_dtype`` the dtype of
    the [groups, 2] metadata; ``span`` how many elements one quantized value stands for
    (AQ: a mean of 4; h05: one kept rotated value per 2), so a group of metadata covers
    ``GROUP * span`` elements."""

    name: str
    bits: float
    kernel_bits: int
    rotated: bool
    meta_dtype: torch.dtype
    span: int = 1

    def values(self, n: int) -> int:
        """How many values are quantized for ``n`` elements (means, for AQ)."""
        return -(-n // self.span)

    def num_groups(self, n: int) -> int:
        return -(-self.values(n) // GROUP)

    def payload_bytes(self, n: int) -> int:
        if self.rotated:  # whole groups: the rotation needs all 128 slots
            return self.num_groups(n) * GROUP * max(self.kernel_bits, 1) // 8
        return -(-self.values(n) * (self.kernel_bits or 2) // 8)

    def buffer_sizes(self, n: int) -> tuple[int, int]:
        """(payload bytes, metadata groups) for ``n`` elements, remembered: asked for
        every saved tensor of every step, with the same few sizes each time."""
        return _buffer_sizes(self.name, n)

    def meta_bytes(self, n: int) -> int:
        return self.num_groups(n) * 2 * self.meta_dtype.itemsize

    @property
    def stored_bits(self) -> float:
        """Bits per element stored, metadata included (for whole groups): what the
        allocator budgets."""
        meta_bits = 2 * self.meta_dtype.itemsize * 8
        return self.bits + meta_bits / (GROUP * self.span)


@functools.lru_cache(maxsize=4096)
def _buffer_sizes(name: str, n: int) -> tuple[int, int]:
    fmt = REGISTRY[name]  # keyed by name: a str hashes once, a Format hashes its fields
    return fmt.payload_bytes(n), fmt.num_groups(n)


AQ = Format("aq", 0.5, 0, False, torch.float32, span=AQ_AVG)
H05_SPAN = 2
"""h05: a block of GROUP * 2 values (two rotated groups) keeps GROUP sign bits."""
REGISTRY: dict[str, Format] = {f.name: f for f in (
    AQ,
    Format("q2", 2, 2, False, torch.float32),
    Format("q4", 4, 4, False, torch.float32),
    Format("q8", 8, 8, False, torch.float32),
    Format("h05", 0.5, 0, True, torch.bfloat16, span=H05_SPAN),
    Format("h1", 1, 1, True, torch.bfloat16),
    Format("h2", 2, 2, True, torch.bfloat16),
    Format("h4", 4, 4, True, torch.bfloat16),
    Format("h8", 8, 8, True, torch.bfloat16),
)}
"""Every compressed format by name (the name a PackedTensor carries)."""

LADDERS: dict[str, dict[float, Format]] = {
    "minmax": {0.5: AQ, 2: REGISTRY["q2"], 4: REGISTRY["q4"], 8: REGISTRY["q8"]},
    "rotated": {0.5: REGISTRY["h05"], 1: REGISTRY["h1"], 2: REGISTRY["h2"], 4: REGISTRY["h4"],
                8: REGISTRY["h8"]},
}
"""Per family: plan bits -> format."""

MASK = "mask"
KEPT = ("bf16", "raw")  # PackedTensor formats of tensors not quantized


def family(name: str) -> str:
    """The canonical family for ``name`` (old spellings mapped); ValueError if unknown."""
    canonical = FAMILY_ALIASES.get(name, name)
    if canonical not in FAMILIES:
        known = ", ".join(repr(f) for f in (*FAMILIES, *FAMILY_ALIASES))
        raise ValueError(f"formats={name!r}; choose one of {known}")
    return canonical


def allowed_bits(formats: str = "minmax") -> tuple[float, ...]:
    """The ``bits`` values a family accepts (exact ones included)."""
    return tuple(sorted((*LADDERS[family(formats)], *EXACT_BITS)))


def normalize_bits(bits: float, formats: str = "minmax") -> float:
    """Validate ``bits`` for ``formats``; map minmax's alias 1 to 0.5."""
    fam = family(formats)
    allowed = allowed_bits(fam)
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise ValueError(f"bits must be a number in {allowed}, got {bits!r}")
    if bits == 1 and fam == "minmax":
        return 0.5
    if bits not in allowed:
        alias = " (1 is accepted as an alias of 0.5)" if fam == "minmax" else ""
        raise ValueError(f"bits={bits!r} is not a supported {fam} format; allowed values "
                         f"are {allowed}{alias}")
    return float(bits) if bits == 0.5 else int(bits)


def format_for(bits: float, formats: str = "minmax") -> Format | None:
    """The registry entry for normalised ``bits`` in a family (None for 16 and 32)."""
    return LADDERS[family(formats)].get(bits)


def stored_bits(bits: float, raw_bits: int, formats: str = "minmax") -> float:
    """Bits per element a tensor of ``raw_bits`` (16 or 32) costs at plan bits ``bits``."""
    if bits == 32 or bits >= raw_bits:
        return float(raw_bits)
    if bits == 16:
        return 16.0
    return LADDERS[family(formats)][bits].stored_bits

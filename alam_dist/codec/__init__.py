"""The alam_dist codec: encode a tensor to a few bits per element and back.

    >>> import torch
    >>> from alam_dist import codec
    >>> x = torch.randn(4096, dtype=torch.bfloat16)
    >>> p = codec.encode(x, bits=0.5, seed=7)          # average quantization
    >>> round(p.bits_per_element, 3)
    0.625
    >>> y = codec.decode(p)
    >>> y.shape, y.dtype
    (torch.Size([4096]), torch.bfloat16)

``formats`` picks the family the numbers of ``bits`` name (the registry:
alam_dist/codec/formats.py):

* ``"minmax"`` (the ALAM paper's; ``"seed"`` is the old spelling): 0.5 (average quantization: means of 4 values at 2 bits;
  the seed's alias ``1`` is accepted), 2, 4, 8 (stochastic rounding in groups of 128
  with fp32 min and scale);
* ``"rotated"``: 1, 2, 4, 8 (each group of 128 sign-flipped and Walsh-Hadamard rotated,
  then rounded to nearest on symmetric levels with a bfloat16 (step, mean) per group), and
  0.5 (average quantization, as above).

In both, 16 keeps a tensor in 16 bits (bfloat16 for fp32 inputs) and 32 keeps it as is;
bool and uint8 0/1 masks are bit-packed losslessly whatever ``bits`` says. Format
details and measurements: docs/codec.md.

``backend``: "reference" (pure torch, the ground truth), "cpp" (CPU kernels), "cuda"
(CUDA kernels) or "auto" (the fastest built one for the tensor's device). All backends
give bit-identical results for the same seed.
"""
from __future__ import annotations

import functools

import torch

from alam_dist.codec import backends, formats as _formats
from alam_dist.codec.backends import FLOAT_CODES as _FLOAT_CODES
from alam_dist.codec.formats import (FAMILIES, REGISTRY, allowed_bits, family, format_for,
                                     normalize_bits)
from alam_dist.codec.packed import PackedTensor

__all__ = ["ALLOWED_BITS", "Encoder", "FAMILIES", "FORMATS", "ROTATED_ALLOWED_BITS",
           "PackedTensor", "allowed_bits", "available_backends", "cuda_unusable_reason", "decode", "encode",
           "family", "normalize_bits", "validate"]

ALLOWED_BITS = allowed_bits("minmax")
"""Valid ``bits`` values of the minmax formats (plus ``1``, the seed code's alias for 0.5)."""
ROTATED_ALLOWED_BITS = allowed_bits("rotated")
"""Valid ``bits`` values of the rotated formats."""
FORMATS = FAMILIES  # the family names (the old spelling "seed" is accepted too)
BACKENDS = backends.BACKENDS
_MASK_DTYPES = (torch.bool, torch.uint8)

available_backends = backends.available
cuda_unusable_reason = backends.cuda_unusable_reason


def _is_mask(x: torch.Tensor) -> bool:
    """bool, or uint8 holding only 0/1. The uint8 test reads the tensor (a host sync on a
    GPU): training never gets here with uint8 -- the saved-tensor policy keeps non-float,
    non-bool tensors as they are -- only direct calls of :func:`encode` do."""
    if x.dtype == torch.bool:
        return True
    return x.dtype == torch.uint8 and (x.numel() == 0 or int(x.max()) <= 1)


@functools.lru_cache(maxsize=256)
def _plan_format(bits: float, formats: str):
    """(normalised bits, registry entry or None): once per (bits, family), not per call."""
    plan_bits = normalize_bits(bits, formats)
    return plan_bits, format_for(plan_bits, formats) if plan_bits < 16 else None


def encode(x: torch.Tensor, bits: float, *, seed: int = 0, backend: str = "auto",
           formats: str = "minmax") -> PackedTensor:
    """Encode ``x`` in the format ``bits`` of the family ``formats`` (module docstring).

    ``seed`` (any int, taken mod 2**64) fixes the stochastic rounding (and, for rotated
    formats, the sign flips): the same seed gives the same bytes on every backend, rank
    and run. Raises ``ValueError`` for bits outside the family, unsupported dtypes and
    backends that cannot run on ``x``'s device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"encode expects a torch.Tensor, got {type(x).__name__}")
    if type(bits) in (int, float) and isinstance(formats, str):
        plan_bits, fmt = _plan_format(bits, formats)
    else:  # numpy scalars and the like (or a bad value: the error names it)
        plan_bits = normalize_bits(bits, formats)
        fmt = format_for(plan_bits, formats) if plan_bits < 16 else None
    seed = int(seed) & ((1 << 64) - 1)
    shape, dtype, device = x.shape, x.dtype, x.device
    if x.dtype in _MASK_DTYPES:
        if not _is_mask(x):
            return PackedTensor("raw", shape, dtype, device, x)
        flat = x.detach().reshape(-1).contiguous()
        payload = backends.resolve(backend, device).pack_mask(flat)
        return PackedTensor(_formats.MASK, shape, dtype, device, payload)
    if x.dtype not in _FLOAT_CODES:
        if plan_bits == 32:
            return PackedTensor("raw", shape, dtype, device, x)
        raise ValueError(f"cannot encode dtype {x.dtype} at bits={bits}: the quantized formats "
                         "take float32, bfloat16 or float16 (and bool/uint8 masks); "
                         "use bits=32 to keep it as is")
    if plan_bits == 32 or (plan_bits == 16 and x.dtype != torch.float32):
        return PackedTensor("raw", shape, dtype, device, x)
    if plan_bits == 16:
        return PackedTensor("bf16", shape, dtype, device, x.to(torch.bfloat16))
    flat = x.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    payload, meta = backends.resolve(backend, device).quantize(flat, fmt, seed)
    return PackedTensor(fmt.name, shape, dtype, device, payload, meta,
                        seed=seed if fmt.rotated else 0)


class Encoder:
    """:func:`encode` at one quantized format on one device, its choices made once: the
    format of (``bits``, ``formats``) and the backend for ``device``. What the
    saved-tensor hooks call per tensor, where every microsecond of host time counts; the
    result is the same ``PackedTensor``, byte for byte, as ``encode`` gives.

    It takes what the hooks hand it and checks nothing per call: a float tensor
    (float32, bfloat16, float16) on ``device``. Anything else goes through ``encode``.
    """

    __slots__ = ("fmt", "impl", "_torch_ops")

    def __init__(self, bits: float, formats: str, backend: str, device: torch.device):
        _, fmt = _plan_format(bits, formats)
        if fmt is None:
            raise ValueError(f"Encoder is for the quantized formats (bits < 16); bits={bits} "
                             "keeps the tensor: use encode")
        self.fmt, self.impl = fmt, backends.resolve(backend, device)
        self._torch_ops = self.impl is backends.REFERENCE

    def __call__(self, x: torch.Tensor, seed: int) -> PackedTensor:
        """``encode(x, bits, seed=seed)``; ``seed`` already in [0, 2**64)."""
        shape = x.shape
        flat = x.detach().reshape(-1) if self._torch_ops else x  # the kernels read addresses
        if not flat.is_contiguous():
            flat = flat.contiguous()
        fmt = self.fmt
        payload, meta = self.impl.quantize(flat, fmt, seed)
        return PackedTensor(fmt.name, shape, x.dtype, x.device, payload, meta,
                            seed if fmt.rotated else 0)


def _check_buffer(what: str, t, dtype: torch.dtype, numel: int, packed: PackedTensor,
                  contiguous: bool = True) -> None:
    problem = None
    if not isinstance(t, torch.Tensor):
        problem = f"its {what} is a {type(t).__name__}, not a tensor"
    elif t.dtype != dtype:
        problem = f"its {what} has dtype {t.dtype}, expected {dtype}"
    elif t.numel() != numel:
        problem = f"its {what} holds {t.numel()} elements, the format needs {numel}"
    elif t.device != packed.device:
        problem = f"its {what} is on {t.device} but the PackedTensor says {packed.device}"
    elif contiguous and not t.is_contiguous():
        problem = f"its {what} is not contiguous"
    if problem:
        raise ValueError(f"cannot decode {packed!r}: {problem}. Decode only what "
                         "alam_dist.codec.encode returned, unmodified (move it with both "
                         "data and meta, or re-encode on the new device)")


def validate(packed: PackedTensor) -> None:
    """Check that ``packed``'s buffers fit its format, shape and device (ValueError if
    not): the kernels read raw pointers and would otherwise read out of bounds."""
    name, n = packed.format, packed.numel
    if name == "raw":  # the tensor itself, in whatever layout autograd saved it
        _check_buffer("data", packed.data, packed.dtype, n, packed, contiguous=False)
    elif name == "bf16":
        _check_buffer("data", packed.data, torch.bfloat16, n, packed)
    elif name == _formats.MASK:
        _check_buffer("payload", packed.data, torch.uint8, (n + 7) // 8, packed)
    elif name in REGISTRY:
        fmt = REGISTRY[name]
        if packed.dtype not in _FLOAT_CODES:
            raise ValueError(f"cannot decode {packed!r}: dtype {packed.dtype} is not a "
                             "quantizable float dtype")
        _check_buffer("payload", packed.data, torch.uint8, fmt.payload_bytes(n), packed)
        _check_buffer("meta", packed.meta, fmt.meta_dtype, 2 * fmt.num_groups(n), packed)
    else:
        raise ValueError(f"cannot decode {packed!r}: unknown format {name!r} (known: "
                         f"{sorted(REGISTRY) + ['bf16', 'mask', 'raw']})")


def decode(packed: PackedTensor, *, backend: str = "auto",
           impl: backends.Backend | None = None) -> torch.Tensor:
    """Rebuild a tensor of ``packed``'s shape, dtype and device (contiguous).

    ``impl``: a backend already resolved for ``packed``'s device (``Encoder.impl``), for
    callers decoding only what they encoded themselves -- the buffers are then trusted
    and not validated again (the saved-tensor hooks, once per tensor per step)."""
    if impl is None:
        if not isinstance(packed, PackedTensor):
            raise TypeError(f"decode expects a PackedTensor, got {type(packed).__name__}")
        validate(packed)
    name = packed.format
    if name == "raw":
        return packed.data
    if name == "bf16":
        return packed.data.to(packed.dtype)
    if impl is None:
        impl = backends.resolve(backend, packed.device)
    if name == _formats.MASK:
        out = impl.unpack_mask(packed.data, packed.numel)
        if packed.dtype == torch.bool:
            out = out.view(torch.bool)
        return out.view(packed.shape)
    return impl.dequantize(packed.data, packed.meta, packed.shape, REGISTRY[name], packed.seed,
                           packed.dtype)

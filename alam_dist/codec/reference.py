"""Pure-torch reference of the codec: the ground truth the kernels are tested against.

It follows csrc/common/alam_codec.h operation for operation (fp32 arithmetic, same
order, no fused multiply-add), so its output is bit-identical to the C++ and CUDA
kernels. It runs on any device torch supports and is slow: int64 temporaries per element.

Formats (``bits`` is the kernel code: 2, 4, 8, or 0 for average quantization):
  * values are split into groups of ``GROUP`` = 128; each group stores fp32 ``min`` and
    ``scale = (max - min) / (2**b - 1)`` in ``meta[g] = (min, scale)``;
  * each value is stored as ``clamp(floor((x - min) * (1 / scale) + u), 0, 2**b - 1)`` with
    ``u`` from :func:`hash_uniform` (stochastic rounding, unbiased), bit-packed with
    value ``i`` at bit ``(i % (8 // b)) * b`` of byte ``i // (8 // b)``;
  * average quantization first replaces every ``AQ_AVG`` = 4 consecutive values by their
    mean (the tail by its own mean) and quantizes the means with 2 bits;
  * a constant group has scale 0 and decodes exactly; a group with NaN/inf stores NaN
    metadata and decodes to NaN as a whole, written as one explicit pattern per dtype
    (:data:`NAN_BITS`), never whatever NaN the arithmetic or a cast happens to produce;
  * a group's min and max are normalised with ``+ 0.0`` (so ``-0.0`` is stored as
    ``+0.0``: which signed zero a min/max reduction returns is not reproducible);
  * ``(x - min) * (1 / scale) + u`` is clamped in float before the integer conversion
    (NaN -> 0, above range -> ``2**b - 1``): ``1 / scale`` overflows for denormal ranges.

Divisions are tensor by tensor: on CUDA, torch divides by a Python scalar by
multiplying with its reciprocal, which is not bit-identical to a division.
"""
from __future__ import annotations

import torch

from alam_dist.codec.formats import AQ_AVG, GROUP, REGISTRY

_BY_KERNEL_BITS = {f.kernel_bits: f for f in REGISTRY.values() if not f.rotated}
HALF = GROUP // 2  # h05 keeps rotated values 0..HALF-1 of each group
_M32 = 0xFFFFFFFF

NAN_BITS = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}
"""The one NaN bit pattern each backend writes for a NaN group (positive quiet NaN)."""
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def with_nan_pattern(y: torch.Tensor, nan: torch.Tensor) -> torch.Tensor:
    """``y`` with the elements flagged by ``nan`` set to its dtype's :data:`NAN_BITS`."""
    view = y.view(_INT_VIEW[y.dtype])
    pattern = NAN_BITS[y.dtype]
    if pattern >= 1 << (8 * y.element_size() - 1):  # as the signed view stores it
        pattern -= 1 << (8 * y.element_size())
    view.masked_fill_(nan, pattern)
    return y


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without signed overflow."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def seed_keys(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    k0 = _fmix32_int(((seed & _M32) + 0x9E3779B9) & _M32)
    k1 = _fmix32_int((seed >> 32) ^ 0x7F4A7C15)
    return k0, k1


def hash_uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform noise in [0, 1): a pure function of (seed, element index)."""
    k0, k1 = seed_keys(seed)
    index = index.to(torch.int64)
    lo, hi = index & _M32, index >> 32
    h = _fmix32((_fmix32(lo ^ k0) + (hi ^ k1)) & _M32)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def num_values(n: int, bits: int) -> int:
    """Values quantized for ``n`` elements at kernel code ``bits`` (sizes: codec.formats)."""
    return _BY_KERNEL_BITS[bits].values(n)


def average(x: torch.Tensor) -> torch.Tensor:
    """Means of AQ_AVG consecutive values of flat ``x``, in fp32, summed left to right."""
    x = x.to(torch.float32)
    n = x.numel()
    full = n // AQ_AVG * AQ_AVG
    f = x[:full].view(-1, AQ_AVG)
    s = f[:, 0]
    for k in range(1, AQ_AVG):
        s = s + f[:, k]
    means = s / _f32(AQ_AVG, x)
    if full < n:
        t = x[full]
        for k in range(full + 1, n):
            t = t + x[k]
        means = torch.cat([means, (t / _f32(n - full, x)).reshape(1)])
    return means


def quantize(x: torch.Tensor, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float tensor -> (uint8 payload, fp32 meta of shape [groups, 2])."""
    v = average(x) if bits == 0 else x.to(torch.float32)
    b = bits or 2
    levels = (1 << b) - 1
    m = v.numel()
    ng = -(-m // GROUP)
    if m == 0:
        return (torch.empty(0, dtype=torch.uint8, device=x.device),
                torch.empty(0, 2, dtype=torch.float32, device=x.device))
    # Pad with the last value: it changes neither a group's min/max nor its finiteness.
    pad = ng * GROUP - m
    vg = torch.cat([v, v[-1:].expand(pad)]).view(ng, GROUP)
    finite = torch.isfinite(vg).all(dim=1)
    mn = vg.amin(dim=1) + 0.0
    mx = vg.amax(dim=1) + 0.0
    scale = (mx - mn) / _f32(levels, v)
    bad = ~finite | ~torch.isfinite(scale)
    ones = torch.ones_like(scale)
    inv = ones / torch.where(scale == 0, ones, scale)
    u = hash_uniform(seed, torch.arange(ng * GROUP, device=x.device)).view(ng, GROUP)
    t = (vg - mn[:, None]) * inv[:, None] + u
    # clamp in float: NaN (0 * inf) -> 0, inf -> levels; floor == truncation for t >= 0
    t = torch.where(t > 0, t, torch.zeros_like(t))
    t = torch.where(t < levels, t, torch.full_like(t, levels))
    q = torch.floor(t)
    q = torch.where(bad[:, None], torch.zeros_like(q), q)
    q = q.reshape(-1)[:m].to(torch.int32)
    per_byte = 8 // b
    q = torch.cat([q, q.new_zeros(-m % per_byte)]).view(-1, per_byte)
    shifts = torch.arange(per_byte, device=x.device, dtype=torch.int32) * b
    payload = (q << shifts).sum(dim=1).to(torch.uint8)
    meta = torch.stack([mn, scale], dim=1)
    return payload, with_nan_pattern(meta, bad[:, None].expand(ng, 2))


def dequantize(payload: torch.Tensor, meta: torch.Tensor, n: int, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`: a flat tensor of ``n`` values of ``dtype``."""
    b = bits or 2
    m = num_values(n, bits)
    if m == 0:
        return torch.empty(0, dtype=dtype, device=payload.device)
    per_byte = 8 // b
    shifts = torch.arange(per_byte, device=payload.device, dtype=torch.int32) * b
    q = (payload.to(torch.int32)[:, None] >> shifts) & ((1 << b) - 1)
    ng = meta.shape[0]
    q = q.reshape(-1)
    q = torch.cat([q, q.new_zeros(ng * GROUP - q.numel())])[: ng * GROUP].view(ng, GROUP)
    y = q.to(torch.float32) * meta[:, 1:2] + meta[:, 0:1]
    nan = torch.isnan(meta[:, 1:2]).expand(ng, GROUP).reshape(-1)[:m]
    y = y.reshape(-1)[:m]
    if bits == 0:
        y = y.repeat_interleave(AQ_AVG)[:n]
        nan = nan.repeat_interleave(AQ_AVG)[:n]
    return with_nan_pattern(y.to(dtype), nan)


def pack_mask(x: torch.Tensor) -> torch.Tensor:
    """Flat bool/uint8 mask -> 1 bit per value (value i at bit i % 8 of byte i // 8)."""
    bits = (x.reshape(-1) != 0).to(torch.int32)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8)
    shifts = torch.arange(8, device=x.device, dtype=torch.int32)
    return (bits << shifts).sum(dim=1).to(torch.uint8)


def unpack_mask(payload: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, device=payload.device, dtype=torch.int32)
    bits = (payload.to(torch.int32)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].to(torch.uint8)


# -- rotated formats ("h1", "h2", "h4", "h8") ------------------------------------------
#
# Per group of GROUP values (the tail group padded with zeros): subtract the group mean
# (bfloat16, round to nearest; summed in the fixed tree of :func:`_tree_sum`), flip the
# signs given by :func:`rotation_signs`, apply the unnormalised Walsh-Hadamard transform
# (7 butterfly stages, v[i], v[i+h] <- v[i] + v[i+h], v[i] - v[i+h] for h = 1, ..., 64),
# then round each rotated value r to the nearest of 2**b symmetric levels
# (q - L/2) * step, L = 2**b - 1. ``step`` is bfloat16: for b >= 2 the covering step
# (absmax + absmax) / L rounded *up*, so no value is clipped; for b = 1 (a sign code)
# 2 * mean|r| rounded to nearest (levels +-mean|r|, the mean-square-optimal sign code),
# mean|r| summed in the tree of :func:`_tree_sum`. Decoding applies the inverse: levels,
# the same butterflies, times 1/GROUP (exact), the same signs, plus the mean. Metadata:
# (step, mean) as two bfloat16 per group.
#
# The rotation spreads an outlier channel's energy over its group, so one range fits all
# values, and round-to-nearest has a quarter of stochastic rounding's variance (a
# clipping step would halve the 2-bit error again, but its bias stalled training on the
# tiny LLaMA: docs/codec.md). The mean is taken out first because
# a group sharing a large offset (log-probabilities, post-activation outputs) would put
# all its energy into the rotated values and leave nothing for the variation.

ROTATED_BITS = (1, 2, 4, 8)


def rotation_signs(seed: int, device) -> torch.Tensor:
    """Bool [GROUP]: which positions of every group are negated before the transform."""
    k0, _ = seed_keys(seed)
    j = torch.arange(GROUP, dtype=torch.int64, device=device)
    return (_fmix32(j ^ k0) >> 31) == 1


def _fwht(v: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of each row of [groups, GROUP] (fp32)."""
    ng = v.shape[0]
    h = 1
    while h < GROUP:
        w = v.reshape(ng, GROUP // (2 * h), 2, h)
        a, b = w[:, :, 0], w[:, :, 1]
        v = torch.stack([a + b, a - b], dim=2).reshape(ng, GROUP)
        h *= 2
    return v


def _tree_sum(a: torch.Tensor) -> torch.Tensor:
    """Sum per row of [groups, GROUP] in the order the CUDA warp uses: 4 values per lane
    left to right, then xor-butterfly across 32 lanes (every lane ends with the same sum)."""
    a = a.reshape(-1, 32, 4)
    p = ((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]
    lanes = torch.arange(32, device=a.device)
    for off in (16, 8, 4, 2, 1):
        p = p + p[:, lanes ^ off]
    return p[:, 0]


def _bf16_bits_round_up(x: torch.Tensor) -> torch.Tensor:
    """Non-negative finite fp32 -> the smallest bfloat16 >= x, as int32 bit patterns."""
    u = x.view(torch.int32).to(torch.int64)
    up = torch.where((u & 0xFFFF) != 0, (u & ~0xFFFF) + 0x10000, u)
    return (up >> 16).to(torch.int32)


def _bf16_bits_nearest(x: torch.Tensor) -> torch.Tensor:
    u = x.view(torch.int32).to(torch.int64) & _M32
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(torch.int32)


def _bf16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int32) << 16).view(torch.float32)


def rotate_groups(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float tensor (not empty) -> (rotated values [groups, GROUP] in fp32, the
    groups' bfloat16 means as int32 bit patterns): the tail group padded with zeros, the
    mean taken out, the signs flipped, the Walsh-Hadamard transform applied."""
    n = x.numel()
    ng = -(-n // GROUP)
    v = torch.cat([x.to(torch.float32), x.new_zeros(ng * GROUP - n, dtype=torch.float32)])
    v = v.view(ng, GROUP)
    mean_bits = _bf16_bits_nearest(_tree_sum(v) * _f32(1.0 / GROUP, v))
    v = v - _bf16_from_bits(mean_bits)[:, None]
    v = torch.where(rotation_signs(seed, x.device), -v, v)
    return _fwht(v), mean_bits


def unrotate_groups(r: torch.Tensor, mean: torch.Tensor, seed: int) -> torch.Tensor:
    """Inverse of :func:`rotate_groups` for reconstructed rotated values ``r`` [groups,
    GROUP] and the groups' means (fp32): the values [groups, GROUP] in fp32."""
    v = _fwht(r) * _f32(1.0 / GROUP, r)
    return torch.where(rotation_signs(seed, r.device), -v, v) + mean[:, None]


def quantize_rotated(x: torch.Tensor, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float tensor -> (uint8 payload, bfloat16 [groups, 2] of (step, mean)); bits 0
    is h05 (:func:`quantize_half`)."""
    if x.numel() == 0:
        return (torch.empty(0, dtype=torch.uint8, device=x.device),
                torch.empty(0, 2, dtype=torch.bfloat16, device=x.device))
    if bits == 0:
        return quantize_half(x, seed)
    r, mean_bits = rotate_groups(x, seed)
    levels = (1 << bits) - 1
    finite = torch.isfinite(r).all(dim=1)
    if bits == 1:
        mean = _tree_sum(r.abs()) * _f32(1.0 / GROUP, r)
        step_bits = _bf16_bits_nearest(mean + mean)
    else:
        m = r.abs().amax(dim=1)
        step_bits = _bf16_bits_round_up((m + m) / _f32(levels, r))
    step = _bf16_from_bits(step_bits)
    bad = ~finite | ~torch.isfinite(step)
    ones = torch.ones_like(step)
    inv = ones / torch.where(step == 0, ones, step)
    t = r * inv[:, None] + _f32((levels + 1) / 2, r)
    t = torch.where(t > 0, t, torch.zeros_like(t))
    t = torch.where(t < levels, t, torch.full_like(t, levels))
    q = torch.floor(t)
    q = torch.where(bad[:, None], torch.zeros_like(q), q)
    # All GROUP rotated values of the tail group are stored: each one carries part of
    # every input value of the group.
    meta = torch.stack([step_bits, mean_bits], dim=1)
    meta = torch.where(bad[:, None], torch.full_like(meta, NAN_BITS[torch.bfloat16]), meta)
    return pack_codes(q, bits), meta.to(torch.int16).view(torch.bfloat16)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of whole groups (any shape, GROUP values per group) -> uint8 payload, value i
    at bit ``(i % (8 // bits)) * bits`` of byte ``i // (8 // bits)``."""
    per_byte = 8 // bits
    q = q.to(torch.int32).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, device=q.device, dtype=torch.int32) * bits
    return (q << shifts).sum(dim=1).to(torch.uint8)


def dequantize_rotated(payload: torch.Tensor, meta: torch.Tensor, n: int, bits: int, seed: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_rotated` (the seed gives the same signs)."""
    if n == 0:
        return torch.empty(0, dtype=dtype, device=payload.device)
    if bits == 0:
        return dequantize_half(payload, meta, n, seed, dtype)
    ng = meta.shape[0]
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=payload.device, dtype=torch.int32) * bits
    q = (payload.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    q = q.reshape(ng, GROUP)
    step, mean = meta[:, 0].to(torch.float32), meta[:, 1].to(torch.float32)
    levels = (1 << bits) - 1
    r = (q.to(torch.float32) - _f32(levels / 2, step)) * step[:, None]
    v = unrotate_groups(r, mean, seed)
    nan = torch.isnan(step)[:, None].expand(ng, GROUP).reshape(-1)[:n]
    return with_nan_pattern(v.reshape(-1)[:n].to(dtype), nan)


# -- h05: the sign code on a random half of the rotated values ------------------------
#
# Per block of 2 * GROUP values (two groups; the tail block padded with zeros): subtract
# the block mean (bfloat16, round to nearest, of (tree sum of group 0 + tree sum of group
# 1) * 1/256), flip the signs and rotate each group as the rotated formats do, then keep
# only rotated values 0..63 of each group as a sign code: GROUP kept values in the order
# (group 0's, group 1's), summed |r| in the tree of :func:`_tree_sum`, step = 2 * mean|r|
# rounded to nearest (h1's rule), code floor(clamp(r / step + 1, 0, 1)). The other half
# decodes as 0. Metadata: one (step, mean) per block; 0.625 stored bits per element, as
# average quantization. The seed changes the sign flips every step, so the half-space
# that is dropped changes too (its expectation is half the identity): average
# quantization drops the same three quarters of every tensor at every step.


def quantize_half(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nb = -(-n // (2 * GROUP))
    v = torch.cat([x.to(torch.float32), x.new_zeros(nb * 2 * GROUP - n, dtype=torch.float32)])
    v = v.view(nb * 2, GROUP)
    sums = _tree_sum(v).view(nb, 2)
    mean_bits = _bf16_bits_nearest((sums[:, 0] + sums[:, 1]) * _f32(1.0 / (2 * GROUP), v))
    v = v - _bf16_from_bits(mean_bits).repeat_interleave(2)[:, None]
    v = torch.where(rotation_signs(seed, x.device), -v, v)
    r = _fwht(v).view(nb, 2, GROUP)
    finite = torch.isfinite(r).all(dim=2).all(dim=1)
    kept = r[:, :, :HALF].reshape(nb, GROUP)
    mean_abs = _tree_sum(kept.abs()) * _f32(1.0 / GROUP, v)
    step_bits = _bf16_bits_nearest(mean_abs + mean_abs)
    step = _bf16_from_bits(step_bits)
    bad = ~finite | ~torch.isfinite(step)
    ones = torch.ones_like(step)
    inv = ones / torch.where(step == 0, ones, step)
    t = kept * inv[:, None] + _f32(1.0, v)
    t = torch.where(t > 0, t, torch.zeros_like(t))
    t = torch.where(t < 1, t, torch.ones_like(t))
    q = torch.where(bad[:, None], torch.zeros_like(t), torch.floor(t))
    meta = torch.stack([step_bits, mean_bits], dim=1)
    meta = torch.where(bad[:, None], torch.full_like(meta, NAN_BITS[torch.bfloat16]), meta)
    return pack_codes(q, 1), meta.to(torch.int16).view(torch.bfloat16)


def dequantize_half(payload: torch.Tensor, meta: torch.Tensor, n: int, seed: int,
                    dtype: torch.dtype) -> torch.Tensor:
    nb = meta.shape[0]
    shifts = torch.arange(8, device=payload.device, dtype=torch.int32)
    q = ((payload.to(torch.int32)[:, None] >> shifts) & 1).reshape(nb, 2, HALF)
    step, mean = meta[:, 0].to(torch.float32), meta[:, 1].to(torch.float32)
    r = torch.zeros(nb, 2, GROUP, dtype=torch.float32, device=payload.device)
    r[:, :, :HALF] = (q.to(torch.float32) - _f32(0.5, step)) * step[:, None, None]
    v = unrotate_groups(r.view(nb * 2, GROUP), mean.repeat_interleave(2), seed)
    nan = torch.isnan(step)[:, None].expand(nb, 2 * GROUP).reshape(-1)[:n]
    return with_nan_pattern(v.reshape(-1)[:n].to(dtype), nan)

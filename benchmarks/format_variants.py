"""Experimental rotated-rung variants, for benchmarks/finetune.py --variant (issue 25).

They patch the pure-torch reference codec (so the rows that use them run with
``backend="reference"``); the C++/CUDA kernels do not have them. Kept so that the
fine-tune table's rows for them can be run again:

* ``lm2``: the 2-bit rung with Lloyd-Max levels for a Gaussian (+-0.4528, +-1.510) times
  the group's RMS, round to nearest (MSE 0.116 sigma^2 against 0.306 for the covering
  step; it clips beyond 1.51 RMS);
* ``unb1``: the 1-bit sign code with levels +-sum(r^2)/sum|r| instead of +-mean|r| (the
  reconstruction no longer shrinks: E[x_hat x] = E[x^2]; MSE 0.56 against 0.36);
* ``rd`` / ``rdu`` / ``rd@B``: not codes but the rate-distortion bound's test channel at
  every rung's stored bits (below): the ceiling any code of the same size could reach.

Metadata as the registry's formats: a bfloat16 (step, mean) per group of 128. The rotation
and the bit packing are the reference codec's own (``rotate_groups``, ``pack_codes``).
"""
from __future__ import annotations

import contextlib

import torch

from alam_dist.codec import reference as R
from alam_dist.codec.formats import LADDERS

# kernel bits (what the reference codec's rotated functions take; 0 is h05) -> stored bits
# per element, metadata included: the registry's, the one source of format sizes
_STORED_BITS = {f.kernel_bits: f.stored_bits for f in LADDERS["rotated"].values()}

VARIANTS = ("lm2", "unb1", "rd", "rdu")  # rd@B: the ideal channel at kernel bits B only
_LM2 = (-1.510, -0.4528, 0.4528, 1.510)
_LM2_THRESHOLDS = (-0.9816, 0.0, 0.9816)


def _meta(step_bits: torch.Tensor, mean_bits: torch.Tensor) -> torch.Tensor:
    return torch.stack([step_bits, mean_bits], dim=1).to(torch.int16).view(torch.bfloat16)


@contextlib.contextmanager
def variant(name: str):
    """Within: the reference codec's rotated rungs with ``name``'s change."""
    base, _, only = name.partition("@")
    kernel_bits = [str(b) for b in sorted(_STORED_BITS)]
    if base not in VARIANTS or (only and (base != "rd" or only not in kernel_bits)):
        raise ValueError(f"--variant {name!r}; choose one of {VARIANTS}, or rd@B "
                         f"(B: {' '.join(kernel_bits)})")
    if base in ("rd", "rdu"):
        with ideal_channel(unbiased=base == "rdu", only=int(only) if only else None) as stats:
            yield stats
        return
    quantize, dequantize = R.quantize_rotated, R.dequantize_rotated
    bits_changed = 2 if name == "lm2" else 1

    def q(x, bits, seed):
        if bits != bits_changed or x.numel() == 0 or not torch.isfinite(x).all():
            return quantize(x, bits, seed)
        r, mean_bits = R.rotate_groups(x, seed)
        if name == "lm2":
            step_bits = R._bf16_bits_nearest(r.pow(2).mean(dim=1).sqrt())
            step = R._bf16_from_bits(step_bits)
            z = r / torch.where(step == 0, torch.ones_like(step), step)[:, None]
            codes = torch.bucketize(z, torch.tensor(_LM2_THRESHOLDS, device=z.device))
            return R.pack_codes(codes, 2), _meta(step_bits, mean_bits)
        level = r.pow(2).sum(dim=1) / r.abs().sum(dim=1).clamp_min(1e-30)
        return R.pack_codes(r > 0, 1), _meta(R._bf16_bits_nearest(level + level), mean_bits)

    def d(payload, meta, n, bits, seed, dtype):
        if bits != 2 or name != "lm2" or n == 0 or torch.isnan(meta.float()).any():
            return dequantize(payload, meta, n, bits, seed, dtype)  # unb1 decodes as h1
        shifts = torch.arange(4, dtype=torch.int32, device=payload.device) * 2
        codes = ((payload.to(torch.int32)[:, None] >> shifts) & 3).reshape(meta.shape[0], R.GROUP)
        r = torch.tensor(_LM2, device=codes.device)[codes.long()] * meta[:, 0].float()[:, None]
        return R.unrotate_groups(r, meta[:, 1].float(), seed).reshape(-1)[:n].to(dtype)

    with _patched(q, d):
        yield


@contextlib.contextmanager
def _patched(quantize, dequantize):
    """Within: the reference codec's rotated functions are ``quantize`` / ``dequantize``."""
    saved = R.quantize_rotated, R.dequantize_rotated
    R.quantize_rotated, R.dequantize_rotated = quantize, dequantize
    try:
        yield
    finally:
        R.quantize_rotated, R.dequantize_rotated = saved


# -- the rate-distortion ceiling --------------------------------------------------------
#
# ``rd`` / ``rdu`` are not codes: they ask what *any* code could do at the bits our rungs
# store. For a Gaussian source of variance s^2 the least mean-square error at R bits per
# value is D = s^2 2^(-2R) (Shannon); its test channel reconstructs
# x_hat = mu + a (x - mu) + sqrt(a D) z with a = 1 - 2^(-2R) and z fresh N(0, 1) noise
# (``rd``: the MMSE reconstruction, which shrinks towards the mean), and the unbiased
# version at the least variance is x_hat = x + sqrt(D / a) z (``rdu``). R is each rung's
# *stored* bits, metadata included (0.625, 1.25, 2.25, 4.25, 8.25), s^2 and mu each group
# of 128 values' own, and z is drawn from the tensor's per-step seed, so the noise is fresh
# every step as our rungs' rotations are. The real code still runs (its bytes are what the
# memory report counts); decode returns the channel's output instead. A row with it is a
# ceiling for the formats: the held-out cost of the allocator's plan if every rung were a
# perfect Gaussian code of the same size. ``rd@B`` makes one rung ideal (kernel bits B;
# 0 is h05) and leaves the others real: which rung's distance from the bound costs most.

@contextlib.contextmanager
def ideal_channel(unbiased: bool, only: int | None = None):
    import collections
    quantize, dequantize = R.quantize_rotated, R.dequantize_rotated
    outputs: collections.OrderedDict = collections.OrderedDict()
    stats = {"encoded": 0, "decoded_ideal": 0, "decoded_real": 0}

    def q(x, bits, seed):
        payload, meta = quantize(x, bits, seed)
        if x.numel() == 0 or (only is not None and bits != only) or not torch.isfinite(x).all():
            return payload, meta
        n = x.numel()
        ng = -(-n // R.GROUP)
        v = torch.cat([x.to(torch.float32), x.new_zeros(ng * R.GROUP - n, dtype=torch.float32)])
        v = v.view(ng, R.GROUP)
        mu = v.mean(dim=1, keepdim=True)
        var = (v - mu).pow(2).mean(dim=1, keepdim=True)
        shrink = 1.0 - 2.0 ** (-2 * _STORED_BITS[bits])
        dist = var * (1.0 - shrink)
        gen = torch.Generator(device=x.device).manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        z = torch.randn(v.shape, generator=gen, device=x.device)
        if unbiased:
            out = v + (dist / shrink).sqrt() * z
        else:
            out = mu + shrink * (v - mu) + (shrink * dist).sqrt() * z
        outputs[(seed, n, bits)] = out.reshape(-1)[:n]
        while len(outputs) > 512:  # a step's packs are decoded in its backward
            outputs.popitem(last=False)
        stats["encoded"] += 1
        return payload, meta

    def d(payload, meta, n, bits, seed, dtype):
        out = outputs.get((seed, n, bits))
        if out is None:
            stats["decoded_real"] += 1
            return dequantize(payload, meta, n, bits, seed, dtype)
        stats["decoded_ideal"] += 1
        return out.to(dtype)

    with _patched(q, d):
        yield stats

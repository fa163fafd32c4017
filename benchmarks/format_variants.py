"""Experimental rotated-rung variants, for benchmarks/finetune.py --variant (issue 25).

They patch the pure-torch reference codec (so the rows that use them run with
``backend="reference"``); the C++/CUDA kernels do not have them. Kept so that the
fine-tune table's rows for them can be run again:

* ``lm2``: the 2-bit rung with Lloyd-Max levels for a Gaussian (+-0.4528, +-1.510) times
  the group's RMS, round to nearest (MSE 0.116 sigma^2 against 0.306 for the covering
  step; it clips beyond 1.51 RMS);
* ``unb1``: the 1-bit sign code with levels +-sum(r^2)/sum|r| instead of +-mean|r| (the
  reconstruction no longer shrinks: E[x_hat x] = E[x^2]; MSE 0.56 against 0.36).

Metadata as the registry's formats: a bfloat16 (step, mean) per group of 128. The rotation
and the bit packing are the reference codec's own (``rotate_groups``, ``pack_codes``).
"""
from __future__ import annotations

import contextlib

import torch

from alam_dist.codec import reference as R

VARIANTS = ("lm2", "unb1")
_LM2 = (-1.510, -0.4528, 0.4528, 1.510)
_LM2_THRESHOLDS = (-0.9816, 0.0, 0.9816)


def _meta(step_bits: torch.Tensor, mean_bits: torch.Tensor) -> torch.Tensor:
    return torch.stack([step_bits, mean_bits], dim=1).to(torch.int16).view(torch.bfloat16)


@contextlib.contextmanager
def variant(name: str):
    """Within: the reference codec's rotated rungs with ``name``'s change."""
    if name not in VARIANTS:
        raise ValueError(f"--variant {name!r}; choose one of {VARIANTS}")
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

    R.quantize_rotated, R.dequantize_rotated = q, d
    try:
        yield
    finally:
        R.quantize_rotated, R.dequantize_rotated = quantize, dequantize

"""Rotated formats (h05/h1/h2/h4/h8): bit-identity across backends, error bounds, special
values, and the memory they count."""
import math

import pytest
import torch

from alam_dist import codec
from alam_dist.codec import reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
RBITS = [0.5, 1, 2, 4, 8]
UNIT = {0.5: 256}  # elements one (step, mean) covers: h05 blocks are two groups
ODD_SIZES = [0, 1, 3, 127, 128, 129, 511, 1000, 4099]
needs_cpp = pytest.mark.skipif(not codec.available_backends()["cpp"], reason="C++ kernels not built")
needs_cuda = pytest.mark.skipif(not codec.available_backends()["cuda"], reason="no CUDA device")


def _bits_view(t):
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _sample(n, dtype, seed=0, outlier=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2 + 0.25
    if n > 300:
        x[130:260] = 1.25  # a constant group
        if outlier:
            x[5] = 150.0  # an outlier channel's value
    return x.to(dtype)


def _special(dtype):
    """Groups holding NaN, +inf, -inf, only zeros (some negative), and huge values."""
    big = {torch.float16: 6e4, torch.bfloat16: 3e38, torch.float32: 3e38}[dtype]
    x = torch.randn(128 * 6)
    x[3] = float("nan")
    x[128 + 7] = float("inf")
    x[256 + 9] = -float("inf")
    x[384:512] = 0.0
    x[384:512:2] = -0.0
    x[512:640] = big  # the rotated sum overflows fp32: a NaN group, like inf
    return x.to(dtype)


def _same(a: codec.PackedTensor, b: codec.PackedTensor) -> None:
    assert a.format == b.format
    assert torch.equal(a.data.cpu(), b.data.cpu()), "payload"
    assert torch.equal(_bits_view(a.meta.cpu()), _bits_view(b.meta.cpu())), "meta"


@needs_cpp
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", RBITS)
def test_cpp_is_bit_identical_to_reference(dtype, bits):
    for n in ODD_SIZES:
        x = _sample(n, dtype, seed=n)
        ref = codec.encode(x, bits, seed=n * 5 + 3, backend="reference", formats="rotated")
        cpp = codec.encode(x, bits, seed=n * 5 + 3, backend="cpp", formats="rotated")
        _same(ref, cpp)
        assert torch.equal(_bits_view(codec.decode(ref, backend="reference")),
                           _bits_view(codec.decode(cpp, backend="cpp"))), (n, "decode")


@needs_cpp
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", RBITS)
def test_special_values_are_contained_and_bit_identical(dtype, bits):
    x = _special(dtype)
    ref = codec.encode(x, bits, seed=4, backend="reference", formats="rotated")
    cpp = codec.encode(x, bits, seed=4, backend="cpp", formats="rotated")
    _same(ref, cpp)
    out = codec.decode(ref, backend="reference")
    assert torch.equal(_bits_view(out), _bits_view(codec.decode(cpp, backend="cpp")))
    nan_bits = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}[dtype]
    if bits == 0.5:  # blocks of two groups: (NaN, inf), (-inf, zeros), (huge, finite)
        blocks = out.view(-1, 256)
        for b in (0, 1) + ((2,) if dtype != torch.float16 else ()):
            assert bool((_bits_view(blocks[b]) == nan_bits).all()), b
        if dtype == torch.float16:
            assert bool(torch.isfinite(blocks[2]).all()), "a finite block was poisoned"
        return
    groups = out.view(-1, 128)
    # NaN, +inf, -inf, and (fp32/bf16 range) a rotated sum that overflows: the whole
    # group is the NaN pattern
    for g in (0, 1, 2) + ((4,) if dtype != torch.float16 else ()):
        assert bool((_bits_view(groups[g]) == nan_bits).all()), g
    assert bool(torch.isfinite(groups[5]).all()), "a finite group was poisoned"
    assert bool((groups[3] == 0).all()), "an all-zero group must decode to zeros"


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("bits", RBITS)
def test_error_is_bounded_by_the_step(backend, bits):
    """Each rotated value is off by at most half a step (b >= 2: the step covers the
    group), and the inverse rotation is orthogonal up to the factor 128, so a group's
    error energy is at most 128 * (step/2)**2 / 128."""
    x = _sample(4096, torch.float32, seed=int(bits * 2))
    p = codec.encode(x, bits, seed=1, backend=backend, formats="rotated")
    y = codec.decode(p, backend=backend)
    err = (y - x).view(-1, 128).pow(2).sum(dim=1)
    step = p.meta[:, 0].float()
    if bits >= 2:
        bound = 128 * (step / 2) ** 2 / 128 * 1.0001 + 1e-12  # ||H e||^2 / 128^2 * 128
        assert bool((err <= bound).all())
    rel = float((y - x).pow(2).sum() / x.pow(2).sum())
    # Gaussian-like groups after rotation: 1-bit ~0.36, 2-bit ~0.3 relative MSE; h05
    # drops half the rotated energy and sign-codes the rest (~0.68)
    assert rel < {0.5: 0.75, 1: 0.45, 2: 0.36, 4: 0.02, 8: 1e-4}[bits], rel


def test_outlier_channel_does_not_flatten_its_group():
    """The seed's min/max groups round most of a group holding one huge value to 0 or
    +-step; rotated groups keep the rest of the group."""
    x = torch.randn(64, 128)
    x[:, 7] = 200.0  # one channel, every token
    seed_fmt = codec.decode(codec.encode(x, 2, seed=1))
    rotated = codec.decode(codec.encode(x, 2, seed=1, formats="rotated"))
    rest = torch.ones(128, dtype=torch.bool)
    rest[7] = False

    def rel(y):
        return float((y[:, rest] - x[:, rest]).pow(2).sum() / x[:, rest].pow(2).sum())
    assert rel(rotated) < 0.5 * rel(seed_fmt)


def test_seed_changes_signs_and_repeats():
    x = _sample(1000, torch.float32)
    a = codec.encode(x, 2, seed=1, formats="rotated")
    b = codec.encode(x, 2, seed=1, formats="rotated")
    c = codec.encode(x, 2, seed=2, formats="rotated")
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    # decoding uses the seed the tensor was encoded with
    assert torch.equal(codec.decode(a), codec.decode(b))


@pytest.mark.parametrize("bits", RBITS)
def test_bits_per_element_counts_the_bf16_step_and_mean(bits):
    x = torch.randn(128 * 1000)
    p = codec.encode(x, bits, formats="rotated")
    unit = UNIT.get(bits, 128)
    assert p.format == ("h05" if bits == 0.5 else f"h{bits}")
    assert math.isclose(p.bits_per_element, bits + 32 / unit)
    # a tail group (block) stores all its rotated values (h05: 128 signs)
    q = codec.encode(torch.randn(unit + 1), bits, formats="rotated")
    assert q.data.numel() == 2 * 128 * max(bits, 1) // 8  # h05: 128 signs per block
    assert q.meta.shape == (2, 2)


def test_rotated_family_names_and_errors():
    assert codec.encode(torch.randn(1000), 0.5, formats="rotated").format == "h05"
    assert codec.encode(torch.randn(1000), 0.5).format == "aq"
    assert codec.encode(torch.randn(1000), 1, formats="rotated").format == "h1"
    assert codec.encode(torch.randn(1000), 1).format == "aq"  # the seed's alias
    with pytest.raises(ValueError, match="not a supported rotated format"):
        codec.encode(torch.randn(10), 3, formats="rotated")
    with pytest.raises(ValueError, match="formats="):
        codec.encode(torch.randn(10), 2, formats="hadamard")
    p = codec.encode(torch.randn(1000), 2, formats="rotated")
    bad = codec.PackedTensor(p.format, p.shape, p.dtype, p.device, p.data[:-1], p.meta)
    with pytest.raises(ValueError, match="payload"):
        codec.decode(bad)
    bad = codec.PackedTensor(p.format, p.shape, p.dtype, p.device, p.data, p.meta.float())
    with pytest.raises(ValueError, match="meta"):
        codec.decode(bad)


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", RBITS)
def test_cuda_is_bit_identical_to_reference(dtype, bits):
    for n in ODD_SIZES + [1 << 20]:
        x = _sample(n, dtype, seed=n).cuda()
        ref = codec.encode(x.cpu(), bits, seed=9, backend="reference", formats="rotated")
        dev = codec.encode(x, bits, seed=9, backend="cuda", formats="rotated")
        _same(ref, dev)
        assert torch.equal(_bits_view(codec.decode(ref, backend="reference")),
                           _bits_view(codec.decode(dev, backend="cuda").cpu())), (n, "decode")


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", RBITS)
def test_cuda_special_values_are_bit_identical(dtype, bits):
    x = _special(dtype)
    ref = codec.encode(x, bits, seed=4, backend="reference", formats="rotated")
    dev = codec.encode(x.cuda(), bits, seed=4, backend="cuda", formats="rotated")
    _same(ref, dev)
    assert torch.equal(_bits_view(codec.decode(ref, backend="reference")),
                       _bits_view(codec.decode(dev, backend="cuda").cpu()))


def test_h05_keeps_every_direction_in_expectation():
    """h05 drops half of each block's rotated values, a different half-space for every
    seed: over seeds its reconstruction points along x (the sign code shrinks it), where
    average quantization drops the same three quarters of x for every seed (its
    expectation is the local mean). Same stored bits."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for fam, lowest, highest in (("rotated", 0.95, 1.0), ("minmax", 0.0, 0.7)):
        ys = [codec.decode(codec.encode(x, 0.5, seed=s, formats=fam)) for s in range(64)]
        cos = float(torch.nn.functional.cosine_similarity(torch.stack(ys).mean(0), x, dim=0))
        assert lowest < cos < highest, (fam, cos)
    h05 = codec.encode(x, 0.5, formats="rotated")
    aq = codec.encode(x, 0.5)
    assert h05.nbytes == aq.nbytes  # 0.625 bits per element each
    assert float((codec.decode(h05) - x).pow(2).mean()) < 0.8 * float((codec.decode(aq) - x).pow(2).mean())

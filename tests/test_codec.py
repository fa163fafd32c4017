"""Codec: formats, bit-identity across backends, statistics, and bad input."""
import pytest
import torch

from alam_dist import codec
from alam_dist.codec import reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
QBITS = [0.5, 2, 4, 8]
ODD_SIZES = [1, 3, 4, 5, 127, 128, 129, 511, 513, 1000, 4099]
needs_cpp = pytest.mark.skipif(not codec.available_backends()["cpp"], reason="C++ kernels not built")
needs_cuda = pytest.mark.skipif(not codec.available_backends()["cuda"], reason="no CUDA device")


def _sample(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3 + 0.5
    if n > 300:
        x[130:260] = 1.25  # a constant group
    return x.to(dtype)


def _bits_view(t):
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _step(packed):
    """Per-element quantization step (scale) of a quantized PackedTensor."""
    per_group = 512 if packed.format == "aq" else 128
    return packed.meta[:, 1].repeat_interleave(per_group)[: packed.numel]


def _target(x, bits):
    """What the format aims at: x, or for AQ the mean of each 4-value block."""
    if bits != 0.5:
        return x.float()
    return reference.average(x.reshape(-1)).repeat_interleave(4)[: x.numel()].view(x.shape)


@needs_cpp
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", QBITS)
def test_cpp_is_bit_identical_to_reference(dtype, bits):
    for n in ODD_SIZES:
        x = _sample(n, dtype, seed=n)
        ref = codec.encode(x, bits, seed=n * 7 + 1, backend="reference")
        cpp = codec.encode(x, bits, seed=n * 7 + 1, backend="cpp")
        assert torch.equal(ref.data, cpp.data), (n, "payload")
        assert torch.equal(_bits_view(ref.meta), _bits_view(cpp.meta)), (n, "meta")
        out_ref = codec.decode(ref, backend="reference")
        out_cpp = codec.decode(cpp, backend="cpp")
        assert torch.equal(_bits_view(out_ref), _bits_view(out_cpp)), (n, "decode")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_masks_pack_losslessly_and_identically(dtype):
    for n in [1, 7, 8, 9, 63, 1001]:
        x = torch.rand(n) > 0.3
        x = x.to(dtype)
        for backend in ("reference", "cpp"):
            p = codec.encode(x, 32, backend=backend)
            assert p.format == "mask" and p.nbytes == (n + 7) // 8
            y = codec.decode(p, backend=backend)
            assert y.dtype == dtype and torch.equal(y, x)
        assert torch.equal(codec.encode(x, 2, backend="reference").data,
                           codec.encode(x, 2, backend="cpp").data)


def test_uint8_that_is_not_a_mask_is_kept_losslessly():
    x = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    p = codec.encode(x, 0.5)
    assert p.format == "raw" and torch.equal(codec.decode(p), x)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", QBITS)
def test_round_trip_error_is_within_one_step(backend, dtype, bits):
    x = _sample(5000, dtype).view(50, 100)
    p = codec.encode(x, bits, seed=3, backend=backend)
    y = codec.decode(p, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    err = (y.float() - _target(x, bits)).abs().reshape(-1)
    # one quantization step, plus the output dtype's own rounding
    slack = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    bound = _step(p) * (1 + 1e-5) + slack * y.float().abs().reshape(-1) + 1e-6
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("bits", QBITS)
def test_stochastic_rounding_is_unbiased(bits):
    x = _sample(1024, torch.float32, seed=11)
    seeds = 400
    acc = torch.zeros(1024, dtype=torch.float64)
    for s in range(seeds):
        acc += codec.decode(codec.encode(x, bits, seed=s)).double()
    mean = acc / seeds
    step = _step(codec.encode(x, bits, seed=0)).double()
    # each decode is within one step and unbiased: std of one <= step/2, of the mean
    # <= step/(2*sqrt(seeds)); 6 sigma over 1024 elements essentially never fails.
    bound = 6 * step / (2 * seeds ** 0.5) + 1e-7
    assert bool(((mean - _target(x, bits).double()).abs() <= bound).all())


def test_seeds_change_rounding_and_same_seed_repeats():
    x = _sample(4096, torch.bfloat16)
    a, b, c = (codec.encode(x, 2, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)


@needs_cpp
def test_hash_matches_between_python_and_cpp():
    from alam_dist import _native
    idx = torch.tensor([0, 1, 2, 1000, 2 ** 32 - 1, 2 ** 32, 2 ** 33 + 5])
    for seed in (0, 1, 2 ** 63 + 12345):
        ref = reference.hash_uniform(seed, idx)
        cpp = torch.tensor([_native.cpu.hash_uniform(seed, int(i)) for i in idx])
        assert torch.equal(ref, cpp)
        assert bool(((ref >= 0) & (ref < 1)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bits_per_element_targets(dtype):
    x = torch.randn(1 << 20).to(dtype)
    assert codec.encode(x, 0.5).bits_per_element <= 0.63
    assert codec.encode(x, 2).bits_per_element <= 2.6
    assert codec.encode(x, 4).bits_per_element <= 4.6
    assert codec.encode(x, 8).bits_per_element <= 8.6
    assert codec.encode(x, 16).nbytes == x.numel() * 2
    assert codec.encode(x, 32).nbytes == x.numel() * x.element_size()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_constant_groups_decode_exactly(backend):
    for value in (0.0, -3.75, 1e30):
        x = torch.full((1000,), value)
        for bits in QBITS:
            assert torch.equal(codec.decode(codec.encode(x, bits, backend=backend), backend=backend), x)


def test_fp16_wide_range_does_not_overflow():
    x = torch.tensor([-60000.0, 60000.0] * 64, dtype=torch.float16)
    p = codec.encode(x, 8)
    y = codec.decode(p)
    assert torch.isfinite(y).all()
    assert float((y.float() - x.float()).abs().max()) <= float(p.meta[0, 1]) + 64


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_nonfinite_values_poison_only_their_group(backend):
    x = torch.randn(128 * 4)
    x[130] = float("nan")
    x[300] = float("inf")
    for bits in (2, 8):
        y = codec.decode(codec.encode(x, bits, backend=backend), backend=backend)
        assert torch.isnan(y[128:256]).all() and torch.isnan(y[256:384]).all()
        assert torch.isfinite(y[:128]).all() and torch.isfinite(y[384:]).all()


def _special_values(dtype, seed=0) -> torch.Tensor:
    """Groups of 128 that are hard to get bit-identical: NaN, ±inf, all ±0 (with the sign
    of zero mixed), denormals only, a denormal range beside 0, and ordinary values."""
    g = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(dtype).smallest_normal
    groups = [
        torch.randn(128, generator=g),                       # ordinary
        torch.where(torch.arange(128) == 5, float("nan"), 1.0),
        torch.where(torch.arange(128) == 77, float("inf"), -2.0),
        torch.where(torch.arange(128) == 0, float("-inf"), 3.0),
        torch.full((128,), -0.0),                            # all -0
        torch.where(torch.arange(128) % 3 == 0, -0.0, 0.0),  # ±0 mixed, -0 first
        torch.where(torch.arange(128) % 3 == 0, 0.0, -0.0),  # ±0 mixed, +0 first
        torch.rand(128, generator=g) * tiny * 0.5,           # denormals only
        torch.where(torch.arange(128) % 2 == 0, 0.0, tiny * 0.25),
        torch.randn(128, generator=g) * 1e-3,
    ]
    return torch.cat(groups).to(dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", QBITS)
def test_special_values_are_bit_identical_across_backends(dtype, bits):
    """NaN/inf groups, signed zeros and denormal-only groups: same bytes, same metadata
    bits, same decoded bits (one NaN pattern per dtype) on every CPU backend."""
    # AQ averages 4 values per mean: stretch each 128-group so its means stay special
    x = _special_values(dtype)
    if bits == 0.5:
        x = x.repeat_interleave(4)
    for n in (x.numel(), x.numel() - 3):  # and a tail that is not a multiple of 4 or 128
        ref = codec.encode(x[:n], bits, seed=21, backend="reference")
        cpp = codec.encode(x[:n], bits, seed=21, backend="cpp")
        assert torch.equal(ref.data, cpp.data), "payload"
        assert torch.equal(_bits_view(ref.meta), _bits_view(cpp.meta)), "meta"
        out_ref, out_cpp = codec.decode(ref, backend="reference"), codec.decode(cpp, backend="cpp")
        assert torch.equal(_bits_view(out_ref), _bits_view(out_cpp)), "decode"
    # the documented NaN pattern of each dtype, and no negative zero in the metadata
    nan_bits = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}[dtype]
    nan_out = _bits_view(out_ref)[torch.isnan(out_ref)]
    assert nan_out.numel() > 0 and bool((nan_out == nan_bits).all())
    meta_bits = _bits_view(ref.meta)
    assert not bool((meta_bits == -2 ** 31).any()), "a -0.0 min or scale in the metadata"
    # a denormal-only group (1/scale overflows) stays inside its range instead of
    # collapsing to 0 (the C++ kernel's (int)inf once made every value 0)
    if bits != 0.5 and dtype == torch.float32:
        den, y = x[128 * 7:128 * 8], out_ref[128 * 7:128 * 8]
        step = float(ref.meta[7, 1])  # denormal arithmetic rounds: one step of slack
        assert bool((y >= den.min() - step).all() and (y <= den.max() + step).all())
        assert bool((y > 0).all())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_empty_and_non_contiguous_inputs(backend):
    for bits in QBITS:
        e = codec.decode(codec.encode(torch.empty(0, 3), bits, backend=backend), backend=backend)
        assert e.shape == (0, 3)
    base = _sample(64 * 48, torch.float32).view(64, 48)
    nc = base.t()[:, ::2]
    assert not nc.is_contiguous()
    a = codec.encode(nc, 4, seed=5, backend=backend)
    b = codec.encode(nc.contiguous(), 4, seed=5, backend=backend)
    assert torch.equal(a.data, b.data) and codec.decode(a, backend=backend).shape == nc.shape


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp),
                                     pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("formats", ["minmax", "rotated"])
def test_encoder_is_encode_with_its_choices_made_once(backend, formats):
    """The hooks' fast path gives encode's PackedTensor byte for byte, and decoding it with
    the encoder's backend (unvalidated) gives decode's tensor."""
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    base = _sample(6 * 129 * 5, torch.float32, seed=3).view(6, 129, 5)
    inputs = [base[0, :5, 0], base[:3].reshape(3, -1), base, base.transpose(0, 2)]  # odd, 3-D,
    for bits in [b for b in codec.allowed_bits(formats) if b < 16]:          # non-contiguous
        encoder = codec.Encoder(bits, formats, backend, device)
        for dtype in FLOATS:
            for x in inputs:
                x = x.to(device=device, dtype=dtype)
                got = encoder(x, 2**63 + 11)
                want = codec.encode(x, bits, seed=2**63 + 11, backend=backend, formats=formats)
                assert (got.format, got.shape, got.dtype, got.seed) == \
                    (want.format, want.shape, want.dtype, want.seed)
                assert torch.equal(got.data, want.data) and torch.equal(
                    _bits_view(got.meta), _bits_view(want.meta)), (bits, dtype, x.shape)
                assert torch.equal(_bits_view(codec.decode(got, impl=encoder.impl)),
                                   _bits_view(codec.decode(want, backend=backend)))
    with pytest.raises(ValueError, match="keeps the tensor"):
        codec.Encoder(16, formats, backend, device)
    with pytest.raises(ValueError, match="allowed values"):
        codec.Encoder(3, formats, backend, device)


def test_16_and_32_bit_formats():
    x = _sample(1000, torch.float32)
    p16 = codec.encode(x, 16)
    assert p16.format == "bf16" and codec.decode(p16).dtype == torch.float32
    assert torch.equal(codec.decode(p16), x.to(torch.bfloat16).float())
    assert codec.decode(codec.encode(x, 32)) is x
    xb = x.to(torch.bfloat16)
    assert codec.encode(xb, 16).format == "raw"


def test_seed_alias_one_means_average_quantization():
    x = _sample(1000, torch.float32)
    assert codec.encode(x, 1).format == "aq"
    assert torch.equal(codec.encode(x, 1, seed=4).data, codec.encode(x, 0.5, seed=4).data)


@pytest.mark.parametrize("bits", [3, 0, 0.25, 64, -2, True, "2", None])
def test_bad_bits_name_the_allowed_values(bits):
    with pytest.raises(ValueError, match=r"0\.5, 2, 4, 8, 16, 32"):
        codec.encode(torch.randn(10), bits)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="backend"):
        codec.encode(torch.randn(10), 2, backend="tpu")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        codec.encode(torch.arange(10), 2)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        codec.encode(torch.randn(10, dtype=torch.float64), 4)
    with pytest.raises(TypeError):
        codec.encode([1.0, 2.0], 2)
    with pytest.raises(TypeError):
        codec.decode(torch.randn(3))
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="cuda"):
            codec.encode(torch.randn(10), 2, backend="cuda")
    assert codec.encode(torch.arange(10), 32).format == "raw"


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", QBITS)
def test_cuda_is_bit_identical_to_reference(dtype, bits):
    for n in ODD_SIZES + [1 << 20]:
        x = _sample(n, dtype, seed=n).cuda()
        ref = codec.encode(x.cpu(), bits, seed=9, backend="reference")
        dev = codec.encode(x, bits, seed=9, backend="cuda")
        assert torch.equal(ref.data, dev.data.cpu()), (n, "payload")
        assert torch.equal(_bits_view(ref.meta), _bits_view(dev.meta.cpu())), (n, "meta")
        assert torch.equal(_bits_view(codec.decode(ref, backend="reference")),
                           _bits_view(codec.decode(dev, backend="cuda").cpu())), (n, "decode")


@needs_cuda
def test_cuda_masks():
    for n in [1, 9, 1001, 1 << 20]:
        x = (torch.rand(n) > 0.5).cuda()
        p = codec.encode(x, 2, backend="cuda")
        assert torch.equal(p.data.cpu(), reference.pack_mask(x.cpu()))
        assert torch.equal(codec.decode(p, backend="cuda"), x)


def test_decode_rejects_packed_tensors_it_did_not_make():
    from dataclasses import replace
    x = _sample(1000, torch.bfloat16)
    p = codec.encode(x, 4, seed=1)
    bad = {
        "payload holds": replace(p, data=p.data[:-1]),
        "meta holds": replace(p, meta=p.meta[:-1]),
        "not contiguous": replace(p, data=torch.stack([p.data, p.data], 1)[:, 0]),
        "dtype torch.int8": replace(p, data=p.data.view(torch.int8)),
        "is on meta": replace(p, data=torch.empty_like(p.data, device="meta")),
        "unknown format": replace(p, format="q3"),
        "not a tensor": replace(p, meta=None),
    }
    for problem, packed in bad.items():
        with pytest.raises(ValueError, match=problem):
            codec.decode(packed)
    m = codec.encode(torch.rand(100) > 0.5, 32)
    with pytest.raises(ValueError, match="payload holds 12 elements, the format needs 13"):
        codec.decode(replace(m, data=m.data[:12]))
    assert torch.equal(codec.decode(p), codec.decode(replace(p)))  # a faithful copy decodes


# -- CUDA: skipped without a device; scripts/gpu_check.sh runs them where one is lent --------
def _assert_same_encoding(ref, dev, what):
    assert torch.equal(ref.data, dev.data.cpu()), (what, "payload")
    assert torch.equal(_bits_view(ref.meta), _bits_view(dev.meta.cpu())), (what, "meta")
    assert torch.equal(_bits_view(codec.decode(ref, backend="reference")),
                       _bits_view(codec.decode(dev, backend="cuda").cpu())), (what, "decode")


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", QBITS)
def test_cuda_special_values_are_bit_identical(dtype, bits):
    x = _special_values(dtype)
    if bits == 0.5:
        x = x.repeat_interleave(4)
    for n in (x.numel(), x.numel() - 3):
        ref = codec.encode(x[:n], bits, seed=21, backend="reference")
        _assert_same_encoding(ref, codec.encode(x[:n].cuda(), bits, seed=21, backend="cuda"), n)


@needs_cuda
@pytest.mark.parametrize("bits", QBITS)
def test_reference_backend_on_cuda_is_bit_identical(bits):
    """The torch reference run on a CUDA tensor (divisions by tensors, not scalars)."""
    for dtype in FLOATS:
        x = _sample(5003, dtype, seed=4)
        ref = codec.encode(x, bits, seed=5, backend="reference")
        on_gpu = codec.encode(x.cuda(), bits, seed=5, backend="reference")
        assert torch.equal(ref.data, on_gpu.data.cpu())
        assert torch.equal(_bits_view(ref.meta), _bits_view(on_gpu.meta.cpu()))
        assert torch.equal(_bits_view(codec.decode(ref, backend="reference")),
                           _bits_view(codec.decode(on_gpu, backend="reference").cpu()))


@needs_cuda
def test_cuda_runs_on_a_side_stream():
    x = _sample(1 << 20, torch.bfloat16, seed=2).cuda()
    ref = codec.encode(x.cpu(), 2, seed=8, backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dev = codec.encode(x, 2, seed=8, backend="cuda")
        y = codec.decode(dev, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_same_encoding(ref, dev, "side stream")
    assert torch.equal(_bits_view(y.cpu()), _bits_view(codec.decode(ref, backend="reference")))


@pytest.mark.skipif(not codec.available_backends()["cuda"] or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices")
def test_cuda_tensor_on_another_device_than_the_current_one():
    x = _sample(100_003, torch.float16, seed=3)
    ref = codec.encode(x, 4, seed=6, backend="reference")
    with torch.cuda.device(0):
        dev = codec.encode(x.to("cuda:1"), 4, seed=6, backend="cuda")
        assert dev.data.device == torch.device("cuda:1")
        _assert_same_encoding(ref, dev, "cuda:1 while cuda:0 is current")
        assert torch.cuda.current_device() == 0


@needs_cuda
def test_cuda_device_check_reports_usable_kernels():
    assert codec.cuda_unusable_reason(torch.device("cuda")) is None


@needs_cpp
def test_the_registry_sizes_match_the_kernels_c_abi():
    """One source for buffer sizes: the registry (alam_dist/codec/formats.py) agrees with
    the kernel library's own size functions (csrc/common/sizes.cpp) for every format."""
    from alam_dist import _native
    from alam_dist.codec.formats import GROUP, REGISTRY
    abi = _native.cpu
    for fmt in REGISTRY.values():
        for n in [*ODD_SIZES, 65536, 1 << 20 | 3]:
            if fmt.rotated:
                assert fmt.payload_bytes(n) == abi.rotated_payload_bytes(n, fmt.kernel_bits), (fmt, n)
                assert fmt.num_groups(n) == -(-n // (GROUP * fmt.span))
            else:
                assert fmt.payload_bytes(n) == abi.payload_bytes(n, fmt.kernel_bits), (fmt, n)
                assert fmt.num_groups(n) == abi.num_groups(n, fmt.kernel_bits), (fmt, n)
            packed = codec.encode(_sample(n, torch.float32), fmt.bits,
                                  formats="rotated" if fmt.rotated else "minmax")
            assert packed.nbytes == fmt.payload_bytes(n) + fmt.meta_bytes(n)


def test_stored_bits_per_family_and_the_old_family_name():
    from alam_dist.codec.formats import family, stored_bits
    assert family("seed") == "minmax" and family("rotated") == "rotated"
    with pytest.raises(ValueError, match="'minmax', 'rotated', 'seed'"):
        family("hadamard")
    assert stored_bits(0.5, 32, "minmax") == 0.5 + 64 / 512 == stored_bits(0.5, 32, "rotated")
    assert stored_bits(2, 32, "minmax") == 2.5 and stored_bits(2, 32, "rotated") == 2.25
    assert stored_bits(1, 32, "rotated") == 1.25
    assert stored_bits(16, 32) == 16 and stored_bits(16, 16) == 16 and stored_bits(8, 16) == 8.5
    # bits=1 means one thing per family: the sign code (rotated), AQ's alias (minmax)
    x = _sample(1000, torch.float32)
    assert codec.encode(x, 1, formats="rotated").format == "h1"
    assert codec.encode(x, 1, formats="seed").format == "aq" == codec.encode(x, 0.5).format

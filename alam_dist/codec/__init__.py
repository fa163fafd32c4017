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

``formats`` picks the family the numbers of ``bits`` name:

* ``"seed"`` (the ALAM paper's): 0.5 (average quantization: means of 4 values at 2 bits;
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

import warnings

import torch

from alam_dist import _native
from alam_dist.codec import reference
from alam_dist.codec.packed import PackedTensor

__all__ = ["ALLOWED_BITS", "FORMATS", "ROTATED_ALLOWED_BITS", "PackedTensor", "allowed_bits", "available_backends", "cuda_unusable_reason", "decode",
           "encode", "validate"]

ALLOWED_BITS = (0.5, 2, 4, 8, 16, 32)
"""Valid ``bits`` values of the seed formats (plus ``1``, the seed code's alias for 0.5)."""
ROTATED_ALLOWED_BITS = (0.5, 1, 2, 4, 8, 16, 32)
"""Valid ``bits`` values of the rotated formats."""
FORMATS = ("seed", "rotated")

BACKENDS = ("auto", "reference", "cpp", "cuda")
_QUANT_FORMATS = {0.5: "aq", 2: "q2", 4: "q4", 8: "q8"}
_KERNEL_BITS = {"aq": 0, "q2": 2, "q4": 4, "q8": 8}
_ROTATED = {"h1": 1, "h2": 2, "h4": 4, "h8": 8}
_FLOAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MASK_DTYPES = (torch.bool, torch.uint8)


def allowed_bits(formats: str = "seed") -> tuple[float, ...]:
    """The ``bits`` values a format family accepts."""
    if formats not in FORMATS:
        raise ValueError(f"formats={formats!r}; choose one of {FORMATS}")
    return ROTATED_ALLOWED_BITS if formats == "rotated" else ALLOWED_BITS


def normalize_bits(bits: float, formats: str = "seed") -> float:
    """Validate ``bits`` for ``formats`` (for "seed", map the alias 1 to 0.5)."""
    allowed = allowed_bits(formats)
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise ValueError(f"bits must be a number in {allowed}, got {bits!r}")
    if bits == 1 and formats == "seed":
        return 0.5
    if bits not in allowed:
        alias = " (1 is accepted as an alias of 0.5)" if formats == "seed" else ""
        raise ValueError(f"bits={bits!r} is not a supported {formats} format; allowed values "
                         f"are {allowed}{alias}")
    return float(bits) if bits == 0.5 else int(bits)


def available_backends() -> dict[str, bool]:
    """Which backends this installation can run (CUDA also needs a visible device)."""
    return {
        "reference": True,
        "cpp": _native.cpu is not None,
        "cuda": _native.cuda is not None and torch.cuda.is_available()
        and cuda_unusable_reason(torch.device("cuda")) is None,
    }


_CUDA_UNUSABLE: dict[int, str] = {}  # device index -> why the kernels cannot run there
_CUDA_CHECKED: set[int] = set()
_WARNED: set[int] = set()  # devices the auto fallback already warned about


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_unusable_reason(device: torch.device) -> str | None:
    """Why this build's CUDA kernels cannot run on ``device`` (None when they can).

    Checked once per device, without launching anything: a GPU newer than every
    embedded image whose PTX the driver cannot compile, or a driver older than the
    CUDA runtime linked in, is found here instead of at the first launch in training.
    """
    if _native.cuda is None:
        return f"alam_dist was installed without CUDA kernels ({_native.cuda_error})"
    index = _device_index(device)
    if index not in _CUDA_CHECKED:
        code, message = _native.cuda.check_device(index)
        if code:
            _CUDA_UNUSABLE[index] = (f"the CUDA kernels cannot run on cuda:{index} "
                                     f"({torch.cuda.get_device_name(index)}): {message}")
        _CUDA_CHECKED.add(index)
    return _CUDA_UNUSABLE.get(index)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and _native.cuda is not None:
            reason = cuda_unusable_reason(device)
            if reason is None:
                return "cuda"
            if _device_index(device) not in _WARNED:
                _WARNED.add(_device_index(device))
                warnings.warn(f"alam_dist: {reason}; using the (slower) reference codec on "
                              "this device. Rebuild with ALAM_CUDA_ARCH including this GPU's "
                              "architecture, or update the NVIDIA driver.", stacklevel=3)
            return "reference"
        if device.type == "cpu" and _native.cpu is not None:
            return "cpp"
        return "reference"
    if backend == "cpp":
        if _native.cpu is None:
            raise RuntimeError("backend='cpp' requested but alam_dist's C++ kernels are not "
                               f"built ({_native.cpu_error}); reinstall with `pip install -e .` "
                               "without ALAM_NO_NATIVE, or use backend='reference'")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors; this one is on {device}")
    if backend == "cuda":
        if _native.cuda is None:
            raise RuntimeError("backend='cuda' requested but alam_dist was installed without "
                               f"CUDA kernels ({_native.cuda_error}); reinstall where nvcc is "
                               "found (set CUDA_HOME), or use backend='reference'")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors; this one is on {device}")
        reason = cuda_unusable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='cuda': {reason}; use backend='auto' (falls back to "
                               "the reference codec) or rebuild for this GPU")
    return backend



def _cuda_target(device: torch.device) -> tuple[int, int]:
    """(stream handle, device index): kernels run on the tensor's device, on that
    device's current stream, whichever device is current in the caller."""
    index = _device_index(device)
    return torch.cuda.current_stream(index).cuda_stream, index


def _is_mask(x: torch.Tensor) -> bool:
    if x.dtype == torch.bool:
        return True
    # A uint8 tensor is packed only when it is a 0/1 mask; anything else is kept raw.
    return x.dtype == torch.uint8 and (x.numel() == 0 or int(x.max()) <= 1)


def encode(x: torch.Tensor, bits: float, *, seed: int = 0, backend: str = "auto",
           formats: str = "seed") -> PackedTensor:
    """Encode ``x`` in the format ``bits`` of the family ``formats`` (module docstring).

    ``seed`` (any int, taken mod 2**64) fixes the stochastic rounding (and, for rotated
    formats, the sign flips): the same seed gives the same bytes on every backend, rank
    and run. Raises ``ValueError`` for bits outside the family, unsupported dtypes and
    backends that cannot run on ``x``'s device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"encode expects a torch.Tensor, got {type(x).__name__}")
    fmt_bits = normalize_bits(bits, formats)
    seed = int(seed) & ((1 << 64) - 1)
    shape, dtype, device = x.shape, x.dtype, x.device
    if x.dtype in _MASK_DTYPES:
        if not _is_mask(x):
            return PackedTensor("raw", shape, dtype, device, x)
        return _encode_mask(x, shape, dtype, device, backend)
    if x.dtype not in _FLOAT_CODES:
        if fmt_bits == 32:
            return PackedTensor("raw", shape, dtype, device, x)
        raise ValueError(f"cannot encode dtype {x.dtype} at bits={bits}: the quantized formats "
                         "take float32, bfloat16 or float16 (and bool/uint8 masks); "
                         "use bits=32 to keep it as is")
    if fmt_bits == 32 or (fmt_bits == 16 and x.dtype != torch.float32):
        return PackedTensor("raw", shape, dtype, device, x)
    if fmt_bits == 16:
        return PackedTensor("bf16", shape, dtype, device, x.to(torch.bfloat16))
    flat = x.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    resolved = _resolve_backend(backend, device)
    if formats == "rotated" and fmt_bits != 0.5:
        return _encode_rotated(flat, int(fmt_bits), seed, shape, dtype, device, resolved)
    fmt = _QUANT_FORMATS[fmt_bits]
    kbits = _KERNEL_BITS[fmt]
    if resolved == "reference":
        payload, meta = reference.quantize(flat, kbits, seed)
    else:
        payload = torch.empty(reference.payload_bytes(n, kbits), dtype=torch.uint8, device=device)
        meta = torch.empty(reference.num_groups(n, kbits), 2, dtype=torch.float32, device=device)
        args = (flat.data_ptr(), _FLOAT_CODES[dtype], n, kbits, seed, payload.data_ptr(),
                meta.data_ptr())
        if resolved == "cpp":
            _native.cpu.quantize(*args)
        else:
            _native.cuda.quantize(*args, *_cuda_target(device))
    return PackedTensor(fmt, shape, dtype, device, payload, meta)


def _encode_rotated(flat, bits, seed, shape, dtype, device, resolved) -> PackedTensor:
    n = flat.numel()
    if resolved == "reference":
        payload, meta = reference.quantize_rotated(flat, bits, seed)
    else:
        payload = torch.empty(reference.rotated_payload_bytes(n, bits), dtype=torch.uint8,
                              device=device)
        meta = torch.empty(reference.num_groups(n, bits), 2, dtype=torch.bfloat16, device=device)
        args = (flat.data_ptr(), _FLOAT_CODES[dtype], n, bits, seed, payload.data_ptr(),
                meta.data_ptr())
        if resolved == "cpp":
            _native.cpu.quantize_rotated(*args)
        else:
            _native.cuda.quantize_rotated(*args, *_cuda_target(device))
    return PackedTensor(f"h{bits}", shape, dtype, device, payload, meta, seed=seed)


def _encode_mask(x, shape, dtype, device, backend) -> PackedTensor:
    flat = x.detach().reshape(-1).contiguous()
    resolved = _resolve_backend(backend, device)
    if resolved == "reference":
        payload = reference.pack_mask(flat)
    else:
        n = flat.numel()
        payload = torch.empty((n + 7) // 8, dtype=torch.uint8, device=device)
        src = flat.view(torch.uint8)  # bool is one byte holding 0 or 1
        if resolved == "cpp":
            _native.cpu.pack_mask(src.data_ptr(), n, payload.data_ptr())
        else:
            _native.cuda.pack_mask(src.data_ptr(), n, payload.data_ptr(), *_cuda_target(device))
    return PackedTensor("mask", shape, dtype, device, payload)


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
    fmt, n = packed.format, packed.numel
    if fmt == "raw":  # the tensor itself, in whatever layout autograd saved it
        _check_buffer("data", packed.data, packed.dtype, n, packed, contiguous=False)
    elif fmt == "bf16":
        _check_buffer("data", packed.data, torch.bfloat16, n, packed)
    elif fmt == "mask":
        _check_buffer("payload", packed.data, torch.uint8, (n + 7) // 8, packed)
    elif fmt in _KERNEL_BITS:
        if packed.dtype not in _FLOAT_CODES:
            raise ValueError(f"cannot decode {packed!r}: dtype {packed.dtype} is not a "
                             "quantizable float dtype")
        kbits = _KERNEL_BITS[fmt]
        _check_buffer("payload", packed.data, torch.uint8, reference.payload_bytes(n, kbits), packed)
        _check_buffer("meta", packed.meta, torch.float32, 2 * reference.num_groups(n, kbits), packed)
    elif fmt in _ROTATED:
        if packed.dtype not in _FLOAT_CODES:
            raise ValueError(f"cannot decode {packed!r}: dtype {packed.dtype} is not a "
                             "quantizable float dtype")
        bits = _ROTATED[fmt]
        _check_buffer("payload", packed.data, torch.uint8,
                      reference.rotated_payload_bytes(n, bits), packed)
        _check_buffer("meta", packed.meta, torch.bfloat16, 2 * reference.num_groups(n, bits), packed)
    else:
        raise ValueError(f"cannot decode {packed!r}: unknown format {fmt!r} (known: "
                         f"{sorted(_KERNEL_BITS) + sorted(_ROTATED) + ['bf16', 'mask', 'raw']})")


def decode(packed: PackedTensor, *, backend: str = "auto") -> torch.Tensor:
    """Rebuild a tensor of ``packed``'s shape, dtype and device (contiguous)."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"decode expects a PackedTensor, got {type(packed).__name__}")
    validate(packed)
    fmt, n = packed.format, packed.numel
    if fmt == "raw":
        return packed.data
    if fmt == "bf16":
        return packed.data.to(packed.dtype)
    resolved = _resolve_backend(backend, packed.device)
    if fmt == "mask":
        if resolved == "reference":
            out = reference.unpack_mask(packed.data, n)
        else:
            out = torch.empty(n, dtype=torch.uint8, device=packed.device)
            if resolved == "cpp":
                _native.cpu.unpack_mask(packed.data.data_ptr(), n, out.data_ptr())
            else:
                _native.cuda.unpack_mask(packed.data.data_ptr(), n, out.data_ptr(),
                                         *_cuda_target(packed.device))
        if packed.dtype == torch.bool:
            out = out.view(torch.bool)
        return out.view(packed.shape)
    if fmt in _ROTATED:
        bits = _ROTATED[fmt]
        if resolved == "reference":
            out = reference.dequantize_rotated(packed.data, packed.meta, n, bits, packed.seed,
                                               packed.dtype)
        else:
            out = torch.empty(n, dtype=packed.dtype, device=packed.device)
            args = (packed.data.data_ptr(), packed.meta.data_ptr(), n, bits, packed.seed,
                    _FLOAT_CODES[packed.dtype], out.data_ptr())
            if resolved == "cpp":
                _native.cpu.dequantize_rotated(*args)
            else:
                _native.cuda.dequantize_rotated(*args, *_cuda_target(packed.device))
        return out.view(packed.shape)
    kbits = _KERNEL_BITS[fmt]
    if resolved == "reference":
        out = reference.dequantize(packed.data, packed.meta, n, kbits, packed.dtype)
    else:
        out = torch.empty(n, dtype=packed.dtype, device=packed.device)
        args = (packed.data.data_ptr(), packed.meta.data_ptr(), n, kbits,
                _FLOAT_CODES[packed.dtype], out.data_ptr())
        if resolved == "cpp":
            _native.cpu.dequantize(*args)
        else:
            _native.cuda.dequantize(*args, *_cuda_target(packed.device))
    return out.view(packed.shape)

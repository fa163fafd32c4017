"""One dispatch over the codec's backends: the torch reference, the C++ CPU kernels and
the CUDA kernels. :func:`resolve` picks one for a device; every backend does the same four
things (:class:`Backend`), bit for bit, so the codec never branches on which one runs.

The kernels take raw pointers (csrc/common/alam_codec.h): outputs are allocated here, on
the input's device, with the sizes of the format registry (alam_dist.codec.formats).
CUDA kernels run on the tensor's device and that device's current stream.
"""
from __future__ import annotations

import warnings

import torch

from alam_dist import _native
from alam_dist.codec import reference
from alam_dist.codec.formats import Format

BACKENDS = ("auto", "reference", "cpp", "cuda")
FLOAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The C ABI's dtype codes: the float dtypes the quantized formats take."""


class Backend:
    """What every backend does. ``flat`` is a contiguous 1-D tensor."""

    name = "?"

    def quantize(self, flat: torch.Tensor, fmt: Format, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, payload: torch.Tensor, meta: torch.Tensor, shape: torch.Size,
                   fmt: Format, seed: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (allocated in that shape: no view per call)."""
        raise NotImplementedError

    def pack_mask(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack_mask(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 0/1 of ``n`` elements."""
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"

    def quantize(self, flat, fmt, seed):
        if fmt.rotated:
            return reference.quantize_rotated(flat, fmt.kernel_bits, seed)
        return reference.quantize(flat, fmt.kernel_bits, seed)

    def dequantize(self, payload, meta, shape, fmt, seed, dtype):
        n = shape.numel()
        if fmt.rotated:
            out = reference.dequantize_rotated(payload, meta, n, fmt.kernel_bits, seed, dtype)
        else:
            out = reference.dequantize(payload, meta, n, fmt.kernel_bits, dtype)
        return out.view(shape)

    def pack_mask(self, flat):
        return reference.pack_mask(flat)

    def unpack_mask(self, payload, n):
        return reference.unpack_mask(payload, n)


class NativeBackend(Backend):
    """The compiled kernels of one module (``_native.cpu`` or ``_native.cuda``): same
    signatures, the CUDA ones followed by (stream, device index)."""

    def __init__(self, name: str, module, cuda: bool):
        self.name, self._m, self._cuda = name, module, cuda

    def _target(self, device: torch.device) -> tuple:
        if not self._cuda:
            return ()
        index = device_index(device)
        return torch.cuda.current_stream(index).cuda_stream, index

    def quantize(self, flat, fmt, seed):
        n, device = flat.numel(), flat.device
        payload_bytes, groups = fmt.buffer_sizes(n)
        payload = torch.empty(payload_bytes, dtype=torch.uint8, device=device)
        meta = torch.empty(groups, 2, dtype=fmt.meta_dtype, device=device)
        kernel = self._m.quantize_rotated if fmt.rotated else self._m.quantize
        kernel(flat.data_ptr(), FLOAT_CODES[flat.dtype], n, fmt.kernel_bits, seed,
               payload.data_ptr(), meta.data_ptr(), *self._target(device))
        return payload, meta

    def dequantize(self, payload, meta, shape, fmt, seed, dtype):
        out = torch.empty(shape, dtype=dtype, device=payload.device)
        n = out.numel()
        if fmt.rotated:
            self._m.dequantize_rotated(payload.data_ptr(), meta.data_ptr(), n, fmt.kernel_bits,
                                       seed, FLOAT_CODES[dtype], out.data_ptr(),
                                       *self._target(payload.device))
        else:
            self._m.dequantize(payload.data_ptr(), meta.data_ptr(), n, fmt.kernel_bits,
                               FLOAT_CODES[dtype], out.data_ptr(), *self._target(payload.device))
        return out

    def pack_mask(self, flat):
        n = flat.numel()
        payload = torch.empty((n + 7) // 8, dtype=torch.uint8, device=flat.device)
        src = flat.view(torch.uint8)  # bool is one byte holding 0 or 1
        self._m.pack_mask(src.data_ptr(), n, payload.data_ptr(), *self._target(flat.device))
        return payload

    def unpack_mask(self, payload, n):
        out = torch.empty(n, dtype=torch.uint8, device=payload.device)
        self._m.unpack_mask(payload.data_ptr(), n, out.data_ptr(), *self._target(payload.device))
        return out


REFERENCE = ReferenceBackend()
CPP = NativeBackend("cpp", _native.cpu, cuda=False) if _native.cpu is not None else None
CUDA = NativeBackend("cuda", _native.cuda, cuda=True) if _native.cuda is not None else None

_CUDA_UNUSABLE: dict[int, str] = {}  # device index -> why the kernels cannot run there
_CUDA_CHECKED: set[int] = set()
_WARNED: set[int] = set()  # devices the auto fallback already warned about (-1: no kernels)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_unusable_reason(device: torch.device) -> str | None:
    """Why this build's CUDA kernels cannot run on ``device`` (None when they can).

    Checked once per device, without launching anything: a GPU newer than every
    embedded image whose PTX the driver cannot compile, or a driver older than the
    CUDA runtime linked in, is found here instead of at the first launch in training.
    """
    if _native.cuda is None:
        return f"alam_dist was installed without CUDA kernels ({_native.cuda_error})"
    index = device_index(device)
    if index not in _CUDA_CHECKED:
        code, message = _native.cuda.check_device(index)
        if code:
            _CUDA_UNUSABLE[index] = (f"the CUDA kernels cannot run on cuda:{index} "
                                     f"({torch.cuda.get_device_name(index)}): {message}")
        _CUDA_CHECKED.add(index)
    return _CUDA_UNUSABLE.get(index)


def available() -> dict[str, bool]:
    """Which backends this installation can run (CUDA also needs a visible device)."""
    return {
        "reference": True,
        "cpp": CPP is not None,
        "cuda": CUDA is not None and torch.cuda.is_available()
        and cuda_unusable_reason(torch.device("cuda")) is None,
    }


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that runs ``backend`` ("auto": the fastest built one for the device)
    on ``device``; a clear error when the one asked for cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return _auto(device)
    if backend == "reference":
        return REFERENCE
    if backend == "cpp":
        if CPP is None:
            raise RuntimeError("backend='cpp' requested but alam_dist's C++ kernels are not "
                               f"built ({_native.cpu_error}); reinstall with `pip install -e .` "
                               "without ALAM_NO_NATIVE, or use backend='reference'")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors; this one is on {device}")
        return CPP
    if CUDA is None:
        raise RuntimeError("backend='cuda' requested but alam_dist was installed without "
                           f"CUDA kernels ({_native.cuda_error}); reinstall where nvcc is "
                           "found (set CUDA_HOME), or use backend='reference'")
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors; this one is on {device}")
    reason = cuda_unusable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='cuda': {reason}; use backend='auto' (falls back to "
                           "the reference codec) or rebuild for this GPU")
    return CUDA


def _auto(device: torch.device) -> Backend:
    if device.type == "cpu":
        return CPP or REFERENCE
    if device.type != "cuda":
        return REFERENCE
    if CUDA is None:
        if -1 not in _WARNED:  # once per process, loudly: the fallback is slow
            _WARNED.add(-1)
            warnings.warn(f"alam_dist: no CUDA kernels in this install ({_native.cuda_error}); "
                          "CUDA tensors go through the torch reference codec, several times "
                          "slower and with fp32 temporaries of the tensor's size. Reinstall "
                          "where nvcc is found (CUDA_HOME; ALAM_REQUIRE_CUDA=1 makes a failed "
                          "CUDA build an error), or set alam.backend='cuda' to fail instead.",
                          stacklevel=4)
        return REFERENCE
    reason = cuda_unusable_reason(device)
    if reason is None:
        return CUDA
    if device_index(device) not in _WARNED:
        _WARNED.add(device_index(device))
        warnings.warn(f"alam_dist: {reason}; using the (slower) reference codec on "
                      "this device. Rebuild with ALAM_CUDA_ARCH including this GPU's "
                      "architecture, or update the NVIDIA driver.", stacklevel=4)
    return REFERENCE

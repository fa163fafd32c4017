// pybind11 module alam_dist._C_cuda: the CUDA kernels behind raw addresses and a
// stream handle (torch.cuda.current_stream().cuda_stream). Compiled by the host
// compiler; the kernels are linked in from csrc/cuda (nvcc) with the static cudart,
// so importing it needs only the NVIDIA driver, never torch's CUDA headers.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "../common/alam_codec.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string("alam_dist CUDA ") + what + " failed: " +
                             alam_cuda_error_string(code));
  }
}
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "alam_dist CUDA codec kernels (raw-pointer ABI; see csrc/common/alam_codec.h)";
  // Every call takes the tensor's device index and a stream of that device.
  m.def("quantize", [](uintptr_t x, int dtype, int64_t n, int bits, uint64_t seed,
                       uintptr_t payload, uintptr_t meta, uintptr_t stream, int device) {
    check(alam_cuda_quantize(ptr<const void>(x), dtype, n, bits, seed, ptr<uint8_t>(payload),
                             ptr<float>(meta), ptr<void>(stream), device), "quantize");
  });
  m.def("dequantize", [](uintptr_t payload, uintptr_t meta, int64_t n, int bits, int dtype,
                         uintptr_t out, uintptr_t stream, int device) {
    check(alam_cuda_dequantize(ptr<const uint8_t>(payload), ptr<const float>(meta), n, bits, dtype,
                               ptr<void>(out), ptr<void>(stream), device), "dequantize");
  });
  m.def("quantize_rotated", [](uintptr_t x, int dtype, int64_t n, int bits, uint64_t seed,
                               uintptr_t payload, uintptr_t meta, uintptr_t stream, int device) {
    check(alam_cuda_quantize_rotated(ptr<const void>(x), dtype, n, bits, seed, ptr<uint8_t>(payload),
                                     ptr<uint16_t>(meta), ptr<void>(stream), device), "quantize_rotated");
  });
  m.def("dequantize_rotated", [](uintptr_t payload, uintptr_t meta, int64_t n, int bits,
                                 uint64_t seed, int dtype, uintptr_t out, uintptr_t stream, int device) {
    check(alam_cuda_dequantize_rotated(ptr<const uint8_t>(payload), ptr<const uint16_t>(meta), n, bits,
                                       seed, dtype, ptr<void>(out), ptr<void>(stream), device),
          "dequantize_rotated");
  });
  m.def("pack_mask", [](uintptr_t x, int64_t n, uintptr_t payload, uintptr_t stream, int device) {
    check(alam_cuda_pack_mask(ptr<const uint8_t>(x), n, ptr<uint8_t>(payload), ptr<void>(stream), device), "pack_mask");
  });
  m.def("unpack_mask", [](uintptr_t payload, int64_t n, uintptr_t out, uintptr_t stream, int device) {
    check(alam_cuda_unpack_mask(ptr<const uint8_t>(payload), n, ptr<uint8_t>(out), ptr<void>(stream), device), "unpack_mask");
  });
  // (0, "") when the kernels can run on `device`, else (code, message): lets Python
  // fall back before the first launch instead of failing inside training.
  m.def("check_device", [](int device) {
    const int code = alam_cuda_check_device(device);
    return py::make_tuple(code, code ? std::string(alam_cuda_error_string(code)) : std::string());
  });
  m.def("payload_bytes", &alam_payload_bytes);
  m.def("num_groups", &alam_num_groups);
}

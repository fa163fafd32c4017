// pybind11 module alam_dist._C: the CPU kernels, taking tensors as raw addresses
// (torch's data_ptr()) so the extension never includes or links torch.
#include <pybind11/pybind11.h>

#include "../common/alam_codec.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "alam_dist CPU codec kernels (raw-pointer ABI; see csrc/common/alam_codec.h)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("quantize", [](uintptr_t x, int dtype, int64_t n, int bits, uint64_t seed,
                       uintptr_t payload, uintptr_t meta) {
    alam_cpu_quantize(ptr<const void>(x), dtype, n, bits, seed, ptr<uint8_t>(payload), ptr<float>(meta));
  }, nogil);
  m.def("dequantize", [](uintptr_t payload, uintptr_t meta, int64_t n, int bits, int dtype,
                         uintptr_t out) {
    alam_cpu_dequantize(ptr<const uint8_t>(payload), ptr<const float>(meta), n, bits, dtype, ptr<void>(out));
  }, nogil);
  m.def("quantize_rotated", [](uintptr_t x, int dtype, int64_t n, int bits, uint64_t seed,
                               uintptr_t payload, uintptr_t meta) {
    alam_cpu_quantize_rotated(ptr<const void>(x), dtype, n, bits, seed, ptr<uint8_t>(payload),
                              ptr<uint16_t>(meta));
  }, nogil);
  m.def("dequantize_rotated", [](uintptr_t payload, uintptr_t meta, int64_t n, int bits,
                                 uint64_t seed, int dtype, uintptr_t out) {
    alam_cpu_dequantize_rotated(ptr<const uint8_t>(payload), ptr<const uint16_t>(meta), n, bits,
                                seed, dtype, ptr<void>(out));
  }, nogil);
  m.def("rotated_payload_bytes", &alam_rotated_payload_bytes);
  m.def("pack_mask", [](uintptr_t x, int64_t n, uintptr_t payload) {
    alam_cpu_pack_mask(ptr<const uint8_t>(x), n, ptr<uint8_t>(payload));
  }, nogil);
  m.def("unpack_mask", [](uintptr_t payload, int64_t n, uintptr_t out) {
    alam_cpu_unpack_mask(ptr<const uint8_t>(payload), n, ptr<uint8_t>(out));
  }, nogil);
  m.def("payload_bytes", &alam_payload_bytes);
  m.def("num_groups", &alam_num_groups);
  m.def("num_threads", &alam_cpu_num_threads);
  m.def("hash_uniform", [](uint64_t seed, uint64_t index) {
    uint32_t k0, k1;
    alam_seed_keys(seed, &k0, &k1);
    return alam_hash_uniform(k0, k1, index);
  });
}

// alam_dist native codec: the formats of docs/codec.md as a plain C ABI.
//
// No torch headers on purpose: the library takes raw pointers, element counts and
// (for CUDA) a stream, so one build works with any torch version and pip's build
// isolation never has to install torch.
//
// Every backend (alam_dist/codec/reference.py, csrc/cpu, csrc/cuda) must produce
// bit-identical output for the same input and seed. The rules that make that possible:
//   * all arithmetic in fp32, in the order written here, without FMA contraction;
//   * stochastic rounding noise from alam_hash_uniform(), a pure function of
//     (seed, element index) -- never from a stateful generator.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define ALAM_HD __host__ __device__ __forceinline__
#else
#define ALAM_HD static inline
#endif

enum AlamDType { ALAM_F32 = 0, ALAM_BF16 = 1, ALAM_F16 = 2 };

// Values per quantization group (each group stores fp32 min and scale).
#define ALAM_GROUP 128
// Values averaged together by average quantization (the "0.5 bit" format).
#define ALAM_AQ_AVG 4

// murmur3's 32-bit finaliser: a bijection with full avalanche.
ALAM_HD uint32_t alam_fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Per-call keys derived once from the 64-bit seed.
ALAM_HD void alam_seed_keys(uint64_t seed, uint32_t* k0, uint32_t* k1) {
  *k0 = alam_fmix32((uint32_t)(seed & 0xFFFFFFFFu) + 0x9E3779B9u);
  *k1 = alam_fmix32((uint32_t)(seed >> 32) ^ 0x7F4A7C15u);
}

// Uniform noise in [0, 1) with 24 random bits (exact in fp32) for element `index`,
// split as (hi_key = (index >> 32) ^ k1, lo = index & 0xFFFFFFFF). Kernels hoist
// hi_key out of a group (groups are 128-aligned, so it is constant inside one) and keep
// the per-element work in 32-bit lanes.
ALAM_HD float alam_hash_uniform_lo(uint32_t k0, uint32_t hi_key, uint32_t lo) {
  uint32_t h = alam_fmix32(alam_fmix32(lo ^ k0) + hi_key);
  return (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f);  // signed: SIMD-convertible
}

ALAM_HD float alam_hash_uniform(uint32_t k0, uint32_t k1, uint64_t index) {
  return alam_hash_uniform_lo(k0, (uint32_t)(index >> 32) ^ k1, (uint32_t)(index & 0xFFFFFFFFu));
}

// bfloat16 <-> float as bit operations, identical on host and device. float -> bf16
// rounds to nearest even and maps every NaN to 0x7FC0 (torch's own cast does not have
// one pattern: it gives 0xFFFF on AVX2 CPUs, so the reference writes NaNs explicitly).
//
// NaN groups decode to one explicit pattern per dtype in every backend:
#define ALAM_NAN_F32 0x7FC00000u
#define ALAM_NAN_BF16 0x7FC0u
#define ALAM_NAN_F16 0x7E00u
ALAM_HD float alam_bf16_to_float(uint16_t h) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)h << 16;
  return c.f;
}

ALAM_HD uint16_t alam_float_to_bf16(float f) {
  union { uint32_t u; float f; } c;
  c.f = f;
  if ((c.u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)ALAM_NAN_BF16;
  c.u += 0x7FFFu + ((c.u >> 16) & 1u);
  return (uint16_t)(c.u >> 16);
}

// -- rotated formats (alam_dist/codec/reference.py, quantize_rotated) ----------------
// Per group: the bfloat16 mean taken out, sign flips, unnormalised Walsh-Hadamard
// transform, symmetric levels (q - L/2) * step with a bfloat16 step, round to nearest. Every GROUP rotated value of
// the tail group is stored (each carries part of every input of its group).

// float -> bfloat16 bits, round to nearest even, for any float (NaN keeps a NaN pattern
// but the groups that use this flag NaN separately).
ALAM_HD uint16_t alam_float_to_bf16_nearest(float f) {
  union { uint32_t u; float f; } c;
  c.f = f;
  return (uint16_t)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

// Whether position j (0..ALAM_GROUP-1) of every group is negated before the transform.
ALAM_HD bool alam_rotation_negate(uint32_t k0, uint32_t j) { return (alam_fmix32(j ^ k0) >> 31) != 0; }

ALAM_HD uint32_t alam_float_bits(float f) {
  union { uint32_t u; float f; } c;
  c.f = f;
  return c.u;
}

ALAM_HD float alam_bits_float(uint32_t u) {
  union { uint32_t u; float f; } c;
  c.u = u;
  return c.f;
}

// The group's step as bfloat16 bits from its absmax and its |r| sum (summed as the CUDA
// warp does: 4 values per lane left to right, then an xor butterfly over 32 lanes).
// b = 1: round-to-nearest of 2 * mean|r|; b >= 2: the covering step (2 absmax / L)
// rounded up. Returns ALAM_NAN_BF16 when the group is not finite.
ALAM_HD uint16_t alam_rotated_step(float absmax, float abs_sum, bool finite, int bits) {
  uint32_t step;
  if (bits == 1) {
    const float mean = abs_sum * (1.0f / (float)ALAM_GROUP);
    step = alam_float_to_bf16_nearest(mean + mean);
  } else {
    const uint32_t u = alam_float_bits((absmax + absmax) / (float)((1 << bits) - 1));
    step = (u & 0xFFFFu) ? (u >> 16) + 1u : (u >> 16);
  }
  const float value = alam_bits_float(step << 16);
  if (!finite || !(value - value == 0.0f)) return (uint16_t)ALAM_NAN_BF16;
  return (uint16_t)step;
}

#ifdef __cplusplus
extern "C" {
#endif

// Sizes of the packed buffers for n input values at `bits` (0 means average
// quantization: ceil(n / ALAM_AQ_AVG) means at 2 bits).
int64_t alam_payload_bytes(int64_t n, int bits);
int64_t alam_num_groups(int64_t n, int bits);
// Rotated formats (bits 1, 2, 4, 8): ceil(n / ALAM_GROUP) groups, all values stored;
// bits 0 is h05: ceil(n / (2 ALAM_GROUP)) blocks of ALAM_GROUP sign bits.
int64_t alam_rotated_payload_bytes(int64_t n, int bits);

// CPU kernels (csrc/cpu). `meta` holds 2 floats per group: min, scale.
void alam_cpu_quantize(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                       uint8_t* payload, float* meta);
void alam_cpu_dequantize(const uint8_t* payload, const float* meta, int64_t n, int bits,
                         int dtype, void* out);
// Rotated formats: `meta` holds two bfloat16 per group, (step, mean); the seed gives the
// signs.
void alam_cpu_quantize_rotated(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                               uint8_t* payload, uint16_t* meta);
void alam_cpu_dequantize_rotated(const uint8_t* payload, const uint16_t* meta, int64_t n,
                                 int bits, uint64_t seed, int dtype, void* out);
// Masks: any nonzero byte is 1; 8 values per byte, value i at bit (i % 8).
void alam_cpu_pack_mask(const uint8_t* x, int64_t n, uint8_t* payload);
void alam_cpu_unpack_mask(const uint8_t* payload, int64_t n, uint8_t* out);
int alam_cpu_num_threads(void);

// CUDA kernels (csrc/cuda): same contracts, asynchronous on `stream` (a cudaStream_t of
// `device`, which every call makes current for its duration and then restores).
// Return a cudaError_t code (0 on success).
int alam_cuda_quantize(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                       uint8_t* payload, float* meta, void* stream, int device);
int alam_cuda_dequantize(const uint8_t* payload, const float* meta, int64_t n, int bits,
                         int dtype, void* out, void* stream, int device);
int alam_cuda_quantize_rotated(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                               uint8_t* payload, uint16_t* meta, void* stream, int device);
int alam_cuda_dequantize_rotated(const uint8_t* payload, const uint16_t* meta, int64_t n,
                                 int bits, uint64_t seed, int dtype, void* out, void* stream,
                                 int device);
int alam_cuda_pack_mask(const uint8_t* x, int64_t n, uint8_t* payload, void* stream, int device);
int alam_cuda_unpack_mask(const uint8_t* payload, int64_t n, uint8_t* out, void* stream, int device);
// 0 when this build's kernels can run on `device` (an image for its architecture or PTX
// the driver can compile, and a new enough driver); the error code otherwise.
int alam_cuda_check_device(int device);
const char* alam_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif

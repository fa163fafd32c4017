// CUDA kernels for the alam_dist codec. One warp per 128-value group, 4 values per
// lane, so a lane's 4 quantized values fill whole bytes for every bit width.
// Arithmetic uses the explicit round-to-nearest intrinsics (no FMA contraction) so the
// output is bit-identical to csrc/cpu and alam_dist/codec/reference.py.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/alam_codec.h"

namespace {

constexpr int kThreads = 256;
constexpr int kGroupsPerBlock = kThreads / 32;
constexpr int kPerLane = ALAM_GROUP / 32;  // 4

__device__ __forceinline__ float load(const void* x, int dtype, int64_t i) {
  if (dtype == ALAM_BF16) return alam_bf16_to_float(((const uint16_t*)x)[i]);
  if (dtype == ALAM_F16) return __half2float(((const __half*)x)[i]);
  return ((const float*)x)[i];
}

// A NaN group's value: one explicit pattern per dtype (csrc/common/alam_codec.h), not
// the canonical NaN of CUDA arithmetic (0x7FFFFFFF) or of __float2half_rn (0x7FFF).
__device__ __forceinline__ void store_nan(void* out, int dtype, int64_t i) {
  if (dtype == ALAM_BF16) {
    ((uint16_t*)out)[i] = (uint16_t)ALAM_NAN_BF16;
  } else if (dtype == ALAM_F16) {
    ((uint16_t*)out)[i] = (uint16_t)ALAM_NAN_F16;
  } else {
    ((uint32_t*)out)[i] = ALAM_NAN_F32;
  }
}

__device__ __forceinline__ void store(void* out, int dtype, int64_t i, float v) {
  if (dtype == ALAM_BF16) {
    ((uint16_t*)out)[i] = alam_float_to_bf16(v);
  } else if (dtype == ALAM_F16) {
    ((__half*)out)[i] = __float2half_rn(v);
  } else {
    ((float*)out)[i] = v;
  }
}

// Value j of the quantized sequence: input j, or the left-to-right mean of inputs
// [4j, min(4j+4, n)) for average quantization.
__device__ __forceinline__ float load_value(const void* x, int dtype, int64_t n, bool aq,
                                            int64_t j) {
  if (!aq) return load(x, dtype, j);
  const int64_t start = j * ALAM_AQ_AVG;
  const int64_t stop = start + ALAM_AQ_AVG < n ? start + ALAM_AQ_AVG : n;
  float s = load(x, dtype, start);
  for (int64_t k = start + 1; k < stop; ++k) s = __fadd_rn(s, load(x, dtype, k));
  return __fdiv_rn(s, (float)(stop - start));
}

template <int BITS>
__global__ void quantize_kernel(const void* x, int dtype, int64_t n, bool aq,
                                int64_t values, int64_t groups, int64_t payload_bytes,
                                uint32_t k0, uint32_t k1, uint8_t* payload, float* meta) {
  const int lane = threadIdx.x & 31;
  const int64_t g = (int64_t)blockIdx.x * kGroupsPerBlock + (threadIdx.x >> 5);
  if (g >= groups) return;  // uniform per warp: the shuffles below stay convergent
  const int64_t first = g * ALAM_GROUP + lane * kPerLane;
  float v[kPerLane];
  float mn = INFINITY, mx = -INFINITY;
  bool finite = true;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = first + k;
    v[k] = j < values ? load_value(x, dtype, n, aq, j) : 0.0f;
    if (j < values) {
      finite &= isfinite(v[k]);
      mn = fminf(mn, v[k]);
      mx = fmaxf(mx, v[k]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xFFFFFFFFu, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, off));
  }
  finite = __all_sync(0xFFFFFFFFu, finite);
  // Which signed zero fminf/fmaxf keep is unspecified: store +0 as every backend does.
  mn = __fadd_rn(mn, 0.0f);
  mx = __fadd_rn(mx, 0.0f);
  constexpr int levels = (1 << BITS) - 1;
  const float scale = __fdiv_rn(__fsub_rn(mx, mn), (float)levels);
  const bool bad = !finite || !isfinite(scale);
  if (lane == 0) {
    meta[2 * g] = bad ? __uint_as_float(ALAM_NAN_F32) : mn;
    meta[2 * g + 1] = bad ? __uint_as_float(ALAM_NAN_F32) : scale;
  }
  const float inv = __fdiv_rn(1.0f, scale == 0.0f ? 1.0f : scale);
  uint32_t packed = 0;  // kPerLane * BITS bits: 1, 2 or 4 bytes
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = first + k;
    uint32_t q = 0;
    if (j < values && !bad) {
      const float u = alam_hash_uniform(k0, k1, (uint64_t)j);
      // Clamp in float before converting (NaN -> 0, inf -> levels), as every backend.
      float t = __fadd_rn(__fmul_rn(__fsub_rn(v[k], mn), inv), u);
      t = t > 0.0f ? t : 0.0f;
      t = t < (float)levels ? t : (float)levels;
      q = (uint32_t)floorf(t);
    }
    packed |= q << (k * BITS);
  }
  const int64_t byte0 = first * BITS / 8;
#pragma unroll
  for (int b = 0; b < kPerLane * BITS / 8; ++b) {
    if (byte0 + b < payload_bytes) payload[byte0 + b] = (uint8_t)(packed >> (8 * b));
  }
}

template <int BITS>
__global__ void dequantize_kernel(const uint8_t* payload, const float* meta, int64_t n,
                                  bool aq, int64_t values, int64_t groups, int dtype,
                                  void* out) {
  const int lane = threadIdx.x & 31;
  const int64_t g = (int64_t)blockIdx.x * kGroupsPerBlock + (threadIdx.x >> 5);
  if (g >= groups) return;
  const int64_t first = g * ALAM_GROUP + lane * kPerLane;
  const float mn = meta[2 * g], scale = meta[2 * g + 1];
  const bool nan_group = isnan(scale);
  constexpr int per_byte = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = first + k;
    if (j >= values) break;
    const uint32_t q = (payload[j / per_byte] >> ((j % per_byte) * BITS)) & mask;
    const float y = __fadd_rn(__fmul_rn((float)q, scale), mn);
    const int64_t start = aq ? j * ALAM_AQ_AVG : j;
    const int64_t stop = aq ? (start + ALAM_AQ_AVG < n ? start + ALAM_AQ_AVG : n) : j + 1;
    for (int64_t e = start; e < stop; ++e) {
      if (nan_group) {
        store_nan(out, dtype, e);
      } else {
        store(out, dtype, e, y);
      }
    }
  }
}

// -- rotated formats: a warp per group, lane l holds values 4l..4l+3 -------------------

// One butterfly stage of the unnormalised Walsh-Hadamard transform for distance h: the
// value with bit h clear becomes self + partner, the other partner - self (exactly the
// reference's a + b, a - b). h < 4 pairs values inside a lane, h >= 4 across lanes.
__device__ __forceinline__ void fwht_warp(float (&v)[kPerLane], int lane) {
  // h = 1, 2: inside the lane
  float a0 = v[0], a1 = v[1], a2 = v[2], a3 = v[3];
  v[0] = __fadd_rn(a0, a1); v[1] = __fsub_rn(a0, a1);
  v[2] = __fadd_rn(a2, a3); v[3] = __fsub_rn(a2, a3);
  a0 = v[0]; a1 = v[1]; a2 = v[2]; a3 = v[3];
  v[0] = __fadd_rn(a0, a2); v[2] = __fsub_rn(a0, a2);
  v[1] = __fadd_rn(a1, a3); v[3] = __fsub_rn(a1, a3);
#pragma unroll
  for (int lanes = 1; lanes < 32; lanes <<= 1) {  // h = 4 * lanes
    const bool upper = (lane & lanes) != 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const float other = __shfl_xor_sync(0xFFFFFFFFu, v[k], lanes);
      v[k] = upper ? __fsub_rn(other, v[k]) : __fadd_rn(v[k], other);
    }
  }
}

// Sum of the group, the lane's 4 values left to right, then an xor butterfly (each lane
// adds its partner's partial: every lane ends with the same, order-fixed sum).
__device__ __forceinline__ float warp_tree_sum(float a0, float a1, float a2, float a3) {
  float sum = __fadd_rn(__fadd_rn(__fadd_rn(a0, a1), a2), a3);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum = __fadd_rn(sum, __shfl_xor_sync(0xFFFFFFFFu, sum, off));
  return sum;
}

template <int BITS>
__global__ void quantize_rotated_kernel(const void* x, int dtype, int64_t n, int64_t groups,
                                        uint32_t k0, uint8_t* payload, uint16_t* meta) {
  const int lane = threadIdx.x & 31;
  const int64_t g = (int64_t)blockIdx.x * kGroupsPerBlock + (threadIdx.x >> 5);
  if (g >= groups) return;  // uniform per warp
  const int64_t first = g * ALAM_GROUP + lane * kPerLane;
  float v[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = first + k;
    v[k] = j < n ? load(x, dtype, j) : 0.0f;
  }
  const uint16_t mean_bits = alam_float_to_bf16_nearest(
      __fmul_rn(warp_tree_sum(v[0], v[1], v[2], v[3]), 1.0f / (float)ALAM_GROUP));
  const float mean = alam_bf16_to_float(mean_bits);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const float centred = __fsub_rn(v[k], mean);
    v[k] = alam_rotation_negate(k0, (uint32_t)(lane * kPerLane + k)) ? -centred : centred;
  }
  fwht_warp(v, lane);
  bool finite = true;
  float absmax = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    finite &= isfinite(v[k]);
    absmax = fmaxf(absmax, fabsf(v[k]));
  }
  const float sum = warp_tree_sum(fabsf(v[0]), fabsf(v[1]), fabsf(v[2]), fabsf(v[3]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    absmax = fmaxf(absmax, __shfl_xor_sync(0xFFFFFFFFu, absmax, off));
  finite = __all_sync(0xFFFFFFFFu, finite);
  const uint16_t step_bits = alam_rotated_step(absmax, sum, finite, BITS);
  const bool bad = step_bits == (uint16_t)ALAM_NAN_BF16;
  if (lane == 0) {
    meta[2 * g] = step_bits;
    meta[2 * g + 1] = bad ? (uint16_t)ALAM_NAN_BF16 : mean_bits;
  }
  constexpr int levels = (1 << BITS) - 1;
  const float step = alam_bf16_to_float(step_bits);
  const float inv = __fdiv_rn(1.0f, step == 0.0f ? 1.0f : step);
  const float half = (float)((levels + 1) / 2);
  uint32_t packed = 0;  // kPerLane * BITS bits
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    uint32_t q = 0;
    if (!bad) {
      float t = __fadd_rn(__fmul_rn(v[k], inv), half);
      t = t > 0.0f ? t : 0.0f;
      t = t < (float)levels ? t : (float)levels;
      q = (uint32_t)floorf(t);
    }
    packed |= q << (k * BITS);
  }
  uint8_t* group_payload = payload + g * (ALAM_GROUP * BITS / 8);
  if (BITS == 1) {  // 4 bits per lane: an even lane writes its byte with its neighbour's
    const uint32_t other = __shfl_xor_sync(0xFFFFFFFFu, packed, 1);
    if ((lane & 1) == 0) group_payload[lane / 2] = (uint8_t)(packed | (other << 4));
  } else {
#pragma unroll
    for (int b = 0; b < kPerLane * BITS / 8; ++b)
      group_payload[lane * (kPerLane * BITS / 8) + b] = (uint8_t)(packed >> (8 * b));
  }
}

template <int BITS>
__global__ void dequantize_rotated_kernel(const uint8_t* payload, const uint16_t* meta,
                                          int64_t n, int64_t groups, uint32_t k0, int dtype,
                                          void* out) {
  const int lane = threadIdx.x & 31;
  const int64_t g = (int64_t)blockIdx.x * kGroupsPerBlock + (threadIdx.x >> 5);
  if (g >= groups) return;
  const int64_t first = g * ALAM_GROUP + lane * kPerLane;
  const uint16_t step_bits = meta[2 * g];
  if (step_bits == (uint16_t)ALAM_NAN_BF16) {
    for (int k = 0; k < kPerLane; ++k)
      if (first + k < n) store_nan(out, dtype, first + k);
    return;  // uniform per warp: no shuffles follow
  }
  constexpr int levels = (1 << BITS) - 1;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const float step = alam_bf16_to_float(step_bits);
  const float mean = alam_bf16_to_float(meta[2 * g + 1]);
  const float half_levels = (float)levels / 2.0f;
  const uint8_t* group_payload = payload + g * (ALAM_GROUP * BITS / 8);
  float v[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int j = lane * kPerLane + k;
    const uint32_t q = (group_payload[j * BITS / 8] >> ((j * BITS) % 8)) & mask;
    v[k] = __fmul_rn(__fsub_rn((float)q, half_levels), step);
  }
  fwht_warp(v, lane);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const float y = __fmul_rn(v[k], 1.0f / (float)ALAM_GROUP);
    const float signed_y = alam_rotation_negate(k0, (uint32_t)(lane * kPerLane + k)) ? -y : y;
    if (first + k < n) store(out, dtype, first + k, __fadd_rn(signed_y, mean));
  }
}

// -- h05: a warp per block of two groups; lane l holds values 4l..4l+3 of each ---------
// (alam_dist/codec/reference.py, quantize_half). The kept values are rotated values
// 0..63 of each group: lanes 0..15 of group A, then lanes 0..15 of group B.

// The tree sum of the GROUP kept |values| in the reference's order: lane l < 16 takes its
// own group-A partial, lane l >= 16 lane (l - 16)'s group-B partial, then the butterfly.
__device__ __forceinline__ float warp_kept_sum(const float (&a)[kPerLane], const float (&b)[kPerLane],
                                               int lane) {
  const float pa = __fadd_rn(__fadd_rn(__fadd_rn(fabsf(a[0]), fabsf(a[1])), fabsf(a[2])), fabsf(a[3]));
  const float pb = __fadd_rn(__fadd_rn(__fadd_rn(fabsf(b[0]), fabsf(b[1])), fabsf(b[2])), fabsf(b[3]));
  const float from_b = __shfl_sync(0xFFFFFFFFu, pb, lane & 15);
  float sum = lane < 16 ? pa : from_b;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum = __fadd_rn(sum, __shfl_xor_sync(0xFFFFFFFFu, sum, off));
  return sum;
}

__global__ void quantize_half_kernel(const void* x, int dtype, int64_t n, int64_t nblocks,
                                     uint32_t k0, uint8_t* payload, uint16_t* meta) {
  const int lane = threadIdx.x & 31;
  const int64_t blk = (int64_t)blockIdx.x * kGroupsPerBlock + (threadIdx.x >> 5);
  if (blk >= nblocks) return;  // uniform per warp
  const int64_t first = blk * 2 * ALAM_GROUP + lane * kPerLane;
  float a[kPerLane], b[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    a[k] = first + k < n ? load(x, dtype, first + k) : 0.0f;
    b[k] = first + ALAM_GROUP + k < n ? load(x, dtype, first + ALAM_GROUP + k) : 0.0f;
  }
  const float sum = __fadd_rn(warp_tree_sum(a[0], a[1], a[2], a[3]), warp_tree_sum(b[0], b[1], b[2], b[3]));
  const uint16_t mean_bits = alam_float_to_bf16_nearest(__fmul_rn(sum, 1.0f / (float)(2 * ALAM_GROUP)));
  const float mean = alam_bf16_to_float(mean_bits);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const bool negate = alam_rotation_negate(k0, (uint32_t)(lane * kPerLane + k));
    const float ca = __fsub_rn(a[k], mean), cb = __fsub_rn(b[k], mean);
    a[k] = negate ? -ca : ca;
    b[k] = negate ? -cb : cb;
  }
  fwht_warp(a, lane);
  fwht_warp(b, lane);
  bool finite = true;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) finite &= isfinite(a[k]) && isfinite(b[k]);
  finite = __all_sync(0xFFFFFFFFu, finite);
  const float kept_sum = warp_kept_sum(a, b, lane);
  const uint16_t step_bits = alam_rotated_step(0.0f, kept_sum, finite, 1);
  const bool bad = step_bits == (uint16_t)ALAM_NAN_BF16;
  if (lane == 0) {
    meta[2 * blk] = step_bits;
    meta[2 * blk + 1] = bad ? (uint16_t)ALAM_NAN_BF16 : mean_bits;
  }
  const float step = alam_bf16_to_float(step_bits);
  const float inv = __fdiv_rn(1.0f, step == 0.0f ? 1.0f : step);
  uint32_t nib_a = 0, nib_b = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    float ta = __fadd_rn(__fmul_rn(a[k], inv), 1.0f);
    float tb = __fadd_rn(__fmul_rn(b[k], inv), 1.0f);
    ta = ta > 0.0f ? ta : 0.0f;
    ta = ta < 1.0f ? ta : 1.0f;
    tb = tb > 0.0f ? tb : 0.0f;
    tb = tb < 1.0f ? tb : 1.0f;
    if (!bad) {
      nib_a |= (uint32_t)floorf(ta) << k;
      nib_b |= (uint32_t)floorf(tb) << k;
    }
  }
  const uint32_t next_a = __shfl_xor_sync(0xFFFFFFFFu, nib_a, 1);
  const uint32_t next_b = __shfl_xor_sync(0xFFFFFFFFu, nib_b, 1);
  uint8_t* block_payload = payload + blk * (ALAM_GROUP / 8);
  if (lane < 16 && (lane & 1) == 0) {
    block_payload[lane / 2] = (uint8_t)(nib_a | (next_a << 4));
    block_payload[8 + lane / 2] = (uint8_t)(nib_b | (next_b << 4));
  }
}

__global__ void dequantize_half_kernel(const uint8_t* payload, const uint16_t* meta, int64_t n,
                                       int64_t nblocks, uint32_t k0, int dtype, void* out) {
  const int lane = threadIdx.x & 31;
  const int64_t blk = (int64_t)blockIdx.x * kGroupsPerBlock + (threadIdx.x >> 5);
  if (blk >= nblocks) return;
  const int64_t first = blk * 2 * ALAM_GROUP + lane * kPerLane;
  const uint16_t step_bits = meta[2 * blk];
  if (step_bits == (uint16_t)ALAM_NAN_BF16) {
    for (int k = 0; k < kPerLane; ++k) {
      if (first + k < n) store_nan(out, dtype, first + k);
      if (first + ALAM_GROUP + k < n) store_nan(out, dtype, first + ALAM_GROUP + k);
    }
    return;  // uniform per warp: no shuffles follow
  }
  const float step = alam_bf16_to_float(step_bits);
  const float mean = alam_bf16_to_float(meta[2 * blk + 1]);
  const uint8_t* block_payload = payload + blk * (ALAM_GROUP / 8);
  float a[kPerLane], b[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    a[k] = 0.0f;
    b[k] = 0.0f;
    if (lane < 16) {
      const int i = lane * kPerLane + k;
      const uint32_t qa = (block_payload[i >> 3] >> (i & 7)) & 1u;
      const uint32_t qb = (block_payload[(64 + i) >> 3] >> ((64 + i) & 7)) & 1u;
      a[k] = __fmul_rn(__fsub_rn((float)qa, 0.5f), step);
      b[k] = __fmul_rn(__fsub_rn((float)qb, 0.5f), step);
    }
  }
  fwht_warp(a, lane);
  fwht_warp(b, lane);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const bool negate = alam_rotation_negate(k0, (uint32_t)(lane * kPerLane + k));
    const float ya = __fmul_rn(a[k], 1.0f / (float)ALAM_GROUP);
    const float yb = __fmul_rn(b[k], 1.0f / (float)ALAM_GROUP);
    if (first + k < n) store(out, dtype, first + k, __fadd_rn(negate ? -ya : ya, mean));
    if (first + ALAM_GROUP + k < n)
      store(out, dtype, first + ALAM_GROUP + k, __fadd_rn(negate ? -yb : yb, mean));
  }
}

__global__ void pack_mask_kernel(const uint8_t* x, int64_t n, uint8_t* payload) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t first = b * 8;
  if (first >= n) return;
  const int count = n - first < 8 ? (int)(n - first) : 8;  // never read past the end
  uint32_t byte = 0;
  for (int k = 0; k < count; ++k) byte |= (uint32_t)(x[first + k] != 0) << k;
  payload[b] = (uint8_t)byte;
}

__global__ void unpack_mask_kernel(const uint8_t* payload, int64_t n, uint8_t* out) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = (payload[i >> 3] >> (i & 7)) & 1u;
}

int64_t blocks_for(int64_t groups) { return (groups + kGroupsPerBlock - 1) / kGroupsPerBlock; }

// Makes `device` current for the scope of one call and restores the caller's device.
// This library links its own (static) CUDA runtime, so it selects the tensor's device
// itself instead of relying on torch's runtime having done so.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_ && previous_ >= 0) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_;
};

}  // namespace

extern "C" {

int alam_cuda_check_device(int device) {
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  // Fails with cudaErrorNoKernelImageForDevice (no SASS for this GPU and no PTX the
  // driver can JIT) or cudaErrorInsufficientDriver, without launching anything.
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, quantize_kernel<2>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, dequantize_kernel<2>);
  return (int)err;
}

int alam_cuda_quantize(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                       uint8_t* payload, float* meta, void* stream, int device) {
  if (n == 0) return 0;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  const bool aq = bits == 0;
  const int64_t values = aq ? (n + ALAM_AQ_AVG - 1) / ALAM_AQ_AVG : n;
  const int64_t groups = (values + ALAM_GROUP - 1) / ALAM_GROUP;
  const int64_t payload_bytes = alam_payload_bytes(n, bits);
  uint32_t k0, k1;
  alam_seed_keys(seed, &k0, &k1);
  cudaStream_t s = (cudaStream_t)stream;
  const int64_t blocks = blocks_for(groups);
  switch (aq ? 2 : bits) {
    case 2: quantize_kernel<2><<<blocks, kThreads, 0, s>>>(x, dtype, n, aq, values, groups, payload_bytes, k0, k1, payload, meta); break;
    case 4: quantize_kernel<4><<<blocks, kThreads, 0, s>>>(x, dtype, n, aq, values, groups, payload_bytes, k0, k1, payload, meta); break;
    case 8: quantize_kernel<8><<<blocks, kThreads, 0, s>>>(x, dtype, n, aq, values, groups, payload_bytes, k0, k1, payload, meta); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int alam_cuda_dequantize(const uint8_t* payload, const float* meta, int64_t n, int bits,
                         int dtype, void* out, void* stream, int device) {
  if (n == 0) return 0;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  const bool aq = bits == 0;
  const int64_t values = aq ? (n + ALAM_AQ_AVG - 1) / ALAM_AQ_AVG : n;
  const int64_t groups = (values + ALAM_GROUP - 1) / ALAM_GROUP;
  cudaStream_t s = (cudaStream_t)stream;
  const int64_t blocks = blocks_for(groups);
  switch (aq ? 2 : bits) {
    case 2: dequantize_kernel<2><<<blocks, kThreads, 0, s>>>(payload, meta, n, aq, values, groups, dtype, out); break;
    case 4: dequantize_kernel<4><<<blocks, kThreads, 0, s>>>(payload, meta, n, aq, values, groups, dtype, out); break;
    case 8: dequantize_kernel<8><<<blocks, kThreads, 0, s>>>(payload, meta, n, aq, values, groups, dtype, out); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int alam_cuda_quantize_rotated(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                               uint8_t* payload, uint16_t* meta, void* stream, int device) {
  if (n == 0) return 0;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  uint32_t k0, k1;
  alam_seed_keys(seed, &k0, &k1);
  cudaStream_t s = (cudaStream_t)stream;
  if (bits == 0) {  // h05
    const int64_t nblocks = (n + 2 * ALAM_GROUP - 1) / (2 * ALAM_GROUP);
    quantize_half_kernel<<<blocks_for(nblocks), kThreads, 0, s>>>(x, dtype, n, nblocks, k0, payload, meta);
    return (int)cudaGetLastError();
  }
  const int64_t groups = (n + ALAM_GROUP - 1) / ALAM_GROUP;
  const int64_t blocks = blocks_for(groups);
  switch (bits) {
    case 1: quantize_rotated_kernel<1><<<blocks, kThreads, 0, s>>>(x, dtype, n, groups, k0, payload, meta); break;
    case 2: quantize_rotated_kernel<2><<<blocks, kThreads, 0, s>>>(x, dtype, n, groups, k0, payload, meta); break;
    case 4: quantize_rotated_kernel<4><<<blocks, kThreads, 0, s>>>(x, dtype, n, groups, k0, payload, meta); break;
    case 8: quantize_rotated_kernel<8><<<blocks, kThreads, 0, s>>>(x, dtype, n, groups, k0, payload, meta); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int alam_cuda_dequantize_rotated(const uint8_t* payload, const uint16_t* meta, int64_t n,
                                 int bits, uint64_t seed, int dtype, void* out, void* stream,
                                 int device) {
  if (n == 0) return 0;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  uint32_t k0, k1;
  alam_seed_keys(seed, &k0, &k1);
  cudaStream_t s = (cudaStream_t)stream;
  if (bits == 0) {  // h05
    const int64_t nblocks = (n + 2 * ALAM_GROUP - 1) / (2 * ALAM_GROUP);
    dequantize_half_kernel<<<blocks_for(nblocks), kThreads, 0, s>>>(payload, meta, n, nblocks, k0, dtype, out);
    return (int)cudaGetLastError();
  }
  const int64_t groups = (n + ALAM_GROUP - 1) / ALAM_GROUP;
  const int64_t blocks = blocks_for(groups);
  switch (bits) {
    case 1: dequantize_rotated_kernel<1><<<blocks, kThreads, 0, s>>>(payload, meta, n, groups, k0, dtype, out); break;
    case 2: dequantize_rotated_kernel<2><<<blocks, kThreads, 0, s>>>(payload, meta, n, groups, k0, dtype, out); break;
    case 4: dequantize_rotated_kernel<4><<<blocks, kThreads, 0, s>>>(payload, meta, n, groups, k0, dtype, out); break;
    case 8: dequantize_rotated_kernel<8><<<blocks, kThreads, 0, s>>>(payload, meta, n, groups, k0, dtype, out); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int alam_cuda_pack_mask(const uint8_t* x, int64_t n, uint8_t* payload, void* stream, int device) {
  if (n == 0) return 0;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  const int64_t nbytes = (n + 7) / 8;
  pack_mask_kernel<<<(nbytes + kThreads - 1) / kThreads, kThreads, 0, (cudaStream_t)stream>>>(x, n, payload);
  return (int)cudaGetLastError();
}

int alam_cuda_unpack_mask(const uint8_t* payload, int64_t n, uint8_t* out, void* stream, int device) {
  if (n == 0) return 0;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  unpack_mask_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, (cudaStream_t)stream>>>(payload, n, out);
  return (int)cudaGetLastError();
}

const char* alam_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // extern "C"

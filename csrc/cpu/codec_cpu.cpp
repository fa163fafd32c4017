// CPU kernels for the alam_dist codec. OpenMP splits the groups across cores; inside a
// group every loop has a fixed trip count of ALAM_GROUP and compile-time dtype/bit width
// so GCC vectorises it (one clone per ISA via target_clones: AVX2 where the machine has
// it, SSE2 otherwise, from one binary). Contracts: csrc/common/alam_codec.h.
#include "../common/alam_codec.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ALAM_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define ALAM_MULTIVERSION
#endif

namespace {

constexpr int G = ALAM_GROUP;

template <int DT>
inline float load(const void* x, int64_t i) {
  if constexpr (DT == ALAM_BF16) {
    return alam_bf16_to_float(((const uint16_t*)x)[i]);
  } else if constexpr (DT == ALAM_F16) {
    return (float)((const _Float16*)x)[i];
  } else {
    return ((const float*)x)[i];
  }
}

// Branch-free float -> bfloat16 (same result as alam_float_to_bf16) so it vectorises.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)ALAM_NAN_BF16 : (uint16_t)rounded;
}

template <int DT>
inline void store(void* out, int64_t i, float v) {
  if constexpr (DT == ALAM_BF16) {
    ((uint16_t*)out)[i] = to_bf16(v);
  } else if constexpr (DT == ALAM_F16) {
    ((_Float16*)out)[i] = (_Float16)v;
  } else {
    ((float*)out)[i] = v;
  }
}

// Fills v[0..count) with the group's values (inputs, or means of ALAM_AQ_AVG inputs
// summed left to right) and pads v[count..G) with v[0], which changes neither the
// group's min/max nor its finiteness.
template <int DT, bool AQ>
ALAM_MULTIVERSION void load_group(const void* x, int64_t n, int64_t first, int count, float* v) {
  if (!AQ) {
    const int64_t base = first;
    if (count == G) {
#pragma omp simd
      for (int j = 0; j < G; ++j) v[j] = load<DT>(x, base + j);
    } else {
      for (int j = 0; j < count; ++j) v[j] = load<DT>(x, base + j);
    }
  } else if (count == G && (first + G) * ALAM_AQ_AVG <= n) {
    const int64_t base = first * ALAM_AQ_AVG;
#pragma omp simd
    for (int j = 0; j < G; ++j) {
      const int64_t s = base + (int64_t)j * ALAM_AQ_AVG;
      v[j] = (((load<DT>(x, s) + load<DT>(x, s + 1)) + load<DT>(x, s + 2)) + load<DT>(x, s + 3)) /
             (float)ALAM_AQ_AVG;
    }
  } else {
    for (int j = 0; j < count; ++j) {
      const int64_t start = (first + j) * ALAM_AQ_AVG;
      const int64_t stop = start + ALAM_AQ_AVG < n ? start + ALAM_AQ_AVG : n;
      float s = load<DT>(x, start);
      for (int64_t k = start + 1; k < stop; ++k) s = s + load<DT>(x, k);
      v[j] = s / (float)(stop - start);
    }
  }
  for (int j = count; j < G; ++j) v[j] = v[0];
}

template <int BITS>
ALAM_MULTIVERSION void quantize_group(const float* v, int count, uint32_t k0, uint32_t k1,
                                      uint64_t first_index, uint8_t* payload, float* meta) {
  constexpr int levels = (1 << BITS) - 1;
  constexpr int per_byte = 8 / BITS;
  float mn = v[0], mx = v[0];
  uint32_t nonfinite = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : nonfinite)
  for (int j = 0; j < G; ++j) {
    uint32_t u;
    memcpy(&u, &v[j], 4);
    nonfinite |= (u & 0x7F800000u) == 0x7F800000u;
    mn = v[j] < mn ? v[j] : mn;
    mx = v[j] > mx ? v[j] : mx;
  }
  // Which signed zero a min/max reduction keeps depends on lane order: store +0.
  mn = mn + 0.0f;
  mx = mx + 0.0f;
  const float scale = (mx - mn) / (float)levels;
  const int nbytes = (count * BITS + 7) / 8;
  if (nonfinite || !isfinite(scale)) {
    // Policy (docs/codec.md): a group holding NaN/inf decodes to NaN as a whole, so
    // loss scalers still see the overflow; no other group is touched.
    meta[0] = std::numeric_limits<float>::quiet_NaN();
    meta[1] = std::numeric_limits<float>::quiet_NaN();
    memset(payload, 0, nbytes);
    return;
  }
  meta[0] = mn;
  meta[1] = scale;
  // One reciprocal per group, then a multiply per value: as deterministic as a divide
  // (all backends do exactly this) and several times cheaper.
  const float inv = 1.0f / (scale == 0.0f ? 1.0f : scale);  // constant group: q is 0
  const uint32_t hi_key = (uint32_t)(first_index >> 32) ^ k1;
  const uint32_t lo0 = (uint32_t)(first_index & 0xFFFFFFFFu);
  uint8_t q[G];
#pragma omp simd
  for (int j = 0; j < G; ++j) {
    const float u = alam_hash_uniform_lo(k0, hi_key, lo0 + (uint32_t)j);
    // Clamp in float before converting: 1/scale overflows to inf for a denormal range,
    // giving inf (-> levels) or 0 * inf = NaN (-> 0); (int)inf would be INT_MIN. After
    // the clamp t >= 0, so truncation is floor (and vectorises; floorf does not
    // without -fno-trapping-math).
    float t = (v[j] - mn) * inv + u;
    t = t > 0.0f ? t : 0.0f;
    t = t < (float)levels ? t : (float)levels;
    q[j] = (uint8_t)(int)t;
  }
  for (int j = count; j < G; ++j) q[j] = 0;
  for (int b = 0; b < nbytes; ++b) {
    uint32_t byte = 0;
#pragma GCC unroll 8
    for (int k = 0; k < per_byte; ++k) byte |= (uint32_t)q[b * per_byte + k] << (k * BITS);
    payload[b] = (uint8_t)byte;
  }
}

template <int BITS>
ALAM_MULTIVERSION void dequantize_group(const uint8_t* payload, const float* meta, int count,
                                        float* v) {
  constexpr int per_byte = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const int nbytes = (count * BITS + 7) / 8;
  uint8_t q[G] = {0};
  for (int b = 0; b < nbytes; ++b) {
    const uint32_t byte = payload[b];
#pragma GCC unroll 8
    for (int k = 0; k < per_byte; ++k) q[b * per_byte + k] = (byte >> (k * BITS)) & mask;
  }
  const float mn = meta[0], scale = meta[1];
#pragma omp simd
  for (int j = 0; j < G; ++j) v[j] = (float)q[j] * scale + mn;
}

// Writes the group's decoded values (each AQ mean to its ALAM_AQ_AVG positions).
template <int DT, bool AQ>
ALAM_MULTIVERSION void store_group(const float* v, int64_t n, int64_t first, int count,
                                   void* out) {
  if (!AQ) {
    if (count == G) {
#pragma omp simd
      for (int j = 0; j < G; ++j) store<DT>(out, first + j, v[j]);
    } else {
      for (int j = 0; j < count; ++j) store<DT>(out, first + j, v[j]);
    }
  } else if (count == G && (first + G) * ALAM_AQ_AVG <= n) {
    const int64_t base = first * ALAM_AQ_AVG;
#pragma omp simd
    for (int e = 0; e < G * ALAM_AQ_AVG; ++e) store<DT>(out, base + e, v[e / ALAM_AQ_AVG]);
  } else {
    for (int j = 0; j < count; ++j) {
      const int64_t start = (first + j) * ALAM_AQ_AVG;
      const int64_t stop = start + ALAM_AQ_AVG < n ? start + ALAM_AQ_AVG : n;
      for (int64_t e = start; e < stop; ++e) store<DT>(out, e, v[j]);
    }
  }
}

template <int DT, int BITS, bool AQ>
void quantize(const void* x, int64_t n, uint64_t seed, uint8_t* payload, float* meta) {
  const int64_t values = AQ ? (n + ALAM_AQ_AVG - 1) / ALAM_AQ_AVG : n;
  const int64_t groups = (values + G - 1) / G;
  constexpr int64_t group_bytes = G * BITS / 8;
  uint32_t k0, k1;
  alam_seed_keys(seed, &k0, &k1);
#pragma omp parallel for schedule(static) if (groups > 256)
  for (int64_t g = 0; g < groups; ++g) {
    alignas(64) float v[G];
    const int64_t first = g * G;
    const int count = (int)(values - first < G ? values - first : G);
    load_group<DT, AQ>(x, n, first, count, v);
    quantize_group<BITS>(v, count, k0, k1, (uint64_t)first, payload + g * group_bytes,
                         meta + 2 * g);
  }
}

template <int DT, int BITS, bool AQ>
void dequantize(const uint8_t* payload, const float* meta, int64_t n, void* out) {
  const int64_t values = AQ ? (n + ALAM_AQ_AVG - 1) / ALAM_AQ_AVG : n;
  const int64_t groups = (values + G - 1) / G;
  constexpr int64_t group_bytes = G * BITS / 8;
#pragma omp parallel for schedule(static) if (groups > 256)
  for (int64_t g = 0; g < groups; ++g) {
    alignas(64) float v[G];
    const int64_t first = g * G;
    const int count = (int)(values - first < G ? values - first : G);
    if (meta[2 * g + 1] != meta[2 * g + 1]) {
      // A NaN group: the canonical quiet NaN, which every store<DT> turns into the
      // dtype's documented pattern (f32 0x7FC00000, bf16 0x7FC0, f16 0x7E00).
      for (int j = 0; j < G; ++j) v[j] = std::numeric_limits<float>::quiet_NaN();
    } else {
      dequantize_group<BITS>(payload + g * group_bytes, meta + 2 * g, count, v);
    }
    store_group<DT, AQ>(v, n, first, count, out);
  }
}

// -- rotated formats -------------------------------------------------------------------

// Unnormalised Walsh-Hadamard transform of one group, the butterflies in the reference's
// order (each output is one add or subtract of two fp32 values: exact same rounding).
ALAM_MULTIVERSION void fwht_group(float* v) {
  // h = 1 and 2 per 4-value chunk (same operations, in a loop the compiler vectorises)
#pragma omp simd
  for (int c = 0; c < G / 4; ++c) {
    const float a0 = v[4 * c], a1 = v[4 * c + 1], a2 = v[4 * c + 2], a3 = v[4 * c + 3];
    const float s01 = a0 + a1, d01 = a0 - a1, s23 = a2 + a3, d23 = a2 - a3;
    v[4 * c] = s01 + s23;
    v[4 * c + 2] = s01 - s23;
    v[4 * c + 1] = d01 + d23;
    v[4 * c + 3] = d01 - d23;
  }
  for (int h = 4; h < G; h *= 2) {
    for (int i0 = 0; i0 < G; i0 += 2 * h) {
#pragma omp simd
      for (int i = i0; i < i0 + h; ++i) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
}

// Sum of a group in the CUDA warp's order: 4 values per lane left to right, then an xor
// butterfly over 32 lanes (alam_dist/codec/reference.py, _tree_sum).
ALAM_MULTIVERSION float tree_sum(const float* v) {
  float lane[32];
#pragma omp simd
  for (int l = 0; l < 32; ++l) lane[l] = ((v[4 * l] + v[4 * l + 1]) + v[4 * l + 2]) + v[4 * l + 3];
  // Lane 0's value after the xor butterfly: at each stage lanes l and l ^ off hold the
  // same sum, so halving the array (l + off for l < off) gives lane 0 the same additions
  // in the same order as the warp.
  for (int off = 16; off > 0; off >>= 1) {
#pragma omp simd
    for (int l = 0; l < off; ++l) lane[l] = lane[l] + lane[l + off];
  }
  return lane[0];
}

struct Signs {
  alignas(64) float s[G];
  explicit Signs(uint32_t k0) {
    for (int j = 0; j < G; ++j) s[j] = alam_rotation_negate(k0, (uint32_t)j) ? -1.0f : 1.0f;
  }
};

template <int DT, int BITS>
ALAM_MULTIVERSION void quantize_rotated_group(const void* x, int64_t first, int count,
                                              const float* sign, uint8_t* payload,
                                              uint16_t* meta) {
  constexpr int levels = (1 << BITS) - 1;
  constexpr int per_byte = 8 / BITS;
  alignas(64) float v[G];
  if (count == G) {
#pragma omp simd
    for (int j = 0; j < G; ++j) v[j] = load<DT>(x, first + j);
  } else {
    for (int j = 0; j < G; ++j) v[j] = j < count ? load<DT>(x, first + j) : 0.0f;
  }
  const uint16_t mean_bits = alam_float_to_bf16_nearest(tree_sum(v) * (1.0f / (float)G));
  const float mean = alam_bf16_to_float(mean_bits);
#pragma omp simd
  for (int j = 0; j < G; ++j) v[j] = (v[j] - mean) * sign[j];
  fwht_group(v);
  float absmax = 0.0f;
  uint32_t nonfinite = 0;
#pragma omp simd reduction(max : absmax) reduction(| : nonfinite)
  for (int j = 0; j < G; ++j) {
    uint32_t u;
    memcpy(&u, &v[j], 4);
    nonfinite |= (u & 0x7F800000u) == 0x7F800000u;
    const float a = fabsf(v[j]);
    absmax = a > absmax ? a : absmax;
  }
  alignas(64) float a[G];
#pragma omp simd
  for (int j = 0; j < G; ++j) a[j] = fabsf(v[j]);
  const uint16_t step_bits = alam_rotated_step(absmax, tree_sum(a), !nonfinite, BITS);
  constexpr int nbytes = G * BITS / 8;
  if (step_bits == (uint16_t)ALAM_NAN_BF16) {
    meta[0] = meta[1] = (uint16_t)ALAM_NAN_BF16;
    memset(payload, 0, nbytes);
    return;
  }
  meta[0] = step_bits;
  meta[1] = mean_bits;
  const float step = alam_bf16_to_float(step_bits);
  const float inv = 1.0f / (step == 0.0f ? 1.0f : step);
  constexpr float half = (float)((levels + 1) / 2);
  uint8_t q[G];
#pragma omp simd
  for (int j = 0; j < G; ++j) {
    float t = v[j] * inv + half;
    t = t > 0.0f ? t : 0.0f;
    t = t < (float)levels ? t : (float)levels;
    q[j] = (uint8_t)(int)t;
  }
  for (int b = 0; b < nbytes; ++b) {
    uint32_t byte = 0;
#pragma GCC unroll 8
    for (int k = 0; k < per_byte; ++k) byte |= (uint32_t)q[b * per_byte + k] << (k * BITS);
    payload[b] = (uint8_t)byte;
  }
}

template <int DT, int BITS>
ALAM_MULTIVERSION void dequantize_rotated_group(const uint8_t* payload, const uint16_t* meta,
                                                int64_t first, int count, const float* sign,
                                                void* out) {
  const uint16_t step_bits = meta[0];
  constexpr int levels = (1 << BITS) - 1;
  constexpr int per_byte = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  alignas(64) float v[G];
  if (step_bits == (uint16_t)ALAM_NAN_BF16) {
    for (int j = 0; j < G; ++j) v[j] = std::numeric_limits<float>::quiet_NaN();
  } else {
    uint8_t q[G];
    for (int b = 0; b < G / per_byte; ++b) {
      const uint32_t byte = payload[b];
#pragma GCC unroll 8
      for (int k = 0; k < per_byte; ++k) q[b * per_byte + k] = (byte >> (k * BITS)) & mask;
    }
    const float step = alam_bf16_to_float(step_bits);
    const float mean = alam_bf16_to_float(meta[1]);
    constexpr float half_levels = (float)levels / 2.0f;
#pragma omp simd
    for (int j = 0; j < G; ++j) v[j] = ((float)q[j] - half_levels) * step;
    fwht_group(v);
#pragma omp simd
    for (int j = 0; j < G; ++j) v[j] = v[j] * (1.0f / (float)G) * sign[j] + mean;
  }
  if (count == G) {
#pragma omp simd
    for (int j = 0; j < G; ++j) store<DT>(out, first + j, v[j]);
  } else {
    for (int j = 0; j < count; ++j) store<DT>(out, first + j, v[j]);
  }
}

// Runs f(block index, signs) over the ceil(n / block) blocks of a rotated format, with the
// seed's sign flips; in parallel beyond 32768 values (256 groups), as every format.
template <typename F>
void for_each_rotated_block(int64_t n, int64_t block, uint64_t seed, F f) {
  const int64_t blocks = (n + block - 1) / block;
  uint32_t k0, k1;
  alam_seed_keys(seed, &k0, &k1);
  const Signs signs(k0);
#pragma omp parallel for schedule(static) if (blocks * block > 256 * G)
  for (int64_t b = 0; b < blocks; ++b) f(b, signs.s);
}

template <int DT, int BITS>
void quantize_rotated(const void* x, int64_t n, uint64_t seed, uint8_t* payload, uint16_t* meta) {
  for_each_rotated_block(n, G, seed, [&](int64_t g, const float* sign) {
    const int64_t first = g * G;
    const int count = (int)(n - first < G ? n - first : G);
    quantize_rotated_group<DT, BITS>(x, first, count, sign, payload + g * (G * BITS / 8),
                                     meta + 2 * g);
  });
}

template <int DT, int BITS>
void dequantize_rotated(const uint8_t* payload, const uint16_t* meta, int64_t n, uint64_t seed,
                        void* out) {
  for_each_rotated_block(n, G, seed, [&](int64_t g, const float* sign) {
    const int64_t first = g * G;
    const int count = (int)(n - first < G ? n - first : G);
    dequantize_rotated_group<DT, BITS>(payload + g * (G * BITS / 8), meta + 2 * g, first, count,
                                       sign, out);
  });
}

// -- h05: the sign code on half of the rotated values (alam_dist/codec/reference.py) ---
// A block is two groups: one (step, mean) and GROUP sign bits (rotated values 0..63 of
// each group, group 0's first); the dropped half decodes as 0.

template <int DT>
ALAM_MULTIVERSION void quantize_half_block(const void* x, int64_t n, int64_t first,
                                           const float* sign, uint8_t* payload, uint16_t* meta) {
  constexpr int H = G / 2;
  alignas(64) float v[2][G];
  for (int h = 0; h < 2; ++h) {
    const int64_t base = first + (int64_t)h * G;
    if (base + G <= n) {
#pragma omp simd
      for (int j = 0; j < G; ++j) v[h][j] = load<DT>(x, base + j);
    } else {
      for (int j = 0; j < G; ++j) v[h][j] = base + j < n ? load<DT>(x, base + j) : 0.0f;
    }
  }
  const float sum = tree_sum(v[0]) + tree_sum(v[1]);
  const uint16_t mean_bits = alam_float_to_bf16_nearest(sum * (1.0f / (float)(2 * G)));
  const float mean = alam_bf16_to_float(mean_bits);
  uint32_t nonfinite = 0;
  alignas(64) float kept[G];
  for (int h = 0; h < 2; ++h) {
#pragma omp simd
    for (int j = 0; j < G; ++j) v[h][j] = (v[h][j] - mean) * sign[j];
    fwht_group(v[h]);
#pragma omp simd reduction(| : nonfinite)
    for (int j = 0; j < G; ++j) {
      uint32_t u;
      memcpy(&u, &v[h][j], 4);
      nonfinite |= (u & 0x7F800000u) == 0x7F800000u;
    }
    for (int j = 0; j < H; ++j) kept[h * H + j] = v[h][j];
  }
  alignas(64) float a[G];
#pragma omp simd
  for (int j = 0; j < G; ++j) a[j] = fabsf(kept[j]);
  const uint16_t step_bits = alam_rotated_step(0.0f, tree_sum(a), !nonfinite, 1);
  if (step_bits == (uint16_t)ALAM_NAN_BF16) {
    meta[0] = meta[1] = (uint16_t)ALAM_NAN_BF16;
    memset(payload, 0, G / 8);
    return;
  }
  meta[0] = step_bits;
  meta[1] = mean_bits;
  const float step = alam_bf16_to_float(step_bits);
  const float inv = 1.0f / (step == 0.0f ? 1.0f : step);
  uint8_t q[G];
#pragma omp simd
  for (int j = 0; j < G; ++j) {
    float t = kept[j] * inv + 1.0f;
    t = t > 0.0f ? t : 0.0f;
    t = t < 1.0f ? t : 1.0f;
    q[j] = (uint8_t)(int)t;
  }
  for (int b = 0; b < G / 8; ++b) {
    uint32_t byte = 0;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) byte |= (uint32_t)q[b * 8 + k] << k;
    payload[b] = (uint8_t)byte;
  }
}

template <int DT>
ALAM_MULTIVERSION void dequantize_half_block(const uint8_t* payload, const uint16_t* meta,
                                             int64_t n, int64_t first, const float* sign,
                                             void* out) {
  constexpr int H = G / 2;
  alignas(64) float v[2][G];
  if (meta[0] == (uint16_t)ALAM_NAN_BF16) {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < G; ++j) v[h][j] = std::numeric_limits<float>::quiet_NaN();
  } else {
    const float step = alam_bf16_to_float(meta[0]);
    const float mean = alam_bf16_to_float(meta[1]);
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < H; ++j) {
        const int i = h * H + j;
        v[h][j] = ((float)((payload[i >> 3] >> (i & 7)) & 1u) - 0.5f) * step;
      }
      for (int j = H; j < G; ++j) v[h][j] = 0.0f;
      fwht_group(v[h]);
#pragma omp simd
      for (int j = 0; j < G; ++j) v[h][j] = v[h][j] * (1.0f / (float)G) * sign[j] + mean;
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t base = first + (int64_t)h * G;
    for (int j = 0; j < G && base + j < n; ++j) store<DT>(out, base + j, v[h][j]);
  }
}

template <int DT>
void quantize_half(const void* x, int64_t n, uint64_t seed, uint8_t* payload, uint16_t* meta) {
  for_each_rotated_block(n, 2 * G, seed, [&](int64_t b, const float* sign) {
    quantize_half_block<DT>(x, n, b * 2 * G, sign, payload + b * (G / 8), meta + 2 * b);
  });
}

template <int DT>
void dequantize_half(const uint8_t* payload, const uint16_t* meta, int64_t n, uint64_t seed,
                     void* out) {
  for_each_rotated_block(n, 2 * G, seed, [&](int64_t b, const float* sign) {
    dequantize_half_block<DT>(payload + b * (G / 8), meta + 2 * b, n, b * 2 * G, sign, out);
  });
}

template <template <int, int> class F, typename... Args>
void dispatch_rotated(int dtype, int bits, Args... args) {
  auto by_bits = [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    switch (bits) {
      case 0: F<DT, 0>::run(args...); break;  // h05
      case 1: F<DT, 1>::run(args...); break;
      case 2: F<DT, 2>::run(args...); break;
      case 4: F<DT, 4>::run(args...); break;
      case 8: F<DT, 8>::run(args...); break;
    }
  };
  switch (dtype) {
    case ALAM_BF16: by_bits(std::integral_constant<int, ALAM_BF16>{}); break;
    case ALAM_F16: by_bits(std::integral_constant<int, ALAM_F16>{}); break;
    default: by_bits(std::integral_constant<int, ALAM_F32>{});
  }
}

template <int DT, int BITS>
struct QuantizeRotated {
  static void run(const void* x, int64_t n, uint64_t seed, uint8_t* payload, uint16_t* meta) {
    if constexpr (BITS == 0) {
      quantize_half<DT>(x, n, seed, payload, meta);
    } else {
      quantize_rotated<DT, BITS>(x, n, seed, payload, meta);
    }
  }
};

template <int DT, int BITS>
struct DequantizeRotated {
  static void run(const uint8_t* payload, const uint16_t* meta, int64_t n, uint64_t seed, void* out) {
    if constexpr (BITS == 0) {
      dequantize_half<DT>(payload, meta, n, seed, out);
    } else {
      dequantize_rotated<DT, BITS>(payload, meta, n, seed, out);
    }
  }
};

// Runtime (dtype, bits) -> the template instance. bits 0 is average quantization.
template <template <int, int, bool> class F, typename... Args>
void dispatch(int dtype, int bits, Args... args) {
  auto by_bits = [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    switch (bits) {
      case 0: F<DT, 2, true>::run(args...); break;
      case 2: F<DT, 2, false>::run(args...); break;
      case 4: F<DT, 4, false>::run(args...); break;
      case 8: F<DT, 8, false>::run(args...); break;
    }
  };
  switch (dtype) {
    case ALAM_BF16: by_bits(std::integral_constant<int, ALAM_BF16>{}); break;
    case ALAM_F16: by_bits(std::integral_constant<int, ALAM_F16>{}); break;
    default: by_bits(std::integral_constant<int, ALAM_F32>{});
  }
}

template <int DT, int BITS, bool AQ>
struct Quantize {
  static void run(const void* x, int64_t n, uint64_t seed, uint8_t* payload, float* meta) {
    quantize<DT, BITS, AQ>(x, n, seed, payload, meta);
  }
};

template <int DT, int BITS, bool AQ>
struct Dequantize {
  static void run(const uint8_t* payload, const float* meta, int64_t n, void* out) {
    dequantize<DT, BITS, AQ>(payload, meta, n, out);
  }
};

}  // namespace

extern "C" {

int alam_cpu_num_threads(void) { return omp_get_max_threads(); }

void alam_cpu_quantize(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                       uint8_t* payload, float* meta) {
  if (n == 0) return;
  dispatch<Quantize>(dtype, bits, x, n, seed, payload, meta);
}

void alam_cpu_dequantize(const uint8_t* payload, const float* meta, int64_t n, int bits,
                         int dtype, void* out) {
  if (n == 0) return;
  dispatch<Dequantize>(dtype, bits, payload, meta, n, out);
}

void alam_cpu_quantize_rotated(const void* x, int dtype, int64_t n, int bits, uint64_t seed,
                               uint8_t* payload, uint16_t* meta) {
  if (n == 0) return;
  dispatch_rotated<QuantizeRotated>(dtype, bits, x, n, seed, payload, meta);
}

void alam_cpu_dequantize_rotated(const uint8_t* payload, const uint16_t* meta, int64_t n,
                                 int bits, uint64_t seed, int dtype, void* out) {
  if (n == 0) return;
  dispatch_rotated<DequantizeRotated>(dtype, bits, payload, meta, n, seed, out);
}

void alam_cpu_pack_mask(const uint8_t* x, int64_t n, uint8_t* payload) {
  const int64_t full = n / 8;
#pragma omp parallel for schedule(static) if (full > 65536)
  for (int64_t b = 0; b < full; ++b) {
    uint32_t byte = 0;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) byte |= (uint32_t)(x[b * 8 + k] != 0) << k;
    payload[b] = (uint8_t)byte;
  }
  if (full * 8 < n) {  // the tail byte reads only the n % 8 values that exist
    uint32_t byte = 0;
    for (int64_t i = full * 8; i < n; ++i) byte |= (uint32_t)(x[i] != 0) << (i - full * 8);
    payload[full] = (uint8_t)byte;
  }
}

void alam_cpu_unpack_mask(const uint8_t* payload, int64_t n, uint8_t* out) {
#pragma omp parallel for simd schedule(static) if (n > 524288)
  for (int64_t i = 0; i < n; ++i) out[i] = (payload[i >> 3] >> (i & 7)) & 1u;
}

}  // extern "C"

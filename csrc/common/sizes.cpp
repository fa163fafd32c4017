// Buffer sizes of the packed formats, shared by the CPU and CUDA modules.
#include "alam_codec.h"

extern "C" {

static int64_t quantized_values(int64_t n, int bits) {
  return bits == 0 ? (n + ALAM_AQ_AVG - 1) / ALAM_AQ_AVG : n;
}

int64_t alam_num_groups(int64_t n, int bits) {
  return (quantized_values(n, bits) + ALAM_GROUP - 1) / ALAM_GROUP;
}

int64_t alam_payload_bytes(int64_t n, int bits) {
  return (quantized_values(n, bits) * (bits == 0 ? 2 : bits) + 7) / 8;
}

int64_t alam_rotated_payload_bytes(int64_t n, int bits) {
  if (bits == 0)  // h05: GROUP sign bits per block of two groups
    return (n + 2 * ALAM_GROUP - 1) / (2 * ALAM_GROUP) * (ALAM_GROUP / 8);
  return (n + ALAM_GROUP - 1) / ALAM_GROUP * (ALAM_GROUP * bits / 8);
}

}  // extern "C"

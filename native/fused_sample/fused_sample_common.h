// The integer parts of fused_sample's semantics (native/README.md), shared by the CPU code and the
// CUDA kernel so that both compute the same thresholds and the same token from the same float
// values: the per-row hash, the 32.32 fixed point of the probability and weight sums, and the
// radix digits of the threshold selection. (The Metal kernel repeats them in its own language.)
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FS_HOST_DEVICE inline
#endif

namespace mlx_serving::fused_sample_detail {

// Sums of probabilities and weights (each in [0, 1]) are exact integer sums of floor(x * 2^32).
constexpr float kFixedOne = 4294967296.0f; // 2^32

// The threshold selection walks the float bits of p (>= 0, so ordered as unsigned integers) in
// three digits, most significant first: bits 31..21, 20..10 and 9..0.
constexpr int kRadixPasses = 3;
constexpr int kRadixMaxBins = 2048;

FS_HOST_DEVICE int radix_shift(int pass) {
  return pass == 0 ? 21 : (pass == 1 ? 10 : 0);
}

FS_HOST_DEVICE int radix_bits(int pass) {
  return pass == 2 ? 10 : 11;
}

// The lowbias32 hash (README step 7).
FS_HOST_DEVICE uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The row's 24 random bits r: u = r * 2^-24.
FS_HOST_DEVICE uint32_t random24(uint32_t key, uint32_t step) {
  return mix(key ^ mix(step + 0x9E3779B9u)) >> 8;
}

FS_HOST_DEVICE uint64_t to_fixed(float x) {
  return static_cast<uint64_t>(x * kFixedOne);
}

// floor(total * r / 2^24) for r <= 2^24 and total < 2^63, without overflow.
FS_HOST_DEVICE uint64_t scale24_floor(uint64_t total, uint64_t r) {
  return (total >> 24) * r + (((total & 0xFFFFFFull) * r) >> 24);
}

// ceil(total * r / 2^24) for r <= 2^24 and total < 2^63, without overflow.
FS_HOST_DEVICE uint64_t scale24_ceil(uint64_t total, uint64_t r) {
  return (total >> 24) * r + (((total & 0xFFFFFFull) * r + 0xFFFFFFull) >> 24);
}

// top_p as a multiple of 2^-24 (floor), clamped to [0, 2^24].
FS_HOST_DEVICE uint64_t top_p24(float top_p) {
  if (!(top_p > 0.0f)) {
    return 0;
  }
  if (top_p >= 1.0f) {
    return 1ull << 24;
  }
  return static_cast<uint64_t>(top_p * 16777216.0f);
}

// The top-p target on the fixed-point sums: at least 1, so that a zero top_p keeps the largest p.
FS_HOST_DEVICE uint64_t top_p_target(uint64_t z_fixed, float top_p) {
  uint64_t target = scale24_ceil(z_fixed, top_p24(top_p));
  return target < 1 ? 1 : target;
}

} // namespace mlx_serving::fused_sample_detail

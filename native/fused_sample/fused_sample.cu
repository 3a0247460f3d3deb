// The CUDA eval_gpu of FusedSample: one block of 512 threads per row, no sort.
//
// The op hands the kernel a float32 copy of the logits that only this primitive holds (see
// fused_sample.cpp) and the kernel works in it in place:
//   1. bias and penalties: each distinct token by the thread holding its first occurrence;
//   2. one pass: the mask (masked tokens become -inf), the largest logit and its first index;
//   3. thresholds (top-k, top-p), by a three-digit radix selection on the float bits of
//      p = exp(l - m): per digit one pass building shared-memory histograms of counts (top-k)
//      and of 32.32 fixed-point sums of p (top-p), then a block scan over the bins picks the
//      digit; the first pass also sums Z. Later passes skip the exp of every element whose
//      logit cannot fall in the chosen bins;
//   4. one pass summing the kept tokens' fixed-point weights per warp (each warp a contiguous
//      slice of the row); the warp whose slice holds u * W is found from the warps' sums, and a
//      block prefix sum over that slice finds the token.
// Sums are exact integer sums, so the result does not depend on the order of the additions: the
// same token as the pure-MLX fallback on the GPU, whose exp is expf too (no fused multiply-adds
// here either: __fmul_rn and friends where a product meets a sum).
//
// As in decode_attention.cu, the kernel goes into MLX's graph as a driver-API CUfunction, and the
// output takes over the buffer of an extra input made by the op (libmlx exports neither its
// runtime's kernels nor its stream-ordered allocator).
//
// Compiled (nvcc 13 from pip's wheels, sm_90: 98 registers, no spills) where it was written, but
// never run there (no GPU): tests/engine/test_fused_sample.py runs it on the GPU machine.

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <climits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "cuda_function.h"
#include "fused_sample/fused_sample.h"
#include "fused_sample/fused_sample_common.h"

namespace mlx_serving {

namespace {

namespace fs = fused_sample_detail;

constexpr int kThreads = 512;
// Radix bins a thread holds in the bin scans (bins / kThreads is at most this).
constexpr int kBinsPerThread = fs::kRadixMaxBins / kThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kScanItems = 8; // elements per thread in the final block prefix sum
constexpr unsigned kFullMask = 0xffffffffu;
// Bounds on y = l - m, with a margin far wider than expf's and logf's errors: below
// log(v) - kMargin, expf(y) < v; at or above log(v) + kMargin, expf(y) >= v.
constexpr float kMargin = 1e-3f;
// expf(y) * 2^32 < 1 below this: such a p adds nothing to a fixed-point sum.
constexpr float kBelowFixed = -23.0f;
// expf(y) > 0 for sure above this.
constexpr float kSurelyPositive = -80.0f;

struct Args {
  float* work; // (B, V): the logits, processed in place
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* min_p;
  const int32_t* history;
  const float* repetition;
  const float* presence;
  const float* frequency;
  const int32_t* bias_ids;
  const float* bias_values;
  const uint32_t* keys;
  const uint32_t* mask; // nullptr: no mask
  int32_t* out;
  int V;
  int L;
  int K;
  int words;
};

struct MaxPair {
  float value;
  int index;
};

struct FirstMax {
  __device__ __forceinline__ MaxPair operator()(const MaxPair& a, const MaxPair& b) const {
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) {
      return b;
    }
    return a;
  }
};

__device__ __forceinline__ float negative_infinity() {
  return __int_as_float(0xff800000);
}

// f(i, x) for every element x = row[i] of the row, the block's threads taking float4s.
template <typename F>
__device__ __forceinline__ void for_each(const float* row, int V, F&& f) {
  const bool aligned = (V % 4 == 0) && (reinterpret_cast<uintptr_t>(row) % 16 == 0);
  int i = threadIdx.x;
  if (aligned) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int n4 = V / 4;
#pragma unroll 2
    for (int j = threadIdx.x; j < n4; j += kThreads) {
      const float4 x = row4[j];
      f(4 * j, x.x);
      f(4 * j + 1, x.y);
      f(4 * j + 2, x.z);
      f(4 * j + 3, x.w);
    }
    return;
  }
#pragma unroll 2
  for (; i < V; i += kThreads) {
    f(i, row[i]);
  }
}

// The key range [lo, lo + 2^width) of a radix group as bounds on y = l - m (see kMargin).
__device__ __forceinline__ void group_bounds(uint32_t lo, int width, float& y_lo, float& y_hi) {
  const float v_lo = __uint_as_float(lo);
  const float v_hi = __uint_as_float(lo + (1u << width));
  y_lo = v_lo > 0.0f ? logf(v_lo) - kMargin : negative_infinity();
  y_hi = logf(v_hi) + kMargin;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

// Whether token i (y = l - m) is kept under threshold t, computing p only near the threshold.
__device__ __forceinline__ bool is_kept(float y, float t, float y_lo, float y_hi) {
  if (y < y_lo) {
    return false;
  }
  if (y >= y_hi && y > kSurelyPositive) {
    return true;
  }
  const float p = expf(y);
  return p > 0.0f && p >= t;
}

__global__ void __launch_bounds__(kThreads) fused_sample_kernel(const __grid_constant__ Args a) {
  using ReduceMax = cub::BlockReduce<MaxPair, kThreads>;
  using ReduceU64 = cub::BlockReduce<unsigned long long, kThreads>;
  using ScanU32 = cub::BlockScan<unsigned int, kThreads>;
  using ScanU64 = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename ReduceMax::TempStorage reduce_max;
    typename ReduceU64::TempStorage reduce_u64;
    typename ScanU32::TempStorage scan_u32;
    typename ScanU64::TempStorage scan_u64;
  } temp;
  __shared__ unsigned int hist_k[fs::kRadixMaxBins];
  __shared__ unsigned long long hist_p[fs::kRadixMaxBins];
  __shared__ unsigned long long warp_sums[kWarps];
  __shared__ float shared_max;
  __shared__ int shared_argmax;
  __shared__ int chosen_k; // the top-k digit of this pass, -1 if none
  __shared__ unsigned int left_k;
  __shared__ int chosen_p;
  __shared__ unsigned long long left_p;
  __shared__ int chosen_warp;
  __shared__ unsigned long long before_warp;
  __shared__ unsigned long long point;
  __shared__ int token;

  const int b = blockIdx.x;
  const int tid = threadIdx.x;
  const int V = a.V;
  const float neg_inf = negative_infinity();
  float* l = a.work + static_cast<size_t>(b) * V;

  // 1. Bias (in k order), then the penalties, each distinct token by its first occurrence.
  if (a.K > 0) {
    const int32_t* ids = a.bias_ids + static_cast<size_t>(b) * a.K;
    const float* values = a.bias_values + static_cast<size_t>(b) * a.K;
    for (int k = tid; k < a.K; k += kThreads) {
      const int t = ids[k];
      if (t < 0 || t >= V) {
        continue;
      }
      bool first = true;
      for (int j = 0; j < k && first; ++j) {
        first = ids[j] != t;
      }
      if (!first) {
        continue;
      }
      float x = l[t];
      for (int j = k; j < a.K; ++j) {
        if (ids[j] == t) {
          x = __fadd_rn(x, values[j]);
        }
      }
      l[t] = x;
    }
    __syncthreads();
  }
  if (a.L > 0) {
    const int32_t* h = a.history + static_cast<size_t>(b) * a.L;
    const float r = a.repetition[b];
    const float presence = a.presence[b];
    const float frequency = a.frequency[b];
    for (int j = tid; j < a.L; j += kThreads) {
      const int t = h[j];
      if (t < 0 || t >= V) {
        continue;
      }
      bool first = true;
      int count = 0;
      for (int i = 0; i < a.L; ++i) {
        if (h[i] == t) {
          if (i < j) {
            first = false;
            break;
          }
          ++count;
        }
      }
      if (!first) {
        continue;
      }
      float x = l[t];
      if (r != 1.0f) {
        x = x < 0.0f ? __fmul_rn(x, r) : __fdiv_rn(x, r);
      }
      x = __fsub_rn(x, presence);
      // Two roundings, as the CPU and the fallback (no fused multiply-add).
      x = __fsub_rn(x, __fmul_rn(frequency, static_cast<float>(count)));
      l[t] = x;
    }
    __syncthreads();
  }

  // 2. Mask, largest logit, its first index.
  const uint32_t* mask = a.mask ? a.mask + static_cast<size_t>(b) * a.words : nullptr;
  MaxPair best{neg_inf, INT_MAX};
  if (mask) {
    for (int i = tid; i < V; i += kThreads) {
      float x = l[i];
      if (!((mask[i >> 5] >> (i & 31)) & 1u)) {
        x = neg_inf;
        l[i] = x;
      }
      if (x > best.value) {
        best = {x, i};
      }
    }
  } else {
    for_each(l, V, [&](int i, float x) {
      if (x > best.value || (x == best.value && x > neg_inf && i < best.index)) {
        best = {x, i};
      }
    });
  }
  best = ReduceMax(temp.reduce_max).Reduce(best, FirstMax());
  if (tid == 0) {
    shared_max = best.value;
    shared_argmax = best.index;
  }
  __syncthreads();
  const float m = shared_max;
  if (!(m > neg_inf)) {
    if (tid == 0) {
      a.out[b] = -1;
    }
    return;
  }
  const float temperature = a.temperature[b];
  if (!(temperature > 0.0f)) {
    if (tid == 0) {
      a.out[b] = shared_argmax;
    }
    return;
  }

  // 3. Thresholds.
  const int top_k = a.top_k[b];
  const float top_p = a.top_p[b];
  const float min_p = a.min_p[b];
  bool want_k = top_k > 0 && top_k < V;
  bool want_p = top_p < 1.0f;
  float t_k = 0.0f;
  float t_p = 0.0f;
  if (want_k || want_p) {
    uint32_t prefix_k = 0;
    uint32_t prefix_p = 0;
    uint32_t decided = 0;
    unsigned int k_left = static_cast<unsigned int>(top_k);
    unsigned long long target = 0;
    for (int pass = 0; pass < fs::kRadixPasses && (want_k || want_p); ++pass) {
      const int shift = fs::radix_shift(pass);
      const int bits = fs::radix_bits(pass);
      const unsigned int bins = 1u << bits;
      for (unsigned int i = tid; i < bins; i += kThreads) {
        hist_k[i] = 0;
        hist_p[i] = 0;
      }
      if (tid == 0) {
        chosen_k = -1;
        chosen_p = -1;
      }
      // Which y can land in the groups still open (none are closed in the first pass).
      float y_lo = neg_inf;
      float y_hi = __int_as_float(0x7f800000);
      if (pass > 0) {
        float k_lo, k_hi, p_lo, p_hi;
        group_bounds(prefix_k, shift + bits, k_lo, k_hi);
        group_bounds(prefix_p, shift + bits, p_lo, p_hi);
        y_lo = fminf(want_k ? k_lo : p_lo, want_p ? p_lo : k_lo);
        y_hi = fmaxf(want_k ? k_hi : p_hi, want_p ? p_hi : k_hi);
      } else if (!want_k) {
        y_lo = kBelowFixed; // top-p alone: a p that adds nothing to the sums changes nothing
      }
      __syncthreads();
      unsigned long long z = 0;
      // Each thread adds up runs of one digit before touching the shared bins: on a flat
      // distribution nearly every p lands in one bin, and one atomic per element on it
      // serialized the block (12 ms a step at 128k on an H200 against about 1 ms).
      int run_k_digit = -1, run_p_digit = -1;
      unsigned int run_k = 0;
      unsigned long long run_p = 0;
      for_each(l, V, [&](int, float x) {
        const float y = x - m;
        if (!(y >= y_lo && y < y_hi)) {
          return;
        }
        const float p = expf(y);
        if (!(p > 0.0f)) {
          return;
        }
        const uint32_t key = __float_as_uint(p);
        const uint32_t digit = (key >> shift) & (bins - 1);
        const unsigned long long fixed = fs::to_fixed(p);
        if (want_k && (key & decided) == prefix_k) {
          if (static_cast<int>(digit) != run_k_digit) {
            if (run_k > 0) {
              atomicAdd(&hist_k[run_k_digit], run_k);
            }
            run_k_digit = static_cast<int>(digit);
            run_k = 0;
          }
          run_k += 1;
        }
        if (want_p && (key & decided) == prefix_p && fixed > 0) {
          if (static_cast<int>(digit) != run_p_digit) {
            if (run_p > 0) {
              atomicAdd(&hist_p[run_p_digit], run_p);
            }
            run_p_digit = static_cast<int>(digit);
            run_p = 0;
          }
          run_p += fixed;
        }
        z += fixed;
      });
      if (run_k > 0) {
        atomicAdd(&hist_k[run_k_digit], run_k);
      }
      if (run_p > 0) {
        atomicAdd(&hist_p[run_p_digit], run_p);
      }
      if (pass == 0 && want_p) {
        const unsigned long long total = ReduceU64(temp.reduce_u64).Sum(z);
        if (tid == 0) {
          left_p = fs::top_p_target(total, top_p);
        }
      }
      __syncthreads();
      if (pass == 0) {
        target = left_p;
        __syncthreads(); // everyone has read it before the selection below rewrites left_p
      }
      // Thread tid holds the bins of descending ranks per * tid ... per * tid + per - 1.
      const int per = bins / kThreads;
      if (want_k) {
        unsigned int counts[kBinsPerThread] = {};
        unsigned int total = 0;
#pragma unroll
        for (int r = 0; r < kBinsPerThread; ++r) {
          if (r < per) {
            counts[r] = hist_k[bins - 1 - (per * tid + r)];
            total += counts[r];
          }
        }
        unsigned int above;
        ScanU32(temp.scan_u32).ExclusiveSum(total, above);
#pragma unroll
        for (int r = 0; r < kBinsPerThread; ++r) {
          if (r < per && above < k_left && above + counts[r] >= k_left) {
            chosen_k = bins - 1 - (per * tid + r);
            left_k = k_left - above;
          }
          above += counts[r];
        }
        __syncthreads();
      }
      if (want_p) {
        unsigned long long sums[kBinsPerThread] = {};
        unsigned long long total = 0;
#pragma unroll
        for (int r = 0; r < kBinsPerThread; ++r) {
          if (r < per) {
            sums[r] = hist_p[bins - 1 - (per * tid + r)];
            total += sums[r];
          }
        }
        unsigned long long above;
        ScanU64(temp.scan_u64).ExclusiveSum(total, above);
#pragma unroll
        for (int r = 0; r < kBinsPerThread; ++r) {
          if (r < per && above < target && above + sums[r] >= target) {
            chosen_p = bins - 1 - (per * tid + r);
            left_p = target - above;
          }
          above += sums[r];
        }
      }
      __syncthreads();
      if (want_k) {
        if (chosen_k < 0) {
          want_k = false; // fewer than k positive p: no top-k threshold
        } else {
          prefix_k |= static_cast<uint32_t>(chosen_k) << shift;
          k_left = left_k;
        }
      }
      if (want_p) {
        if (chosen_p < 0) {
          want_p = false;
        } else {
          prefix_p |= static_cast<uint32_t>(chosen_p) << shift;
          target = left_p;
        }
      }
      decided |= (bins - 1) << shift;
      __syncthreads();
    }
    t_k = want_k ? __uint_as_float(prefix_k) : 0.0f;
    t_p = want_p ? __uint_as_float(prefix_p) : 0.0f;
  }
  float t = fmaxf(t_k, t_p);
  if (min_p > 0.0f) {
    t = fmaxf(t, min_p);
  }
  t = fminf(t, 1.0f); // the largest p (1) is always kept
  const float log_t = t > 0.0f ? logf(t) : neg_inf;
  const float keep_lo = log_t - kMargin;
  const float keep_hi = log_t + kMargin;

  // 4. Kept weights, summed per warp over contiguous slices.
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int slice = (V + kWarps - 1) / kWarps;
  {
    const int start = min(V, warp * slice);
    const int end = min(V, start + slice);
    unsigned long long sum = 0;
#pragma unroll 4
    for (int i = start + lane; i < end; i += 32) {
      const float y = l[i] - m;
      if (is_kept(y, t, keep_lo, keep_hi)) {
        sum += fs::to_fixed(expf(__fdiv_rn(y, temperature)));
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      warp_sums[warp] = sum;
    }
  }
  __syncthreads();
  if (tid == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kWarps; ++w) {
      total += warp_sums[w];
    }
    const uint32_t* key = a.keys + static_cast<size_t>(b) * 2;
    const unsigned long long u = fs::scale24_floor(total, fs::random24(key[0], key[1]));
    unsigned long long running = 0;
    int w = 0;
    while (w < kWarps - 1 && running + warp_sums[w] <= u) {
      running += warp_sums[w];
      ++w;
    }
    chosen_warp = w;
    before_warp = running;
    point = u;
    token = shared_argmax; // (the crossing is always found: the sums are exact)
  }
  __syncthreads();

  // The crossing within the chosen slice: a block prefix sum over it, kScanItems a thread.
  {
    const int start = min(V, chosen_warp * slice);
    const int end = min(V, start + slice);
    const unsigned long long u = point;
    unsigned long long carry = before_warp;
    for (int base = start; base < end; base += kThreads * kScanItems) {
      unsigned long long w[kScanItems];
      unsigned long long mine = 0;
#pragma unroll
      for (int r = 0; r < kScanItems; ++r) {
        const int i = base + tid * kScanItems + r;
        w[r] = 0;
        if (i < end) {
          const float y = l[i] - m;
          if (is_kept(y, t, keep_lo, keep_hi)) {
            w[r] = fs::to_fixed(expf(__fdiv_rn(y, temperature)));
          }
        }
        mine += w[r];
      }
      unsigned long long before, chunk;
      ScanU64(temp.scan_u64).ExclusiveSum(mine, before, chunk);
      unsigned long long running = carry + before;
      if (running <= u && running + mine > u) {
#pragma unroll
        for (int r = 0; r < kScanItems; ++r) {
          running += w[r];
          if (running > u) {
            token = base + tid * kScanItems + r;
            break;
          }
        }
      }
      carry += chunk;
      __syncthreads();
      if (carry > u) {
        break;
      }
    }
  }
  __syncthreads();
  if (tid == 0) {
    a.out[b] = token;
  }
}

} // namespace

void FusedSample::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // inputs: work, temperature, top_k, top_p, min_p, history, repetition, presence, frequency,
  // bias_ids, bias_values, keys, [mask], then the output's buffer.
  auto& out = outputs[0];
  const auto& buffer = inputs.back();
  if (buffer.is_donatable() && buffer.nbytes() == out.nbytes() && buffer.dtype() == mx::int32) {
    out.copy_shared_buffer(buffer);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  const auto& work = inputs[0];
  const int rows = work.shape(0);
  if (rows == 0) {
    return;
  }
  auto& encoder = mx::cu::get_command_encoder(stream());
  for (size_t i = 0; i + 1 < inputs.size(); ++i) {
    encoder.set_input_array(inputs[i]);
  }
  // The kernel also writes `work`, which only this primitive holds.
  encoder.set_output_array(work);
  encoder.set_output_array(out);
  Args args{
      mx::gpu_ptr<float>(const_cast<mx::array&>(work)),
      mx::gpu_ptr<float>(inputs[1]),
      mx::gpu_ptr<int32_t>(inputs[2]),
      mx::gpu_ptr<float>(inputs[3]),
      mx::gpu_ptr<float>(inputs[4]),
      mx::gpu_ptr<int32_t>(inputs[5]),
      mx::gpu_ptr<float>(inputs[6]),
      mx::gpu_ptr<float>(inputs[7]),
      mx::gpu_ptr<float>(inputs[8]),
      mx::gpu_ptr<int32_t>(inputs[9]),
      mx::gpu_ptr<float>(inputs[10]),
      mx::gpu_ptr<uint32_t>(inputs[11]),
      masked_ ? mx::gpu_ptr<uint32_t>(inputs[12]) : nullptr,
      mx::gpu_ptr<int32_t>(out),
      static_cast<int>(work.shape(1)),
      static_cast<int>(inputs[5].shape(1)),
      static_cast<int>(inputs[9].shape(1)),
      masked_ ? static_cast<int>(inputs[12].shape(1)) : 0};
  encoder.add_kernel_node_ex(
      driver_function(&fused_sample_kernel, encoder.device().cuda_device(), "fused_sample"),
      dim3(rows),
      dim3(kThreads),
      dim3(1, 1, 1),
      0,
      args);
}

} // namespace mlx_serving

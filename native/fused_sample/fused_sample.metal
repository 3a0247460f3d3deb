// The Metal kernel of FusedSample: one threadgroup per row, kept simple (semantics:
// native/README.md; the CUDA kernel in fused_sample.cu is the fast one).
//
// UNTESTED: written without a Mac; neither compiled nor run. It follows the CPU kernel's
// arithmetic: exact 32.32 fixed-point sums, the thresholds found bit by bit (31 passes over the
// row, each counting and summing the p at or above a candidate), the token by one threadgroup
// prefix sum over per-thread contiguous slices.

#include <metal_stdlib>

using namespace metal;

constant constexpr uint kMaxThreads = 1024;
constant constexpr float kFixedOne = 4294967296.0f; // 2^32

static inline uint mix32(uint x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

static inline ulong to_fixed(float x) {
  return ulong(x * kFixedOne);
}

static inline ulong scale24_floor(ulong total, ulong r) {
  return (total >> 24) * r + (((total & 0xFFFFFFul) * r) >> 24);
}

static inline ulong top_p_target(ulong total, float top_p) {
  ulong r = 0;
  if (top_p >= 1.0f) {
    r = 1ul << 24;
  } else if (top_p > 0.0f) {
    r = ulong(top_p * 16777216.0f);
  }
  ulong target = (total >> 24) * r + (((total & 0xFFFFFFul) * r + 0xFFFFFFul) >> 24);
  return target < 1 ? 1 : target;
}

// Sum over the threadgroup (n threads); every thread gets the total.
static inline ulong group_sum(ulong x, threadgroup ulong* buffer, uint tid, uint n) {
  buffer[tid] = x;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint stride = 1; stride < n; stride *= 2) {
    ulong other = 0;
    if (tid % (2 * stride) == 0 && tid + stride < n) {
      other = buffer[tid + stride];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid % (2 * stride) == 0) {
      buffer[tid] += other;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  ulong total = buffer[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return total;
}

[[kernel]] void fused_sample(
    device float* work [[buffer(0)]],
    const device float* temperature [[buffer(1)]],
    const device int* top_k [[buffer(2)]],
    const device float* top_p [[buffer(3)]],
    const device float* min_p [[buffer(4)]],
    const device int* history [[buffer(5)]],
    const device float* repetition [[buffer(6)]],
    const device float* presence [[buffer(7)]],
    const device float* frequency [[buffer(8)]],
    const device int* bias_ids [[buffer(9)]],
    const device float* bias_values [[buffer(10)]],
    const device uint* keys [[buffer(11)]],
    const device uint* mask [[buffer(12)]],
    device int* out [[buffer(13)]],
    constant const int* sizes [[buffer(14)]], // V, L, K, words, masked
    uint b [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  threadgroup ulong sums[kMaxThreads];
  threadgroup float values[kMaxThreads];
  threadgroup int indices[kMaxThreads];
  threadgroup ulong point[1];

  const int V = sizes[0];
  const int L = sizes[1];
  const int K = sizes[2];
  const int words = sizes[3];
  const bool masked = sizes[4] != 0;
  const float neg_inf = -INFINITY;
  device float* l = work + ulong(b) * ulong(V);

  // 1. Bias (in k order), then the penalties, each distinct token by its first occurrence.
  const device int* ids = bias_ids + ulong(b) * ulong(K);
  const device float* bias = bias_values + ulong(b) * ulong(K);
  for (int k = int(tid); k < K; k += int(n)) {
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
    for (int j = k; j < K; ++j) {
      if (ids[j] == t) {
        x += bias[j];
      }
    }
    l[t] = x;
  }
  threadgroup_barrier(mem_flags::mem_device);
  const device int* h = history + ulong(b) * ulong(L);
  const float r = repetition[b];
  for (int j = int(tid); j < L; j += int(n)) {
    const int t = h[j];
    if (t < 0 || t >= V) {
      continue;
    }
    bool first = true;
    int count = 0;
    for (int i = 0; i < L; ++i) {
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
      x = x < 0.0f ? x * r : x / r;
    }
    x -= presence[b];
    const float shift = frequency[b] * float(count);
    x -= shift;
    l[t] = x;
  }
  threadgroup_barrier(mem_flags::mem_device);

  // 2. Mask, largest logit, its first index.
  const device uint* row_mask = mask + ulong(b) * ulong(words);
  float best = neg_inf;
  int best_index = 0x7fffffff;
  for (int i = int(tid); i < V; i += int(n)) {
    float x = l[i];
    if (masked && !((row_mask[i >> 5] >> (i & 31)) & 1u)) {
      x = neg_inf;
      l[i] = x;
    }
    if (x > best) {
      best = x;
      best_index = i;
    }
  }
  values[tid] = best;
  indices[tid] = best_index;
  threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
  if (tid == 0) {
    for (uint i = 1; i < n; ++i) {
      if (values[i] > values[0] || (values[i] == values[0] && indices[i] < indices[0])) {
        values[0] = values[i];
        indices[0] = indices[i];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float m = values[0];
  const int argmax = indices[0];
  if (!(m > neg_inf)) {
    if (tid == 0) {
      out[b] = -1;
    }
    return;
  }
  const float T = temperature[b];
  if (!(T > 0.0f)) {
    if (tid == 0) {
      out[b] = argmax;
    }
    return;
  }

  // 3. Thresholds, bit by bit on the float bits of p (>= 0, so ordered as integers).
  const int k = top_k[b];
  const float tp = top_p[b];
  bool want_k = k > 0 && k < V;
  bool want_p = tp < 1.0f;
  float t_k = 0.0f;
  float t_p = 0.0f;
  if (want_k || want_p) {
    ulong positive = 0;
    ulong z = 0;
    for (int i = int(tid); i < V; i += int(n)) {
      const float p = exp(l[i] - m);
      positive += p > 0.0f ? 1 : 0;
      z += to_fixed(p);
    }
    positive = group_sum(positive, sums, tid, n);
    z = group_sum(z, sums, tid, n);
    want_k = want_k && positive >= ulong(k);
    const ulong target = want_p ? top_p_target(z, tp) : 0;
    uint prefix_k = 0;
    uint prefix_p = 0;
    for (int bit = 30; bit >= 0 && (want_k || want_p); --bit) {
      const uint cand_k = prefix_k | (1u << bit);
      const uint cand_p = prefix_p | (1u << bit);
      ulong count = 0;
      ulong sum = 0;
      for (int i = int(tid); i < V; i += int(n)) {
        const float p = exp(l[i] - m);
        if (!(p > 0.0f)) {
          continue;
        }
        const uint key = as_type<uint>(p);
        count += key >= cand_k ? 1 : 0;
        sum += key >= cand_p ? to_fixed(p) : 0;
      }
      if (want_k) {
        count = group_sum(count, sums, tid, n);
        if (count >= ulong(k)) {
          prefix_k = cand_k;
        }
      }
      if (want_p) {
        sum = group_sum(sum, sums, tid, n);
        if (sum >= target) {
          prefix_p = cand_p;
        }
      }
    }
    t_k = want_k ? as_type<float>(prefix_k) : 0.0f;
    t_p = want_p ? as_type<float>(prefix_p) : 0.0f;
  }
  float t = max(t_k, t_p);
  if (min_p[b] > 0.0f) {
    t = max(t, min_p[b]);
  }
  t = min(t, 1.0f);

  // 4. Kept weights: each thread a contiguous slice; one prefix sum over the slices' sums.
  const int slice = (V + int(n) - 1) / int(n);
  const int start = min(V, int(tid) * slice);
  const int end = min(V, start + slice);
  ulong mine = 0;
  for (int i = start; i < end; ++i) {
    const float p = exp(l[i] - m);
    if (p > 0.0f && p >= t) {
      mine += to_fixed(exp((l[i] - m) / T));
    }
  }
  sums[tid] = mine;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    // The exclusive prefix in place, serially (n values), then the point to pass.
    ulong running = 0;
    for (uint i = 0; i < n; ++i) {
      const ulong v = sums[i];
      sums[i] = running;
      running += v;
    }
    const uint u24 = mix32(keys[2 * b] ^ mix32(keys[2 * b + 1] + 0x9E3779B9u)) >> 8;
    point[0] = scale24_floor(running, ulong(u24));
    indices[0] = argmax; // (the crossing is always found: the sums are exact)
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const ulong u = point[0];
  const ulong before = sums[tid];
  if (before <= u && before + mine > u) {
    ulong running = before;
    for (int i = start; i < end; ++i) {
      const float p = exp(l[i] - m);
      if (p > 0.0f && p >= t) {
        running += to_fixed(exp((l[i] - m) / T));
        if (running > u) {
          indices[0] = i;
          break;
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    out[b] = indices[0];
  }
}

// The Metal kernel of DecodeAttention (eval_gpu in decode_attention.cpp, under _METAL_): the
// CUDA kernel's layout and arithmetic (decode_attention.cu) with simdgroups for warps. One
// threadgroup of 32 simdgroups per (query head, sequence). Never compiled by this project's CI
// (no macOS machine): see native/README.md.

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

using namespace metal;

// The parameter block the C++ side sets at buffer 5: its Layout, field for field.
struct DecodeAttentionParams {
  int B;
  int H;
  int Hkv;
  int S;
  int D;
  float scale;
  int64_t q_strides[4];
  int64_t k_strides[4];
  int64_t v_strides[4];
  int64_t lp_stride;
};

template <typename T, int D>
[[kernel]] void decode_attention(
    const device T* queries [[buffer(0)]],
    const device T* keys [[buffer(1)]],
    const device T* values [[buffer(2)]],
    const device int32_t* left_padding [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant const DecodeAttentionParams& p [[buffer(5)]],
    uint3 group [[threadgroup_position_in_grid]],
    uint w [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int WARPS = 32;
  constexpr int PER_LANE = D / 32;
  const int head = group.x;
  const int b = group.z;
  const int kv_head = head / (p.H / p.Hkv);
  const float scale_log2 = p.scale * 1.44269504088896341f;

  const device T* q = queries + b * p.q_strides[0] + head * p.q_strides[1] +
      lane * PER_LANE * p.q_strides[3];
  const device T* k = keys + b * p.k_strides[0] + kv_head * p.k_strides[1] +
      lane * PER_LANE * p.k_strides[3];
  const device T* v = values + b * p.v_strides[0] + kv_head * p.v_strides[1] +
      lane * PER_LANE * p.v_strides[3];

  float qs[PER_LANE], acc[PER_LANE];
  for (int i = 0; i < PER_LANE; i++) {
    qs[i] = scale_log2 * static_cast<float>(q[i * p.q_strides[3]]);
    acc[i] = 0.0f;
  }
  float best = -INFINITY, total = 0.0f;
  const int start = max(left_padding[b * p.lp_stride], 0);
  for (int j = start + int(w); j < p.S; j += WARPS) {
    const device T* kj = k + j * p.k_strides[2];
    float score = 0.0f;
    for (int i = 0; i < PER_LANE; i++) {
      score += qs[i] * static_cast<float>(kj[i * p.k_strides[3]]);
    }
    score = simd_sum(score);
    const float top = max(best, score);
    const float shrink = exp2(best - top);
    const float weight = exp2(score - top);
    best = top;
    total = total * shrink + weight;
    const device T* vj = v + j * p.v_strides[2];
    for (int i = 0; i < PER_LANE; i++) {
      acc[i] = acc[i] * shrink + weight * static_cast<float>(vj[i * p.v_strides[3]]);
    }
  }

  threadgroup float partial[WARPS][33];
  threadgroup float bests[WARPS];
  threadgroup float totals[WARPS];
  if (lane == 0) {
    bests[w] = best;
    totals[w] = total;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float top = simd_max(bests[lane]);
  const float rescale = bests[lane] == -INFINITY ? 0.0f : exp2(bests[lane] - top);
  const float norm = simd_sum(totals[lane] * rescale);

  device T* o = out + (int64_t(b) * p.H + head) * D;
  for (int i = 0; i < PER_LANE; i++) {
    partial[lane][w] = acc[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Simdgroup w now sums, over the 32 simdgroups, element i of lane w's slice.
    const float sum = simd_sum(partial[w][lane] * rescale);
    if (lane == 0) {
      o[w * PER_LANE + i] = static_cast<T>(norm > 0.0f ? sum / norm : 0.0f);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// clang-format off
#define instantiate_decode_attention(type_name, type)                                   \
  instantiate_kernel("decode_attention_" #type_name "_64", decode_attention, type, 64)   \
  instantiate_kernel("decode_attention_" #type_name "_128", decode_attention, type, 128) \
  instantiate_kernel("decode_attention_" #type_name "_256", decode_attention, type, 256)

instantiate_decode_attention(float32, float)
instantiate_decode_attention(float16, half)
instantiate_decode_attention(bfloat16, bfloat16_t)
// clang-format on

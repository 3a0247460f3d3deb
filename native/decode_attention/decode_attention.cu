// The CUDA eval_gpu of DecodeAttention: one block of 32 warps per (query head, sequence), each
// warp taking every 32nd key with an online softmax, combined through shared memory (the layout
// of MLX's own vector attention kernel). Ported from the run-time compiled kernel this project
// used before (engine/decode_attention.py), with the same arithmetic.
//
// Two things differ from MLX's own kernels, both because libmlx exports little of its CUDA
// backend and links the CUDA runtime statically:
// - the kernel goes into MLX's CUDA graph as a driver-API CUfunction (cudaGetFuncBySymbol from
//   this module's runtime), since MLX's runtime does not know this module's kernels;
// - the output takes over the buffer of an extra input, a fresh array made by the op (MLX's
//   stream-ordered allocator, cu::malloc_async, is not exported; allocator::malloc gives
//   unified memory and may copy a cached device buffer synchronously). When that input cannot
//   be taken over (shared, as under mx.compile's common subexpressions), allocator::malloc.

#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "cuda_function.h"
#include "decode_attention/decode_attention.h"

namespace mlx_serving {

namespace {

namespace cg = cooperative_groups;

constexpr int WARPS = 32;

struct Params {
  int S;
  int gqa;
  float scale;
  int64_t q_strides[4];
  int64_t k_strides[4];
  int64_t v_strides[4];
  int64_t lp_stride;
};

template <typename T, int D>
__global__ void __launch_bounds__(WARPS * 32) decode_attention_kernel(
    const T* queries,
    const T* keys,
    const T* values,
    const int32_t* left_padding,
    T* out,
    const __grid_constant__ Params p) {
  constexpr int PER_LANE = D / 32;
  auto block = cg::this_thread_block();
  auto warp = cg::tiled_partition<32>(block);
  const int lane = warp.thread_rank();
  const int w = warp.meta_group_rank();
  const int head = blockIdx.x;
  const int b = blockIdx.z;
  const int kv_head = head / p.gqa;
  const float neg_inf = __int_as_float(0xff800000);
  const float scale_log2 = p.scale * 1.44269504088896341f;

  const T* q = queries + b * p.q_strides[0] + head * p.q_strides[1] +
      lane * PER_LANE * p.q_strides[3];
  const T* k = keys + b * p.k_strides[0] + kv_head * p.k_strides[1] +
      lane * PER_LANE * p.k_strides[3];
  const T* v = values + b * p.v_strides[0] + kv_head * p.v_strides[1] +
      lane * PER_LANE * p.v_strides[3];

  float qs[PER_LANE], acc[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; i++) {
    qs[i] = scale_log2 * static_cast<float>(q[i * p.q_strides[3]]);
    acc[i] = 0.0f;
  }
  float best = neg_inf, total = 0.0f;
  const int start = max(left_padding[b * p.lp_stride], 0);
  for (int j = start + w; j < p.S; j += WARPS) {
    const T* kj = k + j * p.k_strides[2];
    float score = 0.0f;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
      score += qs[i] * static_cast<float>(kj[i * p.k_strides[3]]);
    }
    score = cg::reduce(warp, score, cg::plus<float>());
    const float top = fmaxf(best, score);
    const float shrink = exp2f(best - top);
    const float weight = exp2f(score - top);
    best = top;
    total = total * shrink + weight;
    const T* vj = v + j * p.v_strides[2];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
      acc[i] = acc[i] * shrink + weight * static_cast<float>(vj[i * p.v_strides[3]]);
    }
  }

  __shared__ float partial[WARPS][33];
  __shared__ float bests[WARPS];
  __shared__ float totals[WARPS];
  if (lane == 0) {
    bests[w] = best;
    totals[w] = total;
  }
  block.sync();
  const float top = cg::reduce(warp, bests[lane], cg::greater<float>());
  const float rescale = bests[lane] == neg_inf ? 0.0f : exp2f(bests[lane] - top);
  const float norm = cg::reduce(warp, totals[lane] * rescale, cg::plus<float>());

  T* o = out + (static_cast<int64_t>(b) * gridDim.x + head) * D;
#pragma unroll
  for (int i = 0; i < PER_LANE; i++) {
    partial[lane][w] = acc[i];
    block.sync();
    // Warp w now sums, over the 32 warps, element i of lane w's slice.
    const float sum = cg::reduce(warp, partial[w][lane] * rescale, cg::plus<float>());
    if (lane == 0) {
      // No key past the padding: zeros, as on the CPU (rather than 0 / 0).
      o[w * PER_LANE + i] = static_cast<T>(norm > 0.0f ? sum / norm : 0.0f);
    }
    block.sync();
  }
}

template <typename T, int D>
void launch(
    mx::cu::CommandEncoder& encoder,
    const std::vector<mx::array>& inputs,
    mx::array& out,
    const Params& params) {
  const T* q = mx::gpu_ptr<T>(inputs[0]);
  const T* k = mx::gpu_ptr<T>(inputs[1]);
  const T* v = mx::gpu_ptr<T>(inputs[2]);
  const int32_t* lp = mx::gpu_ptr<int32_t>(inputs[3]);
  T* o = mx::gpu_ptr<T>(out);
  Params p = params;
  const dim3 grid(inputs[0].shape(1), 1, inputs[0].shape(0));
  const CUfunction function = driver_function(
      &decode_attention_kernel<T, D>, encoder.device().cuda_device(), "decode_attention");
  encoder.add_kernel_node_ex(
      function, grid, dim3(WARPS * 32), dim3(1, 1, 1), 0, q, k, v, lp, o, p);
}

template <typename T>
void launch_for_dim(
    mx::cu::CommandEncoder& encoder,
    const std::vector<mx::array>& inputs,
    mx::array& out,
    const Params& params) {
  switch (inputs[0].shape(3)) {
    case 64:
      return launch<T, 64>(encoder, inputs, out, params);
    case 128:
      return launch<T, 128>(encoder, inputs, out, params);
    case 256:
      return launch<T, 256>(encoder, inputs, out, params);
    default:
      throw std::invalid_argument("[decode_attention] head dim must be 64, 128 or 256");
  }
}

} // namespace

void DecodeAttention::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  const auto& buffer = inputs.at(4);
  if (buffer.is_donatable() && buffer.flags().row_contiguous && buffer.nbytes() == out.nbytes()) {
    out.copy_shared_buffer(buffer);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  if (out.size() == 0) {
    return;
  }

  const auto& q = inputs[0];
  const auto& k = inputs[1];
  const auto& v = inputs[2];
  const auto& lp = inputs[3];
  Params params{};
  params.S = k.shape(2);
  params.gqa = q.shape(1) / k.shape(1);
  params.scale = scale_;
  for (int i = 0; i < 4; i++) {
    params.q_strides[i] = q.strides()[i];
    params.k_strides[i] = k.strides()[i];
    params.v_strides[i] = v.strides()[i];
  }
  params.lp_stride = lp.strides()[0];

  auto& encoder = mx::cu::get_command_encoder(stream());
  encoder.set_input_array(q);
  encoder.set_input_array(k);
  encoder.set_input_array(v);
  encoder.set_input_array(lp);
  // The output's buffer is the extra input's: this also orders the kernel after its fill.
  encoder.set_output_array(out);
  switch (out.dtype()) {
    case mx::float32:
      return launch_for_dim<float>(encoder, inputs, out, params);
    case mx::float16:
      return launch_for_dim<__half>(encoder, inputs, out, params);
    case mx::bfloat16:
      return launch_for_dim<__nv_bfloat16>(encoder, inputs, out, params);
    default:
      throw std::invalid_argument("[decode_attention] unsupported dtype");
  }
}

} // namespace mlx_serving

// Batched decode attention over left-padded KV caches (mlx-lm's BatchKVCache).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mlx_serving {

/**
 * Softmax attention of each sequence's one query over its keys past its left padding.
 * queries (B, H, 1, D) and keys and values (B, H_kv, S, D), one dtype among float32, float16 and
 * bfloat16, D 64, 128 or 256, H a multiple of H_kv, any strides; left_padding (B,) integers (a
 * negative padding counts as 0). Returns (B, 1, H * D), the heads side by side, in queries'
 * dtype; a row with no key past its padding is zeros. Computed in float32 (online softmax).
 * Bad shapes or dtypes throw std::invalid_argument (ValueError in Python).
 */
mx::array decode_attention(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& values,
    const mx::array& left_padding,
    float scale,
    mx::StreamOrDevice s = {});

/** Whether this build has a GPU kernel (CUDA or Metal) for the op. */
bool has_gpu_kernel();

/**
 * Inputs: queries, keys, values, left_padding (int32) and, on CUDA only, a fresh (B, 1, H * D)
 * array whose buffer the output takes over (the extension cannot reach MLX's stream-ordered CUDA
 * allocator: see decode_attention.cu).
 */
class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream stream, float scale)
      : mx::Primitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;

  const char* name() const override {
    return "DecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
};

} // namespace mlx_serving

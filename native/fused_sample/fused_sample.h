// One token per row for a batch: logit bias, penalties, a token mask, temperature, top-k, top-p,
// min-p and per-row seeded randomness in one pass over the vocabulary (no sort).
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mlx_serving {

/**
 * logits (B, V) float32/float16/bfloat16. Per row: temperature, top_p, min_p,
 * repetition/presence/frequency penalties (B,) float32; top_k (B,) int32; history (B, L) int32,
 * the tokens the penalties look at, -1 padded (L may be 0); bias_ids (B, K) int32 -1 padded
 * with bias_values (B, K) float32 (K may be 0); keys (B, 2) uint32: (row key, step); mask
 * (B, ceil(V / 32)) uint32, bit j of word w allowing token 32 w + j. Returns (B,) int32; -1 for
 * a row whose mask allows no token. Exact semantics: native/README.md.
 */
mx::array fused_sample(
    const mx::array& logits,
    const mx::array& temperature,
    const mx::array& top_k,
    const mx::array& top_p,
    const mx::array& min_p,
    const mx::array& history,
    const mx::array& repetition_penalty,
    const mx::array& presence_penalty,
    const mx::array& frequency_penalty,
    const mx::array& bias_ids,
    const mx::array& bias_values,
    const mx::array& keys,
    const std::optional<mx::array>& mask = std::nullopt,
    mx::StreamOrDevice s = {});

class FusedSample : public mx::Primitive {
 public:
  FusedSample(mx::Stream stream, bool masked) : mx::Primitive(stream), masked_(masked) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;

  const char* name() const override {
    return "FusedSample";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool masked_;
};

} // namespace mlx_serving

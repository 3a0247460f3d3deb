// Python bindings of the native primitives; the work lives in the primitives' folders.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "backends.h"

#include "decode_attention/decode_attention.h"
#include "fused_sample/fused_sample.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() = "mlx-serving's native MLX primitives (see native/README.md)";

  m.def("backends", &mlx_serving::backends,
        "The backends this build compiled: 'cpu', and 'cuda' or 'metal'.");

  m.def(
      "decode_attention",
      &mlx_serving::decode_attention,
      "queries"_a,
      "keys"_a,
      "values"_a,
      "left_padding"_a,
      "scale"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Attention of each sequence's one query over its keys past its left padding: "
      "queries (B, H, 1, D), keys and values (B, H_kv, S, D) of one float dtype, D 64, 128 or "
      "256, any strides; left_padding (B,) integers; returns (B, 1, H * D) (see "
      "native/README.md).");

  m.def(
      "fused_sample",
      &mlx_serving::fused_sample,
      "logits"_a,
      "temperature"_a,
      "top_k"_a,
      "top_p"_a,
      "min_p"_a,
      "history"_a,
      "repetition_penalty"_a,
      "presence_penalty"_a,
      "frequency_penalty"_a,
      "bias_ids"_a,
      "bias_values"_a,
      "keys"_a,
      "mask"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none(),
      "One token per row in one pass over the vocabulary (see native/README.md for the exact "
      "semantics); -1 for a row whose mask allows nothing.");
}

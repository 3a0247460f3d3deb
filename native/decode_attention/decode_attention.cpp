// Batched decode attention over left-padded KV caches: the op, its CPU kernel, the Metal
// eval_gpu (macOS builds) and the error for builds without a GPU backend. The CUDA eval_gpu is
// in decode_attention.cu.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/utils.h"

#include "decode_attention/decode_attention.h"

#ifdef _METAL_
#include <dlfcn.h>
#include <filesystem>

#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"
#endif

namespace mlx_serving {

namespace {

[[noreturn]] void fail(const std::string& message) {
  throw std::invalid_argument("[decode_attention] " + message);
}

std::string shape_of(const mx::array& a) {
  std::ostringstream out;
  out << a.shape();
  return out.str();
}

} // namespace

mx::array decode_attention(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& values,
    const mx::array& left_padding,
    float scale,
    mx::StreamOrDevice s) {
  if (queries.ndim() != 4 || queries.shape(2) != 1) {
    fail("queries must be (B, H, 1, D), got " + shape_of(queries));
  }
  if (keys.ndim() != 4 || values.ndim() != 4) {
    fail("keys and values must be (B, H_kv, S, D), got " + shape_of(keys) + " and " +
         shape_of(values));
  }
  if (keys.shape() != values.shape()) {
    fail("keys and values must have one shape, got " + shape_of(keys) + " and " +
         shape_of(values));
  }
  const int B = queries.shape(0), H = queries.shape(1), D = queries.shape(3);
  const int Hkv = keys.shape(1);
  if (keys.shape(0) != B || keys.shape(3) != D) {
    fail("keys " + shape_of(keys) + " do not match queries " + shape_of(queries) +
         " (batch and head dim)");
  }
  if (D != 64 && D != 128 && D != 256) {
    fail("head dim must be 64, 128 or 256, got " + std::to_string(D));
  }
  if (Hkv == 0 || H % Hkv != 0) {
    fail("query heads (" + std::to_string(H) + ") must be a multiple of key/value heads (" +
         std::to_string(Hkv) + ")");
  }
  const auto dtype = queries.dtype();
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16) {
    std::ostringstream out;
    out << "queries must be float32, float16 or bfloat16, got " << dtype;
    fail(out.str());
  }
  if (keys.dtype() != dtype || values.dtype() != dtype) {
    std::ostringstream out;
    out << "keys and values must have queries' dtype " << dtype << ", got " << keys.dtype()
        << " and " << values.dtype();
    fail(out.str());
  }
  if (left_padding.ndim() != 1 || left_padding.shape(0) != B) {
    fail("left_padding must be (B,) = (" + std::to_string(B) + ",), got " +
         shape_of(left_padding));
  }
  if (!mx::issubdtype(left_padding.dtype(), mx::integer)) {
    std::ostringstream out;
    out << "left_padding must be integers, got " << left_padding.dtype();
    fail(out.str());
  }
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu && !has_gpu_kernel()) {
    fail("this build of mlx_serving._native has no GPU kernel (neither CUDA nor Metal)");
  }
  std::vector<mx::array> inputs{
      queries, keys, values, mx::astype(left_padding, mx::int32, stream)};
  mx::Shape out_shape{B, 1, H * D};
#ifdef MLX_SERVING_CUDA
  // The output's memory on CUDA (see DecodeAttention::eval_gpu in decode_attention.cu).
  if (stream.device == mx::Device::gpu) {
    inputs.push_back(mx::zeros(out_shape, dtype, stream));
  }
#endif
  return mx::array(
      std::move(out_shape),
      dtype,
      std::make_shared<DecodeAttention>(stream, scale),
      std::move(inputs));
}

bool has_gpu_kernel() {
#if defined(MLX_SERVING_CUDA) || defined(_METAL_)
  return true;
#else
  return false;
#endif
}

bool DecodeAttention::is_equivalent(const mx::Primitive& other) const {
  return scale_ == static_cast<const DecodeAttention&>(other).scale_;
}

// ---- CPU ------------------------------------------------------------------------------------

namespace {

// Keys scored at a time per (sequence, key/value head): one rescale of the accumulators per tile.
constexpr int TILE = 32;

// Shapes and strides in elements; the Metal kernel's parameter block too.
struct Layout {
  int B, H, Hkv, S, D;
  float scale;
  int64_t q_strides[4];
  int64_t k_strides[4];
  int64_t v_strides[4];
  int64_t lp_stride;
};

template <typename T>
inline float widen(T x) {
  return static_cast<float>(x);
}

#if defined(__FLT16_MAX__) && !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC)
// The compiler's own half type: one instruction per element where the target has F16C (MLX's
// float16_t converts in software on x86).
inline float widen(mx::float16_t x) {
  return static_cast<float>(std::bit_cast<_Float16>(x.bits_));
}
#endif

// Row x[0], x[stride], ... of n elements in float32: in buf, or x itself when it already is.
template <typename T>
inline const float* widened(const T* x, int64_t stride, int n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      return x;
    }
  }
  if (stride == 1) {
    for (int i = 0; i < n; i++) {
      buf[i] = widen(x[i]);
    }
  } else {
    for (int i = 0; i < n; i++) {
      buf[i] = widen(x[i * stride]);
    }
  }
  return buf;
}

// Eight partial sums (D is a multiple of 8), so the compiler can vectorize without reassociating.
inline float dot(const float* a, const float* b, int n) {
  float lanes[8] = {};
  for (int i = 0; i < n; i += 8) {
    for (int l = 0; l < 8; l++) {
      lanes[l] += a[i + l] * b[i + l];
    }
  }
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
      ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

// One (sequence, key/value head) at a time: its G = H / H_kv query heads share each key and
// value row, read once and widened to float32. Scores are taken a tile of keys at a time and
// folded into a running maximum, normalizer and weighted sum of values (online softmax).
template <typename T>
inline void decode_attention_cpu(
    const T* q,
    const T* k,
    const T* v,
    const int32_t* left_padding,
    T* out,
    const Layout& p) {
  const int D = p.D, G = p.H / p.Hkv;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> qs(G * D), acc(G * D), row(D), best(G), total(G), scores(G * TILE);
  for (int b = 0; b < p.B; b++) {
    const int start = std::max(0, left_padding[b * p.lp_stride]);
    for (int kv = 0; kv < p.Hkv; kv++) {
      for (int g = 0; g < G; g++) {
        const int head = kv * G + g;
        const float* qh = widened(
            q + b * p.q_strides[0] + head * p.q_strides[1], p.q_strides[3], D, row.data());
        for (int i = 0; i < D; i++) {
          qs[g * D + i] = qh[i] * p.scale;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(best.begin(), best.end(), neg_inf);
      std::fill(total.begin(), total.end(), 0.0f);
      const T* kb = k + b * p.k_strides[0] + kv * p.k_strides[1];
      const T* vb = v + b * p.v_strides[0] + kv * p.v_strides[1];
      for (int j0 = start; j0 < p.S; j0 += TILE) {
        const int n = std::min(TILE, p.S - j0);
        for (int t = 0; t < n; t++) {
          const float* kj = widened(kb + (j0 + t) * p.k_strides[2], p.k_strides[3], D, row.data());
          for (int g = 0; g < G; g++) {
            scores[g * TILE + t] = dot(&qs[g * D], kj, D);
          }
        }
        for (int g = 0; g < G; g++) {
          float top = best[g];
          for (int t = 0; t < n; t++) {
            top = std::max(top, scores[g * TILE + t]);
          }
          const float shrink = best[g] == neg_inf ? 0.0f : std::exp(best[g] - top);
          best[g] = top;
          total[g] *= shrink;
          for (int i = 0; i < D; i++) {
            acc[g * D + i] *= shrink;
          }
          for (int t = 0; t < n; t++) {
            const float weight = std::exp(scores[g * TILE + t] - top);
            scores[g * TILE + t] = weight;
            total[g] += weight;
          }
        }
        for (int t = 0; t < n; t++) {
          const float* vj = widened(vb + (j0 + t) * p.v_strides[2], p.v_strides[3], D, row.data());
          for (int g = 0; g < G; g++) {
            const float weight = scores[g * TILE + t];
            float* ag = &acc[g * D];
            for (int i = 0; i < D; i++) {
              ag[i] += weight * vj[i];
            }
          }
        }
      }
      for (int g = 0; g < G; g++) {
        // No key past the padding: zeros (the mask would leave nothing to attend to).
        const float norm = total[g];
        T* o = out + (static_cast<int64_t>(b) * p.H + kv * G + g) * D;
        for (int i = 0; i < D; i++) {
          o[i] = static_cast<T>(norm > 0.0f ? acc[g * D + i] / norm : 0.0f);
        }
      }
    }
  }
}

// Compiled twice on x86-64 Linux with GCC, for AVX2/FMA/F16C and for the baseline, picked at load
// time (the wheel's binary runs on any x86-64).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MLX_SERVING_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define MLX_SERVING_CLONES
#endif

MLX_SERVING_CLONES void run_cpu(
    const float* q, const float* k, const float* v, const int32_t* lp, float* o,
    const Layout& p) {
  decode_attention_cpu<float>(q, k, v, lp, o, p);
}

MLX_SERVING_CLONES void run_cpu(
    const mx::float16_t* q, const mx::float16_t* k, const mx::float16_t* v, const int32_t* lp,
    mx::float16_t* o, const Layout& p) {
  decode_attention_cpu<mx::float16_t>(q, k, v, lp, o, p);
}

MLX_SERVING_CLONES void run_cpu(
    const mx::bfloat16_t* q, const mx::bfloat16_t* k, const mx::bfloat16_t* v,
    const int32_t* lp, mx::bfloat16_t* o, const Layout& p) {
  decode_attention_cpu<mx::bfloat16_t>(q, k, v, lp, o, p);
}

Layout layout_of(const std::vector<mx::array>& inputs, float scale) {
  const auto& q = inputs[0];
  const auto& k = inputs[1];
  const auto& v = inputs[2];
  const auto& lp = inputs[3];
  Layout p{};
  p.B = q.shape(0);
  p.H = q.shape(1);
  p.D = q.shape(3);
  p.Hkv = k.shape(1);
  p.S = k.shape(2);
  p.scale = scale;
  for (int i = 0; i < 4; i++) {
    p.q_strides[i] = q.strides()[i];
    p.k_strides[i] = k.strides()[i];
    p.v_strides[i] = v.strides()[i];
  }
  p.lp_stride = lp.strides()[0];
  return p;
}

template <typename T>
void dispatch_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out,
    float scale,
    mx::Stream stream) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (int i = 0; i < 4; i++) {
    encoder.set_input_array(inputs[i]);
  }
  encoder.set_output_array(out);
  encoder.dispatch([q = inputs[0].data<T>(),
                    k = inputs[1].data<T>(),
                    v = inputs[2].data<T>(),
                    lp = inputs[3].data<int32_t>(),
                    o = out.data<T>(),
                    p = layout_of(inputs, scale)]() {
    run_cpu(q, k, v, lp, o, p);
  });
}

} // namespace

void DecodeAttention::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  switch (out.dtype()) {
    case mx::float32:
      return dispatch_cpu<float>(inputs, out, scale_, stream());
    case mx::float16:
      return dispatch_cpu<mx::float16_t>(inputs, out, scale_, stream());
    case mx::bfloat16:
      return dispatch_cpu<mx::bfloat16_t>(inputs, out, scale_, stream());
    default:
      throw std::invalid_argument("[decode_attention] unsupported dtype");
  }
}

// ---- Metal (macOS builds; never compiled or run by this project's CI) -----------------------

#ifdef _METAL_

namespace {

// The directory of this module: mlx_serving.metallib is installed next to it.
std::string binary_dir() {
  static std::string dir = []() {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info)) {
      throw std::runtime_error("[decode_attention] cannot locate the extension module");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

} // namespace

void DecodeAttention::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& k = inputs[1];
  const auto& v = inputs[2];
  const auto& lp = inputs[3];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto lib = d.get_library("mlx_serving", binary_dir());
  const int D = q.shape(3);
  auto kernel = d.get_kernel(
      "decode_attention_" + mx::type_to_name(out) + "_" + std::to_string(D), lib);

  // Layout is also the kernel's parameter block (DecodeAttentionParams, decode_attention.metal).
  const auto p = layout_of(inputs, scale_);

  auto& encoder = mx::metal::get_command_encoder(s);
  encoder.set_compute_pipeline_state(kernel);
  encoder.set_input_array(q, 0);
  encoder.set_input_array(k, 1);
  encoder.set_input_array(v, 2);
  encoder.set_input_array(lp, 3);
  encoder.set_output_array(out, 4);
  encoder.set_bytes(p, 5);
  // One threadgroup of 32 simdgroups per (query head, sequence), as the CUDA kernel.
  encoder.dispatch_threadgroups(MTL::Size(p.H, 1, p.B), MTL::Size(1024, 1, 1));
}

#elif !defined(MLX_SERVING_CUDA)

void DecodeAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[decode_attention] this build of mlx_serving._native has no GPU kernel (neither CUDA "
      "nor Metal); use the pure-MLX fallback on the GPU");
}

#endif

} // namespace mlx_serving

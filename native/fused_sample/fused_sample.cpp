// fused_sample: the op (validation, inputs), the CPU evaluation, and the GPU evaluation for Metal
// (the CUDA one is in fused_sample.cu). Semantics: native/README.md.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/simd/simd.h"

#include "fused_sample/fused_sample.h"
#include "fused_sample/fused_sample_common.h"

#ifdef _METAL_
#include <dlfcn.h>

#include <filesystem>

#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"
#endif

// a * b + c stays two roundings, as MLX's separate ops compute it (native/README.md).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace mlx_serving {

namespace {

namespace fs = fused_sample_detail;

// Inputs, in the primitive's order.
enum Input {
  kLogits = 0,
  kTemperature,
  kTopK,
  kTopP,
  kMinP,
  kHistory,
  kRepetition,
  kPresence,
  kFrequency,
  kBiasIds,
  kBiasValues,
  kKeys,
  kMask, // only when masked
};

[[noreturn]] void invalid(const std::string& message) {
  throw std::invalid_argument("fused_sample: " + message);
}

std::string describe(const mx::array& a) {
  std::ostringstream text;
  text << "shape (";
  for (int i = 0; i < a.ndim(); ++i) {
    text << (i ? ", " : "") << a.shape(i);
  }
  text << (a.ndim() == 1 ? ",)" : ")") << " and dtype " << a.dtype();
  return text.str();
}

bool is_integral(mx::Dtype dtype) {
  return mx::issubdtype(dtype, mx::integer) || dtype == mx::bool_;
}

// A per-row parameter: shape (B,), any real dtype, as float32.
mx::array row_floats(const mx::array& a, const char* name, int rows, mx::StreamOrDevice s) {
  if (a.ndim() != 1 || a.shape(0) != rows || a.dtype() == mx::complex64) {
    invalid(
        std::string(name) + " must be a real (B,) array with B = " + std::to_string(rows) +
        " (the rows of logits), got " + describe(a));
  }
  return mx::contiguous(a.dtype() == mx::float32 ? a : mx::astype(a, mx::float32, s), false, s);
}

mx::array row_ints(const mx::array& a, const char* name, int rows, mx::StreamOrDevice s) {
  if (a.ndim() != 1 || a.shape(0) != rows || !is_integral(a.dtype())) {
    invalid(
        std::string(name) + " must be an integer (B,) array with B = " + std::to_string(rows) +
        ", got " + describe(a));
  }
  return mx::contiguous(a.dtype() == mx::int32 ? a : mx::astype(a, mx::int32, s), false, s);
}

mx::array table(
    const mx::array& a,
    const char* name,
    int rows,
    mx::Dtype dtype,
    const char* dtype_name,
    mx::StreamOrDevice s) {
  if (a.ndim() != 2 || a.shape(0) != rows || a.dtype() != dtype) {
    invalid(
        std::string(name) + " must be a " + dtype_name + " (B, n) array with B = " +
        std::to_string(rows) + ", got " + describe(a));
  }
  return mx::contiguous(a, false, s);
}

// ---------------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------------

// MLX's own CPU exp (a polynomial, not libm's): the fallback's p and w are the same floats.
inline float exp_mlx(float x) {
  return mx::simd::exp(mx::simd::Simd<float, 1>(x)).value;
}

constexpr float kInf = std::numeric_limits<float>::infinity();

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// The top-k and top-p thresholds over p (>= 0): the k-th largest p, and the largest p value v
// with sum(P_j for p_j >= v) >= target (P the 32.32 fixed point of p), by a three-digit radix
// selection on the float bits of the positive p (no sort). want_k / want_p: which to find;
// on return they say which were found (top-k is not when fewer than k p are positive).
void radix_thresholds(
    const float* p,
    int V,
    bool& want_k,
    uint32_t k,
    bool& want_p,
    uint64_t target,
    float& t_k,
    float& t_p) {
  std::vector<uint32_t> count(fs::kRadixMaxBins);
  std::vector<uint64_t> sum(fs::kRadixMaxBins);
  uint32_t prefix_k = 0;
  uint32_t prefix_p = 0;
  uint32_t decided = 0; // the bits the prefixes already fix
  for (int pass = 0; pass < fs::kRadixPasses && (want_k || want_p); ++pass) {
    const int shift = fs::radix_shift(pass);
    const uint32_t bins = 1u << fs::radix_bits(pass);
    std::fill(count.begin(), count.begin() + bins, 0u);
    std::fill(sum.begin(), sum.begin() + bins, 0ull);
    for (int i = 0; i < V; ++i) {
      if (!(p[i] > 0.0f)) {
        continue;
      }
      const uint32_t key = float_bits(p[i]);
      const uint32_t digit = (key >> shift) & (bins - 1);
      if (want_k && (key & decided) == prefix_k) {
        ++count[digit];
      }
      if (want_p && (key & decided) == prefix_p) {
        sum[digit] += fs::to_fixed(p[i]);
      }
    }
    if (want_k) {
      uint64_t above = 0;
      bool found = false;
      for (int d = static_cast<int>(bins) - 1; d >= 0; --d) {
        if (above + count[d] >= k) {
          prefix_k |= static_cast<uint32_t>(d) << shift;
          k -= static_cast<uint32_t>(above);
          found = true;
          break;
        }
        above += count[d];
      }
      want_k = found;
    }
    if (want_p) {
      uint64_t above = 0;
      bool found = false;
      for (int d = static_cast<int>(bins) - 1; d >= 0; --d) {
        if (above + sum[d] >= target) {
          prefix_p |= static_cast<uint32_t>(d) << shift;
          target -= above;
          found = true;
          break;
        }
        above += sum[d];
      }
      want_p = found;
    }
    decided |= (bins - 1) << shift;
  }
  t_k = want_k ? bits_float(prefix_k) : 0.0f;
  t_p = want_p ? bits_float(prefix_p) : 0.0f;
}

struct CpuArgs {
  int B;
  int V;
  int L;
  int K;
  int words;
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
};

template <typename T>
void sample_rows_cpu(const T* logits, const CpuArgs& a) {
  const int V = a.V;
  std::vector<float> l(V);
  std::vector<float> p(V);
  std::vector<int32_t> window;
  for (int b = 0; b < a.B; ++b) {
    const T* row = logits + static_cast<size_t>(b) * V;
    for (int i = 0; i < V; ++i) {
      l[i] = static_cast<float>(row[i]);
    }
    // 1. Bias, in k order.
    for (int k = 0; k < a.K; ++k) {
      const int32_t t = a.bias_ids[static_cast<size_t>(b) * a.K + k];
      if (t >= 0 && t < V) {
        l[t] += a.bias_values[static_cast<size_t>(b) * a.K + k];
      }
    }
    // 2. Penalties, once per distinct history token.
    window.clear();
    for (int j = 0; j < a.L; ++j) {
      const int32_t t = a.history[static_cast<size_t>(b) * a.L + j];
      if (t >= 0 && t < V) {
        window.push_back(t);
      }
    }
    std::sort(window.begin(), window.end());
    const float repetition = a.repetition[b];
    const float presence = a.presence[b];
    const float frequency = a.frequency[b];
    for (size_t j = 0; j < window.size();) {
      size_t end = j;
      while (end < window.size() && window[end] == window[j]) {
        ++end;
      }
      float x = l[window[j]];
      if (repetition != 1.0f) {
        x = x < 0.0f ? x * repetition : x / repetition;
      }
      x -= presence;
      x -= frequency * static_cast<float>(end - j);
      l[window[j]] = x;
      j = end;
    }
    // 3. Mask, then the largest logit (first index on ties).
    if (a.mask != nullptr) {
      const uint32_t* words = a.mask + static_cast<size_t>(b) * a.words;
      for (int i = 0; i < V; ++i) {
        if (!((words[i >> 5] >> (i & 31)) & 1u)) {
          l[i] = -kInf;
        }
      }
    }
    int best = 0;
    float m = l[0];
    for (int i = 1; i < V; ++i) {
      if (l[i] > m) {
        m = l[i];
        best = i;
      }
    }
    if (!(m > -kInf)) {
      a.out[b] = -1;
      continue;
    }
    // 4. Greedy.
    const float temperature = a.temperature[b];
    if (!(temperature > 0.0f)) {
      a.out[b] = best;
      continue;
    }
    // 5. Thresholds on p.
    for (int i = 0; i < V; ++i) {
      p[i] = exp_mlx(l[i] - m);
    }
    const int32_t top_k = a.top_k[b];
    const float top_p = a.top_p[b];
    const float min_p = a.min_p[b];
    bool want_k = top_k > 0 && top_k < V;
    bool want_p = top_p < 1.0f;
    float t_k = 0.0f;
    float t_p = 0.0f;
    if (want_k || want_p) {
      uint64_t target = 0;
      if (want_p) {
        uint64_t z = 0;
        for (int i = 0; i < V; ++i) {
          z += fs::to_fixed(p[i]);
        }
        target = fs::top_p_target(z, top_p);
      }
      radix_thresholds(
          p.data(), V, want_k, static_cast<uint32_t>(top_k), want_p, target, t_k, t_p);
    }
    float t = std::max(t_k, t_p);
    if (min_p > 0.0f) {
      t = std::max(t, min_p);
    }
    t = std::min(t, 1.0f); // the largest p (1) is always kept
    // 6. Weights of the kept tokens (in p, in place), their fixed-point total.
    uint64_t total = 0;
    int last_kept = best;
    for (int i = 0; i < V; ++i) {
      if (p[i] > 0.0f && p[i] >= t) {
        p[i] = exp_mlx((l[i] - m) / temperature);
        total += fs::to_fixed(p[i]);
        last_kept = i;
      } else {
        p[i] = 0.0f;
      }
    }
    // 7-8. The first index whose running sum passes u * W.
    const uint32_t* key = a.keys + static_cast<size_t>(b) * 2;
    const uint64_t target = fs::scale24_floor(total, fs::random24(key[0], key[1]));
    int32_t token = last_kept;
    uint64_t running = 0;
    for (int i = 0; i < V; ++i) {
      running += fs::to_fixed(p[i]);
      if (running > target) {
        token = i;
        break;
      }
    }
    a.out[b] = token;
  }
}

// Compiled twice on x86-64 Linux with GCC, for AVX2/FMA and for the baseline, picked at load time
// (as decode_attention.cpp's kernel): MLX's exp polynomial is a chain of std::fma, a libm call
// without FMA, one instruction with it. fma rounds once either way, so both give the same floats.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define FS_CPU_CLONES
#endif

FS_CPU_CLONES void run_rows(const float* logits, const CpuArgs& args) {
  sample_rows_cpu(logits, args);
}

FS_CPU_CLONES void run_rows(const mx::float16_t* logits, const CpuArgs& args) {
  sample_rows_cpu(logits, args);
}

FS_CPU_CLONES void run_rows(const mx::bfloat16_t* logits, const CpuArgs& args) {
  sample_rows_cpu(logits, args);
}

template <typename T>
void dispatch_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out,
    bool masked,
    mx::Stream stream) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
  }
  encoder.set_output_array(out);
  const auto& logits = inputs[kLogits];
  CpuArgs args{
      static_cast<int>(logits.shape(0)),
      static_cast<int>(logits.shape(1)),
      static_cast<int>(inputs[kHistory].shape(1)),
      static_cast<int>(inputs[kBiasIds].shape(1)),
      masked ? static_cast<int>(inputs[kMask].shape(1)) : 0,
      inputs[kTemperature].data<float>(),
      inputs[kTopK].data<int32_t>(),
      inputs[kTopP].data<float>(),
      inputs[kMinP].data<float>(),
      inputs[kHistory].data<int32_t>(),
      inputs[kRepetition].data<float>(),
      inputs[kPresence].data<float>(),
      inputs[kFrequency].data<float>(),
      inputs[kBiasIds].data<int32_t>(),
      inputs[kBiasValues].data<float>(),
      inputs[kKeys].data<uint32_t>(),
      masked ? inputs[kMask].data<uint32_t>() : nullptr,
      out.data<int32_t>()};
  encoder.dispatch([logits = logits.data<T>(), args]() { run_rows(logits, args); });
}

#ifdef _METAL_
std::string current_binary_dir() {
  static std::string dir = []() {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&current_binary_dir), &info)) {
      throw std::runtime_error("fused_sample: cannot find the extension's directory");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}
#endif

} // namespace

// ---------------------------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------------------------

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
    const std::optional<mx::array>& mask,
    mx::StreamOrDevice s) {
  if (logits.ndim() != 2 || logits.shape(1) < 1 || !mx::issubdtype(logits.dtype(), mx::floating)) {
    invalid("logits must be a floating (B, V) array with V >= 1, got " + describe(logits));
  }
  const int rows = logits.shape(0);
  const int vocabulary = logits.shape(1);
  std::vector<mx::array> inputs;
  inputs.reserve(kMask + 1);
  auto stream = mx::to_stream(s);
  if (stream.device.type == mx::Device::gpu) {
    // The GPU kernels work in place on a float32 copy of the logits that only they hold (x * 1
    // is exact; a donated buffer is one nobody else holds).
    inputs.push_back(
        mx::contiguous(mx::multiply(logits, mx::array(1.0f), stream), false, stream));
  } else {
    const auto dtype = logits.dtype();
    const bool native =
        dtype == mx::float32 || dtype == mx::float16 || dtype == mx::bfloat16;
    inputs.push_back(
        mx::contiguous(native ? logits : mx::astype(logits, mx::float32, stream), false, stream));
  }
  inputs.push_back(row_floats(temperature, "temperature", rows, stream));
  inputs.push_back(row_ints(top_k, "top_k", rows, stream));
  inputs.push_back(row_floats(top_p, "top_p", rows, stream));
  inputs.push_back(row_floats(min_p, "min_p", rows, stream));
  inputs.push_back(table(history, "history", rows, mx::int32, "int32", stream));
  inputs.push_back(row_floats(repetition_penalty, "repetition_penalty", rows, stream));
  inputs.push_back(row_floats(presence_penalty, "presence_penalty", rows, stream));
  inputs.push_back(row_floats(frequency_penalty, "frequency_penalty", rows, stream));
  inputs.push_back(table(bias_ids, "bias_ids", rows, mx::int32, "int32", stream));
  if (bias_values.ndim() != 2 || bias_values.shape() != bias_ids.shape() ||
      bias_values.dtype() == mx::complex64) {
    invalid(
        "bias_values must be a real array of bias_ids' shape " + describe(bias_ids) + ", got " +
        describe(bias_values));
  }
  inputs.push_back(mx::contiguous(
      bias_values.dtype() == mx::float32 ? bias_values
                                         : mx::astype(bias_values, mx::float32, stream),
      false,
      stream));
  if (keys.ndim() != 2 || keys.shape(0) != rows || keys.shape(1) != 2 ||
      keys.dtype() != mx::uint32) {
    invalid(
        "keys must be a uint32 (B, 2) array of (row key, step) with B = " +
        std::to_string(rows) + ", got " + describe(keys));
  }
  inputs.push_back(mx::contiguous(keys, false, stream));
  if (mask) {
    const int words = (vocabulary + 31) / 32;
    if (mask->ndim() != 2 || mask->shape(0) != rows || mask->shape(1) != words ||
        mask->dtype() != mx::uint32) {
      invalid(
          "mask must be a uint32 (B, ceil(V / 32)) = (" + std::to_string(rows) + ", " +
          std::to_string(words) + ") array, got " + describe(*mask));
    }
    inputs.push_back(mx::contiguous(*mask, false, stream));
  }
#ifdef MLX_SERVING_CUDA
  // The output's memory on CUDA (see FusedSample::eval_gpu in fused_sample.cu).
  if (stream.device.type == mx::Device::gpu) {
    inputs.push_back(mx::zeros({rows}, mx::int32, stream));
  }
#endif
  return mx::array(
      {rows},
      mx::int32,
      std::make_shared<FusedSample>(stream, mask.has_value()),
      std::move(inputs));
}

// ---------------------------------------------------------------------------------------------
// The primitive
// ---------------------------------------------------------------------------------------------

void FusedSample::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  switch (inputs[kLogits].dtype()) {
    case mx::float32:
      return dispatch_cpu<float>(inputs, out, masked_, stream());
    case mx::float16:
      return dispatch_cpu<mx::float16_t>(inputs, out, masked_, stream());
    case mx::bfloat16:
      return dispatch_cpu<mx::bfloat16_t>(inputs, out, masked_, stream());
    default:
      throw std::runtime_error("fused_sample: logits reached the CPU kernel as a non-float type");
  }
}

#if defined(_METAL_)

// UNTESTED: written to MLX's extension pattern (examples/extensions/axpby) without a Mac to
// compile or run it on; see fused_sample.metal.
void FusedSample::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto& work = inputs[kLogits];
  const int rows = work.shape(0);
  if (rows == 0) {
    return;
  }
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto* library = d.get_library("mlx_serving", current_binary_dir());
  auto* kernel = d.get_kernel("fused_sample", library);
  auto& encoder = mx::metal::get_command_encoder(s);
  encoder.set_compute_pipeline_state(kernel);
  // The kernel writes the processed logits into `work` (its private float32 copy).
  encoder.set_output_array(const_cast<mx::array&>(work), 0);
  for (int i = kTemperature; i <= kKeys; ++i) {
    encoder.set_input_array(inputs[i], i);
  }
  encoder.set_input_array(masked_ ? inputs[kMask] : inputs[kKeys], kMask);
  encoder.set_output_array(out, kMask + 1);
  const int sizes[5] = {
      static_cast<int>(work.shape(1)),
      static_cast<int>(inputs[kHistory].shape(1)),
      static_cast<int>(inputs[kBiasIds].shape(1)),
      masked_ ? static_cast<int>(inputs[kMask].shape(1)) : 0,
      masked_ ? 1 : 0};
  encoder.set_bytes(sizes, 5, kMask + 2);
  const size_t threads = std::min<size_t>(1024, kernel->maxTotalThreadsPerThreadgroup());
  encoder.dispatch_threadgroups(MTL::Size(rows, 1, 1), MTL::Size(threads, 1, 1));
}

#elif !defined(MLX_SERVING_CUDA)

void FusedSample::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "fused_sample: this build of mlx_serving._native has no GPU kernel (it was built without "
      "CUDA or Metal); run it on the CPU stream or use the pure-MLX fallback "
      "(mlx_serving.engine.fused_sample)");
}

#endif

bool FusedSample::is_equivalent(const mx::Primitive& other) const {
  return masked_ == static_cast<const FusedSample&>(other).masked_;
}

} // namespace mlx_serving

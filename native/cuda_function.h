// Our kernels as driver-API functions for MLX's CUDA graph (see decode_attention.cu for why).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <map>
#include <utility>

namespace mlx_serving {

/** `kernel` as a function of `device`'s primary context (the one MLX's runtime uses), looked
 * up once per (kernel, device); `name` goes in the error when the build has no code for this GPU. */
template <typename Kernel>
CUfunction driver_function(Kernel* kernel, int device, const char* name) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, CUfunction> functions;
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  std::lock_guard lock(mutex);
  auto found = functions.find(key);
  if (found != functions.end()) {
    return found->second;
  }
  auto status = cudaSetDevice(device);
  cudaFunction_t f = nullptr;
  if (status == cudaSuccess) {
    status = cudaGetFuncBySymbol(&f, key.first);
  }
  if (status != cudaSuccess) {
    throw std::runtime_error(
        std::string("[") + name + "] CUDA kernel unavailable: " + cudaGetErrorString(status) +
        " (was the extension built for this GPU's architecture? see native/README.md)");
  }
  auto function = reinterpret_cast<CUfunction>(f);
  functions.emplace(key, function);
  return function;
}

} // namespace mlx_serving

// Which backends this build of the extension compiled (the Python side picks a fallback for the
// rest).
#pragma once

#include <string>
#include <vector>

namespace mlx_serving {

inline std::vector<std::string> backends() {
  std::vector<std::string> compiled{"cpu"};
#ifdef MLX_SERVING_CUDA
  compiled.push_back("cuda");
#endif
#ifdef _METAL_
  compiled.push_back("metal");
#endif
  return compiled;
}

} // namespace mlx_serving

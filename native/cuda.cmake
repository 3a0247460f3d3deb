# The CUDA backend of the extension, included by CMakeLists.txt when the MLX found was built with
# CUDA (the mlx-cuda-13 wheel: its MLXConfig finds CUDAToolkit, so CUDA::cudart exists).
#
# Every primitive has a <primitive>.cu with its eval_gpu; MLX_SERVING_CUDA tells the .cpp files
# (and backends()) that CUDA is there. MLX's CUDA headers include <fmt/format.h>: fmt >= 10
# headers come from MLX_SERVING_FMT_INCLUDE, by default the include directory of an installed
# torch (which ships them); fmt is used header-only, as MLX itself does.

# One architecture by default (90: H100/H200), which keeps the build short; override with
# -DCMAKE_CUDA_ARCHITECTURES=... (e.g. "80;90", or "native" on the GPU machine).
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES
      "90"
      CACHE STRING "CUDA architectures of the extension's kernels")
endif()
if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER)
  set(CMAKE_CUDA_HOST_COMPILER ${CMAKE_CXX_COMPILER})
endif()
enable_language(CUDA)
# CMake 3.25 knows no flag for nvcc's C++20 (CUDA20, which MLX's C++20 headers need): tell it.
if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
endif()
set_target_properties(_native PROPERTIES CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON)

if(NOT DEFINED MLX_SERVING_FMT_INCLUDE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))"
    OUTPUT_VARIABLE _torch_include
    OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_QUIET)
  set(MLX_SERVING_FMT_INCLUDE
      "${_torch_include}"
      CACHE PATH "A directory holding fmt/format.h (fmt >= 10)")
endif()
if(NOT EXISTS "${MLX_SERVING_FMT_INCLUDE}/fmt/format.h")
  message(
    FATAL_ERROR
      "MLX's CUDA headers need fmt (>= 10) headers: no fmt/format.h in "
      "MLX_SERVING_FMT_INCLUDE='${MLX_SERVING_FMT_INCLUDE}'. Install torch (its include "
      "directory has them) or pass -DMLX_SERVING_FMT_INCLUDE=<dir with fmt/format.h>.")
endif()

foreach(primitive ${PRIMITIVES})
  set(_source ${CMAKE_CURRENT_LIST_DIR}/${primitive}/${primitive}.cu)
  if(NOT EXISTS ${_source})
    message(FATAL_ERROR "CUDA build: ${primitive} has no ${primitive}/${primitive}.cu")
  endif()
  target_sources(_native PRIVATE ${_source})
endforeach()

target_compile_definitions(_native PRIVATE MLX_SERVING_CUDA FMT_HEADER_ONLY)
# fmt as a system include: its warnings are not ours.
target_include_directories(_native SYSTEM PRIVATE ${MLX_SERVING_FMT_INCLUDE})
# The CUDA runtime, statically (as libmlx links its own): the kernels are handed to MLX's graph
# as driver-API functions, so the two runtimes need not be one (see decode_attention.cu).
target_link_libraries(_native PRIVATE CUDA::cudart_static)
set_target_properties(_native PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}"
                                         CUDA_RUNTIME_LIBRARY Static)
target_compile_options(_native PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>")
# Warnings nvcc raises on MLX's C++ headers (MLX suppresses the same).
foreach(_diagnostic 27 997 1394 20011 20208)
  target_compile_options(
    _native PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-Xcudafe --diag_suppress=${_diagnostic}>")
endforeach()
message(STATUS "mlx_serving: CUDA kernels for architectures ${CMAKE_CUDA_ARCHITECTURES}, "
               "fmt from ${MLX_SERVING_FMT_INCLUDE}")

#!/usr/bin/env bash
# Builds mlx_serving._native with its CUDA kernels on the GPU machine, in place, and puts the
# module in server/mlx_serving/ (git-ignored), where `from mlx_serving import _native` finds it
# with server/ on PYTHONPATH.
#
# Needs, without network: the Python that runs the tests (python3, or $PYTHON) with MLX's CUDA
# build importable (e.g. PYTHONPATH=/tmp/site holding mlx and mlx-cuda-13 with its nvidia-*
# wheels, cuDNN among them), nanobind 3.1.x and torch (for its fmt headers; or pass
# -DMLX_SERVING_FMT_INCLUDE=DIR); nvcc (on PATH or in /usr/local/cuda/bin), CMake >= 3.25, Ninja.
# Release, one architecture ($CUDA_ARCHITECTURES, default 90: H100/H200). Extra arguments go to
# CMake's configure step. Prints the log's tail when the build fails.
#
#   scripts/build_native_gpu.sh                 # then: PYTHONPATH=server:stubs/src:... pytest
#   CUDA_ARCHITECTURES=80 scripts/build_native_gpu.sh -DMLX_SERVING_FMT_INCLUDE=/path/include
set -euo pipefail
cd "$(dirname "$0")/.."

python="$(command -v "${PYTHON:-python3}")"
build="${BUILD_DIR:-build/native-cuda}"
log="$build/build.log"
mkdir -p "$build"

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
nvcc="$(command -v nvcc || true)"
if [ -z "$nvcc" ]; then
  echo "build_native_gpu.sh: no nvcc on PATH or in /usr/local/cuda/bin" >&2
  exit 1
fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi

started=$SECONDS
if ! {
  cmake -S . -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$python" \
    -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}" \
    "$@" &&
    cmake --build "$build" --parallel
} >"$log" 2>&1; then
  echo "build_native_gpu.sh: the build failed; the tail of $log:" >&2
  tail -n 80 "$log" >&2
  exit 1
fi
if ! grep -q "mlx_serving: CUDA kernels" "$log"; then
  echo "build_native_gpu.sh: the MLX that $python imports has no CUDA backend; the tail of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi

modules=("$build"/native/_native*.so)
rm -f server/mlx_serving/_native*.so
cp "${modules[@]}" server/mlx_serving/
echo "build_native_gpu.sh: built in $((SECONDS - started)) s: server/mlx_serving/$(basename "${modules[0]}")"

PYTHONPATH="$PWD/server:$PWD/stubs/src${PYTHONPATH:+:$PYTHONPATH}" "$python" -c '
import mlx.core as mx
from mlx_serving import _native
from mlx_serving.engine import decode_attention, native
print("backends:", _native.backends(), "| default device:", mx.default_device(),
      "| decode attention kernel here:", decode_attention.kernel_here())
assert "cuda" in _native.backends()
'

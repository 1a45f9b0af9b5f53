#!/usr/bin/env bash
# Compiles switchyard-worker with `--features cuda` on a machine without a GPU, so a change
# that breaks the CUDA path is caught before anyone has a GPU in front of them.
#
# The CUDA toolkit comes from NVIDIA's wheels on PyPI (nvidia-cuda-nvcc, nvidia-nvvm,
# nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl), installed once into a virtual
# environment keyed by version:
#
#   $SWITCHYARD_CACHE_DIR/tools/cuda-<version>/venv/
#
# By default (`make check-cuda`) it builds the worker library — every CUDA code path, with
# candle's kernels compiled to PTX and its quantized-matmul kernels to a static library for
# CUDA_COMPUTE_CAP (90: H100/H200) — and type-checks the binary and the tests. It does not
# link the binary: candle links cudarc against libcuda (the driver), cuBLAS, cuRAND and
# NVRTC, which a machine without a GPU driver does not have; hack/gpu-check.sh does the full
# build on a GPU machine. The build goes to target/cuda (its own directory: the CPU build in
# target/ is not disturbed). Versions: hack/versions.env.
#
# Usage: hack/check-cuda.sh [build|test|run|check ...] [cargo args...]
#   hack/check-cuda.sh                       # what `make check-cuda` runs (see above)
#   hack/check-cuda.sh test --release --test model_reference   # hack/gpu-check.sh, on a GPU
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$repo/hack/versions.env"

cache=${SWITCHYARD_CACHE_DIR:-$HOME/.cache/switchyard}
root="$cache/tools/cuda-$CUDA_WHEELS_VERSION"
venv="$root/venv"
python=$(command -v python3.11 || command -v python3)

if [[ ! -f "$root/.complete" ]]; then
  echo "check-cuda: installing the CUDA $CUDA_WHEELS_VERSION toolkit wheels from PyPI into $venv" >&2
  rm -rf "$root"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$CUDA_WHEELS_VERSION" "nvidia-nvvm==$CUDA_WHEELS_VERSION" \
    "nvidia-cuda-runtime==$CUDA_WHEELS_VERSION" "nvidia-cuda-crt==$CUDA_WHEELS_VERSION" \
    "nvidia-cuda-cccl==$CUDA_WHEELS_VERSION" >&2
  touch "$root/.complete"
fi

# CUDA_LINK=1 (hack/gpu-check.sh): also the libraries the binary links against (cuBLAS,
# cuRAND, NVRTC from PyPI; libcuda from the machine's driver), with the unversioned names
# the linker looks for.
if [[ "${CUDA_LINK:-0}" == 1 && ! -f "$root/.link-complete" ]]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cublas==$CUDA_CUBLAS_VERSION" "nvidia-curand==$CUDA_CURAND_VERSION" \
    "nvidia-cuda-nvrtc==$CUDA_WHEELS_VERSION" >&2
  touch "$root/.link-complete"
fi

# The wheels unpack one CUDA tree (bin/, include/, lib/, nvvm/) under site-packages/nvidia.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvcc=$(find "$site/nvidia" -type f -name nvcc -path '*/bin/*' | head -1)
[[ -x "$nvcc" ]] || { echo "check-cuda: no nvcc under $site/nvidia" >&2; exit 1; }
cuda_home=$(dirname "$(dirname "$nvcc")")
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
export PATH="$cuda_home/bin:$PATH"
export LIBRARY_PATH="$cuda_home/lib:$cuda_home/lib64:${LIBRARY_PATH:-}"
if [[ "${CUDA_LINK:-0}" == 1 ]]; then
  links="$root/link"
  mkdir -p "$links"
  for lib in cudart cublas cublasLt curand nvrtc; do
    found=$(find "$site/nvidia" -name "lib$lib.so.*" | sort | head -1)
    [[ -n "$found" ]] && ln -sfn "$found" "$links/lib$lib.so"
  done
  driver=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
  [[ -n "$driver" ]] || { echo "check-cuda: CUDA_LINK=1 needs the NVIDIA driver's libcuda.so.1" >&2; exit 1; }
  ln -sfn "$driver" "$links/libcuda.so"
  export LIBRARY_PATH="$links:$LIBRARY_PATH"
  export LD_LIBRARY_PATH="$links:$(dirname "$driver"):${LD_LIBRARY_PATH:-}"
fi
export CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP
echo "check-cuda: $("$nvcc" --version | tail -1) at $cuda_home; compute capability $CUDA_COMPUTE_CAP" >&2

cd "$repo"
started=$(date +%s)
cuda_cargo() {
  cargo "$1" --target-dir target/cuda -p switchyard-worker --features cuda "${@:2}"
}
if [[ $# -gt 0 && "$1" != -* ]]; then
  cuda_cargo "$@"
else
  cuda_cargo build --lib "$@"
  cuda_cargo check --bins --tests "$@"
fi
echo "check-cuda: --features cuda: ${*:-build --lib, check --bins --tests} took $(( $(date +%s) - started )) s" >&2

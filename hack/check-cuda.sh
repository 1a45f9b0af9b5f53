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
# candle's kernels are compiled to PTX and the quantized-matmul kernels to a static library
# for CUDA_COMPUTE_CAP (90: H100/H200); cudarc loads the driver at run time, so nothing here
# needs libcuda. The build goes to target/cuda (its own directory: the CPU build in target/
# is not disturbed). Versions: hack/versions.env.
#
# Usage: hack/check-cuda.sh [build|test|run ...] [cargo args...]
#   hack/check-cuda.sh                       # cargo build --bins (what `make check-cuda` runs)
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

# The wheels unpack one CUDA tree (bin/, include/, lib/, nvvm/) under site-packages/nvidia.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvcc=$(find "$site/nvidia" -type f -name nvcc -path '*/bin/*' | head -1)
[[ -x "$nvcc" ]] || { echo "check-cuda: no nvcc under $site/nvidia" >&2; exit 1; }
cuda_home=$(dirname "$(dirname "$nvcc")")
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
export PATH="$cuda_home/bin:$PATH"
export LIBRARY_PATH="$cuda_home/lib:$cuda_home/lib64:${LIBRARY_PATH:-}"
export CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP
echo "check-cuda: $("$nvcc" --version | tail -1) at $cuda_home; compute capability $CUDA_COMPUTE_CAP" >&2

cd "$repo"
cmd=(build --bins)
if [[ $# -gt 0 && "$1" != -* ]]; then
  cmd=("$1")
  shift
fi
started=$(date +%s)
cargo "${cmd[@]}" --target-dir target/cuda -p switchyard-worker --features cuda "$@"
echo "check-cuda: cargo ${cmd[*]} $* with --features cuda took $(( $(date +%s) - started )) s" >&2

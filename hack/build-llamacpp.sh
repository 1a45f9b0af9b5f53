#!/usr/bin/env bash
# Builds llama.cpp (CPU) from the source vendored in the PyPI `llama-cpp-python` sdist, at
# the version pinned in hack/versions.env, into a cache keyed by version:
#
#   $SWITCHYARD_CACHE_DIR/tools/llama.cpp-<version>/bin/  llama-perplexity llama-bench
#                                                         llama-batched-bench llama-simple
#                                                         llama-quantize llama-server
#
# llama.cpp is the engine people run on CPUs: the benchmarks and the perplexity check set
# Switchyard beside it on the same GGUF file. Built with CMake for this machine's CPU
# (GGML_NATIVE), without CURL; llama-server without its web UI (no npm, no download: its
# OpenAI API is what hack/bench/serving-vs-llamacpp.sh calls). A complete build is not
# redone: a second run only prints the bin directory. Takes about 10 minutes on 2 cores.
# Usage: hack/build-llamacpp.sh [--print-bin-dir]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$repo/hack/versions.env"

cache=${SWITCHYARD_CACHE_DIR:-$HOME/.cache/switchyard}
root="$cache/tools/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
bindir="$root/bin"
targets=(llama-perplexity llama-bench llama-batched-bench llama-simple llama-quantize llama-server)
configure=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF
  -DBUILD_SHARED_LIBS=OFF)

if [[ "${1:-}" == "--print-bin-dir" ]]; then
  echo "$bindir"
  exit 0
fi
# The stamp lists the targets built: a target added later is built into the same tree.
if [[ -f "$root/.complete" && "$(cat "$root/.complete")" == "${targets[*]}" ]]; then
  echo "$bindir"
  exit 0
fi
if [[ -f "$root/.complete" && -d "$root/build" ]]; then
  echo "build-llamacpp: building ${targets[*]} in the existing tree" >&2
  # Configured again: a target added later may need an option the tree was built without.
  cmake -S "$(readlink -f "$root/src")" -B "$root/build" "${configure[@]}" >&2
  cmake --build "$root/build" --config Release -j "$(nproc)" --target "${targets[@]}" >&2
  for t in "${targets[@]}"; do cp "$root/build/bin/$t" "$bindir/"; done
  echo "${targets[*]}" >"$root/.complete"
  echo "$bindir"
  exit 0
fi

command -v cmake >/dev/null || { echo "build-llamacpp: cmake is needed (apt-get install cmake)" >&2; exit 1; }
python=$(command -v python3.11 || command -v python3)
rm -rf "$root"
mkdir -p "$root"
echo "build-llamacpp: downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist from PyPI" >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  -d "$root/sdist" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
tar -xzf "$root"/sdist/llama_cpp_python-*.tar.gz -C "$root/sdist"
src=$(echo "$root"/sdist/llama_cpp_python-*/vendor/llama.cpp)
[[ -f "$src/CMakeLists.txt" ]] || { echo "build-llamacpp: no vendor/llama.cpp in the sdist" >&2; exit 1; }
echo "build-llamacpp: configuring $src" >&2
cmake -S "$src" -B "$root/build" "${configure[@]}" >&2
echo "build-llamacpp: building ${targets[*]} (several minutes on 2 cores)" >&2
cmake --build "$root/build" --config Release -j "$(nproc)" --target "${targets[@]}" >&2
mkdir -p "$bindir"
for t in "${targets[@]}"; do
  cp "$root/build/bin/$t" "$bindir/"
done
# The converter (convert_hf_to_gguf.py) and its gguf-py package stay in the source tree.
ln -sfn "$src" "$root/src"
echo "${targets[*]}" >"$root/.complete"
echo "$bindir"

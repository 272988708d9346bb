#!/usr/bin/env bash
# On a GPU host that has PyTorch (CUDA libtorch >= 2.1) but no .NET SDK: builds the native shim against the host's
# libtorch, unpacks the runtime packed by pack.sh, and runs the given command with the environment set.
#   scripts/gpu/run.sh dotnet .device/worker-tests/FineTune.Worker.Tests.dll
# FINETUNE_GPU_PACK names the folder pack.sh wrote (default .device).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
work="${FINETUNE_GPU_WORK:-/tmp/finetune-gpu}"
mkdir -p "$work"
torch_prefix="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')"
torch_lib="$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')"
if [ ! -f "$work/native/libfinetune_torch.so" ]; then
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  # The fused CUDA kernels need nvcc: CMake looks on PATH and in CUDACXX; CUDA images keep it in /usr/local/cuda.
  if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDACXX=/usr/local/cuda/bin/nvcc; fi
  configure() {
    cmake -S "$REPO_ROOT/src/Worker/Torch/native" -B "$work/cmake" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DTorch_DIR="$torch_prefix/Torch" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$work/native" \
      -DCMAKE_CUDA_ARCHITECTURES="${FINETUNE_CUDA_ARCHS:-90}" "$@" >&2
  }
  # If the kernels do not compile on this host, the shim is built without them (composite ops) rather than not at all.
  if ! { configure && cmake --build "$work/cmake" -j "$(nproc)" >&2; }; then
    echo "run.sh: the build with the fused CUDA kernels failed; building without them (FT_CUDA_KERNELS=OFF)" >&2
    rm -rf "$work/cmake"
    configure -DFT_CUDA_KERNELS=OFF && cmake --build "$work/cmake" -j "$(nproc)" >&2
  fi
fi
pack="${FINETUNE_GPU_PACK:-$REPO_ROOT/.device}"
if [ ! -x "$work/dotnet/dotnet" ]; then
  mkdir -p "$work/dotnet" && tar -xJf "$pack/dotnet-runtime.tar.xz" -C "$work/dotnet"
fi
# pack.sh leaves out of worker-tests/ the files it shares with worker/ (listed in .from-worker): put them back.
if [ -f "$pack/worker-tests/.from-worker" ]; then
  while IFS= read -r f; do
    [ -n "$f" ] && [ ! -e "$pack/worker-tests/$f" ] && cp "$pack/worker/$f" "$pack/worker-tests/$f"
  done < "$pack/worker-tests/.from-worker"
fi
export DOTNET_ROOT="$work/dotnet" PATH="$work/dotnet:$PATH" DOTNET_CLI_TELEMETRY_OPTOUT=1
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}" FINETUNE_TORCH_NATIVE="$work/native/libfinetune_torch.so"
exec "$@"

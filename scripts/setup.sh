#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: torch (if missing), Python deps, and the build of
# oppo_runtime._C (CUDA kernels when torch is a CUDA build and nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1"
  $PY -m pip install -q "torch==2.14.1"
fi
$PY -m pip install -q safetensors tokenizers pyyaml tqdm matplotlib tensorboard numpy "pytest>=8" hypothesis \
  "transformers>=4.51" "trl==1.12.0" setuptools wheel ninja 2>&1 | grep -v "Running pip as the 'root' user" || true

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # build for the GPU that is here; with none (CI), for sm_90a only, to prove the kernels compile
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; c=torch.cuda.get_device_capability() if torch.cuda.is_available() else (9,0); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "[setup] building oppo_runtime._C (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_HOME=${CUDA_HOME:-unset}, MAX_JOBS=$MAX_JOBS)"
$PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | grep -v "Running pip as the 'root' user" | tail -3
$PY -c "import oppo_runtime.ops as o; print('[setup] _C loaded:', o.extension() is not None, '| CUDA kernels compiled:', o.has_cuda_kernels())"

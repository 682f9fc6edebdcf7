#!/usr/bin/env bash
# Compile-check every CUDA source in csrc/ for sm_80, sm_90 (sm_100 where nvcc has it) and PTX: .cu bindings
# against torch's headers (those of the CPU wheel suffice), torch-free .cuh kernel headers on their own. Fails on
# any error.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
PYINC=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
ABI=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
# SASS for sm_80 and sm_90 (and sm_100 when this nvcc has it), plus PTX of the newest: what setup.py builds
ARCH=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
if nvcc --list-gpu-arch 2>/dev/null | grep -qx compute_100; then
  ARCH+=(-gencode arch=compute_100,code=sm_100 -gencode arch=compute_100,code=compute_100)
else
  ARCH+=(-gencode arch=compute_90,code=compute_90)
fi
echo "nvcc targets: ${ARCH[*]}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for f in csrc/cuda/*.cu; do
  echo "nvcc $f"
  # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (no effect on Linux).
  # 3306: warnings raised inside torch's own headers.
  nvcc -std=c++17 -O3 -c "$f" -o "$out/$(basename "$f").o" "${ARCH[@]}" \
    -I csrc -I "$TORCH/include" -I "$TORCH/include/torch/csrc/api/include" -I "$PYINC" \
    -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    -diag-suppress 3306 || status=1
done
for f in csrc/cuda/*.cuh; do
  echo "nvcc $f (standalone)"
  nvcc -std=c++17 -O3 -x cu -c "$f" -o "$out/$(basename "$f").o" "${ARCH[@]}" -I csrc || status=1
done
exit $status

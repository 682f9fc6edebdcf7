#!/usr/bin/env bash
# Compiles each torch-free CUDA kernel header (csrc/cuda/*.cuh) on its own with nvcc, which shows that each one
# includes what it uses (the real build includes them only after others). One target, sm_80, suffices here: every
# kernel is compiled for the whole arch list by the real build of rlhf_kernels._C (.ci/cuda_build_check.sh).
# Fails on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for f in csrc/cuda/*.cuh; do
  echo "nvcc $f (standalone)"
  nvcc -std=c++17 -O3 -x cu -c "$f" -o "$out/$(basename "$f").o" -gencode arch=compute_80,code=sm_80 -I csrc ||
    status=1
done
exit $status

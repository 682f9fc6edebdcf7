#!/usr/bin/env bash
# One command for a bare GPU machine (torch, triton, pytest preinstalled, no network): build, test, benchmark.
# Logs and the results table go to ${OUT:-benchmarks/results}. Usage: bash benchmarks/gpu_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu_env.log"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu_env.log"
pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -i warning | tail -5 | tee "$out/gpu_build.log"
python3 -c 'import rlhf_kernels; print(rlhf_kernels.backend_status())' | tee -a "$out/gpu_env.log"
# Peers for the comparison columns: the machine has no network, so their wheels travel with the working tree
# (`pip download --no-deps -d benchmarks/wheels liger-kernel` here, then `run` with carry=["benchmarks/wheels"]).
ls benchmarks/wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps benchmarks/wheels/*.whl 2>&1 | tail -2
python3 -m pytest -q tests 2>&1 | tee "$out/gpu_tests.log" | tail -30
python3 -m benchmarks.bench_logprobs --out "$out/gpu_logprobs.md" 2>&1 | tail -60
python3 -m benchmarks.bench_kl --out "$out/gpu_kl.md" 2>&1 | tail -60
python3 -m benchmarks.bench_gae --out "$out/gpu_gae.md" 2>&1 | tail -30
python3 -m benchmarks.bench_losses --out "$out/gpu_losses.md" 2>&1 | tail -40

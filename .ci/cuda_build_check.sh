#!/usr/bin/env bash
# Builds rlhf_kernels._C with its CUDA sources as a user does, RLHF_KERNELS_FORCE_CUDA=1 pip install
# --no-build-isolation -e ., against the CUDA build of the torch version that the README's test command installs,
# then checks it with .ci/cuda_ext_check.py. No GPU needed; needs nvcc (setup.py finds its toolkit) and network.
# Everything lives in a new temporary folder, removed at exit (nothing is cached between runs): a virtual
# environment and a copy of the working tree, so the repository's own build of rlhf_kernels._C is left alone.
# RLHF_KERNELS_CUDA_ARCH is passed on to setup.py when set (default: setup.py's arch list).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
torch_req=$(awk '/<!-- test-command -->/{getline; getline; print; exit}' README.md | grep -o 'torch==[0-9.]*' || true)
[ -n "$torch_req" ] || { echo "no torch==VERSION in the README's test command" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$work/build.log"
step() { echo "[cuda-build $(date -u +%H:%M:%S)] $*"; }

step "virtual environment with the CUDA build of $torch_req (the package index, not the local wheels)"
python -m venv "$work/venv"
# PIP_CONFIG_FILE=/dev/null: ignore pip's configured local wheel folders and constraints, which hold the CPU build;
# PIP_NO_CACHE_DIR: keep no copy of the ~3 GB of wheels for the next run
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' PIP_NO_CACHE_DIR=1 "$work/venv/bin/pip" install -q "$torch_req" ninja numpy
"$work/venv/bin/python" -c 'import torch; assert torch.version.cuda, torch.__version__; print("torch", torch.__version__)'

step "copy of the working tree"
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$work/src"

step "build: RLHF_KERNELS_FORCE_CUDA=1 pip install --no-build-isolation -e . (full log printed on failure)"
start=$SECONDS
if ! (cd "$work/src" && RLHF_KERNELS_FORCE_CUDA=1 "$work/venv/bin/pip" install -v --no-deps --no-build-isolation -e . \
  >"$log" 2>&1); then
  cat "$log"
  step "build failed"
  exit 1
fi
grep '^ *rlhf-kernels:' "$log" | sed 's/^ *//' || true
step "built in $((SECONDS - start)) s"

step "check the extension"
(cd "$work" && "$work/venv/bin/python" "$repo/.ci/cuda_ext_check.py")
step "CUDA build check passed"

#!/usr/bin/env bash
# Installs eclip-kernels into a virtual environment ($VENV, default .venv; created if missing): torch,
# the package built from source (C++ CPU kernels; CUDA sources too when FORCE_CUDA=1 or a GPU is visible),
# and the test/benchmark tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip setuptools wheel
# torch 2.14.1 is the newest release the development machines allow; any torch >= 2.6 works. torchvision
# (needed by open-clip-torch, a test dependency) is installed with it, in the matching release.
"$VENV/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" install --quiet "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" install --quiet ninja numpy pytest pytest-benchmark
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda-13.0 ]; then
  export CUDA_HOME=/usr/local/cuda-13.0
fi
# --no-build-isolation: the extension must be compiled against the torch installed above.
"${pip[@]}" install --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c 'import eclip_kernels as ek; [print(f"{n:10s} usable={s.usable!s:5s} {s.reason}") for n, s in ek.available_backends().items()]'

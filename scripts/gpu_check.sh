#!/usr/bin/env bash
# The one command that verifies eclip-kernels on a GPU machine: records the environment, builds the
# extension with its CUDA sources (installing the wheels carried in .whl/ first), runs the GPU tests,
# compute-sanitizer memcheck and racecheck, and the benchmarks, each stage with its own time limit, and
# writes everything to one folder (at most 8 files). Run from anywhere:
#
#   bash scripts/gpu_check.sh --out DIR [--quick] [--stages env,build,tests,sanitizer,bench]
#   bash scripts/gpu_check.sh --help
#
# PYTHON: the interpreter that has torch (default python3). The logic is bench/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u bench/gpu_check.py "$@"

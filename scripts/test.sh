#!/usr/bin/env bash
# Runs the test suites (uses $VENV, default .venv):
#  1. pytest tests: everything, on the best CPU code path of this machine;
#  2. the CPU kernel suite again on its lower instruction-set paths (AVX2, generic), which this machine
#     would not otherwise take (ECLIP_KERNELS_CPU_ISA is read once per process);
#  3. the Triton kernels through the Triton interpreter, in their own process (TRITON_INTERPRET=1 must be
#     set before Triton is imported), the property-based suite among them with its smaller profile; on a
#     machine with a GPU, step 1 already ran them on the GPU;
#  4. the same with the GPU block sizes and a target of two programs (ECLIP_KERNELS_TRITON_GEOMETRY=gpu:2), so
#     that every program walks several tiles: the multi-tile paths a GPU takes at large shapes, at small ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
"$PY" -m pytest tests -q --hypothesis-show-statistics  # the property-based tests print their case counts
for isa in avx2 generic; do
  echo "== CPU kernels, ECLIP_KERNELS_CPU_ISA=$isa"
  ECLIP_KERNELS_CPU_ISA=$isa "$PY" -m pytest tests/test_slot_attention.py -q -m "not slow"
done
echo "== Triton kernels, TRITON_INTERPRET=1 (with the property-based suite, HYPOTHESIS_PROFILE=interpreter)"
HYPOTHESIS_PROFILE=interpreter TRITON_INTERPRET=1 "$PY" -m pytest tests/test_slot_attention_triton.py \
  tests/test_contrastive_triton.py tests/test_siglip_triton.py tests/test_properties_triton.py -q \
  --hypothesis-show-statistics
TRITON_INTERPRET=1 "$PY" -m pytest tests/test_nn_multihead.py -q -k triton  # the module on the Triton backend
echo "== Triton kernels, TRITON_INTERPRET=1, ECLIP_KERNELS_TRITON_GEOMETRY=gpu:2"
ECLIP_KERNELS_TRITON_GEOMETRY=gpu:2 TRITON_INTERPRET=1 "$PY" -m pytest tests/test_slot_attention_triton.py \
  tests/test_contrastive_triton.py tests/test_siglip_triton.py -q

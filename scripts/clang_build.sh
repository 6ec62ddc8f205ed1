#!/usr/bin/env bash
# The C++ CPU kernels built with clang (CI runs this after the GCC build; uses $VENV, default .venv):
#  1. eclip_kernels._C compiled with CC=clang CXX=clang++ (ECLIP_NO_CUDA=1) into build/clang, apart from the
#     GCC build, and staged with the Python sources in build/clang/pkg;
#  2. the CPU kernel tests (tests/test_slot_attention.py, not the slow ones) against that module, on this
#     machine's best instruction set and on the lower ones (ECLIP_KERNELS_CPU_ISA=avx2, generic);
#  3. the C++ test (csrc/tests) built by CMake with clang++ and run by ctest, when CMake is in the venv.
# Without libomp (Debian: libomp-dev), clang compiles the module without OpenMP (see setup.py): the results are
# the same, each call runs on one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV="$(cd "${VENV:-.venv}" && pwd)"
PY="$VENV/bin/python"
CLANG="${CLANG:-clang}"
CLANGXX="${CLANGXX:-clang++}"
command -v "$CLANGXX" >/dev/null || { echo "clang_build.sh: $CLANGXX not found (Debian: apt-get install clang)" >&2; exit 1; }
out=build/clang
rm -rf "$out/pkg"
mkdir -p "$out"

echo "== clang: $("$CLANGXX" --version | head -1)"
CC="$CLANG" CXX="$CLANGXX" ECLIP_NO_CUDA=1 "$PY" setup.py build_ext -b "$out/lib" -t "$out/tmp" > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
if grep -E "warning:" "$out/build.log" | grep -v "isystem" | grep -q .; then
  echo "clang warnings:"; grep -E "warning:" "$out/build.log" | sort | uniq -c | head -20
fi
grep -q "clang without libomp" "$out/build.log" && echo "== clang: built without OpenMP (no libomp): one thread per call"

# The Python sources with the clang-built module (and its _build_info.json) next to them.
mkdir -p "$out/pkg"
(tar -cf - --exclude='__pycache__' --exclude='_C.*' --exclude='_build_info.json' eclip_kernels) | tar -xf - -C "$out/pkg"
cp "$out"/lib/eclip_kernels/_C.* "$out"/lib/eclip_kernels/_build_info.json "$out/pkg/eclip_kernels/"
export PYTHONPATH="$PWD/$out/pkg" ECLIP_KERNELS_REQUIRE_EXTENSION=1
(cd "$out/pkg" && "$PY" - "$PWD" <<'EOF'
import sys, eclip_kernels, eclip_kernels._extension as e
assert eclip_kernels.__file__.startswith(sys.argv[1]), eclip_kernels.__file__
assert e.is_loaded(), e.LOAD_ERROR
print("== clang: module loaded from", e._C.__file__)
EOF
)
echo "== clang build done at $(( $(date +%s) - start )) s"

# pytest from the venv's bin (not `python -m pytest`, which would put the source tree's eclip_kernels first).
pytest=("$VENV/bin/pytest" -q -p no:cacheprovider -m "not slow" tests/test_slot_attention.py)
"${pytest[@]}"
for isa in avx2 generic; do
  echo "== clang: CPU kernels, ECLIP_KERNELS_CPU_ISA=$isa"
  ECLIP_KERNELS_CPU_ISA=$isa "${pytest[@]}"
done
echo "== clang tests done at $(( $(date +%s) - start )) s"

cmake="$VENV/bin/cmake"
if [ -x "$cmake" ]; then
  torch_root=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
  abi=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
  "$cmake" -S . -B "$out/cmake" -DCMAKE_CXX_COMPILER="$CLANGXX" -DECLIP_WITH_CUDA=OFF -DTORCH_ROOT="$torch_root" \
    -DECLIP_CXX11_ABI="$abi" > "$out/cmake.log" 2>&1 || { cat "$out/cmake.log"; exit 1; }
  "$cmake" --build "$out/cmake" -j"${MAX_JOBS:-2}" >> "$out/cmake.log" 2>&1 || { tail -40 "$out/cmake.log"; exit 1; }
  "$VENV/bin/ctest" --test-dir "$out/cmake" --output-on-failure
  echo "== clang C++ test done at $(( $(date +%s) - start )) s"
else
  echo "== clang: no CMake in the venv ($cmake): C++ test skipped"
fi
echo "== clang_build.sh took $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# The twin of the GPU machine's software, on a machine without a GPU: Python 3.12 with the torch, torchvision,
# triton and numpy releases the GPU machine has (torch 2.11.0, torchvision 0.26.0, triton 3.6.0, numpy 2.5.2),
# the package built the way scripts/gpu_check.sh builds it there (`pip install --no-build-isolation --no-deps
# -e .`), then:
#   1. the API tests that need no GPU (what breaks with an older torch or Python shows here, not on the
#      rarely lent GPU machine), and the CPU tests of the GPU check script itself;
#   2. the ahead-of-time Triton compile check with triton 3.6 for sm_80 and sm_90, at the headline cases
#      (`python -m eclip_kernels.triton.aot --arch 80,90 --cases <headline> --check`; all cases take ~7 min).
# The packages carried to the GPU machine as wheels (scripts/gpu_wheels.sh: open-clip-torch, slot-attention,
# inf-cl, webdataset...) are installed too, at the same versions, with their needs from the index.
# The Triton interpreter tests are not run here: triton 3.6's interpreter fails with numpy >= 2.4 (numpy 2.3
# and older work; see README "Verifying on a GPU").
#
#   bash scripts/twin.sh                # creates (or reuses) .venv-twin, then builds and tests
#
# Environment:
#   TWIN_VENV     the virtual environment (default .venv-twin; reused when its Python/torch/triton/numpy match)
#   TWIN_PYTHON   a Python 3.12 interpreter (default: pyenv's newest 3.12, else python3.12 on PATH)
#   TWIN_CUDA     1: compile the CUDA sources too, against torch 2.11's headers, for sm_90 (what the GPU
#                 machine builds); 0: the C++ CPU kernels only (ECLIP_NO_CUDA=1). Default: 1 when nvcc is found.
#   TWIN_AOT_STRICT  1 (default): the step fails on a compile error or a spill at a headline case (--check);
#                 0: the report is printed and written, and does not fail the step
#   TWIN_STEPS    which steps run, comma separated (default "install,build,tests,aot")
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0
TRITON_VERSION=3.6.0
NUMPY_VERSION=2.5.2
VENV="${TWIN_VENV:-.venv-twin}"
STEPS=",${TWIN_STEPS:-install,build,tests,aot},"
step() { [[ "$STEPS" == *",$1,"* ]]; }
elapsed() { echo $(( $(date +%s) - start )); }

# The twin must never travel to the GPU machine (it is GBs) nor be committed: ignore it in this clone.
exclude="$(git rev-parse --git-path info/exclude 2>/dev/null || true)"
if [ -n "$exclude" ]; then
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/${VENV#./}/" "$exclude" 2>/dev/null || echo "/${VENV#./}/" >> "$exclude"
fi

find_python312() {
  if [ -n "${TWIN_PYTHON:-}" ]; then echo "$TWIN_PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local root candidate
    root="$(pyenv root)"
    candidate="$(ls -d "$root"/versions/3.12.* 2>/dev/null | sort -V | tail -1)"
    if [ -n "$candidate" ] && [ -x "$candidate/bin/python" ]; then echo "$candidate/bin/python"; return; fi
  fi
  command -v python3.12 || true
}

py="$VENV/bin/python"
versions_match() {
  [ -x "$py" ] && "$py" - "$TORCH_VERSION" "$TRITON_VERSION" "$NUMPY_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(zip(("torch", "triton", "numpy"), sys.argv[1:]))
sys.exit(0 if all(version(n).split("+")[0] == v for n, v in want.items()) and sys.version_info[:2] == (3, 12) else 1)
EOF
}

# The packages carried to the GPU machine (one list: scripts/gpu_wheels.sh).
carried=$(sed -n '/^WHEELS=(/,/^)/p' scripts/gpu_wheels.sh | grep -o '[A-Za-z0-9_.-]*==[A-Za-z0-9_.+-]*')

if step install; then
  pins="$VENV/twin-constraints.txt"
  if versions_match && [ -f "$pins" ]; then
    echo "== twin: reusing $VENV"
  else
    python312="$(find_python312)"
    if [ -z "$python312" ]; then
      echo "twin: no Python 3.12 found (set TWIN_PYTHON, or install it with pyenv: pyenv install 3.12)" >&2
      exit 1
    fi
    echo "== twin: creating $VENV with $python312"
    rm -rf "$VENV"
    "$python312" -m venv "$VENV"
    "$py" -m pip install --quiet --upgrade pip setuptools wheel
    # One constraints file keeps every later install from moving the GPU machine's releases.
    printf '%s\n' "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "triton==$TRITON_VERSION" \
      "numpy==$NUMPY_VERSION" > "$pins"
    "$py" -m pip install --quiet -c "$pins" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
      "triton==$TRITON_VERSION" "numpy==$NUMPY_VERSION"
  fi
  # The test tools and the carried packages (their needs come from the index here; the GPU machine has them).
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet -c "$pins" ninja pytest $carried
  "$py" -c 'import sys, torch, triton, numpy; print(f"== twin: python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")'
  echo "== twin: environment ready at $(elapsed) s"
fi

if step build; then
  if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda-13.0 ]; then export CUDA_HOME=/usr/local/cuda-13.0; fi
  have_nvcc=0
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || command -v nvcc >/dev/null 2>&1; then have_nvcc=1; fi
  if [ "${TWIN_CUDA:-$have_nvcc}" = "1" ]; then
    export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    echo "== twin: building with the CUDA sources (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  else
    export ECLIP_NO_CUDA=1
    echo "== twin: building the C++ CPU kernels only (no nvcc found, or TWIN_CUDA=0)"
  fi
  # --no-deps: with deps pip would upgrade torch under the extension it builds (as on the GPU machine).
  "$py" -m pip install --quiet --no-build-isolation --no-deps -e .
  "$py" -c 'import eclip_kernels as ek; [print(f"   {n:10s} usable={s.usable!s:5s} {s.reason}") for n, s in ek.available_backends().items()]'
  "$py" -c 'import eclip_kernels._extension as e, sys; sys.exit(0 if e.is_loaded() else f"twin: eclip_kernels._C did not load: {e.LOAD_ERROR}")'
  if [ "${FORCE_CUDA:-0}" = "1" ]; then
    # the CUDA C++ kernels as torch 2.11's headers compile them: no spill (scripts/cuda_resources.py)
    arch_list=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed 's/[^0-9]//g' | paste -sd, -)
    "$py" scripts/cuda_resources.py --arch "$arch_list" --json "${TMPDIR:-/tmp}/twin-cuda-resources.json"
  fi
  echo "== twin: built at $(elapsed) s"
fi

if step tests; then
  # The API, backend-choice, module and CPU-kernel tests without the slow ones (torch.compile, 2-process gloo
  # runs), and the CPU tests of scripts/gpu_check.sh under the GPU machine's Python.
  files=()
  for f in tests/test_api.py tests/test_backends.py tests/test_slot_attention.py tests/test_contrastive.py \
           tests/test_nn.py tests/test_gpu_check.py; do
    [ -f "$f" ] && files+=("$f")
  done
  "$py" -m pytest -q -p no:cacheprovider -m "not slow" "${files[@]}"
  echo "== twin: tests done at $(elapsed) s"
fi

if step aot; then
  # the headline cases (what --check enforces), as the module lists them
  headline=$("$py" -c 'from eclip_kernels.triton import aot
print(",".join(c.name for c in aot.SLOT_CASES + aot.CONTRASTIVE_CASES if c.headline))')
  check=(--check)
  [ "${TWIN_AOT_STRICT:-1}" = "1" ] || check=()
  "$py" -m eclip_kernels.triton.aot --arch 80,90 --cases "$headline" \
    --json "${TMPDIR:-/tmp}/twin-aot.json" ${check[@]+"${check[@]}"} --quiet
  echo "== twin: ahead-of-time Triton check ($headline) done at $(elapsed) s"
fi
echo "== twin took $(elapsed) s"

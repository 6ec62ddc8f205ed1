#!/usr/bin/env bash
# The wheel as a user gets it: built from this tree with the torch of $VENV (default .venv), installed into a
# fresh virtual environment that holds the same torch release, and tested there from a folder outside the
# source tree, so that only the installed package can be imported:
#  1. `pip wheel --no-build-isolation --no-deps -w build/wheel/dist .` with $VENV's python;
#  2. a fresh venv (build/wheel/venv) with torch (the release $VENV has, from the package index or its cache),
#     pytest and numpy, then the wheel (with its dependencies);
#  3. checks: the extension loads (ECLIP_KERNELS_REQUIRE_EXTENSION=1), its _build_info.json and the vocabulary
#     asset (eclip/assets/vocab.txt) are installed, nothing is imported from the source tree; then the API tests
#     (tests/test_api.py, tests/test_extension_load.py) run from a copy of tests/.
# Environment: VENV, WHEEL_VENV (the fresh venv, default build/wheel/venv; emptied first), ECLIP_NO_CUDA /
# FORCE_CUDA as for setup.py (default here ECLIP_NO_CUDA=1: the CPU extension builds in about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
root="$PWD"
PY="${VENV:-.venv}/bin/python"
work=build/wheel
venv="${WHEEL_VENV:-$work/venv}"
rm -rf "$work/dist" "$work/tests" "$venv"
mkdir -p "$work/dist"
export ECLIP_NO_CUDA="${ECLIP_NO_CUDA-1}"

# 1. The wheel, compiled against $VENV's torch (its own build folder: the in-place build is not reused).
"$PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/dist" . > "$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/eclip_kernels-*.whl)
echo "== wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1)) built at $(( $(date +%s) - start )) s"
"$PY" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for want in ("eclip/assets/vocab.txt", "eclip_kernels/_build_info.json"):
    assert want in names, f"{want} is not in the wheel"
assert any(n.startswith("eclip_kernels/_C.") for n in names), "the extension is not in the wheel"
EOF

# 2. A fresh venv with the same torch release, then the wheel.
torch_dist=$("$PY" -c 'from importlib.metadata import version; print(version("torch"))')
python_bin=$("$PY" -c 'import sys; print(sys._base_executable)')
"$python_bin" -m venv "$venv"
vpy="$venv/bin/python"
"$vpy" -m pip install --quiet "torch==$torch_dist" numpy pytest
"$vpy" -m pip install --quiet "$wheel"
echo "== fresh venv with torch $torch_dist and the wheel at $(( $(date +%s) - start )) s"

# 3. Checks and the API tests, from a folder where the source tree is not importable.
mkdir -p "$work/tests"
cp tests/_helpers.py tests/test_api.py tests/test_extension_load.py "$work/tests/"
cd "$work/tests"
export ECLIP_KERNELS_REQUIRE_EXTENSION=1
"$root/$vpy" - "$root" <<'EOF'
import os, sys
import eclip, eclip_kernels
from eclip_kernels import _extension
from eclip.models import config
root = sys.argv[1]
for module in (eclip, eclip_kernels, _extension):
    assert not os.path.abspath(module.__file__).startswith(root + os.sep + "eclip"), f"{module.__file__}: source tree"
assert _extension.is_loaded(), _extension.LOAD_ERROR
assert _extension.read_build_info() is not None, "no _build_info.json next to the installed extension"
assert os.path.isfile(config.TINY_VOCAB), f"vocabulary asset missing: {config.TINY_VOCAB}"
with open(config.TINY_VOCAB) as f:
    words = sum(1 for _ in f)
print(f"== installed: {eclip_kernels.__file__}; extension loaded ({_extension._C.__file__}); "
      f"vocab.txt {words} lines")
EOF
"$root/$venv/bin/pytest" -q -p no:cacheprovider test_api.py test_extension_load.py
echo "== check_wheel.sh took $(( $(date +%s) - start )) s"

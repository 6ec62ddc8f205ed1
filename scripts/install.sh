#!/usr/bin/env bash
# Installs eclip-kernels into a virtual environment ($VENV, default .venv; created if missing): torch,
# the package built from source (C++ CPU kernels; CUDA sources too when FORCE_CUDA=1 or a GPU is visible),
# and the test/benchmark tools.
#
# Every dependency is resolved and installed before the extension is compiled, with torch held at the
# installed release, and the package is then built with --no-deps: no install step can replace torch under
# the compiled extension (which would leave an extension that fails to load with an undefined symbol).
# The script ends by importing the package with ECLIP_KERNELS_REQUIRE_EXTENSION=1: it fails loudly when the
# extension does not load with the torch that is installed.
#
# Environment: VENV, PYTHON (the interpreter that creates the venv), EXTRAS (optional-dependency groups of
# pyproject.toml to install, comma separated; default "test"), and setup.py's FORCE_CUDA, ECLIP_NO_CUDA,
# MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip)
"${pip[@]}" install --quiet --upgrade pip setuptools wheel

# 1. torch. 2.14.1 is the newest release the development machines allow; any torch >= 2.6 works. torchvision
#    (needed by open-clip-torch, a test dependency) is installed with it, in the matching release.
"$py" -c 'import torch' 2>/dev/null || "${pip[@]}" install --quiet "torch==2.14.1" "torchvision==0.29.1"
torch_version=$("$py" -c 'from importlib.metadata import version; print(version("torch"))')  # e.g. 2.14.1

# 2. Every other dependency: [project] dependencies and the extras, read from pyproject.toml, and the build
#    tools. The constraint holds torch at the installed release: pip picks the torchvision (and anything else)
#    that matches it, or fails here, before anything is compiled.
mapfile -t deps < <("$py" - "$EXTRAS" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    deps += project["optional-dependencies"][extra]
print("\n".join(deps))
EOF
)
[ ${#deps[@]} -gt 0 ] || { echo "install.sh: no dependencies read from pyproject.toml" >&2; exit 1; }
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
echo "torch==$torch_version" > "$pins"
"${pip[@]}" install --quiet -c "$pins" ninja numpy pytest pytest-benchmark "${deps[@]}"
# pip matches torchvision to torch by release number only: a torchvision built for another variant of the same
# release (CUDA against +cpu) installs, then fails at import. Say so now rather than in the tests.
if "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)'; then
  "$py" -c 'import torchvision' 2>/dev/null || {
    echo "install.sh: torchvision $("$py" -m pip show torchvision 2>/dev/null | sed -n 's/^Version: //p') does not" \
         "import with torch $torch_version: install the torchvision built for this torch" >&2; exit 1; }
fi

# 3. The package, compiled against the torch installed above; --no-deps: nothing is installed or upgraded now.
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda-13.0 ]; then
  export CUDA_HOME=/usr/local/cuda-13.0
fi
"${pip[@]}" install --no-build-isolation --no-deps -e .

# 4. The extension must load with the torch that is installed (an ImportError otherwise, naming the cause).
now=$("$py" -c 'from importlib.metadata import version; print(version("torch"))')
[ "$now" = "$torch_version" ] || { echo "install.sh: torch changed from $torch_version to $now during the install" >&2; exit 1; }
ECLIP_KERNELS_REQUIRE_EXTENSION=1 "$py" -c 'import eclip_kernels as ek; [print(f"{n:10s} usable={s.usable!s:5s} {s.reason}") for n, s in ek.available_backends().items()]'

#!/usr/bin/env bash
# Downloads, into .whl/, the wheels of what the GPU machine lacks (it reaches no package index): CPython
# 3.12 manylinux x86-64 or pure-Python wheels, one version each, without their dependencies (the GPU
# machine has torch, numpy, timm, regex, tqdm, huggingface-hub, safetensors, einops, sympy, pyyaml...).
# Run it on a machine that reaches the index, in the repository; .whl/ is git-ignored (.git/info/exclude)
# and travels with the working tree; scripts/gpu_check.sh installs it there with
#   python3 -m pip install --no-index --no-deps --target DIR .whl/*.whl
#
#   bash scripts/gpu_wheels.sh            # PYTHON (default python3) runs pip; WHEELS_DIR (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DIR="${WHEELS_DIR:-.whl}"
LIMIT_MIB=60

# name==version: the packages the tests and benchmarks use that the GPU machine lacks, and their own needs
# that it lacks too.
WHEELS=(
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4     # open_clip's ClipLoss (benchmarks, comparison test)
  inf-cl==1.2.1                                         # Inf-CL (benchmark)
  slot-attention==1.5.2 einx==0.4.3 frozendict==2.5.1   # the PyPI SlotAttention (drop-in tests)
  vector-quantize-pytorch==1.32.0 loguru==0.7.3 torch-einops-utils==0.2.0
  webdataset==1.0.2 braceexpand==0.1.7                  # eclip.data shards
)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DIR/" "$exclude" 2>/dev/null || echo "/$DIR/" >> "$exclude"

mkdir -p "$DIR"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for spec in "${WHEELS[@]}"; do
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DIR" "$spec"
done

# One version of each package: two would stop the install there.
dupes=$(ls "$DIR"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels: more than one version in $DIR of: $dupes (remove the old ones)" >&2
  exit 1
fi
size_kib=$(du -sk "$DIR" | cut -f1)
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $(awk "BEGIN { printf \"%.1f\", $size_kib / 1024 }") MiB in $DIR"
ls -1 "$DIR"
if [ "$size_kib" -gt $(( LIMIT_MIB * 1024 )) ]; then
  echo "gpu_wheels: $DIR is over $LIMIT_MIB MiB: the working tree that travels to the GPU machine is at most 64 MiB" >&2
  exit 1
fi

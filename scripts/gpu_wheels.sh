#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels that the GPU image lacks into .whl/ (git-ignored),
# at the versions this venv runs; scripts/gpu_check.sh installs them there with --no-index.
# The GPU image (device tool, KINDS.md) has torch, accelerate, peft, numba, pandas,
# scikit-learn, scipy, pyarrow; these are the rest that extract / hypothesize / train import, and
# transformers at our version (the image had 5.17).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
NAMES="sae-lens transformer-lens trl datasets igraph leidenalg texttable better-abc docstring-parser simple-parsing wandb dill multiprocess xxhash plotly babe beartype jaxtyping typeguard fancy-einsum python-dotenv tenacity transformers huggingface-hub httpx2 httpcore2"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for name in $NAMES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$version" ] || { echo "skip $name (not installed here)"; continue; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$name==$version" \
    || echo "FAILED $name==$version"
done
du -sh .whl

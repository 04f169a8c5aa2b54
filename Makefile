# The README's two commands: `make demo` and `make test`. Both set up .venv first when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export HYDRA_FULL_ERROR ?= 1

.PHONY: setup demo test lint format clean

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change (idempotent, seconds otherwise).
$(STAMP): constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip setuptools
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@# fairseq after torch, without its declared deps (torchaudio would pull a second torch).
	$(PY) -c "import fairseq" 2>/dev/null || \
		$(PY) -m pip install -q --no-deps --no-build-isolation -c constraints.txt fairseq-fixed
	@touch $@

demo: setup
	$(PY) -m scripts.demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

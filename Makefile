# mukv: every target bootstraps its own virtual environment (.venv) on first use.
# `make help` lists the targets.

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# CPU installs pin the local CPU build of torch so that no CUDA packages are pulled.
# GPU users: `make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"`
# or install their CUDA torch into .venv first (any torch>=2.4 satisfies setup.cfg).
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= dev
STAMP       := $(VENV)/.installed-$(EXTRAS)
ARGS        ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint clean reproduce-table

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install mukv with the dev extra (CPU torch)

run: $(STAMP) ## run the default pipeline (embedded model and dataset); extra overrides via ARGS="..."
	$(PY) -m mukv.run $(ARGS)

test: $(STAMP) ## run the whole test suite
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff over the package and tests
	$(PY) -m ruff check mukv tests

clean: ## remove the virtual environment and caches (keeps outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

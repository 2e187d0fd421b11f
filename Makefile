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
# make reproduce-table: which grid (experiments/grids/<DATA>.yaml) and where (default outputs/reproduce/<time>_<DATA>)
DATA        ?= synthetic
OUT         ?=
# make test: test files spread over this many worker processes (pytest-xdist; a file's tests stay in one worker)
TEST_WORKERS ?= auto

.DEFAULT_GOAL := help
.PHONY: bench bench-growth bench-ops browser demo help install run test test-fast lint clean reproduce-table sweep-spec train-nano wandb-dashboard

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP) browser ## create .venv and install mukv with the dev extra (CPU torch), and Chromium for the tests

# Chromium and chromedriver from Debian's packages: the run explorer's browser tests (tests/test_explorer.py) drive
# them headless. Nothing is done where both are installed; root runs apt-get, anyone else through sudo.
BROWSER_PKGS ?= chromium chromium-driver
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## install Chromium and chromedriver (Debian's packages) for the explorer's browser tests, unless present
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(BROWSER_PKGS) with apt-get (the explorer's browser tests)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS); \
	else \
		echo "make browser: no apt-get here; install Chromium and chromedriver (the browser tests skip without them, and fail under CI)"; \
	fi

run: $(STAMP) ## no ARGS: nano model x synthetic benchmark, every registered cache method run through mukv.train_eval, one results table; ARGS="...": one configured run
ifeq ($(strip $(ARGS)),)
	$(PY) experiments/nano_benchmark.py --preset quick
else
	$(PY) -m mukv.run $(ARGS)
endif

demo: $(STAMP) ## the live demo web app at http://127.0.0.1:7860: nano model, a synthetic stream (ARGS="cache=mukv --video clip.mp4")
	$(PY) -m mukv.demo $(ARGS)

train-nano: $(STAMP) ## retrain the nano model on this CPU (<= ~55 min) and replace the shipped checkpoint
	$(PY) -m mukv_nano.train train.publish=true $(ARGS)

test: $(STAMP) browser ## run the whole test suite (TEST_WORKERS=auto processes; TEST_WORKERS=0: one)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: $(STAMP) browser ## run the tests not marked slow
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

reproduce-table: $(STAMP) ## run the results grid as one multirun, render table + figures (DATA=synthetic|rvs|ovo, OUT=dir, ARGS=overrides)
	$(PY) experiments/reproduce_table.py --data $(DATA) $(if $(strip $(OUT)),--out $(OUT),) $(ARGS)

sweep-spec: $(STAMP) ## print the W&B sweep spec of a multirun (ARGS="experiment=sweep/budget cache=rekv model=... --out FILE")
	$(PY) -m mukv.sweeps wandb $(ARGS)

wandb-dashboard: $(STAMP) ## create the W&B workspace panels (ARGS="--entity ME --project mukv"; --dry-run prints them)
	$(PY) experiments/wandb_dashboard.py $(ARGS)

lint: $(STAMP) ## ruff over the package and tests
	$(PY) -m ruff check mukv mukv_nano experiments tests

clean: ## remove the virtual environment and caches (keeps outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# extra mukv.bench arguments for the three targets below (they come last: they override the defaults)
BENCH_ARGS  ?=
bench: $(STAMP) ## speed and memory of every registered cache method (0.5B architecture, random weights; ~15 min on 2 CPU cores); BENCH_ARGS="..."
	@echo "make bench takes about 15 min on a 2-core CPU (every registered method x 8 frames of the 0.5B architecture; see BENCHMARKS.md 5d for the measured time; BENCH_ARGS=\"--methods rekv,mukv\" picks a few); results print at the end"
	$(PY) -m mukv.bench --model 0.5b --dtype auto --frames 8 --chunk 8 $(BENCH_ARGS)

bench-ops: $(STAMP) ## operator calls and host reads per steady chunk and answer token, every method (0.5B layout); BENCH_ARGS="--compile default" compiled
	$(PY) -m mukv.bench --ops --model 0.5b --dtype fp32 --chunk 16 --out outputs/bench/ops.json $(BENCH_ARGS)

bench-growth: $(STAMP) ## time, attention work and memory against stream length (nano, 2 h at 0.5 fps; ~3 min)
	$(PY) -m mukv.bench --growth --model nano --dtype fp32 --frames 3600 --chunk 30 --answer-every 600 \
		--methods full,sliding_window,rekv,mukv,streamkv,infinipot_v,hermes --out outputs/bench/growth_nano $(BENCH_ARGS)

# neurovision — `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS := -q -c constraints.txt --progress-bar off
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONWARNINGS := ignore::DeprecationWarning

.DEFAULT_GOAL := help
.PHONY: help install demo test test-full bench lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/neurovision: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install $(PIP_FLAGS) -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m neurovision_boot >/dev/null  # torchvision fix for every process of this venv
	touch $(BIN)/neurovision

install: $(BIN)/neurovision ## create .venv and install neurovision with the pinned CPU stack

demo: install ## prepare the demo phantom and print its summary
	$(BIN)/neurovision prepare phantom --preset demo --out data/phantom_demo.h5
	$(BIN)/neurovision inspect data/phantom_demo.h5 --plot runs/demo/phantom_overview.png

test: install ## the default test suite (< 10 min on 2 cores)
	$(BIN)/python -m pytest -q

test-full: install ## every test, the slow ones included
	$(BIN)/python -m pytest -q -m ""

bench: install ## benchmarks (prints ratios measured in one run)
	$(BIN)/python benchmarks/bench_datamodule.py
	$(BIN)/python benchmarks/bench_stage1.py

lint: install ## ruff
	$(BIN)/ruff check neurovision data_modules callbacks tests benchmarks

clean: ## remove generated data, runs and caches (keeps .venv)
	rm -rf data runs lightning_logs .bench .pytest_cache .ruff_cache build *.egg-info

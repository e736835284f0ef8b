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

STAGE1_DEMO := -c experiments/stage1_vit3d.yaml -c experiments/presets/stage1_vit3d_demo.yaml
LAST_CKPT = $$(ls -t runs/stage1_demo/tb/*/checkpoints/last.ckpt | head -1)
STAGE2_DEMO = -c experiments/stage2_instruct.yaml -c experiments/presets/stage2_instruct_demo.yaml \
	--model.init_args.stage1=$(LAST_CKPT)
A_CKPT = $$(ls -t runs/stage2_demo_a/tb/*/checkpoints/last.ckpt | head -1)
B_CKPT = $$(ls -t runs/stage2_demo/tb/*/checkpoints/last.ckpt | head -1)

demo: install ## the whole chain on the demo phantom: prepare, teachers, stage 1, stage 2 (~70 min on 2 cores)
	$(BIN)/neurovision prepare phantom --preset demo --out data/phantom_demo.h5
	$(BIN)/neurovision inspect data/phantom_demo.h5 --plot runs/demo/phantom_overview.png
	$(BIN)/python -m neurovision.teacher_training --store data/phantom_demo.h5 --out teachers/phantom_demo \
		--clip-epochs 40 --clip-max-minutes 20
	$(BIN)/neurovision fit $(STAGE1_DEMO)
	$(BIN)/neurovision test $(STAGE1_DEMO) --ckpt_path=$(LAST_CKPT)
	$(BIN)/neurovision localize --ckpt $(LAST_CKPT) --out runs/demo/concept_maps
	$(BIN)/python -m neurovision.llm --store data/phantom_demo.h5 --out teachers/phantom_demo/tiny_llm
	$(BIN)/neurovision fit $(STAGE2_DEMO) -c experiments/presets/stage2_instruct_phase_a.yaml \
		--trainer.default_root_dir=runs/stage2_demo_a --trainer.logger.init_args.save_dir=runs/stage2_demo_a
	$(BIN)/neurovision fit $(STAGE2_DEMO) --model.init_args.init_from=$(A_CKPT)
	$(BIN)/neurovision test $(STAGE2_DEMO) --ckpt_path=$(B_CKPT)

test: install ## the default test suite (< 10 min on 2 cores)
	$(BIN)/python -m pytest -q

test-full: install ## every test, the slow ones included
	$(BIN)/python -m pytest -q -m ""

bench: install ## benchmarks (prints ratios measured in one run)
	$(BIN)/python benchmarks/bench_datamodule.py
	$(BIN)/python benchmarks/bench_stage1.py
	$(BIN)/python benchmarks/bench_stage2.py

lint: install ## ruff
	$(BIN)/ruff check neurovision data_modules callbacks tests benchmarks

clean: ## remove generated data, runs and caches (keeps .venv)
	rm -rf data runs lightning_logs .bench .pytest_cache .ruff_cache build *.egg-info

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
.PHONY: help install demo demo-full demo-encoding test test-full bench bench-scale lint docs clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/neurovision: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install $(PIP_FLAGS) -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m neurovision_boot >/dev/null  # spawned processes' torchvision fix; a .pth only where torchvision's ops do not load
	touch $(BIN)/neurovision

install: $(BIN)/neurovision ## create .venv and install neurovision with the pinned CPU stack

# ---------------------------------------------------------------------------------------------- demo
# One recipe, two sizes: `make demo` (MODE=quick) is the whole chain on the demo phantom with quick settings
# (< 30 min on 2 cores, into runs/demo); `make demo-full` (= `make demo MODE=full`) is the longer chain behind the
# stage pages' numbers (~3 h, into runs/demo_full). Data and teachers are cached (data/, teachers/phantom_demo);
# the teachers remember the step budgets they were trained with (a .budget-* stamp), so switching MODE retrains
# them instead of silently reusing the other size's. The run folder is rebuilt every time.
NV := $(BIN)/neurovision
MODE ?= quick
T := teachers/phantom_demo
ck = $$(ls -t $(1)/tb/*/checkpoints/last.ckpt | head -1)
logto = --trainer.default_root_dir=$(1)  # the logger's save_dir follows it (neurovision.runs.lightning)
S1 := -c experiments/stage1_vit3d.yaml -c experiments/presets/stage1_vit3d_demo.yaml
S2 := -c experiments/stage2_instruct.yaml -c experiments/presets/stage2_instruct_demo.yaml
# The tiny models' budgets are optimiser steps, their schedules functions of the step, and their thread counts
# fixed (the count changes CPU convolutions' sums): the same seed gives the same weights on an idle or a loaded
# machine, so the numbers `make demo` prints are the numbers anyone gets.
ifeq ($(MODE),full)
D := runs/demo_full
DEMO_CLIP_STEPS ?= 900
DEMO_VAE_STEPS ?= 2700
DEMO_UNCLIP_STEPS ?= 1500
DEMO_LLM_STEPS ?= 1500
LLM_THREADS := 2
S1_ARGS :=  # the demo preset's 16 epochs
S2_ARGS :=  # the demo presets' 1 + 2 epochs, every eval item
BETA := experiments/sweeps/beta_full.yaml
else ifeq ($(MODE),quick)
D := runs/demo
DEMO_CLIP_STEPS ?= 400
DEMO_VAE_STEPS ?= 1800
DEMO_UNCLIP_STEPS ?= 275
DEMO_LLM_STEPS ?= 150
LLM_THREADS := 1
# stage 1 with the read-out of 64 principal components (docs/stage1.md); stage 2 with the stage-1 CLIP prediction
# as one more fMRI token (`clip_token`, docs/stage2.md): what lets the quick chain's 4 epochs and few hundred
# stage-2 batches meet issue 19's bars. With these budgets `make demo` took 15.6 min on an idle 2-core machine,
# venv installed (docs/results.md, "make demo (quick chain)").
DEMO_S1_EPOCHS ?= 4
DEMO_S2_A_BATCHES ?= 300
DEMO_S2_BATCHES ?= 400
S1 += -c experiments/presets/stage1_vit3d_demo_readout.yaml
S2 += --model.init_args.clip_token=true
S1_ARGS := --trainer.max_epochs=$(DEMO_S1_EPOCHS) --model.init_args.scheduler.init_args.T_max=$(DEMO_S1_EPOCHS)
S2_EVAL := --data.init_args.max_eval_items=24
S2_A_ARGS := --trainer.max_epochs=1 --trainer.limit_train_batches=$(DEMO_S2_A_BATCHES) $(S2_EVAL)
S2_ARGS := --trainer.max_epochs=1 --trainer.limit_train_batches=$(DEMO_S2_BATCHES) $(S2_EVAL)
BETA := experiments/sweeps/beta.yaml
else
$(error MODE=$(MODE): use MODE=quick (make demo) or MODE=full (make demo-full))
endif
TEACHERS_OK := $(T)/.budget-clip$(DEMO_CLIP_STEPS)-vae$(DEMO_VAE_STEPS)
UNCLIP_OK := $(T)/.budget-unclip$(DEMO_UNCLIP_STEPS)
LLM_OK := $(T)/.budget-llm$(DEMO_LLM_STEPS)-threads$(LLM_THREADS)

data/phantom_demo.h5: | install
	$(NV) prepare phantom --preset demo --out $@

$(TEACHERS_OK): | data/phantom_demo.h5
	rm -f $(T)/.budget-clip*
	$(NV) tiny teachers --store data/phantom_demo.h5 --out $(T) \
		--clip-steps $(DEMO_CLIP_STEPS) --vae-steps $(DEMO_VAE_STEPS) --threads 2 --force
	touch $@

# the tiny unCLIP (on the teachers' CLIP and VAE: retrained with them) and the tiny LLM train side by side, one
# core each in the quick chain (`make -j2` in the demo recipe)
$(UNCLIP_OK): $(TEACHERS_OK)
	rm -f $(T)/.budget-unclip*
	OMP_NUM_THREADS=1 $(NV) tiny unclip --store data/phantom_demo.h5 \
		--teachers $(T) --steps $(DEMO_UNCLIP_STEPS) --threads 1 $(if $(filter quick,$(MODE)),--eval-items 0) --force
	touch $@

$(LLM_OK): | data/phantom_demo.h5
	rm -f $(T)/.budget-llm*
	OMP_NUM_THREADS=$(LLM_THREADS) $(NV) tiny llm --store data/phantom_demo.h5 \
		--out $(T)/tiny_llm --steps $(DEMO_LLM_STEPS) --threads $(LLM_THREADS)
	touch $@

demo: install ## the whole chain on the demo phantom (quick settings, < 30 min on 2 cores) + HTML report
	$(MAKE) --no-print-directory -j$(if $(filter full,$(MODE)),1,2) $(TEACHERS_OK) $(UNCLIP_OK) $(LLM_OK)
	rm -rf $(D)
	$(NV) inspect data/phantom_demo.h5 --plot $(D)/phantom_overview.png
	$(NV) fit $(S1) $(call logto,$(D)/stage1) $(S1_ARGS)
	$(NV) test $(S1) $(call logto,$(D)/stage1) --ckpt_path=$(call ck,$(D)/stage1)
	$(NV) localize --ckpt $(call ck,$(D)/stage1) --out $(D)/stage1/concept_maps --method pattern
	$(NV) fit $(S2) -c experiments/presets/stage2_instruct_phase_a.yaml $(call logto,$(D)/stage2_a) \
		--model.init_args.stage1=$(call ck,$(D)/stage1) $(S2_A_ARGS)
	$(NV) fit $(S2) $(call logto,$(D)/stage2) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--model.init_args.init_from=$(call ck,$(D)/stage2_a) $(S2_ARGS)
	$(NV) test $(S2) $(call logto,$(D)/stage2) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--ckpt_path=$(call ck,$(D)/stage2) $(S2_EVAL)
	$(NV) test $(S2) $(call logto,$(D)/stage2_shuffled) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--ckpt_path=$(call ck,$(D)/stage2) $(S2_EVAL) \
		--data.init_args.shuffle_fmri=true --data.init_args.eval_tasks=[caption]
	$(NV) predict $(S2) $(call logto,$(D)/stage2) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--ckpt_path=$(call ck,$(D)/stage2) --trainer.logger.init_args.version=sd_prompts \
		--data.init_args.eval_tasks=[sd_prompt] --data.init_args.max_eval_items=32
	$(NV) sweep $(BETA) --out $(D)/beta_sweep
	$(NV) prepare phantom_seeg --preset tiny --n_movies 2 --out data/phantom_seeg_quick.h5
	$(NV) encode $(ENC) --store data/phantom_seeg_quick.h5 --out $(D)/encoding
	$(NV) report $(D)
	@echo "demo done: open $(D)/report.html"
	@$(BIN)/python benchmarks/demo_headline.py --root $(D) --teachers $(T)

demo-full: install ## the chain behind the stage pages' numbers (= make demo MODE=full: longer budgets, β best-of-8; ~3 h)
	$(MAKE) --no-print-directory demo MODE=full

# ------------------------------------------------------------------------------------------ encoding
# the encoding stage (Subramaniam et al.) on the SEEG phantom; `make demo` runs it on the tiny one (< 1 min)
ENC := -c experiments/encoding.yaml -c experiments/presets/encoding_phantom.yaml

demo-encoding: install ## the encoding stage on the demo SEEG phantom (~6 min) + its HTML report
	$(NV) prepare phantom_seeg --preset demo --out data/phantom_seeg_demo.h5
	$(NV) encode $(ENC) --out runs/encoding/phantom
	$(NV) report runs/encoding/phantom

test: install ## the default test suite (< 10 min on 2 cores)
	$(BIN)/python -m pytest -q

test-full: install ## every test, the slow ones included
	$(BIN)/python -m pytest -q -m ""

bench: install ## benchmarks (prints ratios measured in one run)
	$(BIN)/python benchmarks/bench_datamodule.py
	$(BIN)/python benchmarks/bench_stage1.py
	$(BIN)/python benchmarks/bench_stage2.py
	$(BIN)/python benchmarks/bench_encoding.py

bench-scale: install ## the scale rehearsal at NSD / Brain Treebank shapes (<= 20 min; --quick <= 5)
	$(BIN)/python benchmarks/bench_scale.py $(BENCH_SCALE_ARGS)

lint: install ## ruff, and mypy on the library (neurovision, data_modules, callbacks; settings in pyproject.toml)
	$(BIN)/ruff check neurovision data_modules callbacks tests benchmarks
	$(BIN)/mypy

docs: install ## build the documentation site into site/ (mkdocs-material; --strict: a dead link fails)
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || \
		{ set -o pipefail; $(BIN)/python -m pip install $(PIP_FLAGS) -e ".[docs]" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean: ## remove generated data, runs and caches (keeps .venv)
	rm -rf data runs lightning_logs .bench .pytest_cache .ruff_cache build site *.egg-info

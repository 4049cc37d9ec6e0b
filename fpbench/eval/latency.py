"""Latency of a run's own quantized model, on this machine: the "latency" task.

Measured where a scheme really runs, never estimated:

- ``fpbench-kernel``: the quantized linears on fpbench's compiled kernels (``--backend kernel``),
  the rest of the model (embeddings, norms, an unquantized head) in bf16 as in the bf16
  baseline;
- ``torch-fp32`` / ``torch-bf16``: torch's own dense kernels for the baselines (fp32 and
  fp16 weights compute in fp32 on a CPU, bf16 in bf16);
- ``torch-int8``: torch's weight-only INT8 kernel (``_weight_int8pack_mm``, bf16
  activations) for ``int8/channel``, a peer of fpbench's kernels.

A scheme with none of these (activation quantization, or weights simulated in fp32 with
no kernel) has no latency: :func:`latency_path` returns None and no record is written.

What is timed, at batch 1: ``decode_ms_per_token``, the mean time of one decode step over
``new_tokens`` greedy steps after a fixed ``prompt_tokens``-token prompt (median over
``repeats``, a warm-up pass excluded), and ``prefill_tokens_per_s`` over a
``prefill_tokens``-token prompt (the transformers forward, median of ``repeats``). Decode
steps run in ``lean_decode.LeanDecoder`` where it supports the model (the same logits as
the transformers forward, without its per-token framework work; ``decode_loop``
"compiled" with its compiled step, which kernel and dense layers get, else "lean"), else
in the transformers forward with its KV cache (``decode_loop`` "transformers").
``weight_mb`` counts the bytes the quantized linear layers hold for their weights
(packed codes, scales, zero points; not biases), so it tracks the format's real size.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from fpbench.errors import FpbenchError
from fpbench.eval.generation import cache_keyword, output_cache
from fpbench.eval.lean_decode import LeanDecoder, decode_loop
from fpbench.kernels.linear import LutLinear, packed_bytes
from fpbench.kernels.torch_int8 import int8_weight_only_mm, padded_codes

PATHS = ("fpbench-kernel", "torch-fp32", "torch-bf16", "torch-int8")


# The prefill warm-up runs a short prompt through the batched path (a full 512-token one
# cost 10 s per bf16 run on an AVX2 CPU); the median of the timed repeats absorbs what is
# left of first-call costs.
WARMUP_PREFILL_TOKENS = 64


@dataclass(frozen=True)
class LatencySettings:
    prompt_tokens: int = 16
    new_tokens: int = 32
    prefill_tokens: int = 512
    repeats: int = 3


def latency_path(scheme, backend: str) -> str | None:
    """Where this scheme's linears run for real, or None (simulated only)."""
    if scheme.act_format is not None:
        return None
    if backend == "kernel":
        return "fpbench-kernel"
    if scheme.is_baseline:
        return "torch-bf16" if scheme.format == "bf16" else "torch-fp32"
    if scheme.format == "int8" and scheme.granularity is not None and scheme.granularity.kind == "channel" \
            and getattr(scheme, "scale_format", "fp16") in ("fp16", "fp32", "bf16"):
        return "torch-int8"
    return None


class TorchInt8Linear(nn.Module):
    """torch's weight-only INT8 CPU kernel: int8 codes [N, K], one scale per row, bf16 x."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.reshape(-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def compiled_projection(self):
        """This layer for the compiled decode step: the same calls as ``forward``."""
        from fpbench.kernels import build as kernels

        return kernels.load().Projection.int8_weight_only(padded_codes(self.codes), self.scales, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_weight_only_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.codes, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def _with_dense_rest_in_bf16(model: nn.Module) -> nn.Module:
    """A copy of a kernel run's model whose unquantized parts (embeddings, norms, the head
    unless it is quantized) hold bf16, sharing the kernel layers (their codes and scales
    stay as they are)."""
    kernel_layers = [module for module in model.modules() if isinstance(module, LutLinear)]
    model = copy.deepcopy(model, memo={id(layer): layer for layer in kernel_layers})
    for module in model.modules():
        if isinstance(module, LutLinear):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.bfloat16)
    return model


def prepare(model: nn.Module, path: str, layer_names, weights: dict | None = None) -> nn.Module:
    """The model to time for ``path`` (a copy when the dtype or layers change). Besides
    the quantized linears, every path but torch-fp32 runs in bf16, as torch-bf16 does:
    the rows differ in their linear layers only. (A kernel run's fp32 head alone, 113 MB
    for the default model, read once a token, cost as much as its FP6 decoder layers.)"""
    if path == "torch-fp32":
        return model
    if path == "fpbench-kernel":
        return _with_dense_rest_in_bf16(model)
    model = copy.deepcopy(model).to(torch.bfloat16)
    if path == "torch-int8":
        modules = dict(model.named_modules())
        for name in layer_names:
            parent, _, leaf = name.rpartition(".")
            old = modules[name]
            qweight = weights[name]
            setattr(modules[parent] if parent else model, leaf,
                    TorchInt8Linear(qweight.codes, qweight.scales, old.bias))
    return model


def weight_bytes(model: nn.Module, layer_names) -> int:
    """Bytes of the linear layers' weights: a kernel layer's ``packed_bytes`` (codes,
    scales, zero points), else every parameter and buffer but the bias."""
    modules = dict(model.named_modules())
    total = 0
    for name in layer_names:
        module = modules[name]
        if isinstance(module, LutLinear):
            total += packed_bytes(module)
            continue
        for tensor_name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor_name != "bias" and tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def _decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    steps = []
    if decode_loop(model) != "transformers":
        decoder = LeanDecoder(model, prompt.shape[1] + new_tokens)
        token = decoder.prefill(prompt).argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            started = time.perf_counter()
            token = decoder.step(token).argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - started)
        return 1e3 * sum(steps) / len(steps)
    out, keyword = model(input_ids=prompt, use_cache=True), cache_keyword(model)
    past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        started = time.perf_counter()
        out = model(input_ids=token, **{keyword: past}, use_cache=True)
        past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - started)
    return 1e3 * sum(steps) / len(steps)


@torch.no_grad()
def _prefill_s(model, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - started


def measure(model: nn.Module, vocab_size: int, max_length: int | None,
            settings: LatencySettings = LatencySettings()) -> dict:
    """Decode ms/token, tokens/s and prefill tokens/s of ``model`` at batch 1."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise FpbenchError("the latency task times decoder-only models; drop 'latency' for this model")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, settings.prompt_tokens), generator=generator)
    prefill_tokens = min(settings.prefill_tokens, max_length or settings.prefill_tokens)
    long_prompt = torch.randint(0, vocab_size, (1, prefill_tokens), generator=generator)
    _decode_ms_per_token(model, prompt, 2)  # warm-up: first-call allocations, kernel loading
    _prefill_s(model, long_prompt[:, :WARMUP_PREFILL_TOKENS])  # the GEMM path's first call
    decode_ms = statistics.median(_decode_ms_per_token(model, prompt, settings.new_tokens)
                                  for _ in range(settings.repeats))
    prefill_s = statistics.median(_prefill_s(model, long_prompt) for _ in range(settings.repeats))
    return {"decode_ms_per_token": decode_ms, "decode_tokens_per_s": 1e3 / decode_ms,
            "prefill_tokens_per_s": prefill_tokens / prefill_s, "prefill_tokens": prefill_tokens,
            "decode_loop": decode_loop(model)}

"""Greedy decoding at batch 1 without the framework's per-token work, for Llama-family models.

A decode step of a small model is mostly Python: the transformers forward builds masks,
cache objects, keyword dictionaries and decorator checks around every layer, and each
kernel layer widens and narrows its input on its own. ``LeanDecoder`` runs the same
modules' arithmetic with none of that: the same torch operations in the same order as
``LlamaForCausalLM`` (RMSNorm, rotary embedding, SDPA, SiLU MLP, residuals), the layers'
own weights, a key/value buffer allocated once, and fpbench's kernel layers stacked per
block (q, k and v in one call; gate and up in one call; bit-identical, see
``LutLinear.stacked``). Its logits equal the transformers forward's bit for bit, so
greedy tokens are the same (tests/test_lean_decode.py checks both).

Where every linear layer is a plain ``nn.Linear`` or offers a ``compiled_projection``
(kernel layers, torch's INT8 layers), the per-layer work runs in the compiled ``LlamaStep``
(fpbench/kernels/cpp/llama_step.cpp): elementwise operations as loops that round as torch's
CPU kernels do, reductions, SiLU and attention as the same ATen calls, so the logits are
the same bits and a step no longer pays the interpreter for each of its ~50 operations per
layer. Other layers (the simulator's) run the Python step below, which is also the
reference the compiled one is tested against.

The prompt runs through the transformers forward (one call, where its overhead does not
matter); its keys and values seed the buffer. Models other than plain Llama ones
(``model_type`` "llama" with SDPA attention, default RoPE and SiLU) are not handled:
``lean_decoder_support`` says why, and callers fall back to the transformers loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fpbench.errors import FpbenchError
from fpbench.eval.generation import output_cache
from fpbench.kernels import build as kernels
from fpbench.kernels.linear import LutLinear


def lean_decoder_support(model: nn.Module) -> str | None:
    """Why ``LeanDecoder`` cannot run this model, or None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} (the lean loop runs Llama models)"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {config._attn_implementation!r}"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        return f"rope type {rope!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


def compiled_step_support(model: nn.Module) -> str | None:
    """Why ``LeanDecoder`` cannot run this (supported) model's layers in the compiled
    ``LlamaStep``, or None: every linear layer must be a plain ``nn.Linear`` or give its
    own handle (``compiled_projection``: kernel layers, torch's INT8 layers), the
    activation the plain SiLU, and every tensor of one dtype."""
    from transformers.activations import SiLUActivation

    dtype = model.model.embed_tokens.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {dtype}"
    norms, linears = [model.model.norm], {"lm_head": model.lm_head}
    for i, layer in enumerate(model.model.layers):
        if type(layer.mlp.act_fn) not in (SiLUActivation, nn.SiLU):
            return f"activation {type(layer.mlp.act_fn).__name__}"
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linears[f"model.layers.{i}.{part}.{name}"] = getattr(getattr(layer, part), name)
    if any(norm.weight.dtype != dtype for norm in norms):
        return "norm weights of another dtype than the embedding"
    for name, module in linears.items():
        if type(module) is not nn.Linear and not hasattr(module, "compiled_projection"):
            return f"layer {name} ({type(module).__name__})"
        if type(module) is nn.Linear and module.weight.dtype != dtype:
            return f"layer {name} in {module.weight.dtype}"
    try:
        kernels.load()
    except FpbenchError as exc:
        return str(exc)
    return None


def decode_loop(model: nn.Module) -> str:
    """The loop a batch-1 greedy decode of ``model`` runs in: "compiled" (``LeanDecoder``
    with its compiled step), "lean" (``LeanDecoder``, per-layer work in Python), else
    "transformers" (the model's own forward and KV cache)."""
    if lean_decoder_support(model):
        return "transformers"
    return "lean" if compiled_step_support(model) else "compiled"


def _stack(layers: list[nn.Module]) -> tuple[list[nn.Module], list[int] | None]:
    """(one kernel layer, the widths of its parts) when ``layers`` are kernel layers that
    stack, else (``layers``, None)."""
    if all(type(layer) is LutLinear for layer in layers):
        try:
            return [LutLinear.stacked(layers)], [layer.out_features for layer in layers]
        except FpbenchError:
            pass
    return layers, None


def _outputs(stack: list[nn.Module], widths: list[int] | None, x: torch.Tensor) -> list[torch.Tensor]:
    if widths is None:
        return [layer.forward(x) for layer in stack]
    return list(stack[0].forward(x).split(widths, dim=-1))


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm.forward, step by step
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Block:
    """One decoder layer's modules and stacked projections, looked up once."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.head_dim, self.scaling, self.groups = attn.head_dim, attn.scaling, attn.num_key_value_groups
        self.qkv, self.qkv_widths = _stack([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up, self.gate_up_widths = _stack([mlp.gate_proj, mlp.up_proj])
        self.down_proj, self.act = mlp.down_proj, mlp.act_fn


def _projection(layer: nn.Module):
    """``LlamaStep``'s handle of a plain dense layer, or the one a layer gives of itself
    (``compiled_projection``: kernel layers, torch's INT8 layers)."""
    if type(layer) is nn.Linear:
        return kernels.load().Projection(layer.weight, layer.bias)
    return layer.compiled_projection()


def _compiled_step(model: nn.Module, blocks: list[_Block]):
    """A ``LlamaStep`` for ``blocks`` and the model's head (see ``compiled_step_support``)."""
    step = kernels.load().LlamaStep()
    for block in blocks:
        step.add_block(block.norm1.weight, block.norm1.variance_epsilon, [_projection(l) for l in block.qkv],
                       _projection(block.o_proj), block.norm2.weight, block.norm2.variance_epsilon,
                       [_projection(l) for l in block.gate_up], _projection(block.down_proj), block.head_dim,
                       block.scaling, block.groups > 1)
    step.set_output(model.model.norm.weight, model.model.norm.variance_epsilon, _projection(model.lm_head))
    return step


class LeanDecoder:
    """Greedy decoding of one sequence, ``max_length`` tokens at most (prompt included), in
    the compiled step where ``compiled_step_support`` allows it and ``compiled`` is left
    True (False keeps the per-layer work in Python: the reference the compiled step is
    tested against)."""

    def __init__(self, model: nn.Module, max_length: int, compiled: bool = True):
        if problem := lean_decoder_support(model):
            raise FpbenchError(f"the lean decode loop cannot run this model: {problem}")
        self.model, self.max_length = model, max_length
        self.blocks = [_Block(layer) for layer in model.model.layers]
        compiled = compiled and compiled_step_support(model) is None
        self.compiled = _compiled_step(model, self.blocks) if compiled else None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run ``prompt`` ([1, T] token ids) through the transformers forward and keep its
        keys and values; returns the last position's logits [1, vocab]."""
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise FpbenchError(f"the lean decode loop takes one prompt [1, T], not {tuple(prompt.shape)}")
        length = prompt.shape[1]
        if length >= self.max_length:
            raise FpbenchError(f"a prompt of {length} tokens leaves no room within max_length {self.max_length}")
        out = self.model(input_ids=prompt, use_cache=True)
        cache = output_cache(out)
        self.keys, self.values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            shape = (1, k.shape[1], self.max_length, k.shape[-1])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
            self.keys[-1][:, :, :length] = k
            self.values[-1][:, :, :length] = v
        if self.compiled is not None:
            self.compiled.set_cache(self.keys, self.values)
        self.length = length
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` ([1, 1] id) and return the next logits [1, vocab]."""
        position = self.length
        if position >= self.max_length:
            raise FpbenchError(f"the lean decode loop reached max_length {self.max_length}")
        inner = self.model.model
        h = inner.embed_tokens(token)
        cos, sin = inner.rotary_emb(h, torch.tensor([[position]]))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.compiled is not None:
            logits = self.compiled.step(h, cos, sin, position)
        else:
            logits = self._python_step(h, cos, sin, position)
        self.length = position + 1
        return logits

    def _python_step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int) -> torch.Tensor:
        end = position + 1
        for block, keys, values in zip(self.blocks, self.keys, self.values):
            residual = h
            x = _rms_norm(block.norm1, h)
            q, k, v = _outputs(block.qkv, block.qkv_widths, x)
            q = q.view(1, 1, -1, block.head_dim).transpose(1, 2)
            k = k.view(1, 1, -1, block.head_dim).transpose(1, 2)
            v = v.view(1, 1, -1, block.head_dim).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            keys[:, :, position:end] = k
            values[:, :, position:end] = v
            # transformers' SDPA path for one query token without a mask
            attn = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=None,
                                                  dropout_p=0.0, scale=block.scaling, is_causal=False,
                                                  enable_gqa=block.groups > 1)
            attn = attn.transpose(1, 2).contiguous().reshape(1, 1, -1).contiguous()
            h = residual + block.o_proj.forward(attn)
            residual = h
            x = _rms_norm(block.norm2, h)
            gate, up = _outputs(block.gate_up, block.gate_up_widths, x)
            h = residual + block.down_proj.forward(block.act(gate) * up)
        h = _rms_norm(self.model.model.norm, h)
        return self.model.lm_head(h)[:, -1]

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> list[int]:
        """Exactly ``new_tokens`` greedy tokens after ``prompt`` (no stop on EOS)."""
        token = self.prefill(prompt).argmax(-1, keepdim=True)
        tokens = [int(token)]
        while len(tokens) < new_tokens:
            token = self.step(token).argmax(-1, keepdim=True)
            tokens.append(int(token))
        return tokens

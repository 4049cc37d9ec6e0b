"""The lean decode loop: the transformers forward's logits bit for bit, so greedy tokens
are identical, for dense weights and for fpbench's kernel layers (stacked per block), with
the per-layer work compiled (LlamaStep) or in Python."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import tiny_llama
from fpbench.errors import FpbenchError
from fpbench.eval.generation import cache_keyword, output_cache
from fpbench.eval.lean_decode import LeanDecoder, compiled_step_support, decode_loop, lean_decoder_support
from fpbench.kernels.linear import LutLinear, use_kernel_linears
from fpbench.quant.model import quantize_model
from fpbench.quant.scheme import Granularity, Scheme
from fpbench.quant.weights import quantize_weight

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])


def _model(dtype, scheme: str | None, bias: bool = False, hidden: int = 128):
    model = tiny_llama(vocab_size=256, layers=2, hidden=hidden, seed=1, bias=bias)
    for module in model.modules():  # transformers initialises biases to zero
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.normal_(module.bias, std=0.5)
    model = model.to(dtype)
    if scheme:
        quantized = quantize_model(model, Scheme.parse(scheme), progress=False)
        use_kernel_linears(model, quantized.weights)
    return model


def _assert_same_logits_as_transformers(model, decoder: LeanDecoder, steps: int) -> None:
    """The decoder's logits equal the transformers forward's (with its KV cache) bit for
    bit, after the prompt and at each of ``steps`` greedy steps."""
    logits = decoder.prefill(PROMPT)
    out = model(input_ids=PROMPT, use_cache=True)
    cache, keyword = output_cache(out), cache_keyword(model)
    assert torch.equal(logits, out.logits[:, -1])
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        logits = decoder.step(token)
        out = model(input_ids=token, **{keyword: cache}, use_cache=True)
        cache = output_cache(out)
        assert torch.equal(logits, out.logits[:, -1])


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("scheme", [None, "fp6_e3m2/channel/rtn", "int4/g64/rtn", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_logits_equal_the_transformers_forward(dtype, scheme, compiled):
    model = _model(dtype, scheme)
    decoder = LeanDecoder(model, max_length=32, compiled=compiled)
    assert (decoder.compiled is not None) == compiled
    if scheme:  # q/k/v and gate/up run as one kernel layer each, but for NVFP4's tensor scales
        qkv, gate_up = (3, 2) if scheme == "nvfp4" else (1, 1)
        assert [(len(block.qkv), len(block.gate_up)) for block in decoder.blocks] == [(qkv, gate_up)] * 2
    _assert_same_logits_as_transformers(model, decoder, steps=12)


@pytest.mark.parametrize("scheme", [None, "int8/channel/rtn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_biases_and_fp16_in_the_compiled_step(dtype, scheme):
    # q/k/v, o, gate/up and down with biases (dense: at::linear; kernel: added in fp32)
    model = _model(dtype, scheme, bias=True)
    decoder = LeanDecoder(model, max_length=32)
    assert decoder.compiled is not None
    _assert_same_logits_as_transformers(model, decoder, steps=8)


@pytest.mark.parametrize("scheme", [None, "fp6_e3m2/channel/rtn"])
@torch.no_grad()
def test_greedy_tokens_equal_generate(scheme):
    model = _model(torch.bfloat16, scheme)
    expected = model.generate(PROMPT, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, PROMPT.shape[1]:].tolist()
    assert LeanDecoder(model, max_length=64).generate(PROMPT, 20) == expected


class _Wrapped(nn.Linear):
    """A linear layer the compiled step does not know (as the simulator's wrappers)."""


@torch.no_grad()
def test_unknown_layers_keep_the_python_step_with_the_same_tokens():
    model = _model(torch.float32, "int4/g64/rtn")
    expected = LeanDecoder(model, max_length=64).generate(PROMPT, 12)
    down = model.model.layers[1].mlp.down_proj.dequantized_weight()
    wrapped = _Wrapped(down.shape[1], down.shape[0], bias=False)
    wrapped.weight.data = down
    model.model.layers[1].mlp.down_proj = wrapped
    assert "layer model.layers.1.mlp.down_proj (_Wrapped)" in compiled_step_support(model)
    assert decode_loop(model) == "lean"
    decoder = LeanDecoder(model, max_length=64)
    assert decoder.compiled is None
    # the dequantized weight in torch's GEMV: another summation order, the same greedy tokens here
    assert decoder.generate(PROMPT, 12) == expected


@torch.no_grad()
def test_kernel_layers_survive_dtype_casts_and_copies():
    model = _model(torch.float32, "nvfp4")  # 8-bit scale codes and an fp32 scale table
    layer = model.model.layers[0].self_attn.q_proj
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    weight = layer.dequantized_weight()
    model.to(torch.bfloat16)  # activations become bf16; the stored weights must not change
    assert all(buffer.dtype == before[name].dtype and torch.equal(buffer.view(torch.uint8), before[name].view(torch.uint8))
               for name, buffer in layer.named_buffers())  # bytes: the E4M3 table holds NaN
    assert torch.equal(layer.dequantized_weight(), weight)
    twin = copy.deepcopy(model)
    x = torch.randn(1, 1, 128).bfloat16()
    assert torch.equal(twin.model.layers[0].self_attn.q_proj(x), layer(x))


@torch.no_grad()
@pytest.mark.parametrize("hidden", [128, 72])  # 72: widths that torch's INT8 kernel needs padded on AVX-512
def test_torch_int8_layers_run_in_the_compiled_step(hidden):
    from fpbench.eval.latency import TorchInt8Linear, prepare

    model = _model(torch.float32, None, bias=True, hidden=hidden)
    quantized = quantize_model(model, Scheme.parse("int8/channel/rtn"), progress=False)
    peer = prepare(model, "torch-int8", list(quantized.weights), quantized.weights)  # a bf16 copy
    assert type(peer.model.layers[0].mlp.down_proj) is TorchInt8Linear and decode_loop(peer) == "compiled"
    compiled, python = LeanDecoder(peer, max_length=32), LeanDecoder(peer, max_length=32, compiled=False)
    assert compiled.compiled is not None
    a, b = compiled.prefill(PROMPT), python.prefill(PROMPT)
    for _ in range(8):
        token = a.argmax(-1, keepdim=True)
        a, b = compiled.step(token), python.step(token)
        assert torch.equal(a, b)


def test_stacked_layers_equal_separate_calls_bit_for_bit():
    torch.manual_seed(0)
    for name, granularity in (("fp6_e3m2", Granularity("channel")), ("int4_asym", Granularity("group", 64))):
        layers = [LutLinear(quantize_weight(torch.randn(n, 192), name, granularity), torch.randn(n))
                  for n in (95, 33, 32)]  # odd sizes: rows change partners in the row pairs of M = 1
        stacked = LutLinear.stacked(layers)
        for rows in (1, 3, 40):  # the GEMV and the blocked GEMM
            x = torch.randn(rows, 192)
            assert torch.equal(stacked(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_layers_that_differ_do_not_stack():
    a = LutLinear(quantize_weight(torch.randn(32, 64), "fp6_e3m2", Granularity("channel")))
    b = LutLinear(quantize_weight(torch.randn(32, 64), "int4", Granularity("channel")))
    with pytest.raises(FpbenchError, match="same input width, format"):
        LutLinear.stacked([a, b])


def test_other_models_are_refused_with_the_reason():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "gpt2" in lean_decoder_support(gpt2) and decode_loop(gpt2) == "transformers"
    with pytest.raises(FpbenchError, match="lean decode loop cannot run"):
        LeanDecoder(gpt2, max_length=8)
    decoder = LeanDecoder(_model(torch.float32, None), max_length=PROMPT.shape[1])
    with pytest.raises(FpbenchError, match="no room"):
        decoder.prefill(PROMPT)

"""FP6Linear / Int4Linear against the simulated path, and the --backend kernel swap."""

import pytest
import torch
from torch import nn

from fpbench.errors import FpbenchError
from fpbench.kernels.linear import FP6Linear, Int4Linear, check_kernel_scheme, use_kernel_linears
from fpbench.quant.model import quantize_model
from fpbench.quant.weights import quantize_weight
from fpbench.quant.scheme import Granularity, Scheme


def _bound(x, w, k):
    return (k + 2) * 2.0**-24 * (x.abs().double() @ w.abs().double().T) + 1e-30


@pytest.mark.parametrize("batch_shape", [(1,), (3, 5), (2, 20)])
def test_fp6_linear_equals_simulated_linear(batch_shape):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 96, bias=True)
    qweight = quantize_weight(linear.weight.data, "fp6_e3m2", Granularity.parse("channel"))
    module = FP6Linear.from_quantized(qweight, linear.bias)
    assert torch.equal(module.dequantized_weight(), qweight.dequantize())
    x = torch.randn(*batch_shape, 576, generator=gen)
    weight = qweight.dequantize()
    reference = x.double() @ weight.double().T + linear.bias.double()
    y = module(x)
    assert y.shape == (*batch_shape, 96) and y.dtype == torch.float32
    err = (y.double() - reference).abs().reshape(-1, 96)
    assert bool((err <= _bound(x.reshape(-1, 576), weight, 576) + 1e-6).all())
    assert module(x.bfloat16()).dtype == torch.bfloat16


def test_int4_linear_equals_simulated_linear():
    qweight = quantize_weight(torch.randn(64, 256), "int4", Granularity.parse("group:128"))
    module = Int4Linear.from_quantized(qweight)
    assert torch.equal(module.dequantized_weight(), qweight.dequantize())
    x = torch.randn(4, 256)
    err = (module(x).double() - x.double() @ qweight.dequantize().double().T).abs()
    assert bool((err <= _bound(x, qweight.dequantize(), 256)).all())


def test_wrong_scheme_is_refused():
    with pytest.raises(FpbenchError, match="fp6_e3m2"):
        FP6Linear.from_quantized(quantize_weight(torch.randn(8, 256), "fp6_e3m2", Granularity.parse("group:64")))
    with pytest.raises(FpbenchError, match="--backend simulate"):
        check_kernel_scheme(Scheme.parse("int8/channel/rtn"))
    check_kernel_scheme(Scheme.parse("fp6_e3m2/channel/rtn"))
    check_kernel_scheme(Scheme.parse("int4/g128/rtn"))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("scheme_name,cls", [("fp6_e3m2/channel/rtn", FP6Linear), ("int4/g128/rtn", None)])
def test_swap_keeps_the_model_output(scheme_name, cls):
    model = _tiny_llama()
    quantized = quantize_model(model, Scheme.parse(scheme_name), progress=False)
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        simulated = model(tokens).logits
    if cls is None:  # K = 64 is not a whole number of 128-groups: a clear error instead
        with pytest.raises(FpbenchError, match="128"):
            use_kernel_linears(model, quantized.weights)
        return
    assert use_kernel_linears(model, quantized.weights) == 14
    assert isinstance(model.model.layers[0].self_attn.q_proj, cls)
    with torch.no_grad():
        kernel = model(tokens).logits
    torch.testing.assert_close(kernel, simulated, rtol=1e-4, atol=1e-4)


def test_runner_backend_kernel(tmp_path, monkeypatch):
    import fpbench.runner as runner
    from fpbench.models import LoadedModel

    model = _tiny_llama()
    monkeypatch.setattr(runner, "load_model", lambda spec: LoadedModel(model, None, "tiny", "test", None))
    seen = {}

    def fake_evaluate(loaded, task, options):
        seen["q_proj"] = type(loaded.model.model.layers[0].self_attn.q_proj)
        return []

    monkeypatch.setattr(runner, "evaluate_task", fake_evaluate)
    config = runner.RunConfig(scheme=Scheme.parse("fp6_e3m2/channel/rtn"), tasks=["wikitext2"],
                              out_dir=str(tmp_path), progress=False, backend="kernel")
    runner.run(config)
    assert seen["q_proj"] is FP6Linear
    simulate = runner.RunConfig(scheme=config.scheme, tasks=["wikitext2"])
    assert simulate.key() != config.key()


def test_e2e_decode_on_a_tiny_model(tmp_path):
    from fpbench.bench.e2e import e2e_table, run_e2e

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    records = run_e2e(new_tokens=4, out_dir=str(tmp_path), progress=False, shape=shape, include_default=False)
    assert [r["variant"] for r in records] == ["bf16", "fp6_kernel"]
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert records[1]["model_bytes"] < records[0]["model_bytes"]
    assert (tmp_path / "e2e.jsonl").read_text().count("\n") == 2
    assert "fp6_kernel" in e2e_table(records)


def _bf16_tolerance(x_bf16, weight, k, reference):
    # fp32 summation of exact products (plus bf16 denormal x read as zero), then the
    # rounding of the result to bf16 (half an ulp: 2^-9 relative; 2^-8 covers the GEMM
    # path's extra rounding of the dot product before the scale).
    fp32 = _bound(x_bf16.float(), weight, k) + k * 2.0**-126 * float(weight.abs().max())
    return 1.01 * fp32 + 2.0**-7 * reference.abs()


@pytest.mark.parametrize("rows", [1, 3, 9, 70])  # 70 >= GEMM_MIN_ROWS_BF16: the GEMM path
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp6_linear_bf16_input(rows, with_bias):
    from fpbench.kernels.linear import GEMM_MIN_ROWS_BF16

    assert 1 < GEMM_MIN_ROWS_BF16 <= 70
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(576, 40, bias=with_bias)
    qweight = quantize_weight(linear.weight.data, "fp6_e3m2", Granularity.parse("channel"))
    module = FP6Linear.from_quantized(qweight, linear.bias)
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    y = module(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 40)
    weight = qweight.dequantize()
    reference = x.double() @ weight.double().T
    if with_bias:
        reference = reference + linear.bias.double()
    err = (y.double() - reference).abs()
    assert bool((err <= _bf16_tolerance(x, weight, 576, reference) + 1e-6).all()), float(err.max())


@pytest.mark.parametrize("isa", ["auto", "scalar"])
def test_int4_linear_bf16_input(isa):
    qweight = quantize_weight(torch.randn(33, 256), "int4", Granularity.parse("group:128"))
    module = Int4Linear.from_quantized(qweight, isa=isa)
    x = torch.randn(2, 5, 256).bfloat16()
    y = module(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 33)
    weight = qweight.dequantize()
    reference = x.reshape(-1, 256).double() @ weight.double().T
    err = (y.reshape(-1, 33).double() - reference).abs()
    assert bool((err <= _bf16_tolerance(x.reshape(-1, 256), weight, 256, reference)).all())


def test_packed_buffers_are_cache_line_aligned():
    qweight = quantize_weight(torch.randn(8, 256), "fp6_e3m2", Granularity.parse("channel"))
    module = FP6Linear.from_quantized(qweight)
    assert module.packed_hi4.data_ptr() % 64 == 0 and module.packed_lo2.data_ptr() % 64 == 0
    # buffers handed in at an odd address are copied to an aligned one
    hi4 = torch.empty(module.packed_hi4.numel() + 1, dtype=torch.uint8)[1:].view(module.packed_hi4.shape)
    hi4.copy_(module.packed_hi4)
    moved = FP6Linear(hi4, module.packed_lo2, module.scales, 256)
    assert moved.packed_hi4.data_ptr() % 64 == 0 and torch.equal(moved.packed_hi4, module.packed_hi4)


def test_bf16_model_decodes_with_the_kernel():
    # A bf16 model (as in bench --e2e) keeps bf16 activations through the FP6 layers.
    model = _tiny_llama().to(torch.bfloat16)
    quantized = quantize_model(model, Scheme.parse("fp6_e3m2/channel/rtn"), progress=False)
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        simulated = model(tokens).logits.float()
    use_kernel_linears(model, quantized.weights)
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.no_grad():
        kernel = model(tokens).logits.float()
    hook.remove()
    assert seen == [torch.bfloat16]
    torch.testing.assert_close(kernel, simulated, rtol=0.05, atol=0.05)

"""LutLinear against the simulated path, scheme checks, and the --backend kernel swap."""

import json

import pytest
import torch
from torch import nn

from fpbench.errors import FpbenchError
from fpbench.kernels import build as kernels
from fpbench.kernels.linear import LutLinear, check_kernel_scheme, packed_bytes, use_kernel_linears
from fpbench.quant.model import quantize_model
from fpbench.quant.scheme import Granularity, Scheme
from fpbench.quant.weights import quantize_weight

FORMATS = ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "fp8_e3m4",
           "int4", "int4_asym", "int8", "int8_asym"]


def _bound(x, w, k):
    return (k + 2) * 2.0**-24 * (x.abs().double() @ w.abs().double().T) + 1e-30


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("fmt", FORMATS)
# (3, 5): 15 rows, the GEMV; (2, 20): 40 rows, the blocked GEMM (SIMD) or, with the scalar
# kernels the dequantize + torch GEMM path
@pytest.mark.parametrize("batch_shape", [(1,), (3, 5), (2, 20)])
def test_linear_equals_simulated_linear(isa, fmt, batch_shape):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 96, bias=True)
    for granularity in ("channel", "group:64"):
        qweight = quantize_weight(linear.weight.data, fmt, Granularity.parse(granularity))
        module = LutLinear.from_quantized(qweight, linear.bias, isa=isa)
        weight = qweight.dequantize()
        assert torch.equal(module.dequantized_weight(), weight)
        x = torch.randn(*batch_shape, 576, generator=gen)
        reference = x.double() @ weight.double().T + linear.bias.double()
        y = module(x)
        assert y.shape == (*batch_shape, 96) and y.dtype == torch.float32
        err = (y.double() - reference).abs().reshape(-1, 96)
        # + 2^-24 |y|: the bias is added to the fp32 dot product (one more rounding)
        assert bool((err <= _bound(x.reshape(-1, 576), weight, 576) + 2.0**-23 * reference.abs().reshape(-1, 96)).all())


def test_gemm_thresholds_are_exercised():
    # the batch shapes above run the GEMV (1, 3x5 rows) and both GEMM paths (2x20 rows)
    module = kernels.load()
    assert 2 * 20 >= module.scalar_gemm_min_rows() > 3 * 5
    assert 2 * 20 >= module.blocked_min_rows() > 3 * 5


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_input(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(576, 40, bias=with_bias)
    qweight = quantize_weight(linear.weight.data, "fp6_e3m2", Granularity.parse("channel"))
    module = LutLinear.from_quantized(qweight, linear.bias)
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    y = module(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 40)
    weight = qweight.dequantize()
    reference = x.double() @ weight.double().T + (linear.bias.double() if with_bias else 0)
    # fp32 summation (plus the bias), then one rounding to bf16 (unit roundoff 2^-8)
    bound = 1.01 * _bound(x.float(), weight, 576) + 2.0**-8 * reference.abs() * 1.01 + 1e-6
    assert bool(((y.double() - reference).abs() <= bound).all())


@pytest.mark.parametrize("scheme", ["fp6_e3m2/channel/rtn", "int4/g128/rtn", "int4_asym/g32/rtn",
                                    "fp4_e2m1/g16/rtn", "fp8_e5m2/channel/gptq", "int8/g64/rtn",
                                    "fp6_e2m3/g128/gptq", "int8_asym/channel/rtn"])
def test_kernel_schemes_accepted(scheme):
    check_kernel_scheme(Scheme.parse(scheme))


@pytest.mark.parametrize("scheme,problem", [
    ("int8/tensor/rtn", "granularity tensor"),
    ("int4/g24/rtn", "group size 24"),
    ("int6/channel/rtn", "format int6"),
    ("fp5_e2m2/channel/rtn", "format fp5_e2m2"),
    ("int8/channel/rtn/a:int8-token-dynamic", "quantized activations"),
    ("bf16", "not bf16"),
])
def test_other_schemes_refused_in_one_line(scheme, problem):
    with pytest.raises(FpbenchError, match=problem) as info:
        check_kernel_scheme(Scheme.parse(scheme))
    message = str(info.value)
    assert "\n" not in message and "fp8_e4m3" in message


def test_packed_bytes_counts_codes_scales_and_zero_points():
    n, k = 96, 576
    for fmt, gran, expected in [  # scales and zero points in fp16, the default scale format
        ("fp6_e3m2", "channel", n * k * 6 // 8 + n * 2),
        ("int4", "group:128", n * k // 2 + n * 5 * 2),  # 576 = 4 full groups + a ragged one
        ("int4_asym", "group:32", n * k // 2 + 2 * n * 18 * 2),
        ("fp8_e4m3", "channel", n * k + n * 2),
    ]:
        module = LutLinear.from_quantized(quantize_weight(torch.randn(n, k), fmt, Granularity.parse(gran)))
        assert packed_bytes(module) == expected, fmt


def test_packed_buffers_are_cache_line_aligned():
    module = LutLinear.from_quantized(quantize_weight(torch.randn(8, 256), "fp6_e3m2", Granularity.parse("channel")))
    assert module.plane_a.data_ptr() % 64 == 0 and module.plane_b.data_ptr() % 64 == 0


def test_k_not_a_multiple_of_64_is_a_clear_error():
    with pytest.raises(FpbenchError, match="divisible by 64"):
        LutLinear.from_quantized(quantize_weight(torch.randn(8, 100), "int4", Granularity.parse("channel")))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("scheme_name", ["fp6_e3m2/channel/rtn", "int4/g32/rtn", "fp8_e4m3/g16/rtn",
                                         "int4_asym/g32/rtn"])
def test_swap_keeps_the_model_output(scheme_name):
    model = _tiny_llama()
    quantized = quantize_model(model, Scheme.parse(scheme_name), progress=False)
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        simulated = model(tokens).logits
    assert use_kernel_linears(model, quantized.weights) == 14
    assert isinstance(model.model.layers[0].self_attn.q_proj, LutLinear)
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
    assert seen["q_proj"] is LutLinear
    simulate = runner.RunConfig(scheme=config.scheme, tasks=["wikitext2"])
    assert simulate.key() != config.key()


def test_e2e_decode_on_a_tiny_model(tmp_path, monkeypatch):
    from fpbench.bench import e2e
    from fpbench.bench.e2e import e2e_table, run_e2e

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    records = run_e2e(new_tokens=4, out_dir=str(tmp_path), progress=False, shape=shape, include_default=False)
    assert [(r["variant"], r["loop"]) for r in records] == [
        ("fp32", "compiled"), ("bf16", "compiled"), ("fp6_kernel", "compiled"), ("fp6_kernel", "lean"),
        ("fp6_kernel", "transformers"), ("fp6_kernel+head", "compiled")]
    assert all(r["tokens_per_s"] > 0 and r["repeats"] == 3 for r in records)  # a median of 3 each
    assert records[5]["model_bytes"] < records[2]["model_bytes"] < records[1]["model_bytes"] < records[0]["model_bytes"]
    best = max(records[0]["tokens_per_s"], records[1]["tokens_per_s"])  # the dense rows of the compiled loop
    for fp6 in records[2:]:  # FP6 rows of every loop, head quantized or not
        assert fp6["speedup_vs_best_dense"] == round(fp6["tokens_per_s"] / best, 3)
    assert (tmp_path / "e2e.jsonl").read_text().count("\n") == 6
    monkeypatch.setattr(e2e, "llama_cpp_available", lambda: False)
    text = e2e_table(records)
    assert "fp6_kernel" in text and "pip install llama-cpp-python" in text  # no peer: how to add it
    # installed, but only random models ran (no default model): nothing to say about the peer
    monkeypatch.setattr(e2e, "llama_cpp_available", lambda: True)
    text = e2e_table(records)
    assert e2e.LLAMA_CPP_FAILED not in text and "pip install llama-cpp-python" not in text


def test_llama_cpp_peer_is_timed_through_its_generator(monkeypatch, tmp_path):
    # The glue around llama-cpp-python (an optional extra, absent in CI): a stand-in
    # module records what the harness asks of it; the ratio line names both speeds.
    import sys
    import types

    from fpbench.bench.e2e import PROMPT_TOKENS, REPEATS, e2e_table, llama_cpp_decode

    calls = []

    class Llama:
        def __init__(self, model_path, n_threads, **kwargs):
            calls.append(("init", model_path, n_threads))

        def n_vocab(self):
            return 50

        def reset(self):
            pass

        def generate(self, tokens, **kwargs):
            calls.append(("generate", len(tokens), kwargs["temp"], kwargs["top_k"]))
            while True:  # like llama.cpp's: endless until the caller stops
                calls.append("token")
                yield 1

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    tps, seconds = llama_cpp_decode(tmp_path / "m.gguf", new_tokens=5, threads=2)
    assert tps > 0 and seconds > 0
    assert calls[0] == ("init", str(tmp_path / "m.gguf"), 2)
    # a warm-up of 2 tokens, then REPEATS timed runs of 5
    assert calls.count(("generate", PROMPT_TOKENS, 0.0, 1)) == 1 + REPEATS and calls.count("token") == 2 + REPEATS * 5
    records = [{"model": "m", "variant": v, "loop": loop, "tokens_per_s": t, "ms_per_token": 1e3 / t,
                "speedup_vs_bf16": 1.0, "speedup_vs_best_dense": 1.0, "model_bytes": 1} for v, loop, t in
               (("fp32", "compiled", 8.0), ("bf16", "compiled", 10.0), ("fp6_kernel", "compiled", 15.0),
                ("fp6_kernel", "lean", 12.0), ("fp6_kernel", "transformers", 9.0),
                ("fp6_kernel+head", "compiled", 18.0),
                ("llama.cpp (Q4_1 GGUF)", "llama.cpp", 60.0))]
    text = e2e_table(records)
    assert "FP6 kernel 15.0 tokens/s = 0.25x llama.cpp's 60.0" in text
    assert "FP6 kernel with FP6 head 18.0 tokens/s = 0.30x llama.cpp's 60.0" in text


def test_llama_cpp_peer_runs_in_its_own_process(monkeypatch, tmp_path, capsys):
    # A crash inside llama.cpp must cost only its row: the peer runs in a child process,
    # whose death is a one-line error naming the signal; its JSON line is the timing.
    import sys

    from fpbench.bench import e2e

    def child(code):
        return lambda gguf, new_tokens, threads: [sys.executable, "-c", code]

    monkeypatch.setattr(e2e, "_peer_command", child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    with pytest.raises(FpbenchError, match="killed by SIGSEGV.*other rows are kept"):
        e2e.llama_cpp_peer(tmp_path / "m.gguf", 4, 2)
    monkeypatch.setattr(e2e, "_peer_command", child("import sys; sys.exit('no model here')"))
    with pytest.raises(FpbenchError, match="exit status 1: no model here"):
        e2e.llama_cpp_peer(tmp_path / "m.gguf", 4, 2)
    monkeypatch.setattr(e2e, "_peer_command", child("print('log'); print('{\"tokens_per_s\": 50.0, \"seconds\": 1.5}')"))
    assert e2e.llama_cpp_peer(tmp_path / "m.gguf", 4, 2) == (50.0, 1.5)
    # the child's own entry point: llama_cpp_decode's result as that JSON line
    monkeypatch.setattr(e2e, "llama_cpp_decode", lambda path, n, threads: (n * 10.0, threads / 4))
    e2e._peer_main([str(tmp_path / "m.gguf"), "4", "2"])
    assert json.loads(capsys.readouterr().out) == {"tokens_per_s": 40.0, "seconds": 0.5}
    # installed but failed: the table says so instead of how to install it
    monkeypatch.setattr(e2e, "llama_cpp_available", lambda: True)
    row = {"model": "m", "variant": "fp6_kernel", "loop": "compiled", "tokens_per_s": 15.0, "ms_per_token": 66.7,
           "speedup_vs_bf16": 1.0, "speedup_vs_best_dense": 1.0, "model_bytes": 1}
    assert e2e.LLAMA_CPP_FAILED in e2e.e2e_table([row])


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

"""The latency task: measured on the run's own model where the scheme really runs
(torch dense, torch's int8 kernel, fpbench's kernels), absent where it is simulated."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from fpbench.cli import main
from fpbench.eval.latency import LatencySettings, TorchInt8Linear, latency_path, measure, prepare
from fpbench.kernels import build as kernels
from fpbench.kernels.torch_int8 import int8_weight_only_mm
from fpbench.quant.scheme import Scheme
from fpbench.quant.weights import quantize_weight
from fpbench.quant.scheme import Granularity


@pytest.mark.parametrize("name, backend, path", [
    ("fp16", "simulate", "torch-fp32"), ("fp32", "simulate", "torch-fp32"), ("bf16", "simulate", "torch-bf16"),
    ("int8/channel/rtn", "simulate", "torch-int8"), ("fp6_e3m2/channel/rtn", "kernel", "fpbench-kernel"),
    ("int4/g128/rtn", "simulate", None), ("fp8_e4m3/channel/rtn", "simulate", None),
    ("int8/channel/rtn/a:int8-token-dynamic", "simulate", None),
])
def test_latency_only_where_a_kernel_runs(name, backend, path):
    assert latency_path(Scheme.parse(name), backend) == path


def test_torch_int8_linear_matches_the_dequantized_weight():
    qweight = quantize_weight(torch.randn(48, 64), "int8", Granularity("channel"))
    layer = TorchInt8Linear(qweight.codes, qweight.scales, None)
    x = torch.randn(3, 64)
    reference = x.bfloat16().double() @ (qweight.codes.double() * qweight.scales.bfloat16().double()).T
    assert torch.allclose(layer(x).double(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("k, rows, offset", [(64, 1, 8), (72, 1, 0), (72, 3, 0), (40, 2, 5), (96, 4, 16)])
def test_torch_int8_kernel_takes_unaligned_rows_and_odd_widths(k, rows, offset):
    # torch's AVX-512 kernel faults on unaligned rows and is wrong for K % 16 != 0 unless padded
    codes = torch.randint(-127, 128, (40, k), dtype=torch.int8)
    scales = torch.rand(40).bfloat16()
    x = torch.randn(rows * k + offset).bfloat16()[offset:].view(rows, k)
    out = int8_weight_only_mm(x, codes, scales)
    reference = x.double() @ (codes.double() * scales.double()[:, None]).T
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 40)
    assert torch.allclose(out.double(), reference, rtol=2e-2, atol=1e-2 * float(reference.abs().max()))


def test_measure_reports_positive_rates(tiny_loaded):
    timing = measure(tiny_loaded.model, tiny_loaded.model.config.vocab_size, 64)
    assert timing["decode_ms_per_token"] > 0 and timing["prefill_tokens"] == 64
    assert timing["decode_loop"] == "compiled"  # a dense Llama model: LeanDecoder's compiled step
    assert timing["decode_tokens_per_s"] == pytest.approx(1e3 / timing["decode_ms_per_token"])


def test_kernel_path_times_the_rest_of_the_model_in_bf16(tiny_loaded):
    # Like the bf16 baseline and the INT8 peer: only the linear layers differ between rows.
    from fpbench.kernels.linear import LutLinear, use_kernel_linears
    from fpbench.quant.model import quantize_model

    model = copy.deepcopy(tiny_loaded.model)
    quantized = quantize_model(model, Scheme.parse("fp6_e3m2/channel/rtn"), progress=False)
    use_kernel_linears(model, quantized.weights)
    timed = prepare(model, "fpbench-kernel", list(quantized.weights), quantized.weights)
    layers, timed_layers = dict(model.named_modules()), dict(timed.named_modules())
    kernel_names = [name for name, module in layers.items() if isinstance(module, LutLinear)]
    assert kernel_names and all(timed_layers[name] is layers[name] for name in kernel_names)  # shared, not copied
    dense = [tensor for module in timed.modules() if not isinstance(module, LutLinear)
             for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
             if tensor.is_floating_point()]
    assert dense and all(tensor.dtype == torch.bfloat16 for tensor in dense)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the run's own model is untouched
    timing = measure(timed, timed.config.vocab_size, 32, LatencySettings(4, 4, 32, 1))
    assert timing["decode_loop"] == "compiled" and timing["decode_tokens_per_s"] > 0


def test_latency_records_beside_accuracy(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import fpbench.runner

    # fewer steps: the records matter here, not the times (bf16 is slow on CPUs without it)
    monkeypatch.setattr(fpbench.runner, "LatencySettings", lambda: LatencySettings(4, 4, 32, 1))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "run", "--model", str(tiny_model_dir), "--scheme", "bf16", "--scheme", "int8/channel/rtn",
        "--scheme", "int4/g128/rtn", "--latency", "--task", "wikitext2", "--limit", "1", "--seqlen", "32",
        "--data-dir", str(data_dir), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "int4/g128/rtn runs simulated only" in result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    latency = {(r["scheme"], r["metric"]): r for r in records if r["task"] == "latency"}
    assert {s for s, _ in latency} == {"bf16", "int8/channel/rtn"}
    assert latency["bf16", "decode_tokens_per_s"]["latency_path"] == "torch-bf16"
    assert latency["int8/channel/rtn", "decode_tokens_per_s"]["latency_path"] == "torch-int8"
    # the int8 weights take half the bytes of the bf16 ones (plus one bf16 scale per row)
    ratio = latency["int8/channel/rtn", "weight_mb"]["value"] / latency["bf16", "weight_mb"]["value"]
    assert 0.5 < ratio < 0.55
    assert all(r["value"] > 0 for r in latency.values())


def test_kernel_latency_counts_the_packed_layers(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import fpbench.runner

    monkeypatch.setattr(fpbench.runner, "LatencySettings", lambda: LatencySettings(4, 4, 32, 1))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "run", "--model", str(tiny_model_dir), "--scheme", "int4/g32/rtn", "--backend", "kernel",
        "--task", "wikitext2", "--limit", "1", "--seqlen", "32", "--data-dir", str(data_dir), "--out", str(out),
        "--no-progress"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"wikitext2", "latency"}
    assert all(r["backend"] == "kernel" and r["bits_per_weight"] > 4 for r in records)
    latency = {r["metric"]: r for r in records if r["task"] == "latency"}
    assert latency["weight_mb"]["latency_path"] == "fpbench-kernel"
    assert latency["weight_mb"]["kernel_isa"] in kernels.ISAS[1:]  # the ISA picked, not "auto"
    # 4-bit codes plus one fp16 scale per 32 weights: the 4.5 bits per weight the scheme reports
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert latency["weight_mb"]["weight_bytes"] == weights * 4.5 / 8
    assert records[0]["bits_per_weight"] == pytest.approx(4.5)

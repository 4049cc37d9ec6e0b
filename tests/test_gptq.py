"""GPTQ: the layer objective against RTN, exact reductions (H ∝ I, act-order, static
groups), damping retries, and the sequential whole-model procedure on a tiny Llama."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.quant.formats import get_format
from fpbench.quant.gptq import decoder_blocks, gptq_model, gptq_quantize_weight
from fpbench.quant.model import quantize_model, target_linears
from fpbench.quant.weights import compute_scales, quantize_weight
from fpbench.quant.scheme import Granularity, Scheme

from conftest import layer_objective, tiny_llama

ROWS, COLS, TOKENS = 48, 320, 4096  # 320 = 2 full groups of 128 + a ragged one of 64


@pytest.fixture(scope="module")
def layer():
    """A random weight and correlated inputs with uneven channel scales (as in LLMs)."""
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(COLS, COLS, generator=gen) / COLS**0.5 + torch.eye(COLS)
    inputs = torch.randn(TOKENS, COLS, generator=gen) @ mixing
    inputs = inputs * (1 + 4 * torch.rand(COLS, generator=gen))
    weight = torch.randn(ROWS, COLS, generator=gen) * 0.05
    hessian = 2 * inputs.T @ inputs / TOKENS
    return weight, inputs, hessian


CASES = [("int4", "group:128"), ("int4", "channel"), ("fp6_e3m2", "channel"), ("fp8_e4m3", "channel")]


@pytest.mark.parametrize("fmt,granularity", CASES + [("int4_asym", "group:128"), ("fp4_e2m1", "group:32")])
@pytest.mark.parametrize("act_order", [False, True])
def test_layer_objective_below_rtn(layer, fmt, granularity, act_order):
    weight, inputs, hessian = layer
    gran = Granularity.parse(granularity)
    rtn = quantize_weight(weight, fmt, gran).dequantize()
    gptq = gptq_quantize_weight(weight, hessian, fmt, gran, act_order=act_order).dequantize()
    # every GPTQ weight is on the format's grid under its own scales
    assert torch.isfinite(gptq).all()
    rtn_error = layer_objective(weight, rtn, inputs)
    gptq_error = layer_objective(weight, gptq, inputs)
    # Correlated inputs leave GPTQ a lot of room; demand a clear margin, not a tie.
    assert gptq_error < 0.8 * rtn_error, (fmt, granularity, gptq_error, rtn_error)


@pytest.mark.parametrize("fmt,granularity", CASES + [
    ("int4_asym", "group:128"), ("int4", "tensor"), ("fp6_e2m3", "group:64"), ("int8", "group:100")])
def test_identity_hessian_gives_rtn_codes(layer, fmt, granularity):
    """H ∝ I: H⁻¹'s Cholesky factor is diagonal, no error moves to other columns, so the
    codes must be RTN's exactly (and so must the dynamic group scales)."""
    weight, _, _ = layer
    gran = Granularity.parse(granularity)
    rtn = quantize_weight(weight, fmt, gran)
    for block_size in (128, 7):
        gptq = gptq_quantize_weight(weight, 3.5 * torch.eye(COLS), fmt, gran, block_size=block_size)
        assert torch.equal(gptq.codes, rtn.codes)
        assert torch.equal(gptq.scales, rtn.scales)
        if rtn.zero_points is not None:
            assert torch.equal(gptq.zero_points, rtn.zero_points)


def test_diagonal_hessian_with_act_order_gives_rtn_codes(layer):
    """A diagonal H with distinct entries reorders the columns under act-order but moves
    no error: the codes come back in the original order, equal to RTN's."""
    weight, _, _ = layer
    diagonal = torch.diag(torch.linspace(0.1, 5.0, COLS)[torch.randperm(COLS, generator=torch.Generator().manual_seed(1))])
    gran = Granularity.parse("group:128")
    gptq = gptq_quantize_weight(weight, diagonal, "int4", gran, act_order=True)
    assert torch.equal(gptq.codes, quantize_weight(weight, "int4", gran).codes)


def test_act_order_equals_gptq_on_permuted_columns(layer):
    """Act-order = plain GPTQ on the columns sorted by decreasing diag(H), then unsorted."""
    weight, _, hessian = layer
    gran = Granularity("channel")
    with_order = gptq_quantize_weight(weight, hessian, "fp6_e3m2", gran, act_order=True)
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    assert not torch.equal(order, torch.arange(COLS))  # the test really permutes
    permuted = gptq_quantize_weight(weight[:, order], hessian[order][:, order], "fp6_e3m2", gran)
    restored = torch.empty_like(permuted.codes)
    restored[:, order] = permuted.codes
    assert torch.equal(with_order.codes, restored)
    assert torch.equal(with_order.scales, permuted.scales)


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups_use_rtn_group_scales(layer, act_order):
    weight, inputs, hessian = layer
    gran = Granularity.parse("group:128")
    rtn_scales, _ = compute_scales(weight, get_format("int4"), gran)
    static = gptq_quantize_weight(weight, hessian, "int4", gran, act_order=act_order, static_groups=True)
    assert torch.equal(static.scales, rtn_scales)
    # and the static variant still beats RTN on the objective
    rtn = quantize_weight(weight, "int4", gran).dequantize()
    assert layer_objective(weight, static.dequantize(), inputs) < layer_objective(weight, rtn, inputs)


def test_dynamic_group_scales_follow_the_updates(layer):
    """Without static groups, groups after the first see updated weights: their scales
    differ from RTN's, the first group's (chosen before any update) do not."""
    weight, _, hessian = layer
    gran = Granularity.parse("group:128")
    rtn_scales, _ = compute_scales(weight, get_format("int4"), gran)
    dynamic = gptq_quantize_weight(weight, hessian, "int4", gran)
    assert torch.equal(dynamic.scales[:, 0], rtn_scales[:, 0])
    assert not torch.equal(dynamic.scales[:, 1:], rtn_scales[:, 1:])


def test_dead_columns_are_zeroed(layer):
    weight, _, hessian = layer
    hessian = hessian.clone()
    hessian[5, :] = hessian[:, 5] = 0
    gptq = gptq_quantize_weight(weight, hessian, "int4", Granularity("channel"))
    assert torch.all(gptq.dequantize()[:, 5] == 0)


def test_not_positive_definite_retries_with_more_damping(layer, caplog):
    weight, _, _ = layer
    vector = torch.randn(COLS, generator=torch.Generator().manual_seed(2))
    indefinite = torch.eye(COLS) - 0.5 * torch.outer(vector, vector)  # one negative eigenvalue
    with caplog.at_level(logging.WARNING, logger="fpbench.quant.gptq"):
        gptq = gptq_quantize_weight(weight, indefinite, "int4", Granularity("channel"), layer_name="bad")
    assert "not positive definite" in caplog.text and "bad" in caplog.text
    assert torch.isfinite(gptq.dequantize()).all()


def test_bad_hessian_is_one_error(layer):
    weight, _, _ = layer
    nan_hessian = torch.full((COLS, COLS), float("nan"))
    with pytest.raises(FpbenchError, match="finite"):
        gptq_quantize_weight(weight, nan_hessian, "int4", Granularity("channel"))
    with pytest.raises(FpbenchError, match="rtn"):
        gptq_quantize_weight(weight, torch.eye(COLS), "fp16", Granularity("channel"))


# ---------------------------------------------------------------- whole model ----------

@pytest.fixture
def tiny():
    model = tiny_llama(vocab_size=256, layers=2, hidden=64)
    calibration_ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(3))
    return model, calibration_ids


def _block_input_objective(model, layer_name, calibration_ids, reference_weight):
    """||(W - Ŵ) X||² with X the layer's inputs in the (quantized) model."""
    captured = []
    module = dict(model.named_modules())[layer_name]
    handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calibration_ids)
    handle.remove()
    return layer_objective(reference_weight, module.weight, torch.cat(captured))


def test_gptq_model_quantizes_every_block_linear(tiny):
    model, calibration_ids = tiny
    layers = target_linears(model)
    originals = {name: m.weight.detach().clone() for name, m in layers.items()}
    scheme = Scheme("int4", Granularity("channel"), "gptq", calib="test")
    weights = gptq_model(model, layers, scheme, calibration_ids, progress=False)
    assert set(weights) == set(layers) and len(layers) == 14
    for name, module in layers.items():
        assert torch.equal(module.weight, weights[name].dequantize())
        assert not torch.equal(module.weight, originals[name])
    assert len(decoder_blocks(model)) == 2


def test_gptq_model_beats_rtn_on_first_layer(tiny):
    """Block 0's q_proj sees the same inputs under GPTQ and RTN (embeddings): GPTQ's
    objective on the calibration tokens is lower."""
    model, calibration_ids = tiny
    name = "model.layers.0.self_attn.q_proj"
    original = dict(model.named_modules())[name].weight.detach().clone()
    rtn_model = tiny_llama(vocab_size=256, layers=2, hidden=64)
    quantize_model(rtn_model, Scheme("int4", Granularity("channel")), progress=False)
    quantize_model(model, Scheme("int4", Granularity("channel"), "gptq", calib="test"), progress=False,
                   calibration_ids=calibration_ids)
    gptq_error = _block_input_objective(model, name, calibration_ids, original)
    rtn_error = _block_input_objective(rtn_model, name, calibration_ids, original)
    assert gptq_error < rtn_error


def test_gptq_is_sequential(tiny):
    """Block 1's Hessians come from block 0 *quantized* (the published procedure): redoing
    block 1 by hand from the quantized block 0's outputs gives the same codes, from the
    full-precision block 0's outputs different ones."""
    from fpbench.quant.gptq import _block_hessians, _first_block_inputs, _run_block

    model, calibration_ids = tiny
    layers = target_linears(model)
    weights = gptq_model(model, layers, Scheme("int4", Granularity("channel"), "gptq", calib="t"),
                         calibration_ids, progress=False)

    def block1_codes(block0_quantized: bool):
        reference = tiny_llama(vocab_size=256, layers=2, hidden=64)  # same seed: same weights
        ref_layers = target_linears(reference)
        if block0_quantized:
            for name, module in ref_layers.items():
                if ".layers.0." in name:
                    module.weight = torch.nn.Parameter(weights[name].dequantize(), requires_grad=False)
        blocks = decoder_blocks(reference)
        inputs, kwargs = _first_block_inputs(reference, blocks, calibration_ids)
        with torch.no_grad():
            hidden = torch.cat([_run_block(blocks[0], inputs[i:i + 1], kwargs) for i in range(len(inputs))])
        block1 = {n: m for n, m in ref_layers.items() if ".layers.1." in n}
        hessians = _block_hessians(blocks[1], block1, hidden, kwargs)
        return {n: gptq_quantize_weight(m.weight, hessians[n], "int4", Granularity("channel")).codes
                for n, m in block1.items()}

    sequential = block1_codes(block0_quantized=True)
    assert all(torch.equal(codes, weights[n].codes) for n, codes in sequential.items())
    full_precision = block1_codes(block0_quantized=False)
    assert any(not torch.equal(codes, weights[n].codes) for n, codes in full_precision.items())


def test_cli_gptq_without_calibration_data_is_one_line_error(tmp_path):
    """The source is checked before any model loads, so this is quick."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("FPBENCH_DATA_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fpbench.cli", "run", "--format", "int4", "--granularity", "channel",
         "--algo", "gptq", "--calib", "ptb", "--task", "wikitext2", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "ptb" in lines[0] and "--data-dir" in lines[0]


@pytest.mark.parametrize("scale_format", ["fp32", "bf16", "e8m0"])
def test_scale_format_reaches_gptq_scales(layer, scale_format):
    """Scales are rounded to the scheme's scale format where GPTQ chooses them; with
    H ∝ I the result is still RTN's, scale format included."""
    weight, inputs, hessian = layer
    gran = Granularity.parse("group:128")
    rtn = quantize_weight(weight, "int4", gran, scale_format=scale_format)
    same = gptq_quantize_weight(weight, 3.5 * torch.eye(COLS), "int4", gran, scale_format=scale_format)
    assert torch.equal(same.codes, rtn.codes) and torch.equal(same.scales, rtn.scales)
    gptq = gptq_quantize_weight(weight, hessian, "int4", gran, scale_format=scale_format)
    rounded = get_format(scale_format).round(gptq.scales)
    assert torch.equal(rounded, gptq.scales) and gptq.scale_format == get_format(scale_format).name
    assert layer_objective(weight, gptq.dequantize(), inputs) < layer_objective(weight, rtn.dequantize(), inputs)


def test_gptq_model_passes_the_scheme_scale_format():
    model = tiny_llama(vocab_size=128)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    layers = target_linears(model)
    weights = gptq_model(model, layers, Scheme.parse("int4/g32/gptq/s:bf16"), windows, progress=False)
    assert all(w.scale_format == "bf16" and torch.equal(w.scales.bfloat16().float(), w.scales)
               for w in weights.values())

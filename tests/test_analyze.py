import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from conftest import tiny_llama
from fpbench.quant.activations import ActQuantizer
from fpbench.analyze import (FORMATS_8BIT, LAYER_KINDS, SYNTHETIC_CLIP_RANGE, block_frame, distributions, layers_frame,
                             layers_summary, run_synthetic, synthetic_frame, synthetic_table)
from fpbench.quant.model import target_linears
from fpbench.quant.qerror import Gaussian, Laplace, StudentT, mse, positive_grid, sqnr_db
from fpbench.quant.weights import quantize_weight
from fpbench.quant.scheme import Granularity


def uniform_quantizer_mse(clip: float, levels: int = 127) -> float:
    """Closed form for a symmetric uniform quantizer on N(0, 1) clipped at +-clip:
    granular noise step^2/12 inside the range plus the clipping error
    2 E[(|x| - c)^2 ; |x| > c] = 2 [(1 + c^2) Q(c) - c phi(c)]."""
    step = clip / levels
    tail = stats.norm.sf(clip)
    inside = 1 - 2 * tail
    return step**2 / 12 * inside + 2 * ((1 + clip**2) * tail - clip * stats.norm.pdf(clip))


@pytest.mark.parametrize("clip", [2.5, 3.0, 3.92, 5.0, 8.0])
def test_int8_gaussian_sqnr_matches_the_uniform_quantizer_closed_form(clip):
    exact = mse(Gaussian(), positive_grid("int8"), clip / 127)[0]
    assert sqnr_db(1.0, exact) == pytest.approx(sqnr_db(1.0, uniform_quantizer_mse(clip)), abs=0.02)


def test_int8_gaussian_best_clip_matches_the_closed_form_optimum():
    frame = synthetic_frame(["int8"], [Gaussian()])
    best = optimize.minimize_scalar(uniform_quantizer_mse, bounds=(2, 6), method="bounded",
                                    options={"xatol": 1e-6})
    row = frame.iloc[0]
    assert row.sqnr_db == pytest.approx(sqnr_db(1.0, best.fun), abs=0.02)
    assert row.best_clip_std == pytest.approx(best.x, abs=0.05)
    assert 40.0 < row.sqnr_db < 41.0  # the textbook ~40.5 dB of an optimally clipped 8-bit uniform grid


def test_synthetic_table_shows_fp_overtaking_int_as_tails_grow():
    frame = synthetic_frame(FORMATS_8BIT + ("int4", "fp4_e2m1"))
    low, high = SYNTHETIC_CLIP_RANGE
    # No optimum sits on an end of the search range (it would be a search artefact).
    assert ((frame.best_clip_std > low * 1.01) & (frame.best_clip_std < high * 0.99)).all()
    table = synthetic_table(frame)
    ts = [d for d in table.index if d.startswith("student_t")]
    int8 = table.loc[ts, "int8"].to_numpy()
    assert np.all(np.diff(int8) < 0)  # heavier tails, worse INT8
    # E4M3 hardly cares about the tails until they are extreme; INT8 loses to it there.
    assert table.loc["gaussian", "int8"] > table.loc["gaussian", "fp8_e4m3"] + 5
    assert table.loc["student_t3", "fp8_e4m3"] > table.loc["student_t3", "int8"] + 5
    assert table.loc["student_t3", "best_8bit"] != "int8"
    gap = table.loc[ts, "fp_minus_int8_db"].to_numpy()
    assert gap[-2] > gap[0]


def test_run_synthetic_writes_files_and_records(tmp_path):
    frame, table, paths = run_synthetic(tmp_path, formats=("int8", "fp8_e4m3"), block_schemes=("mxfp4_e2m1/g32/rtn",))
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(frame) + len(distributions()) and {r["task"] for r in records} == {"analyze-synthetic"}
    gaussian_int8 = [r for r in records if r["scheme"] == "int8" and r["metric"] == "sqnr_db:gaussian"]
    assert gaussian_int8[0]["value"] == pytest.approx(table.loc["gaussian", "int8"])
    assert gaussian_int8[0]["method"] == "exact"
    mx = [r for r in records if r["scheme"] == "mxfp4_e2m1/g32/rtn" and r["metric"] == "sqnr_db:gaussian"][0]
    assert mx["method"] == "monte-carlo" and mx["bits_per_weight"] == 4.25 and mx["n"] == 256 * 1024
    assert mx["value"] == pytest.approx(table.loc["gaussian", "mxfp4_e2m1/g32/rtn (MC)"])
    from fpbench.records.report import write_report

    assert write_report(tmp_path).is_file()


def test_layers_frame_agrees_with_the_quantizers_themselves():
    model = tiny_llama(vocab_size=128)
    windows = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    frame = layers_frame(model, windows, formats=("int8", "fp8_e4m3"), progress=False)
    layers = target_linears(model)
    assert len(frame) == len(layers) * len(LAYER_KINDS) * 2
    # Independent path 1: the token-dynamic activation quantizer on the captured input.
    captured = {}
    layer = layers["model.layers.1.mlp.down_proj"]
    handle = layer.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    x = captured["x"].reshape(-1, layer.in_features).double()
    for fmt in ("int8", "fp8_e4m3"):
        quantized = ActQuantizer(fmt, "token-dynamic").quantize(x)
        expected = sqnr_db(x.pow(2).mean().item(), (quantized - x).pow(2).mean().item())
        got = frame[(frame.layer == "model.layers.1.mlp.down_proj") & (frame.kind == "input-token")
                    & (frame.format == fmt)].sqnr_db.item()
        assert got == pytest.approx(expected, abs=1e-6)
        # Independent path 2: RTN per channel with --clip mse.
        weight = layer.weight.detach()
        dequantized = quantize_weight(weight, fmt, Granularity("channel"), clip="mse").dequantize().double()
        expected = sqnr_db(weight.double().pow(2).mean().item(), (dequantized - weight.double()).pow(2).mean().item())
        got = frame[(frame.layer == "model.layers.1.mlp.down_proj") & (frame.kind == "weight-channel")
                    & (frame.format == fmt)].sqnr_db.item()
        assert got == pytest.approx(expected, abs=0.01)
    # The per-tensor best clip is at least as good as absmax.
    tensor_rows = frame[frame.kind == "input-tensor"]
    assert (tensor_rows.clip_over_absmax <= 1.0).all()
    summary = layers_summary(frame)
    for kind, group in summary.groupby("kind"):
        assert group.win_fraction.sum() == pytest.approx(1.0)
        assert (group.layers == len(layers)).all()


def test_kurtosis_of_a_gaussian_tensor_is_three():
    from fpbench.analyze import tensor_stats

    stats_ = tensor_stats(torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    assert stats_["kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert math.isfinite(stats_["max_over_std"])


def test_student_t_kurtosis_is_reported():
    assert StudentT(10.0).excess_kurtosis == pytest.approx(1.0)
    assert math.isinf(StudentT(3.0).excess_kurtosis)


def test_block_frame_monte_carlo_is_the_rtn_error_and_orders_the_formats():
    dists = [Gaussian(), Laplace(), StudentT(3.0)]
    schemes = ("int4/g32/rtn", "fp4_e2m1/g32/rtn", "mxfp4_e2m1/g32/rtn", "nvfp4/g16/rtn")
    shape = (64, 1024)
    frame = block_frame(schemes, dists, shape=shape, seed=1).set_index(["distribution", "scheme"])
    # The estimate is RTN's own error on the seeded draw, recomputed here in float64.
    x = torch.from_numpy(Gaussian().sample(64 * 1024, np.random.default_rng(1)).reshape(shape)).float()
    deq = quantize_weight(x, "mxfp4_e2m1", None).dequantize().double()
    expected = 10 * math.log10(x.double().pow(2).sum().item() / (deq - x.double()).pow(2).sum().item())
    assert frame.loc[("gaussian", "mxfp4_e2m1/g32/rtn"), "sqnr_db"] == pytest.approx(expected, abs=1e-9)
    assert (frame["method"] == "monte-carlo").all()
    # Another seed moves the estimate by little (sampling noise of 2^16 values) where the
    # error has a finite variance; Student-t3's infinite fourth moment makes it noisy.
    again = block_frame(schemes, dists, shape=shape, seed=2).set_index(["distribution", "scheme"])
    light = (again["sqnr_db"] - frame["sqnr_db"]).abs().drop("student_t3", level="distribution")
    assert light.max() < 0.15
    for dist in ("gaussian", "laplace"):
        sqnr = frame.loc[dist, "sqnr_db"]
        # Power-of-two (E8M0) scales cost MXFP4 against FP4 with fp16 scales of the same block
        # (the grid's top sits anywhere in [4, 8) x 2^e instead of at the block's absmax);
        # NVFP4's E4M3 scales over blocks of 16 win it back.
        assert sqnr["mxfp4_e2m1/g32/rtn"] < sqnr["fp4_e2m1/g32/rtn"] - 0.5
        assert sqnr["nvfp4/g16/rtn"] > sqnr["mxfp4_e2m1/g32/rtn"] + 1.0
    # Heavier tails hurt INT4 more than FP4 (the exact analysis' finding, per block too).
    int_drop = frame.loc[("gaussian", "int4/g32/rtn"), "sqnr_db"] - frame.loc[("student_t3", "int4/g32/rtn"), "sqnr_db"]
    fp_drop = (frame.loc[("gaussian", "fp4_e2m1/g32/rtn"), "sqnr_db"]
               - frame.loc[("student_t3", "fp4_e2m1/g32/rtn"), "sqnr_db"])
    assert int_drop > fp_drop + 1.0


@pytest.mark.parametrize("dist", [Gaussian(), Laplace(), StudentT(5.0)])
def test_samplers_have_unit_variance_and_the_right_tails(dist):
    draws = dist.sample(400_000, np.random.default_rng(0))
    assert draws.var() == pytest.approx(1.0, abs=0.03)
    m0, _, _ = dist.partial(np.array([1.0]))
    assert (np.abs(draws) < 1.0).mean() == pytest.approx(m0[0], abs=0.005)

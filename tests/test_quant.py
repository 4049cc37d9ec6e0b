"""RTN primitives against float64 references and brute force."""

import ml_dtypes
import numpy as np
import pytest
import torch

from fpbench.quant.formats import get_format
from fpbench.quant.weights import (QuantizedWeight, bits_per_weight, compute_scales, fake_quantize,
                           quantize_weight)
from fpbench.quant.scheme import Granularity

CHANNEL, TENSOR = Granularity.parse("channel"), Granularity.parse("tensor")


# Scale formats and the numpy dtype that rounds onto each (RNE), independently of fpbench.
SCALE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16,
                "fp8_e4m3": ml_dtypes.float8_e4m3fn, "e8m0": ml_dtypes.float8_e8m0fnu}


def reference_rtn(w: np.ndarray, fmt, group: int | None, scale_format: str = "fp16") -> np.ndarray:
    """One row/group at a time: scale = absmax / max (fp32) stored in the scale format
    (numpy / ml_dtypes cast), round, rescale."""
    out = np.empty_like(w)
    size = w.shape[1] if group is None else group
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], size):
            block = w[r, start:start + size]
            scale = np.float32(np.abs(block).max()) / np.float32(fmt.max) or np.float32(1.0)
            scale = np.float32(np.float32(scale).astype(SCALE_DTYPES[scale_format]))
            if scale == 0:  # underflowed in the scale format: the group is flushed to 0
                out[r, start:start + size] = 0
                continue
            scaled = (block.astype(np.float32) / scale)
            rounded = fmt.round(torch.from_numpy(scaled)).numpy()
            out[r, start:start + size] = rounded * scale
    return out


@pytest.mark.parametrize("name", ["int4", "int8", "fp6_e3m2", "fp8_e4m3", "fp4_e2m1"])
@pytest.mark.parametrize("group", [None, 32, 48])  # 48 leaves a ragged last group of 40 wide rows
def test_rtn_matches_row_by_row_reference(name, group):
    torch.manual_seed(0)
    w = torch.randn(8, 136) * torch.logspace(-2, 1, 8)[:, None]
    fmt = get_format(name)
    gran = CHANNEL if group is None else Granularity("group", group)
    qweight = quantize_weight(w, fmt, gran)
    expected = reference_rtn(w.numpy(), fmt, group)
    assert np.allclose(qweight.dequantize().numpy(), expected, rtol=0, atol=0)
    assert qweight.scales.shape == (8, 1 if group is None else -(-136 // group))
    assert qweight.scale_format == "fp16"  # the default: what bits_per_weight counts


@pytest.mark.parametrize("scale_format", ["fp32", "bf16", "fp8_e4m3", "e8m0"])
@pytest.mark.parametrize("name", ["int4", "fp6_e3m2", "fp4_e2m1"])
def test_rtn_rounds_scales_to_the_scale_format(name, scale_format):
    torch.manual_seed(0)
    w = torch.randn(8, 136) * torch.logspace(-2, 1, 8)[:, None]
    fmt = get_format(name)
    qweight = quantize_weight(w, fmt, Granularity("group", 32), scale_format=scale_format)
    expected = reference_rtn(w.numpy(), fmt, 32, scale_format)
    assert np.array_equal(qweight.dequantize().numpy(), expected)
    stored = qweight.scales.numpy()
    assert np.array_equal(stored.astype(SCALE_DTYPES[scale_format]).astype(np.float32), stored)


def test_zero_point_is_rounded_to_the_scale_format():
    torch.manual_seed(5)
    w = torch.randn(4, 64) + 0.3
    qweight = quantize_weight(w, "int4_asym", Granularity("group", 32))
    assert torch.equal(qweight.zero_points.half().float(), qweight.zero_points)
    assert torch.equal(qweight.scales.half().float(), qweight.scales)
    lo = w.reshape(4, 2, 32).amin(dim=2)
    assert torch.equal(qweight.zero_points, (0 - lo / qweight.scales).half().float())


def test_scale_that_underflows_flushes_its_group_to_zero():
    w = torch.linspace(-1e-9, 1e-9, 16).repeat(2, 1)  # scale far below fp16's smallest subnormal (6e-8)
    w[1] = torch.linspace(-1, 1, 16)
    for name in ["int4", "int4_asym", "fp4_e2m1"]:
        qweight = quantize_weight(w, name, CHANNEL)
        assert qweight.scales[0, 0] == 0
        out = qweight.dequantize()
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros(16))
        assert torch.equal(out[1], quantize_weight(w[1:], name, CHANNEL).dequantize()[0])
    assert torch.equal(quantize_weight(w, "int4", CHANNEL, scale_format="fp32").scales[0, 0],
                       w[0].abs().max() / 7)


def test_codes_are_on_grid_and_errors_bounded():
    torch.manual_seed(1)
    w = torch.randn(16, 256)
    fmt = get_format("int4")
    qweight = quantize_weight(w, fmt, Granularity("group", 64))
    assert qweight.codes.dtype == torch.int8
    assert qweight.codes.min() >= -7 and qweight.codes.max() <= 7
    err = (qweight.dequantize() - w).abs()
    step = qweight.scales.repeat_interleave(64, dim=1)
    assert (err <= step / 2 + 1e-6).all()  # RTN error is at most half a step


def test_asymmetric_reproduces_an_affine_grid_exactly():
    # Values that already sit on a 16-level affine grid (as Q4_1 weights do) come back
    # exactly with fp32 scales; with fp16 ones the codes still do, and the values to
    # within the zero point's fp16 rounding (half an ulp of |zp|, in steps).
    torch.manual_seed(2)
    codes = torch.randint(0, 16, (4, 64)).float()
    codes[:, 0], codes[:, 1] = 0, 15  # every group spans the full range
    scale = torch.rand(4, 1) * 0.1 + 0.01
    offset = -torch.rand(4, 1)
    w = codes * scale + offset
    exact = quantize_weight(w, "int4_asym", Granularity("group", 64), scale_format="fp32")
    assert torch.allclose(exact.dequantize(), w, atol=1e-6)
    assert torch.equal(exact.codes.long(), codes.long())
    fp16 = quantize_weight(w, "int4_asym", Granularity("group", 64))
    assert torch.equal(fp16.codes.long(), codes.long())
    bound = fp16.scales * (fp16.zero_points.abs() * 2**-11 + 15 * 2**-11) + 1e-6
    assert ((fp16.dequantize() - w).abs() <= bound).all()


def test_tensor_granularity_and_all_zero_rows():
    w = torch.zeros(4, 32)
    w[0, 0] = 28.0  # scale 28 / 448 = 2^-4, exact in fp16
    qweight = quantize_weight(w, "fp8_e4m3", TENSOR)
    assert qweight.scales.shape == (1, 1)
    assert torch.equal(qweight.dequantize(), w)
    zeros = quantize_weight(torch.zeros(2, 8), "int4", CHANNEL)
    assert torch.equal(zeros.dequantize(), torch.zeros(2, 8))


def test_mse_clipping_never_worse_than_absmax():
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    w[0, 0] = 40.0  # an outlier: clipping should pay off on its row
    for name in ["int4", "fp4_e2m1", "int4_asym"]:
        plain = quantize_weight(w, name, CHANNEL).dequantize()
        clipped = quantize_weight(w, name, CHANNEL, clip="mse").dequantize()
        plain_err = (plain - w).pow(2).sum(1)
        clipped_err = (clipped - w).pow(2).sum(1)
        assert (clipped_err <= plain_err + 1e-6).all()
        assert clipped_err.sum() < plain_err.sum()


def test_fake_quantize_matches_codes_path():
    torch.manual_seed(4)
    w = torch.randn(6, 40)
    fmt = get_format("fp6_e2m3")
    gran = Granularity("group", 16)
    scales, zeros = compute_scales(w, fmt, gran)
    qweight = quantize_weight(w, fmt, gran)
    expanded = scales.repeat_interleave(16, dim=1)[:, :40]
    assert torch.equal(fake_quantize(w, fmt, expanded), qweight.dequantize())
    assert isinstance(qweight, QuantizedWeight)


def test_bits_per_weight_counts_scales():
    int4 = get_format("int4")
    assert bits_per_weight(int4, Granularity("group", 128), (576, 1536)) == 4 + 16 / 128
    # ragged: 576 = 4 * 128 + 64 -> 5 scales per row
    assert bits_per_weight(int4, Granularity("group", 128), (10, 576)) == pytest.approx(4 + 5 * 16 / 576)
    assert bits_per_weight(get_format("int4_asym"), Granularity("group", 32), (1, 64)) == 4 + 2 * 2 * 16 / 64
    assert bits_per_weight(get_format("fp16"), None, (4, 4)) == 16
    # the scale format's real width
    assert bits_per_weight(int4, Granularity("group", 128), (576, 1536), "fp32") == 4 + 32 / 128
    assert bits_per_weight(int4, Granularity("group", 32), (576, 1536), "e8m0") == 4 + 8 / 32
    assert bits_per_weight(get_format("int4_asym"), Granularity("group", 32), (1, 64), "fp32") == 4 + 2 * 2 * 32 / 64

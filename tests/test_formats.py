"""Exactness of the format simulators against independent references.

Every float16 and every bfloat16 bit pattern is rounded by each format and compared with
ml_dtypes, torch's float8 dtypes, and a brute-force nearest-grid search (ties to even).
Where a reference overflows to inf/NaN instead of saturating, fpbench's documented rule
(saturate to ±max) is asserted instead.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.quant.formats import FORMATS, FloatFormat, IntFormat, format_table, get_format

ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e3m4": ml_dtypes.float8_e3m4,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
TORCH_FLOAT8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern of ``dtype``, as float32 (exact)."""
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).float()


SOURCES = {"float16": all_patterns(torch.float16), "bfloat16": all_patterns(torch.bfloat16)}


def brute_force_round(x: np.ndarray, fmt) -> np.ndarray:
    """Nearest finite grid value by exhaustive search, ties to the even code,
    inputs clamped to ±max first (saturation)."""
    table = fmt.decode_table.numpy()
    codes = np.arange(len(table))
    finite = np.isfinite(table)
    grid, grid_codes = table[finite], codes[finite]
    clamped = np.clip(x.astype(np.float64), -fmt.max, fmt.max)
    dist = np.abs(clamped[:, None] - grid[None, :])
    best = dist.min(axis=1, keepdims=True)
    tied = dist == best
    # Among ties prefer the even one: mantissa LSB 0 for floats, an even integer for ints.
    parity = (np.abs(grid).astype(np.int64) & 1) if isinstance(fmt, IntFormat) else (grid_codes & 1)
    key = np.where(tied, parity[None, :], 99)
    choice = np.argmin(key, axis=1)
    out = grid[choice]
    return np.where(np.isnan(x), np.nan, out)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ML_DTYPES)
def test_round_matches_ml_dtypes_on_every_16bit_pattern(name, source):
    fmt, x = get_format(name), SOURCES[source]
    ours = fmt.round(x)
    ref = torch.from_numpy(x.numpy().astype(ML_DTYPES[name]).astype(np.float32))
    finite_in = torch.isfinite(x)
    comparable = finite_in & torch.isfinite(ref)
    assert comparable.sum() > 30000
    mismatches = (ours[comparable] != ref[comparable]).sum().item()
    assert mismatches == 0, f"{name} from {source}: {mismatches} mismatches"
    # Signs of zero agree too (compare bit patterns through the encoder).
    codes = fmt.encode(x[comparable])
    ref_codes = torch.from_numpy(x[comparable].numpy().astype(ML_DTYPES[name]).view(np.uint8).copy())
    assert torch.equal(codes, ref_codes)
    # Where the reference overflows to inf/NaN, fpbench saturates to ±max instead.
    overflow = finite_in & ~torch.isfinite(ref)
    assert torch.equal(ours[overflow].abs(), torch.full_like(ours[overflow], fmt.max))
    assert torch.equal(torch.signbit(ours[overflow]), torch.signbit(x[overflow]))
    # inf saturates, NaN stays NaN.
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    rounded = fmt.round(special)
    assert rounded[0] == fmt.max and rounded[1] == -fmt.max and torch.isnan(rounded[2])


@pytest.mark.parametrize("name", TORCH_FLOAT8)
def test_round_matches_torch_float8_on_every_float16_pattern(name):
    fmt, x = get_format(name), SOURCES["float16"]
    ref = x.to(TORCH_FLOAT8[name]).float()
    comparable = torch.isfinite(x) & torch.isfinite(ref) & (x.abs() <= fmt.max)
    assert (fmt.round(x)[comparable] != ref[comparable]).sum().item() == 0


# Formats no library implements, plus integers: brute force is the reference.
BRUTE_FORCE = ["fp5_e2m2", "fp5_e3m1", "fp7_e3m3", "fp6_e4m1", "fp3_e1m1", "int4", "int8",
               "int4_asym", "int3", "fp6_e3m2", "fp4_e2m1"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", BRUTE_FORCE)
def test_round_matches_brute_force_nearest_grid(name, source):
    fmt = get_format(name)
    x = SOURCES[source]
    x = x[torch.isfinite(x)]
    if isinstance(fmt, IntFormat):
        x = x[x.abs() < 1000]  # the integer grid is small: keep the interesting range dense
    ours = fmt.round(x).double().numpy()
    ref = brute_force_round(x.double().numpy(), fmt)
    assert np.array_equal(ours, ref), f"{name}: {(ours != ref).sum()} mismatches"


def test_ties_round_to_even():
    fp6 = get_format("fp6_e3m2")  # grid near 1: 1, 1.25, 1.5, 1.75, 2
    ties = torch.tensor([1.125, 1.375, 1.625, 1.875, 0.03125, -1.125])
    assert fp6.round(ties).tolist() == [1.0, 1.5, 1.5, 2.0, 0.0, -1.0]
    int4 = get_format("int4")
    assert int4.round(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 9.0])).tolist() == [0, 2, 2, 0, -2, 7]


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if isinstance(f, FloatFormat)])
def test_encode_decode_round_trip_every_code(name):
    fmt = get_format(name)
    codes = torch.arange(1 << fmt.bits, dtype=torch.int64).to(torch.uint8)
    values = fmt.decode(codes)
    finite = torch.isfinite(values)
    assert torch.equal(fmt.encode(values[finite]), codes[finite])
    if name in ML_DTYPES:
        ref = codes.numpy().view(ML_DTYPES[name]).astype(np.float32)
        assert np.array_equal(values.numpy(), ref, equal_nan=True)


def test_format_properties_match_ml_dtypes_finfo():
    for name, ref in ML_DTYPES.items():
        fmt, info = get_format(name), ml_dtypes.finfo(ref)
        assert fmt.max == float(info.max)
        assert fmt.min_normal == float(info.smallest_normal)
        assert fmt.min_subnormal == float(info.smallest_subnormal)
    rows = {row["format"]: row for row in format_table()}
    assert rows["fp6_e3m2"]["finite_values"] == 64
    assert rows["fp8_e4m3"]["finite_values"] == 254  # 256 codes minus the two NaNs
    assert rows["fp8_e5m2"]["finite_values"] == 248  # minus ±inf and six NaNs
    assert rows["fp16"]["max"] == 65504


def test_baselines_cast():
    x = torch.tensor([1.0 + 2**-12, 3.0e38, 1e-8])
    assert get_format("fp16").round(x).tolist() == [1.0, float("inf"), x[2].half().item()]
    assert get_format("bf16").round(x)[0] == 1.0
    assert torch.equal(get_format("fp32").round(x), x)


def test_parse_and_errors():
    assert get_format("FP6") is get_format("fp6_e3m2")
    assert get_format("fp5_e2m2").max == 7.0  # 2^(3-1) * 1.75
    assert get_format("int3").qmax == 3
    for bad in ["fp6_e3m3", "fp9_e4m4", "int1", "float7", ""]:
        with pytest.raises(FpbenchError, match="format"):
            get_format(bad)
    with pytest.raises(FpbenchError, match="no NaN code"):
        get_format("fp6_e3m2").encode(torch.tensor([float("nan")]))


def test_block_formats_are_table_rows():
    rows = {row["format"]: row for row in format_table()}
    assert rows["e8m0"]["finite_values"] == 255 and rows["e8m0"]["max"] == 2.0**127
    assert rows["mxfp4_e2m1"]["family"] == "block" and rows["mxfp4_e2m1"]["bits"] == 4
    assert rows["nvfp4"]["finite_values"] == 16
    assert get_format("mxfp4").name == "mxfp4_e2m1" and get_format("e4m3").name == "fp8_e4m3"
    ceil = get_format("MXFP6_E3M2:ceil")
    assert ceil.name == "mxfp6_e3m2:ceil" and ceil.scale_rule == "ceil" and ceil.block_size == 32
    for bad in ["int4:ceil", "nvfp4:ceil", "mxfp5:ceil"]:
        with pytest.raises(FpbenchError, match="format"):
            get_format(bad)


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1", "nvfp4"])
def test_block_format_rounds_as_its_element(name):
    fmt = get_format(name)
    x = SOURCES["float16"]
    assert np.array_equal(fmt.round(x).numpy(), fmt.element.round(x).numpy(), equal_nan=True)
    mxint8 = get_format("mxint8")
    ref = np.clip(np.round(x.numpy().astype(np.float64) * 64), -127, 127) / 64
    finite = torch.isfinite(x).numpy()
    assert np.array_equal(mxint8.round(x).numpy()[finite], ref[finite].astype(np.float32))

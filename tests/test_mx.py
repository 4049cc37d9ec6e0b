"""Block-scaled formats (OCP MX v1.0, NVFP4) against independent references.

- E8M0 scale rounding: ml_dtypes' and torch's ``float8_e8m0fnu`` on every positive
  float16 and bfloat16 bit pattern (fpbench saturates where they return NaN).
- Element grids: every code of each element against ml_dtypes / torch dtypes.
- Whole blocks: a brute-force reference written here (the spec's shared exponent from
  ``math.frexp``, ``emax_elem`` from ml_dtypes' finfo, each element by nearest-grid
  search over the ml_dtypes grid, ties to the even code).
- torchao's MX / NVFP4 reference on CPU where torchao is importable (skipped otherwise).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.quant.activations import ActQuantizer
from fpbench.quant.formats import get_format
from fpbench.quant.gptq import gptq_quantize_weight
from fpbench.quant.scheme import Granularity, Scheme
from fpbench.quant.weights import bits_per_weight, quantize_weight

from conftest import layer_objective

MX_ELEMENTS = {  # format -> ml_dtypes element dtype (None: MXINT8, integers / 64)
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn, "mxfp8_e5m2": ml_dtypes.float8_e5m2,
    "mxfp6_e3m2": ml_dtypes.float6_e3m2fn, "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
    "mxfp4_e2m1": ml_dtypes.float4_e2m1fn, "mxint8": None,
}
BLOCK_NAMES = [*MX_ELEMENTS, "mxfp4_e2m1:ceil", "mxfp8_e4m3:ceil", "mxint8:ceil", "nvfp4"]


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).float()


# -- scale formats ---------------------------------------------------------------------
@pytest.mark.parametrize("source", [torch.float16, torch.bfloat16])
def test_e8m0_rounding_matches_ml_dtypes_and_torch_on_every_pattern(source):
    x = all_patterns(source)
    x = x[torch.isfinite(x) & (x > 0)]
    e8m0 = get_format("e8m0")
    ours = e8m0.round(x)
    ref_ml = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    ref_torch = x.to(torch.float8_e8m0fnu).float()
    comparable = torch.isfinite(ref_ml)
    assert comparable.sum() > 30000
    assert torch.equal(ours[comparable], ref_ml[comparable])
    # torch rounds every fp32 subnormal in (2^-127, 2^-126) up to 2^-126, even those
    # nearer to 2^-127 (only bfloat16 has such patterns); elsewhere it agrees.
    normal = comparable & (x >= 2.0**-126)
    assert torch.equal(ours[normal], ref_torch[normal])
    assert (ours[comparable & ~normal] <= ref_torch[comparable & ~normal]).all()
    codes = e8m0.encode(x[comparable])
    assert torch.equal(codes, torch.from_numpy(x[comparable].numpy().astype(ml_dtypes.float8_e8m0fnu)
                                               .view(np.uint8).copy()))
    # Only bfloat16 reaches beyond 2^127: ml_dtypes overflows to NaN, fpbench saturates.
    assert torch.equal(ours[~comparable], torch.full_like(ours[~comparable], 2.0**127))


def test_e8m0_special_values_and_every_code():
    e8m0 = get_format("e8m0")
    x = torch.tensor([0.0, -1.0, 2.0**-140, 1.5, 3.0, 0.75, math.inf, math.nan])
    assert e8m0.round(x)[:7].tolist() == [2.0**-127, 2.0**-127, 2.0**-127, 2.0, 4.0, 1.0, 2.0**127]
    assert torch.isnan(e8m0.round(x)[7])
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    ref = codes.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert np.array_equal(e8m0.decode(codes).numpy(), ref, equal_nan=True)
    assert torch.equal(e8m0.encode(e8m0.decode(codes[:255])), codes[:255])
    assert e8m0.encode(torch.tensor([math.nan])).item() == 255


def test_e4m3_block_scales_match_ml_dtypes_on_every_float16_pattern():
    amax = all_patterns(torch.float16)
    amax = amax[torch.isfinite(amax) & (amax >= 0)]
    nvfp4 = get_format("nvfp4")
    tensor_scale = torch.tensor(0.0123, dtype=torch.float32)
    ours = nvfp4.block_scales(amax, tensor_scale)
    relative = (amax / 6) / tensor_scale
    ref = np.clip(relative.numpy(), 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(ours.numpy(), ref)
    assert np.array_equal(relative.clamp(max=448).to(torch.float8_e4m3fn).float().numpy(), ref)


@pytest.mark.parametrize("name", list(MX_ELEMENTS))
def test_element_grid_is_the_reference_dtype(name):
    fmt = get_format(name)
    ref = MX_ELEMENTS[name]
    if ref is None:  # MXINT8: 8-bit two's complement x 2^-6, clamped to +-127/64
        assert torch.equal(fmt.decode_table, torch.arange(-127, 128, dtype=torch.float64) / 64)
        assert fmt.max == 127 / 64 and fmt.emax == 0
        return
    codes = torch.arange(1 << fmt.bits, dtype=torch.int64).to(torch.uint8)
    values = codes.numpy().view(ref).astype(np.float32)
    assert np.array_equal(fmt.decode(codes).numpy(), values, equal_nan=True)
    info = ml_dtypes.finfo(ref)
    assert fmt.max == float(info.max)
    assert fmt.emax == math.floor(math.log2(float(info.max)))


def test_torch_float4_agrees_with_the_e2m1_grid():
    # torch.float4_e2m1fn_x2 packs two codes per byte (low nibble first); no cast to it
    # exists on CPU, so compare the grid through its bit patterns.
    fmt = get_format("mxfp4_e2m1")
    nibbles = torch.arange(16, dtype=torch.uint8)
    packed = (nibbles | (nibbles << 4)).view(torch.float4_e2m1fn_x2)
    assert packed.dtype == torch.float4_e2m1fn_x2
    ref = nibbles.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(fmt.decode(nibbles).numpy(), ref)


# -- whole blocks against a brute-force reference --------------------------------------
def _grid(name):
    """Finite element values and their codes, from ml_dtypes (MXINT8: k / 64)."""
    ref = MX_ELEMENTS.get(name.split(":")[0]) if name != "nvfp4" else ml_dtypes.float4_e2m1fn
    if ref is None:
        ints = np.arange(-127, 128)
        return ints / 64.0, ints & 0xFF, ints
    bits = {ml_dtypes.float4_e2m1fn: 4, ml_dtypes.float6_e2m3fn: 6, ml_dtypes.float6_e3m2fn: 6}.get(ref, 8)
    codes = np.arange(1 << bits, dtype=np.uint8)
    values = codes.view(ref).astype(np.float64)
    finite = np.isfinite(values)
    return values[finite], codes[finite], codes[finite]


def _nearest(x: np.ndarray, grid: np.ndarray, parity_source: np.ndarray) -> np.ndarray:
    """Index of the nearest grid value, ties to the even code (even integer for MXINT8)."""
    top = grid.max()
    clamped = np.clip(x, -top, top)
    dist = np.abs(clamped[:, None] - grid[None, :])
    tied = dist == dist.min(axis=1, keepdims=True)
    key = np.where(tied, (parity_source & 1)[None, :], 99)
    return np.argmin(key, axis=1)


def reference_block_quantize(w: np.ndarray, name: str):
    """(dequantized, scales, tensor_scale) computed block by block in Python."""
    block = 16 if name == "nvfp4" else 32
    grid, codes, parity = _grid(name)
    elem_max = grid.max()
    rows, cols = w.shape
    out = np.zeros_like(w, dtype=np.float32)
    scales = np.zeros((rows, -(-cols // block)), dtype=np.float32)
    tensor_scale = None
    if name == "nvfp4":
        amax_t = np.float32(np.abs(w).max())
        tensor_scale = np.float32(amax_t / np.float32(448 * 6)) if amax_t > 0 else np.float32(1)
    emax = math.floor(math.log2(elem_max))
    for r in range(rows):
        for b, start in enumerate(range(0, cols, block)):
            x = w[r, start:start + block].astype(np.float32)
            amax = float(np.abs(x).max())
            if name == "nvfp4":
                relative = np.float32(np.float32(amax) / np.float32(6)) / tensor_scale
                scale = np.float32(np.float32(min(relative, 448)).astype(ml_dtypes.float8_e4m3fn))
                total = np.float32(scale * tensor_scale)
            else:
                if amax == 0:
                    shared = -127
                else:
                    mantissa, exp = math.frexp(amax)
                    shared = exp - 1 - emax  # the spec: floor(log2(amax)) - emax_elem
                    if name.endswith(":ceil"):
                        shared = next(e for e in range(-140, 140) if amax <= elem_max * 2.0**e)
                    shared = min(max(shared, -127), 127)
                scale = total = np.float32(2.0**shared)
            scales[r, b] = scale
            if total == 0:
                continue
            index = _nearest((x / total).astype(np.float64), grid, parity)
            out[r, start:start + block] = (grid[index] * np.float64(total)).astype(np.float32)
    return out, scales, tensor_scale


def _test_weight(seed=0, rows=6, cols=100):
    """Rows of very different magnitudes, a ragged last block (100 = 3 * 32 + 4), an
    all-zero block, a tiny block (its shared exponent is clamped to -127) and exact
    powers of two (binade edges)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 2, rows)[:, None]
    w[0, 32:64] = 0
    w[1, 0:32] = torch.randn(32, generator=gen) * 2.0**-135
    w[2, 64:96] = torch.tensor([2.0**k for k in range(-16, 16)])
    w[3, 5] = 6.0 * 2**10  # an element exactly at the element max of its block's scale
    return w


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_rtn_matches_brute_force_block_reference(name):
    w = _test_weight()
    qweight = quantize_weight(w, name, None)
    expected, scales, tensor_scale = reference_block_quantize(w.numpy(), name)
    assert qweight.granularity == Granularity("group", 16 if name == "nvfp4" else 32)
    assert np.array_equal(qweight.scales.numpy(), scales)
    assert np.array_equal(qweight.dequantize().numpy(), expected)
    if tensor_scale is None:
        assert qweight.tensor_scale is None
        assert qweight.scale_format == "e8m0"
        # stored scales are E8M0 values exactly
        stored = qweight.scales.numpy()
        assert np.array_equal(stored.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32), stored)
    else:
        assert qweight.tensor_scale.item() == tensor_scale
        assert qweight.scale_format == "fp8_e4m3"


def test_mx_floor_clips_and_ceil_does_not():
    # amax 7 with FP4: the spec's scale is 2^(2-2) = 1, 7 saturates to 6; ceil picks 2.
    w = torch.tensor([[7.0, 1.0] + [0.0] * 30])
    floor = quantize_weight(w, "mxfp4_e2m1", None)
    ceil = quantize_weight(w, "mxfp4_e2m1:ceil", None)
    assert floor.scales.item() == 1.0 and floor.dequantize()[0, 0] == 6.0
    assert ceil.scales.item() == 2.0 and ceil.dequantize()[0, 0] == 8.0
    torch.manual_seed(1)
    x = torch.randn(64, 256) * 3
    blocks = x.reshape(64, 8, 32).abs().amax(dim=2)
    ceil_scales = quantize_weight(x, "mxfp4_e2m1:ceil", None).scales
    assert (blocks <= 6 * ceil_scales).all()  # nothing clips


def test_all_zero_block_nan_and_inf():
    zero = quantize_weight(torch.zeros(1, 32), "mxfp8_e4m3", None)
    assert zero.scales.item() == 2.0**-127 and torch.equal(zero.dequantize(), torch.zeros(1, 32))
    nv = quantize_weight(torch.zeros(2, 16), "nvfp4", None)
    assert nv.tensor_scale.item() == 1.0 and torch.equal(nv.dequantize(), torch.zeros(2, 16))
    # NaN or inf in a block: that block is NaN, the others are not (activation path).
    x = torch.randn(1, 96)
    x[0, 3], x[0, 40] = math.nan, math.inf
    out = ActQuantizer("mxfp4_e2m1", "block-dynamic").quantize(x)
    assert torch.isnan(out[0, :64]).all() and torch.isfinite(out[0, 64:]).all()
    with pytest.raises(FpbenchError, match="no NaN code"):
        quantize_weight(x, "mxfp4_e2m1", None)


def test_nvfp4_block_scale_that_underflows_flushes_the_block():
    w = torch.ones(1, 32)
    w[0, :16] = 1e-9  # relative scale (1e-9/6) / (1/2688) ~ 4.5e-7, below E4M3's 2^-9 / 2
    qweight = quantize_weight(w, "nvfp4", None)
    assert qweight.scales[0, 0] == 0
    assert torch.equal(qweight.dequantize()[0, :16], torch.zeros(16))
    assert torch.isfinite(qweight.dequantize()).all()


def test_bits_per_weight_of_block_formats():
    shape = (576, 1536)
    numel = 576 * 1536
    assert bits_per_weight(get_format("mxfp4_e2m1"), None, shape) == 4.25
    assert bits_per_weight(get_format("mxfp6_e3m2"), None, shape) == 6.25
    assert bits_per_weight(get_format("mxfp8_e4m3"), None, shape) == 8.25
    assert bits_per_weight(get_format("mxint8"), None, shape) == 8.25
    assert bits_per_weight(get_format("nvfp4"), None, shape) == 4.5 + 32 / numel
    # a ragged last block is a whole scale: 100 = 3 * 32 + 4
    assert bits_per_weight(get_format("mxfp4_e2m1"), None, (1, 100)) == 4 + 4 * 8 / 100


# -- schemes ---------------------------------------------------------------------------
def test_block_scheme_defaults_and_errors():
    assert Scheme.parse("mxfp4_e2m1").name == "mxfp4_e2m1/g32/rtn"
    assert Scheme("nvfp4").granularity == Granularity("group", 16)
    assert Scheme("nvfp4").scale_format == "fp8_e4m3"
    assert Scheme.parse("int4/g128/rtn/s:fp16").name == "int4/g128/rtn"  # the default is not printed
    assert Scheme.parse("int4/g128/rtn/s:e4m3").name == "int4/g128/rtn/s:fp8_e4m3"
    for bad, message in [("mxfp4_e2m1/g128/rtn", "blocks of 32"), ("mxfp4_e2m1/g32/rtn/s:fp16", "by definition"),
                         ("int4/g128/rtn/s:int8", "float format"), ("nvfp4:ceil/g16/rtn", "MX formats only"),
                         ("e8m0/channel/rtn", "scale format only"), ("mxfp4_e2m1/g32/rtn-mse", "own rule"),
                         ("int8/channel/rtn/a:mxfp4_e2m1-token-dynamic", "block-dynamic"),
                         ("int8/channel/rtn/a:int8-block-dynamic", "block-dynamic")]:
        with pytest.raises(FpbenchError, match=message):
            Scheme.parse(bad)
    assert Scheme("int8", Granularity("channel"), act_format="mxfp4_e2m1").act_granularity == "block-dynamic"


# -- GPTQ and activations --------------------------------------------------------------
@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 96, generator=gen)
    inputs = torch.randn(512, 96, generator=gen) @ (torch.eye(96) + 0.3 * torch.randn(96, 96, generator=gen))
    return weight, inputs, 2 * inputs.T @ inputs / inputs.shape[0]


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mxfp4_e2m1:ceil", "mxint8", "nvfp4"])
def test_gptq_with_identity_hessian_is_rtn_and_beats_it_otherwise(layer, name):
    weight, inputs, hessian = layer
    rtn = quantize_weight(weight, name, None)
    for block_size in (128, 7):
        same = gptq_quantize_weight(weight, 2.0 * torch.eye(96), name, None, block_size=block_size)
        assert torch.equal(same.codes, rtn.codes) and torch.equal(same.scales, rtn.scales)
    gptq = gptq_quantize_weight(weight, hessian, name, None)
    assert gptq.granularity == rtn.granularity and gptq.scale_format == rtn.scale_format
    if rtn.tensor_scale is not None:  # NVFP4's tensor scale comes from the original weight
        assert torch.equal(gptq.tensor_scale, rtn.tensor_scale)
    assert layer_objective(weight, gptq.dequantize(), inputs) < layer_objective(weight, rtn.dequantize(), inputs)
    static = gptq_quantize_weight(weight, hessian, name, None, static_groups=True, act_order=True)
    assert torch.equal(static.scales, rtn.scales)
    assert torch.equal(gptq.scales[:, 0], rtn.scales[:, 0])  # the first block is chosen before any update
    if name == "nvfp4":  # E4M3 scales are fine enough that the updated later blocks move them
        assert not torch.equal(gptq.scales[:, 1:], rtn.scales[:, 1:])


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8", "nvfp4"])
def test_block_dynamic_activations_match_the_block_reference(name):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 48, generator=gen)
    x[..., 7] *= 40  # an outlier feature: only its block's scale grows
    out = ActQuantizer(name, "block-dynamic").quantize(x)
    expected, _, _ = reference_block_quantize(x.reshape(-1, 48).numpy(), name)
    assert np.array_equal(out.reshape(-1, 48).numpy(), expected)
    with pytest.raises(FpbenchError, match="block-dynamic"):
        ActQuantizer(name, "token-dynamic")


# -- torchao's reference (CPU), where installed ----------------------------------------
def test_against_torchao_mx_and_nvfp4(monkeypatch):
    # `make install` puts torchao in .venv/reference-libs, out of transformers' sight.
    monkeypatch.syspath_prepend(str(Path(sys.prefix) / "reference-libs"))
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    w = _test_weight(cols=96)
    w[1, 0:32] = 0  # torchao and fpbench pick different scales for all-zero / tiny blocks
    elem = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp4_e2m1": torch.float4_e2m1fn_x2,
            "mxfp6_e3m2": "fp6_e3m2", "mxfp6_e2m3": "fp6_e2m3"}
    for name, dtype in elem.items():
        for suffix, mode in [("", ScaleCalculationMode.FLOOR), (":ceil", ScaleCalculationMode.RCEIL)]:
            ours = quantize_weight(w, name + suffix, None)
            scale_e8m0, data = to_mx(w, dtype, 32, mode)
            theirs = to_dtype(data, scale_e8m0, dtype, 32, torch.float32)
            nonzero = ours.scales.reshape(-1) != 2.0**-127
            assert torch.equal(ours.scales.reshape(-1)[nonzero], scale_e8m0.float().reshape(-1)[nonzero]), name + suffix
            assert torch.equal(ours.dequantize(), theirs), name + suffix
    ours = quantize_weight(w, "nvfp4", None)
    tensor_scale = per_tensor_amax_to_scale(w.abs().amax())
    assert torch.equal(ours.tensor_scale, tensor_scale.float())
    scales, packed = nvfp4_quantize(w, 16, tensor_scale)
    big = ours.scales.reshape(-1) >= 2.0**-6  # torchao clamps smaller block scales to 2^-6
    assert torch.equal(ours.scales.reshape(-1)[big], scales.float().reshape(-1)[big])
    values = f4_unpacked_to_f32(unpack_uint4(packed.view(torch.uint8))).reshape(w.shape[0], -1, 16)
    theirs = (values * (scales.float().reshape(w.shape[0], -1, 1) * tensor_scale)).reshape(w.shape)
    rows_with_big_scales = big.reshape(w.shape[0], -1).all(dim=1)
    assert rows_with_big_scales.sum() >= 3
    assert torch.equal(ours.dequantize()[rows_with_big_scales], theirs[rows_with_big_scales])

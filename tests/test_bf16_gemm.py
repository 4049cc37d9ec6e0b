"""The bf16 dot-product kernels for bf16 x on a CPU with AVX-512 BF16: the GEMV
(lut_bf16_gemv.h) below ``bf16_gemm_min_rows()`` rows of x, the GEMM (lut_bf16.h) from there.

Products of bf16 x with the exact unscaled values (or values times few-bit scale factors)
are exact, so each output is within the fp32 summation bound of a float64 product with the
dequantized weights (plus one rounding of the scale per group sum); one-hot rows of x give
each weight alone, bit for bit. With zero points (v - z is not exact in bf16) both sum x v
per group: the GEMV takes off s z X (X the group's sum of x) after the groups, the GEMM
takes each group's sum to (S - z X) s (one-hot rows still bit for bit); both within the
bound counted on |x| (|v| + |z|) s. The GEMV decodes 4-bit integer codes per channel
(INT4, INT4 asymmetric) without a lookup, as the value plus an offset (136 and 128), and
takes off offset X (X the row's sum of x) before the scale: within the bound counted on |x|
(|v| + |z| + offset) s, one-hot rows still bit for bit."""

import pytest
import torch

from fpbench.kernels import build as kernels
from fpbench.kernels.linear import LutLinear
from fpbench.kernels.packing import code_bits, value_table
from fpbench.quant.scheme import Scheme
from fpbench.quant.formats import get_format
from fpbench.quant.weights import expand_to_weight, quantize_weight

pytestmark = pytest.mark.skipif("avx512bf16" not in kernels.runnable_isas(),
                                reason="this CPU has no AVX-512 BF16 (the bf16 GEMM's ISA)")

# N = 53: a panel of 48 rows and a masked one; K = 1088: a block of 1024 columns and one of 64
# (the GEMM), an odd number of units (the GEMV's pairs of units).
N, K = 53, 1088
SCHEMES = ["fp4_e2m1/channel", "fp4_e2m1/g16", "fp4_e2m1/g32", "int4/g96", "int4/g128", "int4/channel",
           "int8/channel", "int8/g64", "fp6_e3m2/channel", "fp6_e2m3/g128", "fp6_e3m2/g32", "fp8_e4m3/g32",
           "fp8_e5m2/channel", "fp8_e3m4/g128", "mxfp4_e2m1/g32", "mxfp6_e3m2/g32", "mxfp8_e4m3/g32", "nvfp4/g16",
           "int8/g32", "int4/g48", "int4_asym/g32", "fp8_e4m3/g16", "fp6_e3m2/g16", "int4_asym/channel",
           "int4_asym/g128"]


def _layer(name: str, isa: str = "avx512bf16", every_code: bool = False, n: int = N, k: int = K):
    scheme = Scheme.parse(name + "/rtn")
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    qweight = quantize_weight(weight, scheme.format, scheme.granularity, scheme.clip, scheme.scale_format)
    if every_code:  # every finite code of the element format, in every row and position
        element = LutLinear(qweight).format
        values = value_table(element)
        usable = values.isfinite()
        if qweight.codes.dtype == torch.int8:  # symmetric integers: -(2^(b-1)) is no code
            usable[1 << (code_bits(element) - 1)] = False
        finite = torch.nonzero(usable).flatten()
        index = (torch.arange(n * K) * 7 + torch.arange(n * K) // K) % len(finite)
        codes = finite[index].reshape(n, K)
        if qweight.codes.dtype == torch.int8:  # symmetric integers: two's complement of the index
            half = 1 << (code_bits(element) - 1)
            codes = (codes + half) % (2 * half) - half
        qweight.codes.copy_(codes)
    return qweight, LutLinear(qweight, isa=isa)


def _gemm_from() -> int:  # rows of x from which the GEMM takes over from the GEMV
    return kernels.load().bf16_gemm_min_rows()


def _product(layer: LutLinear, x: torch.Tensor) -> torch.Tensor:
    return kernels.load().lut_linear(x, *layer._args())  # fp32, no rounding to x's dtype


def _product_on_two_threads(layer: LutLinear, x: torch.Tensor) -> torch.Tensor:
    """_product with torch's threads set to 2 (each thread several weight rows or panels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _product(layer, x)
    finally:
        torch.set_num_threads(threads)


def _assert_within_the_summation_bound(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """y (the kernel's fp32 product of bf16 x with the dequantized weight, float64) within
    the fp32 summation bound of the float64 product."""
    error = (y.double() - x.double() @ weight.T).abs()
    bound = (x.shape[1] + 3) * 2.0**-24 * (x.double().abs() @ weight.abs().T) + 1e-30
    assert bool((error <= bound).all()), float((error / bound).max())


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("m", [1, 3, 5, 8, 9, 15, 16, 21, 37])
def test_bf16_x_within_the_summation_bound(name, m):
    qweight, layer = _layer(name)
    weight = qweight.dequantize().double()
    assert torch.equal(layer.dequantized_weight().view(torch.int32), qweight.dequantize().view(torch.int32))
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).bfloat16()
    _assert_within_the_summation_bound(_product(layer, x), x, weight)


@pytest.mark.parametrize("name", ["int4/g384", "fp6_e3m2/g384", "fp4_e2m1/g256", "int8/g384"])
@pytest.mark.parametrize("m", [1, 2, 9])
def test_groups_of_several_units_within_the_summation_bound(name, m):
    # Groups of 6 units of 64 weights (the GEMV's pairs of units in one group, the group
    # found through group_of, not by a shift) and of 4, over K = 1536 (24 units).
    k = 1536
    qweight, layer = _layer(name, k=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    _assert_within_the_summation_bound(_product(layer, x), x, qweight.dequantize().double())


@pytest.mark.parametrize("name", ["fp4_e2m1/channel", "int4/g128", "int4/g384", "fp4_e2m1/g32", "nvfp4/g16",
                                  "mxfp4_e2m1/g32", "int4_asym/g128", "int8/channel", "fp6_e3m2/g128",
                                  "fp8_e4m3/channel"])
@pytest.mark.parametrize("k", [8384, 14400, 32832])
def test_one_row_of_long_k_within_the_summation_bound(name, k):
    # At M = 1 a row of x of more than 3/4 of L1 (K = 14400, 28 KiB, where L1 is 32 KiB;
    # K = 32832, 64 KiB, on any L1 up to 85 KiB) goes in blocks of 128 units (16 KiB of x)
    # for 4- and 8-bit codes per channel and 4-bit ones in groups of 128 or more, the second
    # starting inside a group of 6 units (g384); with zero points their term at the last
    # block, over all the row's groups. The rest, and every layer at K = 8384 (16 KiB of
    # x), in whole rows.
    qweight, layer = _layer(name, n=7, k=k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3)).bfloat16()
    _assert_within_the_summation_bound(_product(layer, x), x, qweight.dequantize().double())


@pytest.mark.parametrize("name", ["fp6_e3m2/channel", "int4_asym/channel", "int4/g128", "nvfp4/g16", "mxfp4_e2m1/g32"])
@pytest.mark.parametrize("m", [1, 5])
def test_many_weight_rows_through_the_gemv(name, m):
    # 600 weight rows on 2 threads: 300 a thread, so a thread's rows cross the batches in
    # which whole rows' scales are decoded (256 per-channel scales, 28 rows of g128's 9,
    # 3 of NVFP4's 68 at K = 1088) and end in a part-filled batch of 16 row sums.
    qweight, layer = _layer(name, n=600)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).bfloat16()
    y = _product_on_two_threads(layer, x)
    _assert_within_the_summation_bound(y, x, qweight.dequantize().double())


@pytest.mark.parametrize("name", ["fp6_e3m2/channel", "int4/g128", "int8/g32", "fp4_e2m1/g16", "mxfp6_e3m2/g32",
                                  "nvfp4/g16", "fp8_e4m3/g16", "int4_asym/channel", "int4_asym/g32"])
@pytest.mark.parametrize("m", [600, 2061])
def test_many_rows_within_the_summation_bound(name, m):
    # Many rows of x take narrower blocks of K (600 rows: 832 or 768 columns, then the
    # rest; 2061: 256) and go through the panels in groups (11 panels of 48 rows, the last
    # masked: more than one group a thread at 2061 rows on 2 threads), with a last, narrower
    # tile of x.
    qweight, layer = _layer(name, n=11 * 48 - 5)
    weight = qweight.dequantize().double()
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).bfloat16()
    y = _product_on_two_threads(layer, x)
    _assert_within_the_summation_bound(y, x, weight)


@pytest.mark.parametrize("name", [s for s in SCHEMES if s != "nvfp4/g16"])
def test_one_hot_rows_give_every_code_bit_for_bit(name):
    # Every column of a unit (each pair slot of the panel), of the second block, and the
    # last: y[m, n] = w[n, column m], the one product times its scale (E8M0 factors: exact).
    qweight, layer = _layer(name, every_code=True)
    weight = qweight.dequantize()
    columns = [*range(64), *range(1024, 1088, 3), 700, 129]
    eye = torch.zeros(len(columns), K, dtype=torch.bfloat16)
    eye[range(len(columns)), columns] = 1.0
    assert torch.equal(_product(layer, eye).T, weight[:, columns])
    # The GEMV: 1 to _gemm_from() - 1 rows of x a call.
    for rows in (1, 3, 4, _gemm_from() - 1):
        y = torch.cat([_product(layer, part) for part in eye.split(rows)])
        assert torch.equal(y.T, weight[:, columns])


def test_nvfp4_one_hot_rows_within_one_rounding():
    # NVFP4's panels hold value x E4M3 factor (exact) and the tensor scale multiplies the
    # sum: one rounding where the dequantization rounds factor x tensor scale, then x value.
    qweight, layer = _layer("nvfp4/g16", every_code=True)
    weight = qweight.dequantize().double()
    eye = torch.zeros(64, K, dtype=torch.bfloat16)
    eye[range(64), range(64)] = 1.0
    error = (_product(layer, eye).double().T - weight[:, :64]).abs()
    assert bool((error <= 2 * 2.0**-24 * weight[:, :64].abs()).all())


@pytest.mark.parametrize("name", ["int4_asym/g32", "int4_asym/g128", "int4_asym/channel", "int4_asym/g16"])
def test_zero_points_within_the_bound_on_values_and_zero_points(name):
    # Codes next to their zero points: the weights (v - z) s nearly cancel, the kernels' sums
    # x v and z X do not; the error is within the bound counted on |x| (|v| + |z|) s. 1-8
    # rows of x: the GEMV (not for g16: the fp32 one); 9 and 600: the GEMM (600 rows: blocks
    # of 832 columns, so per channel two runs of K a row).
    qweight, _ = _layer(name)
    shape = tuple(qweight.codes.shape)
    zero = expand_to_weight(qweight.zero_points, qweight.granularity, shape)
    qweight.codes.copy_(zero.round().clamp(0, 15).to(qweight.codes.dtype))
    layer = LutLinear(qweight)
    weight = qweight.dequantize().double()
    scale = expand_to_weight(qweight.effective_scales, qweight.granularity, shape).double()
    terms = (get_format(qweight.format).decode(qweight.codes).double().abs() + zero.double().abs()) * scale.abs()
    for m in (1, 3, 8, _gemm_from(), 600):
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).bfloat16()
        error = (_product(layer, x).double() - x.double() @ weight.T).abs()
        assert bool((error <= (K + 3) * 2.0**-24 * (x.double().abs() @ terms.T) + 1e-30).all())


@pytest.mark.parametrize("name", ["int4/channel", "int4_asym/channel"])
def test_integer_offset_within_the_bound_on_values_and_offset(name):
    # Codes -1, 0, 1 (asymmetric: next to the zero point) and x >= 0: the GEMV's sums x (v +
    # offset) nearly cancel against offset X; the error is within the bound counted on |x|
    # (|v| + |z| + offset) s. 9 and 600 rows: the GEMM (no offset), within the same bound.
    offset = 128 if "asym" in name else 136
    qweight, _ = _layer(name)
    shape = tuple(qweight.codes.shape)
    near = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(2)).float()
    zero = torch.zeros(shape)
    if qweight.zero_points is not None:
        zero = expand_to_weight(qweight.zero_points, qweight.granularity, shape)
        near = (near + zero.round()).clamp(0, 15)
    qweight.codes.copy_(near.to(qweight.codes.dtype))
    layer = LutLinear(qweight)
    weight = qweight.dequantize().double()
    scale = expand_to_weight(qweight.effective_scales, qweight.granularity, shape).double()
    values = get_format(qweight.format).decode(qweight.codes).double().abs()
    terms = (values + zero.double().abs() + offset) * scale.abs()
    for m in (1, 3, 8, _gemm_from(), 600):
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).abs().bfloat16()
        error = (_product(layer, x).double() - x.double() @ weight.T).abs()
        assert bool((error <= (K + 3) * 2.0**-24 * (x.double().abs() @ terms.T) + 1e-30).all())


@pytest.mark.parametrize("name", ["mxfp4_e2m1/g32", "mxfp8_e4m3/g32"])
def test_e8m0_extremes_keep_the_group_scales(name):
    # A scale of 2^127 (a row of zeros) would overflow bf16 with most values in a panel,
    # 2^-126 underflow it (vdpbf16ps flushes subnormals): the layer keeps its scales per
    # group, and the row of 2^-126 is within the bound and one subnormal step of it.
    qweight, _ = _layer(name)
    qweight.scales[0], qweight.scales[1] = 2.0**127, 2.0**-126
    qweight.codes[0] = 0
    layer = LutLinear(qweight)
    weight = qweight.dequantize().double()
    assert bool((weight[1] != 0).any())
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(5)).bfloat16()
    error = (_product(layer, x).double() - x.double() @ weight.T).abs()
    assert bool((error <= (K + 3) * 2.0**-24 * (x.double().abs() @ weight.abs().T) + 2.0**-149).all())


@pytest.mark.parametrize("name, gemv, gemm", [("fp6_e3m2/channel", True, True), ("int4/g128", True, True),
                                              ("mxfp4_e2m1/g32", True, True), ("nvfp4/g16", True, True),
                                              ("fp8_e4m3/g32", True, True), ("int8/g64", True, True),
                                              ("int8/g32", True, True), ("int4/g96", True, True),
                                              ("int4/g48", False, True), ("int8/g96", False, True),
                                              ("int4_asym/g32", True, True), ("int4_asym/channel", True, True),
                                              ("int4_asym/g16", False, True)])
def test_the_bf16_kernels_are_taken_for_bf16_x(name, gemv, gemm):
    # The fp32 kernels give the same bits on every AVX-512 ISA; the bf16 ones sum in another
    # order: the GEMV below _gemm_from() rows (groups of 16, 32, or whole vectors of a unit: a
    # multiple of 32 weights for 4- and 6-bit codes, of 64 for 8-bit ones), the GEMM from
    # there (zero points too). Zero points in the GEMV: groups of whole vectors, the zero
    # points' term taken off each row; the fp32 kernels otherwise, and for fp32 x.
    _, dot = _layer(name)
    _, fp32 = _layer(name, isa="avx512vbmi")
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(3)).bfloat16()
    for rows in (1, _gemm_from() - 1):
        assert torch.equal(_product(dot, x[:rows]), _product(fp32, x[:rows])) != gemv
    for rows in (_gemm_from(), 16):
        assert torch.equal(_product(dot, x[:rows]), _product(fp32, x[:rows])) != gemm
        assert torch.equal(_product(dot, x[:rows].float()), _product(fp32, x[:rows].float()))
    assert torch.equal(_product(dot, x[:1].float()), _product(fp32, x[:1].float()))


def test_forward_rounds_once_to_bf16():
    qweight, layer = _layer("int4/g128")
    x = torch.randn(2, 20, K, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 20, N)
    assert torch.equal(y, _product(layer, x.reshape(-1, K)).reshape(2, 20, N).bfloat16())


@pytest.mark.parametrize("name", ["int4/g128", "fp6_e3m2/channel", "mxfp8_e4m3/g32"])
def test_forward_adds_the_bias_and_rounds_as_torch(name):
    # The GEMM writes bf16 itself: the bias added to the fp32 sums, then rounded to nearest
    # even, as torch rounds the fp32 product plus the bias; subnormal sums stay subnormal
    # (rows of x all zero give the bias itself, some of it subnormal).
    qweight, _ = _layer(name)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(5))
    bias[::7] *= 2.0**-130
    bias[3] = -0.0
    layer = LutLinear(qweight, bias, isa="avx512bf16")
    x = torch.randn(3, 16, K, generator=torch.Generator().manual_seed(6)).bfloat16()
    x[1, ::3] = 0
    y = layer(x)
    expected = (_product(layer, x.reshape(-1, K)) + bias).bfloat16().reshape(3, 16, N)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))
    assert bool((y[1, 0].float().abs() < 2.0**-126).any() & (y[1, 0] != 0).any())

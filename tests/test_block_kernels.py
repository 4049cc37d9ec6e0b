"""Block formats on the compiled kernels: MX (E8M0 scales per 32) and NVFP4 (E4M3 scales
per 16 times an fp32 tensor scale) run as their element format with one scale per block,
bit-exact with the simulator."""

import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.kernels import build as kernels
from fpbench.kernels.linear import LutLinear, check_kernel_scheme, element_view, packed_bytes
from fpbench.kernels.packing import code_bits, code_indices, decode_params, pack_codes, value_table
from fpbench.quant.formats import get_format
from fpbench.quant.scheme import Granularity, Scheme
from fpbench.quant.weights import bits_per_weight, quantize_weight

BLOCK_SCHEMES = ["mxfp4_e2m1/g32/rtn", "mxfp4_e2m1:ceil/g32/rtn", "mxfp6_e3m2/g32/rtn", "mxfp6_e2m3/g32/rtn",
                 "mxfp8_e4m3/g32/rtn", "mxfp8_e5m2/g32/rtn", "nvfp4/g16/rtn"]
ISAS_HERE = kernels.runnable_isas()


def _weight(scheme_name: str, rows: int = 24, cols: int = 192):
    scheme = Scheme.parse(scheme_name)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[0, :32] *= 1e-30  # a block of tiny values (scale underflow paths)
    weight[1, 32:64] = 0.0  # an all-zero block
    return quantize_weight(weight, scheme.format, scheme.granularity, scheme.clip, scheme.scale_format)


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("name", BLOCK_SCHEMES)
def test_block_formats_dequantize_bit_exactly(name, isa):
    qweight = _weight(name)
    layer = LutLinear(qweight, isa=isa)
    reference = qweight.dequantize()
    assert torch.equal(layer.dequantized_weight().view(torch.int32), reference.view(torch.int32))
    x = torch.randn(3, qweight.codes.shape[1], dtype=torch.float32)
    bound = (qweight.codes.shape[1] + 2) * 2.0**-24 * (x.abs().double() @ reference.abs().double().T) + 1e-30
    assert bool(((layer(x).double() - x.double() @ reference.double().T).abs() <= bound).all())


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("name", ["int4/g16/rtn", "int4_asym/g32/rtn", "fp6_e3m2/g32/rtn", "mxfp4_e2m1/g32/rtn",
                                  "nvfp4/g16/rtn"])
def test_rows_of_many_stored_scales_decode_exactly(name, isa):
    # 16-48 groups a row: the SIMD ISAs convert fp16 scales and zero points 8 at a time
    # (F16C) and gather 8-bit scale codes from their table; the rest of a row one by one.
    qweight = _weight(name, rows=6, cols=768)
    qweight.scales[2, :] = torch.tensor(2.0**-20)  # fp16 subnormals
    layer = LutLinear(qweight, isa=isa)
    reference = qweight.dequantize()
    assert torch.equal(layer.dequantized_weight().view(torch.int32), reference.view(torch.int32))
    eye = torch.eye(qweight.codes.shape[1])[:4]  # the GEMV: y[m, n] = w[n, m] (-0 + 0 sums to +0)
    assert torch.equal(layer(eye).T, reference[:, :4])


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("name", ["int4/channel/rtn", "int4/g128/rtn", "int4_asym/g32/rtn", "int4/g96/rtn",
                                  "fp4_e2m1/channel/rtn", "mxfp4_e2m1/g32/rtn", "nvfp4/g16/rtn",
                                  "int8/channel/rtn", "fp8_e4m3/channel/rtn", "fp8_e5m2/g128/rtn",
                                  "mxfp8_e4m3/g32/rtn"])
def test_long_rows_add_up_over_blocks_of_k(name, isa):
    # K = 131 units: the AVX-512 4-bit GEMVs sum a row in blocks of K (64 units at M = 1,
    # 16 at M = 4; the last ragged), and so do the 8-bit ones at M = 4, each block with its
    # own groups' scales, added into y.
    # One-hot x at the blocks' edges gives each weight alone (exact); random x stays within
    # the fp32 summation bound.
    qweight = _weight(name, rows=6, cols=131 * 64)
    k = qweight.codes.shape[1]
    layer = LutLinear(qweight, isa=isa)
    reference = qweight.dequantize()
    columns = [0, 63, 1023, 1024, 1025, 4095, 4096, 4097, 8191, 8192, k - 1, k - 64]
    eye = torch.zeros(len(columns), k)
    eye[range(len(columns)), columns] = 1.0
    for m in (1, 4):
        onehot = torch.cat([layer(eye[i:i + m]) for i in range(0, len(columns), m)])
        assert torch.equal(onehot.T, reference[:, columns]), m
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        bound = (k + 2) * 2.0**-24 * (x.abs().double() @ reference.abs().double().T) + 1e-30
        assert bool(((layer(x).double() - x.double() @ reference.double().T).abs() <= bound).all()), m


def _scale_table(scale_format: str, tensor_scale: float | None) -> torch.Tensor:
    # The table as the layers store it: each code's value, times the fp32 tensor scale.
    table = get_format(scale_format).decode_table.float()
    return table if tensor_scale is None else table * torch.tensor(tensor_scale, dtype=torch.float32)


def _every_scale_code(module, isa, element: str, group: int, table: torch.Tensor, x_rows=None, k: int = 320):
    """A layer of random element codes whose 8-bit scale codes cycle through every code of
    the table (when x_rows is given, those whose weights are all finite: an inf weight
    times a 0 of x is NaN); the kernel's result and the simulator's weights,
    decode(code) * table[scale code] in fp32."""
    bits = code_bits(element)
    n = 13  # k = 320: 20 groups of 16 a row, SIMD runs of 8 scale codes and a tail
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    values = value_table(element)
    codes[values[codes.long()].isnan() | values[codes.long()].isinf()] = 0
    largest = values[values.isfinite()].abs().max()
    allowed = torch.arange(256) if x_rows is None else torch.nonzero((table * largest).isfinite()).flatten()
    groups = -(-k // group)
    scales = allowed[torch.arange(n * groups) % len(allowed)].to(torch.uint8).reshape(n, groups)
    expected = values[codes.long()] * table[scales.long()].repeat_interleave(group, dim=1)[:, :k]
    plane_a, plane_b = pack_codes(code_indices(codes, element), bits)
    args = (plane_a, torch.empty(0, dtype=torch.uint8) if plane_b is None else plane_b, values, scales,
            torch.empty(0), bits, k, group, decode_params(element), isa)
    if x_rows is None:
        return module.lut_dequantize(*args, scale_table=table), expected
    return module.lut_linear(x_rows, *args, scale_table=table), expected


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("scale_format, tensor_scale, decode", [
    ("e8m0", None, "exponent"), ("fp8_e4m3", None, "minifloat"), ("fp8_e4m3", 0.37, "minifloat"),
    ("fp8_e4m3", 2.0**-130, None), ("fp8_e4m3", 3.0e36, None)])
@pytest.mark.parametrize("element, group", [("fp4_e2m1", 16), ("fp4_e2m1", 32), ("fp6_e2m3", 64), ("fp8_e4m3", 32)])
def test_every_scale_code_decodes_as_its_table(isa, scale_format, tensor_scale, decode, element, group):
    # The SIMD kernels decode E8M0 and E4M3 (times a tensor scale) scale codes by
    # arithmetic, patching the codes it misses from the table; where a tensor scale puts
    # products out of fp32's normal range the formula may not fit and the table is read.
    # Either way every one of the 256 codes gives the table's value bit for bit: in the
    # dequantization and, where the weights stay finite, in the GEMV (one-hot x: each
    # weight alone).
    module = kernels.load()
    table = _scale_table(scale_format, tensor_scale)
    if decode is not None:
        assert module.scale_decode(table) == decode
    got, expected = _every_scale_code(module, isa, element, group, table)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32))
    eye = torch.eye(320)
    for rows in (eye[:4], eye[100:101], eye[316:320]):
        got, expected = _every_scale_code(module, isa, element, group, table, rows)
        columns = rows.argmax(dim=1)
        assert torch.equal(got.T, expected[:, columns]), rows.shape


@pytest.mark.skipif("avx512bf16" not in kernels.runnable_isas(), reason="this CPU has no AVX-512 BF16")
@pytest.mark.parametrize("tensor_scale", [None, 0.37, 2.0**-130])
def test_every_scale_code_in_runs_of_64_through_the_bf16_gemv(tensor_scale):
    # The bf16 GEMV decodes E4M3 scale codes 64 at a time where a row has that many
    # (bf16 words looked up, times the multiplier): 80 groups of 16 a row, one run of 64
    # and a tail (the tables all take the formula, so the words are tried); one-hot bf16
    # rows of x give each weight, every code's value exactly.
    module = kernels.load()
    table = _scale_table("fp8_e4m3", tensor_scale)
    assert module.scale_decode(table) == "minifloat"
    eye = torch.eye(1280).bfloat16()
    for rows in (eye[:4], eye[1020:1021], eye[1276:1280]):
        got, expected = _every_scale_code(module, "avx512bf16", "fp4_e2m1", 16, table, rows, k=1280)
        assert torch.equal(got.T, expected[:, rows.float().argmax(dim=1)])  # as floats: a zero weight gives +0


def test_scale_tables_without_a_formula_are_gathered():
    module = kernels.load()
    assert module.scale_decode(torch.rand(256, generator=torch.Generator().manual_seed(3))) == "gather"
    table = _scale_table("e8m0", None)
    table[[5, 9, 17]] = 1.0  # three codes off the formula: more than it patches
    assert module.scale_decode(table) == "gather"


def test_nvfp4_tensor_scale_is_folded_exactly():
    qweight = _weight("nvfp4/g16/rtn")
    assert qweight.tensor_scale is not None
    view = element_view(qweight)
    assert view.format == "fp4_e2m1" and view.granularity == Granularity("group", 16)
    assert torch.equal(view.scales, (qweight.scales * qweight.tensor_scale).float())


@pytest.mark.parametrize("name", [*BLOCK_SCHEMES, "fp6_e3m2/channel/rtn", "fp8_e4m3/channel/rtn", "int4/g128/rtn",
                                  "int4_asym/g32/rtn", "int8/channel/rtn", "fp4_e2m1/g32/rtn",
                                  "int4/g64/rtn/s:bf16", "int4_asym/g32/rtn/s:e4m3", "fp4_e2m1/g32/rtn/s:e8m0",
                                  "int8/channel/rtn/s:fp32"])
def test_packed_bytes_are_the_bits_per_weight(name):
    # Scales (and zero points) are stored in their scale format's width (fp16 by default,
    # E8M0 codes for MX, E4M3 codes plus the fp32 tensor scale for NVFP4), so the layer
    # holds exactly the bits per weight the scheme reports; and decodes them exactly.
    scheme = Scheme.parse(name)
    qweight = _weight(name)
    layer = LutLinear(qweight)
    weights = qweight.codes.numel()
    bits = bits_per_weight(get_format(scheme.format), scheme.granularity, tuple(qweight.codes.shape),
                           scheme.scale_format)
    assert packed_bytes(layer) * 8 == pytest.approx(bits * weights, abs=1e-6)
    assert torch.equal(layer.dequantized_weight().view(torch.int32), qweight.dequantize().view(torch.int32))


def test_scales_fall_back_to_fp32_where_a_narrower_store_would_not_be_exact():
    from fpbench.kernels.packing import stored_scales

    values = torch.tensor([[0.5, 3.0e-8, 1.0 + 2.0**-12]])  # not all fp16 values
    stored, table = stored_scales(values, "fp16")
    assert stored.dtype == torch.float32 and table.numel() == 0 and torch.equal(stored, values)
    stored, table = stored_scales(torch.tensor([[0.25, 448.0]]), "fp8_e4m3", torch.tensor(2.0**-20))
    assert stored.dtype == torch.uint8 and torch.equal(table[stored.long()], torch.tensor([[0.25, 448.0]]) * 2.0**-20)


@pytest.mark.parametrize("name, message", [
    ("mxint8/g32/rtn", "integer elements"),
    ("mxfp4_e2m1/g32/rtn/a:mxfp8_e4m3-block-dynamic", "quantized activations"),
])
def test_block_schemes_without_a_kernel_are_one_line_errors(name, message):
    with pytest.raises(FpbenchError, match=message):
        check_kernel_scheme(Scheme.parse(name))


def test_block_schemes_with_a_kernel_pass_the_check():
    for name in BLOCK_SCHEMES:
        check_kernel_scheme(Scheme.parse(name))

"""Block formats on the compiled kernels: MX (E8M0 scales per 32) and NVFP4 (E4M3 scales
per 16 times an fp32 tensor scale) run as their element format with one scale per block,
bit-exact with the simulator."""

import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.kernels import build as kernels
from fpbench.kernels.linear import LutLinear, check_kernel_scheme, element_view, packed_bytes
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

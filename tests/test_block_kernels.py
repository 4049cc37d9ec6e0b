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
ISAS_HERE = [isa for isa in ("avx512", "avx2", "scalar")
             if kernels.ISAS.index(isa) >= kernels.ISAS.index(kernels.load().best_isa())]


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


def test_nvfp4_tensor_scale_is_folded_exactly():
    qweight = _weight("nvfp4/g16/rtn")
    assert qweight.tensor_scale is not None
    view = element_view(qweight)
    assert view.format == "fp4_e2m1" and view.granularity == Granularity("group", 16)
    assert torch.equal(view.scales, (qweight.scales * qweight.tensor_scale).float())


@pytest.mark.parametrize("name", ["mxfp4_e2m1/g32/rtn", "nvfp4/g16/rtn"])
def test_packed_bytes_follow_the_format(name):
    qweight = _weight(name)
    layer = LutLinear(qweight)
    weights = qweight.codes.numel()
    # 4-bit codes, and one fp32 scale per block in the kernel's buffers
    block = Scheme.parse(name).granularity.group_size
    assert packed_bytes(layer) == weights // 2 + 4 * weights // block
    # the format itself stores 8-bit scales: 4.25 (MX) and 4.5 (NVFP4, plus the tensor scale) bits
    expected = 4 + 8 / block
    scheme = Scheme.parse(name)
    assert bits_per_weight(get_format(scheme.format), scheme.granularity, tuple(qweight.codes.shape),
                           scheme.scale_format) == pytest.approx(expected + (32 / weights if block == 16 else 0))


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

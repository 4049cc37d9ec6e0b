"""The compiled kernels: exact dequantization (every FP6 code, subnormals included) and
outputs equal to a float64 reference within the fp32 summation bound, on every ISA."""

import pytest
import torch

from fpbench import kernels
from fpbench.formats import get_format
from fpbench.packing import pack_fp6, pack_int4
from fpbench.quant import quantize_weight
from fpbench.scheme import Granularity

ISAS_HERE = [isa for isa in ("avx512", "avx2", "scalar")
             if kernels.ISAS.index(isa) >= kernels.ISAS.index(kernels.load().best_isa())]


@pytest.fixture(scope="module")
def module():
    return kernels.load()


def _bound(x, w, k):
    # |fl(sum) - sum| <= gamma_{K+2} * sum |x||w| (FMA chain, reduction, scale multiply).
    return (k + 2) * 2.0**-24 * (x.abs().double() @ w.abs().double().T) + 1e-30


def test_build_key_depends_on_cpu_flags(monkeypatch):
    key = kernels.build_key()
    assert key in str(kernels.build_dir())
    monkeypatch.setattr(kernels, "cpu_flags", lambda: ["avx2", "fma", "f16c"])
    assert kernels.build_key() != key


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_fp6_decodes_every_code_exactly(module, isa):
    fmt = get_format("fp6_e3m2")
    codes = (torch.arange(64 * 256) % 64).reshape(64, 256).to(torch.uint8)
    scales = torch.ones(64)
    weights = module.fp6_dequantize(*pack_fp6(codes), scales, 256, isa)
    assert torch.equal(weights, fmt.decode(codes))
    # the independent reference: ml_dtypes' float6_e3m2fn bit patterns
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np
    reference = np.arange(64, dtype=np.uint8).view(ml_dtypes.float6_e3m2fn).astype(np.float32)
    assert torch.equal(weights[0, :64], torch.from_numpy(reference))
    assert weights[0, 1] == 0.0625 and weights[0, 3] == 0.1875  # subnormals survive


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("shape", [(48, 576), (20, 256), (33, 1000)])
def test_fp6_dequantize_equals_quantized_weight(module, isa, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    w[0, :5] = torch.tensor([1e-3, -2e-3, 5e-4, 0.0, -0.0])  # tiny values land on subnormal codes
    qweight = quantize_weight(w, "fp6_e3m2", Granularity.parse("channel"))
    assert (qweight.codes & 31 < 4).any()  # subnormal codes present
    got = module.fp6_dequantize(*pack_fp6(qweight.codes), qweight.scales.reshape(-1), shape[1], isa)
    assert torch.equal(got, qweight.dequantize())


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17, 64])
def test_fp6_linear_matches_float64(module, isa, m):
    n, k = 40, 576
    gen = torch.Generator().manual_seed(m)
    qweight = quantize_weight(torch.randn(n, k, generator=gen), "fp6_e3m2", Granularity.parse("channel"))
    weight = qweight.dequantize()
    x = torch.randn(m, k, generator=gen)
    for gemm_min_m in (16, 10_000):  # tiled-GEMM path and streaming path
        y = module.fp6_linear(x, *pack_fp6(qweight.codes), qweight.scales.reshape(-1), gemm_min_m, isa)
        err = (y.double() - x.double() @ weight.double().T).abs()
        assert y.shape == (m, n) and bool((err <= _bound(x, weight, k)).all()), float(err.max())


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("m", [1, 3, 8, 20])
def test_int4_linear_matches_float64(module, isa, m):
    n, k = 24, 384
    gen = torch.Generator().manual_seed(10 + m)
    qweight = quantize_weight(torch.randn(n, k, generator=gen), "int4", Granularity.parse("group:128"))
    weight = qweight.dequantize()
    packed = pack_int4(qweight.codes)
    assert torch.equal(module.int4_dequantize(packed, qweight.scales, isa), weight)
    x = torch.randn(m, k, generator=gen)
    for gemm_min_m in (16, 10_000):
        y = module.int4_linear(x, packed, qweight.scales, gemm_min_m, isa)
        err = (y.double() - x.double() @ weight.double().T).abs()
        assert bool((err <= _bound(x, weight, k)).all()), float(err.max())


def test_stream_bandwidth_is_positive(module):
    assert module.stream_read_gbps(torch.ones(1 << 20, dtype=torch.int64), 2) > 0


def test_unknown_isa_is_a_clear_error():
    from fpbench.errors import FpbenchError
    with pytest.raises(FpbenchError, match="unknown"):
        kernels.isa("neon")

"""The compiled kernels: exact dequantization (every FP6 code, subnormals included) and
outputs equal to a float64 reference within the fp32 summation bound, on every ISA."""

import pytest
import torch

from fpbench.kernels import build as kernels
from fpbench.quant.formats import get_format
from fpbench.kernels.packing import pack_fp6, pack_int4
from fpbench.quant.weights import quantize_weight
from fpbench.quant.scheme import Granularity

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
    # Flags that differ from this machine's, whichever CPU runs the test: drop one
    # flag it has, or add one it lacks.
    here = kernels.cpu_flags()
    other = here[:-1] if here else ["avx2"]
    monkeypatch.setattr(kernels, "cpu_flags", lambda: other)
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
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 20])  # every 4-row tile tail
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


# ---------------------------------------------------------------- register tiles, bf16 path

TILE_BATCHES = [1, 2, 3, 7, 8, 9, 33]


def _fp6_case(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[0, :4] = torch.tensor([1e-3, -2e-3, 5e-4, -0.0])  # subnormal codes
    qweight = quantize_weight(w, "fp6_e3m2", Granularity.parse("channel"))
    return qweight, qweight.dequantize(), gen


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("m", TILE_BATCHES)
@pytest.mark.parametrize("n,k", [(37, 200), (9, 1000), (13, 100), (6, 300)])  # 100, 300: a final half block
def test_fp6_tiles_match_float64(module, isa, m, n, k):
    # N not a multiple of the 4-row tile, K not a multiple of 32 (zero-padded to a multiple of 128).
    qweight, weight, gen = _fp6_case(n, k, m)
    x = torch.randn(m, k, generator=gen)
    y = module.fp6_linear(x, *pack_fp6(qweight.codes), qweight.scales.reshape(-1), 10**9, isa)
    err = (y.double() - x.double() @ weight.double().T).abs()
    assert y.shape == (m, n) and bool((err <= _bound(x, weight, k)).all()), float(err.max())


@pytest.mark.parametrize("m", [1, 9])
def test_fp6_and_int4_many_chunks(module, m):
    # N = 201 rows of K = 4096: several 256 KiB row chunks, several chunks per thread.
    n, k = 201, 4096
    qweight, weight, gen = _fp6_case(n, k, 5)
    packed = (*pack_fp6(qweight.codes), qweight.scales.reshape(-1))
    x = torch.randn(m, k, generator=gen)
    y = module.fp6_linear(x, *packed, 10**9, "auto")
    assert bool(((y.double() - x.double() @ weight.double().T).abs() <= _bound(x, weight, k)).all())
    xb = x.bfloat16()
    yb = module.fp6_linear_bf16(xb, *packed, 10**9, "auto", True)
    assert bool(((yb.double() - _bf16_reference(xb, weight)).abs() <= _bf16_bound(xb, weight, k)).all())
    q4 = quantize_weight(torch.randn(n, k, generator=gen), "int4", Granularity.parse("group:128"))
    w4 = q4.dequantize()
    y4 = module.int4_linear(x, pack_int4(q4.codes), q4.scales, 10**9, "auto")
    assert bool(((y4.double() - x.double() @ w4.double().T).abs() <= _bound(x, w4, k)).all())


def _bf16_reference(x_bf16, weight):
    return x_bf16.double() @ weight.double().T


def _bf16_bound(x_bf16, weight, k):
    # fp32 summation of exact bf16 x bf16 products, plus vdpbf16ps reading bf16 denormal
    # inputs as zero (|x| < 2^-126 each).
    return _bound(x_bf16.float(), weight, k) + k * 2.0**-126 * float(weight.abs().max())


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("m", TILE_BATCHES)
def test_fp6_bf16_matches_float64(module, isa, m):
    n, k = 37, 576
    qweight, weight, gen = _fp6_case(n, k, 20 + m)
    x = torch.randn(m, k, generator=gen).bfloat16()
    packed = (*pack_fp6(qweight.codes), qweight.scales.reshape(-1))
    reference = _bf16_reference(x, weight)
    bound = _bf16_bound(x, weight, k)
    # Streaming path: fp32 result within the fp32 summation bound; the bf16 result is
    # exactly that fp32 result rounded to nearest even.
    y32 = module.fp6_linear_bf16(x, *packed, 10**9, isa, True)
    assert y32.dtype == torch.float32 and y32.shape == (m, n)
    assert bool(((y32.double() - reference).abs() <= bound).all()), float((y32.double() - reference).abs().max())
    y16 = module.fp6_linear_bf16(x, *packed, 10**9, isa, False)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.bfloat16())
    # GEMM path (from gemm_min_m rows): torch's bf16 GEMM rounds each dot product to
    # bf16 once before the fp32 scale (relative 2^-9); forced ISAs use the fp32 path.
    g32 = module.fp6_linear_bf16(x, *packed, 1, isa, True)
    gemm_bound = 1.01 * bound + 2.0**-8 * reference.abs()
    assert bool(((g32.double() - reference).abs() <= gemm_bound).all())
    assert torch.equal(module.fp6_linear_bf16(x, *packed, 1, isa, False), g32.bfloat16())


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("gemm_min_m", [1, 10**9])
@pytest.mark.parametrize("k", [256, 128])  # a full block; a half block only
def test_fp6_bf16_every_code_exact(module, isa, gemm_min_m, k):
    # Row n holds code (n + k) % 64 at column k; x row m is one-hot at column m, so
    # y[m, n] is a single product: fp6((n + m) % 64) * scale[n], exact in fp32.
    fmt = get_format("fp6_e3m2")
    n, m = 64, 33
    codes = ((torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 64).to(torch.uint8)
    scales = torch.rand(n, generator=torch.Generator().manual_seed(4)) + 0.5
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    x[torch.arange(m), torch.arange(m)] = 1.0
    y = module.fp6_linear_bf16(x, *pack_fp6(codes), scales, gemm_min_m, isa, True)
    expected = (fmt.decode(codes[:, :m]) * scales[:, None]).T
    assert torch.equal(y, expected)
    assert bool((codes[:, :m] & 31 < 4).any())  # subnormal codes included


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("m", TILE_BATCHES)
def test_int4_bf16_matches_float64(module, isa, m):
    n, k = 21, 384  # odd N: the 2-row tile's tail
    gen = torch.Generator().manual_seed(40 + m)
    qweight = quantize_weight(torch.randn(n, k, generator=gen), "int4", Granularity.parse("group:128"))
    weight = qweight.dequantize()
    x = torch.randn(m, k, generator=gen).bfloat16()
    packed = pack_int4(qweight.codes)
    y32 = module.int4_linear_bf16(x, packed, qweight.scales, 10**9, isa, True)
    err = (y32.double() - _bf16_reference(x, weight)).abs()
    assert bool((err <= _bf16_bound(x, weight, k)).all()), float(err.max())
    assert torch.equal(module.int4_linear_bf16(x, packed, qweight.scales, 10**9, isa, False), y32.bfloat16())


def test_forced_isa_names(module):
    assert kernels.ISAS.index(module.best_isa()) >= 1
    with pytest.raises(RuntimeError, match="isa must be"):
        module.fp6_linear(torch.zeros(1, 256), *pack_fp6(torch.zeros(1, 256, dtype=torch.uint8)),
                          torch.ones(1), 16, "sse")

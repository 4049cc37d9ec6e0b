"""The compiled kernels: every code of every format decodes to QuantizedWeight's exact
value, and outputs equal a float64 reference within the fp32 summation bound, on every
ISA this CPU has."""

import numpy as np
import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.kernels import build as kernels
from fpbench.kernels.packing import code_bits, code_indices, decode_params, pack_codes, value_table
from fpbench.quant.formats import get_format
from fpbench.quant.scheme import Granularity
from fpbench.quant.weights import QuantizedWeight, quantize_weight

ISAS_HERE = kernels.runnable_isas()
BLOCKED_MIN_ROWS = kernels.load().blocked_min_rows()  # x rows from which the SIMD ISAs take the blocked GEMM
FORMATS = ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "fp8_e3m4",
           "int4", "int4_asym", "int8", "int8_asym"]


@pytest.fixture(scope="module")
def module():
    return kernels.load()


def _bound(x, w, k):
    # |fl(sum) - sum| <= gamma_{K} * sum |x||w| (products of exact weights, fp32 adds).
    return (k + 2) * 2.0**-24 * (x.abs().double() @ w.abs().double().T) + 1e-30


def _call(module, qweight, isa, x=None):
    bits = code_bits(qweight.format)
    plane_a, plane_b = pack_codes(code_indices(qweight.codes, qweight.format), bits)
    n, k = qweight.codes.shape
    group = qweight.granularity.group_size if qweight.granularity.kind == "group" else k
    zeros = torch.empty(0) if qweight.zero_points is None else qweight.zero_points.float().contiguous()
    args = (plane_a, torch.empty(0, dtype=torch.uint8) if plane_b is None else plane_b, value_table(qweight.format),
            qweight.scales.float().contiguous(), zeros, bits, k, group, decode_params(qweight.format), isa)
    if x is None:
        return module.lut_dequantize(*args)
    return module.lut_linear(x, *args)


def _every_code(fmt_name, n, k, finite=False):
    """Codes [n, k] that cycle through every code of the format (shifted per row); with
    ``finite``, every code of a finite value."""
    fmt = get_format(fmt_name)
    if fmt.family == "int":
        values = torch.arange(fmt.qmin, fmt.qmax + 1)
        dtype = torch.int8 if fmt.symmetric else torch.uint8
    else:
        values = torch.arange(1 << fmt.bits)
        if finite:
            values = values[value_table(fmt_name).isfinite()]
        dtype = torch.uint8
    index = (torch.arange(k)[None, :] + 7 * torch.arange(n)[:, None]) % len(values)
    return values[index].to(dtype)


def test_build_key_depends_on_cpu_flags(monkeypatch):
    key = kernels.build_key()
    assert key in str(kernels.build_dir())
    # Flags that differ from this machine's, whichever CPU runs the test: drop one
    # flag it has, or add one it lacks.
    here = kernels.cpu_flags()
    other = here[:-1] if here else ["avx2"]
    monkeypatch.setattr(kernels, "cpu_flags", lambda: other)
    assert kernels.build_key() != key


def test_value_tables_against_ml_dtypes():
    # The independent reference for the float tables: ml_dtypes' own decoders.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for name, dtype in [("fp4_e2m1", "float4_e2m1fn"), ("fp6_e2m3", "float6_e2m3fn"),
                        ("fp6_e3m2", "float6_e3m2fn"), ("fp8_e4m3", "float8_e4m3fn"),
                        ("fp8_e5m2", "float8_e5m2"), ("fp8_e3m4", "float8_e3m4")]:
        bits = get_format(name).bits
        reference = np.arange(1 << bits, dtype=np.uint8).view(getattr(ml_dtypes, dtype)).astype(np.float32)
        np.testing.assert_array_equal(value_table(name).numpy(), reference, err_msg=name)
    # symmetric int4 is -7..7 in two's complement; index 8 (-8) is never stored
    assert value_table("int4").tolist() == list(range(8)) + [0] + list(range(-7, 0))


def _every_code_weight(fmt, granularity, finite=False):
    """Every code of the format (``finite``: of a finite value) at every position of 9 rows
    x 320 (5 units; group:128 leaves a ragged last group of 64), with random scales (and
    zero points)."""
    gran = Granularity.parse(granularity)
    n, k = 9, 320
    groups = 1 if gran.kind == "channel" else -(-k // gran.group_size)
    gen = torch.Generator().manual_seed(1)
    scales = torch.rand(n, groups, generator=gen) + 0.5
    zeros = torch.rand(n, groups, generator=gen) * 15 if fmt.endswith("_asym") else None
    return QuantizedWeight(_every_code(fmt, n, k, finite), scales, zeros, fmt, gran)


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity", ["channel", "group:16", "group:32", "group:128"])
def test_every_code_dequantizes_exactly(module, isa, fmt, granularity):
    qweight = _every_code_weight(fmt, granularity)
    got = _call(module, qweight, isa)
    expected = qweight.dequantize()
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())  # bit for bit (inf included)


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("fmt", ["fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "fp8_e3m4"])
def test_signed_and_zero_scales_multiply_exactly(module, isa, fmt):
    # Sign-magnitude decodes move the code's sign bit into the scaled value: with scales
    # of either sign and zero, each product must still equal value * scale.
    qweight = _every_code_weight(fmt, "channel", finite=True)
    qweight.scales[::2] *= -1
    qweight.scales[3] = 0.0
    eye = torch.eye(qweight.codes.shape[1])
    gemv = torch.cat([_call(module, qweight, isa, eye[i:i + 4]) for i in range(0, len(eye), 4)])
    assert torch.equal(gemv.T, qweight.dequantize())


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("fmt", FORMATS)
# group:96: a unit's two halves now in one group, now in two
@pytest.mark.parametrize("granularity", ["channel", "group:16", "group:32", "group:96", "group:128"])
def test_every_code_multiplies_exactly(module, isa, fmt, granularity):
    # The GEMV's own decode (not the dequantization path: for FP6 E3M2 on AVX2 they
    # differ) and the blocked GEMM's panels: with one-hot rows of x, y[m, n] is the single
    # product w[n, m] * 1, which must be the dequantized weight bit for bit, for every
    # code at every position. Up to 4 rows per call take the GEMV, all of them the GEMM.
    # Finite codes only: an inf or NaN weight times a 0 of x is NaN.
    qweight = _every_code_weight(fmt, granularity, finite=True)
    eye = torch.eye(qweight.codes.shape[1])
    assert BLOCKED_MIN_ROWS > 4
    gemv = torch.cat([_call(module, qweight, isa, eye[i:i + 4]) for i in range(0, len(eye), 4)])
    assert torch.equal(gemv.T, qweight.dequantize())
    assert torch.equal(_call(module, qweight, isa, eye).T, qweight.dequantize())


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_large_gemv_computes_every_row(module, isa):
    # From 2^22 weights the rows go to threads in chunks from a shared counter: 4100 rows
    # (not a multiple of any chunk) x 1024, each output within the fp32 bound.
    gen = torch.Generator().manual_seed(3)
    qweight = quantize_weight(torch.randn(4100, 1024, generator=gen), "int4", Granularity.parse("group:128"))
    x = torch.randn(2, 1024, generator=gen)
    w = qweight.dequantize()
    error = (_call(module, qweight, isa, x).double() - x.double() @ w.double().T).abs()
    assert bool((error <= _bound(x, w, 1024)).all())


ML_DTYPES = {"fp4_e2m1": "float4_e2m1fn", "fp6_e2m3": "float6_e2m3fn", "fp6_e3m2": "float6_e3m2fn",
             "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "fp8_e3m4": "float8_e3m4"}
DECODERS = {"fp4_e2m1": "table", "int4": "table", "int4_asym": "table",  # 4-bit: one vpshufb per 32 codes
            "fp6_e2m3": "sign_magnitude", "fp6_e3m2": "fp16_nibble",  # 6-bit: 2 tables and a sign; vcvtph2ps
            "fp8_e4m3": "float_special", "fp8_e5m2": "float_special", "fp8_e3m4": "float_special",
            "int8": "signed_int", "int8_asym": "unsigned_int"}


def test_every_format_gets_its_arithmetic_decoder(module):
    # The exactness tests below would also pass on the table fallback: pin the decoder.
    for fmt in FORMATS:
        assert module.decoder(code_bits(fmt), decode_params(fmt)) == DECODERS[fmt], fmt
    # Beyond the arithmetic decoders' reach (the product 2^(127 - bias) overflows): the table.
    assert module.decoder(8, [3, 4, 3, -5, 1]) == "table"
    assert module.decoder(6, [1, 0, 0, 0, 0]) == "table"  # no 6-bit integer decoder
    assert module.decoder(8, [3, 5, 2, 15, 0]) == "table"  # E = 31 would be inf in fp16


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp8_e3m4"])
def test_special_value_decode_only_in_layers_that_hold_a_special_code(module, isa, fmt):
    # The blend that writes inf/NaN patterns is dropped for a layer of finite codes and
    # kept where one inf or NaN code sits anywhere, here the last byte of the last row;
    # either way every code decodes to its table value, in the dequantization and the GEMV.
    table = value_table(fmt)
    special = torch.nonzero(~table.isfinite()).flatten()
    n, k = 3, 256
    for code in (None, *special.tolist()):
        codes = _every_code(fmt, n, k, finite=True)
        if code is not None:
            codes[-1, -1] = code
        plane_a, _ = pack_codes(codes, 8)
        layer = module.KernelLinear(plane_a, torch.empty(0, dtype=torch.uint8), table, torch.ones(n, 1),
                                    torch.empty(0), 8, k, k, decode_params(fmt), isa, None, None, None)
        assert layer.decoder() == ("float" if code is None else "float_special"), (fmt, code)
        expected = table[codes.long()]
        got = layer.dequantize()
        assert torch.equal(got.isnan(), expected.isnan()), (fmt, code)
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()), (fmt, code)
        x = torch.zeros(1, k)
        x[0, -1] = 1.0  # y[0, row] = w[row, K - 1], and a non-finite code's row not finite
        y = layer.forward(x)
        assert torch.equal(y.isfinite(), expected[:, -1].isfinite()[None, :]), (fmt, code)
        assert torch.equal(y[0, :-1], expected[:-1, -1]), (fmt, code)


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_six_bit_table_that_is_not_sign_magnitude_keeps_the_full_lookup(module, isa):
    # FP6 E2M3's decode parameters promise sign-magnitude codes; a table that breaks it (a
    # negative code made positive; a NaN, whose pattern drops the sign) must still decode
    # code by code, through the 4-table lookup: dequantization, GEMV and GEMM alike.
    k = 64
    codes = torch.arange(k, dtype=torch.uint8)[None, :].repeat(2, 1)
    plane_a, plane_b = pack_codes(codes, 6)

    def args(table):
        return (plane_a, plane_b, table, torch.ones(2, 1), torch.empty(0), 6, k, k, decode_params("fp6_e2m3"), isa)

    flipped = value_table("fp6_e2m3").clone()
    flipped[40] = -flipped[40]
    assert torch.equal(module.lut_dequantize(*args(flipped)), flipped.expand(2, k))
    eye = torch.eye(k)
    for x in (eye[:4], eye):  # the GEMV, and the blocked GEMM: y[m, n] = w[n, m]
        assert torch.equal(module.lut_linear(x, *args(flipped)), flipped[: len(x), None].expand(len(x), 2))
    with_nan = value_table("fp6_e2m3").clone()
    with_nan[63] = float("nan")
    got = module.lut_dequantize(*args(with_nan))
    assert got[:, 63].isnan().all() and torch.equal(got[:, :63], with_nan[:63].expand(2, 63))


def _codes_at_unit_scale(module, fmt, isa):
    """Kernel values of every code at scale 1, codes in order along K (padded to 64)."""
    bits, width = get_format(fmt).bits, code_bits(fmt)
    codes = (torch.arange(max(64, 1 << bits)) % (1 << bits)).to(torch.uint8)[None, :]
    plane_a, plane_b = pack_codes(codes, width)
    k = codes.shape[1]
    return module.lut_dequantize(plane_a, torch.empty(0, dtype=torch.uint8) if plane_b is None else plane_b,
                                 value_table(fmt), torch.ones(1, 1), torch.empty(0), width, k, k,
                                 decode_params(fmt), isa)[0, : 1 << bits]


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("fmt", list(ML_DTYPES))
def test_float_codes_bit_for_bit_against_ml_dtypes(module, isa, fmt):
    # Every code, compared as fp32 bit patterns: zero and negative zero, the smallest and
    # largest subnormal, the smallest normal, the largest normal, inf; NaN where defined.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    n = 1 << get_format(fmt).bits
    reference = np.arange(n, dtype=np.uint8).view(getattr(ml_dtypes, ML_DTYPES[fmt])).astype(np.float32)
    got = _codes_at_unit_scale(module, fmt, isa).numpy()
    nan = np.isnan(reference)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.int32)[~nan], reference.view(np.int32)[~nan])
    mbits = get_format(fmt).mbits
    edges = {"negative zero": n // 2, "smallest subnormal": 1, "largest subnormal": (1 << mbits) - 1,
             "smallest normal": 1 << mbits, "largest normal": int(np.argmax(np.where(nan, 0, reference)))}
    for name, code in edges.items():
        assert got.view(np.int32)[code] == reference.view(np.int32)[code], (fmt, name)
    assert np.signbit(got[n // 2]) and got[n // 2] == 0


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("fmt", FORMATS)
def test_table_fallback_agrees_with_the_arithmetic_decoders(module, isa, fmt):
    table_decode = [0, 0, 0, 0, 0]
    assert module.decoder(code_bits(fmt), table_decode) == "table"
    qweight = QuantizedWeight(_every_code(fmt, 3, 256), torch.rand(3, 2) + 0.5,
                              torch.rand(3, 2) * 15 if fmt.endswith("_asym") else None, fmt,
                              Granularity.parse("group:128"))
    native = _call(module, qweight, isa)
    bits = code_bits(fmt)
    plane_a, plane_b = pack_codes(code_indices(qweight.codes, fmt), bits)
    zeros = torch.empty(0) if qweight.zero_points is None else qweight.zero_points.float().contiguous()
    table = module.lut_dequantize(plane_a, torch.empty(0, dtype=torch.uint8) if plane_b is None else plane_b,
                                  value_table(fmt), qweight.scales.float().contiguous(), zeros, bits, 256, 128,
                                  table_decode, isa)
    assert torch.equal(native.isnan(), table.isnan())
    assert torch.equal(native.nan_to_num(), table.nan_to_num())


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_flush_denormal_mode_does_not_change_results(module, isa):
    # The float decoders build fp32 subnormal patterns; FTZ/DAZ set by the caller would
    # zero them (E4M3's subnormal codes would decode to 0).
    qweight = quantize_weight(torch.randn(16, 256) * torch.logspace(-6, 0, 256), "fp8_e4m3",
                              Granularity.parse("channel"))
    x = torch.randn(2, 256)
    expected_w, expected_y = _call(module, qweight, isa), _call(module, qweight, isa, x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the mode is per thread: run the kernel on this one
    if not torch.set_flush_denormal(True):
        torch.set_num_threads(threads)
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        got_w, got_y = _call(module, qweight, isa), _call(module, qweight, isa, x)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert torch.equal(got_w, expected_w) and torch.equal(got_y, expected_y)
    assert torch.equal(got_w, qweight.dequantize())


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("fmt", FORMATS)
# GEMV: every 4-row tile tail; blocked GEMM: a full and a padded block of x rows.
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, BLOCKED_MIN_ROWS, 2 * BLOCKED_MIN_ROWS + 1])
def test_linear_matches_float64(module, isa, fmt, m):
    gen = torch.Generator().manual_seed(m)
    n, k = 37, 576  # blocked GEMM: panels of 24 + 13 rows (register blocks 6, 6, 1), slices 256 + 256 + 64
    w = torch.randn(n, k, generator=gen)
    w[0, :4] = torch.tensor([1e-4, -2e-4, 0.0, -0.0])  # small values land on subnormal codes
    for granularity in ("channel", "group:32", "group:128"):  # K = 576: a last group of 64
        qweight = quantize_weight(w, fmt, Granularity.parse(granularity))
        weight = qweight.dequantize()
        x = torch.randn(m, k, generator=gen)
        y = _call(module, qweight, isa, x)
        err = (y.double() - x.double() @ weight.double().T).abs()
        assert bool((err <= _bound(x, weight, k)).all()), (granularity, float(err.max()))


@pytest.mark.parametrize("fmt", ["fp6_e3m2", "int4_asym"])
@pytest.mark.parametrize("m", [3, BLOCKED_MIN_ROWS + 1])
def test_isas_agree_on_large_rows(module, fmt, m):
    # Many rows per thread and a long K: the threaded split and the prefetch distance; for
    # the blocked GEMM, K = 2048 + 2048 + 64 spans three column panels, the last ragged.
    k = 4160
    qweight = quantize_weight(torch.randn(300, k), fmt, Granularity.parse("group:128"))
    x = torch.randn(m, k)
    outputs = [_call(module, qweight, isa, x) for isa in ISAS_HERE]
    weight = qweight.dequantize()
    for y in outputs:
        assert bool(((y.double() - x.double() @ weight.double().T).abs() <= _bound(x, weight, k)).all())
    if m >= BLOCKED_MIN_ROWS:  # the GEMM's AVX-512 and AVX2 blocks: the same FMAs in the same order
        simd = [y for isa, y in zip(ISAS_HERE, outputs) if isa != "scalar"]
        assert all(torch.equal(y, simd[0]) for y in simd)


def test_stream_bandwidth_is_positive(module):
    buffer = torch.ones(8 * 2**20 // 8, dtype=torch.int64)
    for isa in ISAS_HERE:
        for streams in (1, 8):
            assert module.stream_read_gbps(buffer, 2, isa, streams) > 0


def test_unknown_isa_is_a_clear_error():
    with pytest.raises(FpbenchError, match="avx2"):
        kernels.isa("sse9")


def test_inexact_table_is_refused(module):
    qweight = quantize_weight(torch.randn(4, 64), "int4", Granularity.parse("channel"))
    plane_a, _ = pack_codes(code_indices(qweight.codes, "int4"), 4)
    table = value_table("int4") + 1e-3  # not exact in bf16: no silent rounding
    with pytest.raises(RuntimeError, match="not exact in bf16"):
        module.lut_dequantize(plane_a, torch.empty(0, dtype=torch.uint8), table, qweight.scales.contiguous(),
                              torch.empty(0), 4, 64, 64, decode_params("int4"), "auto")

"""fpbench bench on a tiny shape: records for torch's and fpbench's kernels, an honest roofline."""

import json
import time

import pytest
import torch

from fpbench.bench import kernels as bench
from fpbench.errors import FpbenchError


@pytest.fixture
def small_bench(monkeypatch):
    # Tiny buffers: the test checks the records, not the timings.
    monkeypatch.setattr(bench, "COLD_BYTES", 2 * 2**20)
    monkeypatch.setattr(bench, "BANDWIDTH_BUFFER_BYTES", 8 * 2**20)


def test_cold_copies_follow_the_largest_cache(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "107520K"), ("index4", "junk")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert bench.largest_cache_bytes(tmp_path) == 107520 * 2**10
    assert bench.cold_bytes(107520 * 2**10) == 4 * 107520 * 2**10
    assert bench.largest_cache_bytes(tmp_path / "absent") is None
    assert bench.cold_bytes(None) == bench.cold_bytes(8 * 2**20) == 128 * 2**20


def test_records_for_every_kernel(tmp_path, small_bench):
    names = ["torch_int8_bf16", "torch_int4_bf16", "int4/g128", "fp6_e3m2", "int4_asym/g32"]
    records = bench.run_bench([(256, 384)], [1, 3], names, repeats=3, out_dir=str(tmp_path), progress=False)
    expected = {"torch_fp32", "torch_bf16", "torch_int8_bf16", "torch_int4_bf16", "int4/g128",
                "fp6_e3m2/channel", "fp6_e3m2/g128", "int4_asym/g32"}
    assert {r["kernel"] for r in records} == expected
    by_kernel = {r["kernel"]: r for r in records if r["M"] == 1}
    # codes, and scales and zero points in fp16 (the default scale format), as a real layer stores them
    assert by_kernel["fp6_e3m2/channel"]["weight_bytes"] == 256 * 384 * 6 // 8 + 256 * 2
    assert by_kernel["int4_asym/g32"]["weight_bytes"] == 256 * 384 // 2 + 2 * 256 * 12 * 2
    for record in records:
        assert record["median_ms"] > 0 and record["min_ms"] <= record["median_ms"]
        assert record["bytes_read"] == record["weight_bytes"] + record["M"] * 384 * (
            2 if record["activation_dtype"] == "bfloat16" else 4)
        assert {"vs_bf16", "vs_fp32", "gbps", "roofline_fraction", "bandwidth_by_method"} <= set(record)
        # against the streaming read timed in the same cell's turns
        assert record["stream_gbps"] > 0
        # GB/s from the bytes and the median (the recorded gbps has 2 decimals, too few for a
        # slow kernel); the fraction is recorded to 3 decimals (the scalar ISA's 0.023: 5e-4 off)
        gbps = record["bytes_read"] / (record["median_ms"] * 1e6)
        assert record["stream_fraction"] == pytest.approx(gbps / record["stream_gbps"], rel=0.01, abs=5e-4)
        # at M = 1 also the pace with a slice of the weight in cache
        assert (record["cache_gbps"] > 0) if record["M"] == 1 else "cache_gbps" not in record
    cells = {(r["M"], r["stream_gbps"]) for r in records}
    assert len(cells) == 2  # one read a cell, the same for its kernels
    lines = (tmp_path / "bench.jsonl").read_text().splitlines()
    assert len(lines) == len(records) == 2 * len(expected)
    assert json.loads(lines[0])["N"] == 256
    assert "fp6_e3m2/channel" in bench.table(records) and "x_vs_fp32" in bench.table(records, "min_ms")
    assert "vs_read" in bench.table(records) and "cache GB/s" in bench.table(records)


def test_the_cache_rate_times_one_copy_of_a_slice_that_fits(monkeypatch, small_bench):
    # Every row, and the columns of a quarter of the last-level cache (8 MiB at most, 2 MiB
    # where none is reported), whole units and groups, at least 1024 and at most K:
    # 4096x14336 INT4 per channel (29.4 MB) keeps 4032 columns with a 32 MiB cache, 3840 in
    # groups of 384, 1024 with 8 MiB.
    int4 = 4096 * 14336 // 2 + 4096 * 2
    assert bench.cache_slice_k(14336, int4, 32 * 2**20) == 4032
    assert bench.cache_slice_k(14336, int4, 32 * 2**20, 384) == 3840
    assert bench.cache_slice_k(14336, int4, 8 * 2**20) == bench.cache_slice_k(14336, int4, None) == 1024
    assert bench.cache_slice_k(128, 64 * 128, 32 * 2**20) == 128
    prepared, timed = [], []
    real_prepare, real_resident = bench.prepare, bench.resident_seconds

    def spy_prepare(kernel, n, k, generator, copies=None):
        prepared.append((kernel, n, k, copies))
        return real_prepare(kernel, n, k, generator, copies)

    def spy_resident(p, x, repeats, warmup=2):
        timed.append((len(p.weights), tuple(x.shape)))
        return real_resident(p, x, repeats, warmup)

    monkeypatch.setattr(bench, "prepare", spy_prepare)
    monkeypatch.setattr(bench, "resident_seconds", spy_resident)
    monkeypatch.setattr(bench, "LARGEST_CACHE", 2 * 2**20)  # 512 KiB slices
    records = bench.run_bench([(256, 8192)], [1, 2], ["int4/g128", "int8/g128"], repeats=3, progress=False)
    kernels = ["torch_bf16", "torch_fp32", "int4/g128", "int8/g128"]
    # INT4 g128: 256 x 8192 / 2 bytes and 256 x 64 fp16 scales: 4032 -> 3968, whole groups.
    assert prepared == [(name, 256, 8192, None) for name in kernels] + [
        ("torch_bf16", 256, 1024, 1), ("torch_fp32", 256, 1024, 1), ("int4/g128", 256, 3968, 1),
        ("int8/g128", 256, 1920, 1)]
    assert timed == [(1, (1, 1024)), (1, (1, 1024)), (1, (1, 3968)), (1, (1, 1920))]  # M = 1 only, one copy
    assert all(("cache_gbps" in r) == (r["M"] == 1) for r in records)
    # A weight within the slice's bytes is timed whole, on its first copy.
    prepared.clear(), timed.clear()
    bench.run_bench([(64, 256)], [1], ["int4/channel"], repeats=3, progress=False)
    assert [args[3] for args in prepared] == [None] * 3 and timed == [(1, (1, 256))] * 3


def test_the_cells_read_is_timed_in_the_kernels_turns(monkeypatch, small_bench):
    # The read of each cell takes its turns among the kernels' calls, cycling cold copies as
    # they do, with one and eight streams a thread; the better of the two is the cell's.
    calls = []
    real = bench.interleaved_times

    def spy(prepared, xs, repeats, warmup=2):
        calls.append([p.weight_bytes for p in prepared])
        return real(prepared, xs, repeats, warmup)

    monkeypatch.setattr(bench, "interleaved_times", spy)
    records = bench.run_bench([(64, 200)], [1], ["torch_fp32"], repeats=3, progress=False)
    stream = -(-64 * 200 // 4096) * 4096
    assert calls == [[64 * 200 * 2, 64 * 200 * 4, stream, stream]]  # torch_bf16 joins as the reference
    reads = [bench.prepare_stream(s, 64, 200) for s in bench.STREAMS]
    assert [len(p.weights) for p in reads] == [bench.cold_copies(stream)] * 2
    assert all(reads[0].call(None, buffer) > 0 for buffer in reads[0].weights)
    assert records[0]["stream_gbps"] > 0


def test_bandwidth_is_the_best_method(monkeypatch):
    # The ceiling is the maximum over the read loops, so no loop (and no kernel that
    # streams no faster than the best of them) lands above it.
    monkeypatch.setattr(bench, "BANDWIDTH_BUFFER_BYTES", 8 * 2**20)
    monkeypatch.setattr(bench, "stream_methods", lambda: {"a": lambda b, r: 7.0, "b": lambda b, r: 19.5,
                                                          "c": lambda b, r: 11.0})
    best, each = bench.measure_bandwidth_gbps(1)
    assert best == 19.5 and each == {"a": 7.0, "b": 19.5, "c": 11.0}


def test_real_methods_include_every_isa_and_torch(monkeypatch):
    monkeypatch.setattr(bench, "BANDWIDTH_BUFFER_BYTES", 8 * 2**20)
    best, each = bench.measure_bandwidth_gbps(1)
    assert "torch_sum" in each and "read_scalar" in each and best == max(each.values()) > 0


@pytest.mark.parametrize("before, between, after, best", [(5.0, [6.0, 7.0], 8.0, 8.0), (5.0, [9.0, 6.0], 8.0, 9.0),
                                                             (9.5, [6.0, 7.0], 8.0, 9.5)])
def test_records_use_the_best_probe(monkeypatch, small_bench, before, between, after, best):
    # Probes before the kernels, after each shape's cells and after them all: every
    # fraction is computed against the best of them.
    probes = iter([(before, {"a": before}), *[(b, {"a": b}) for b in between], (after, {"a": after})])
    monkeypatch.setattr(bench, "measure_bandwidth_gbps", lambda repeats=5: next(probes))
    records = bench.run_bench([(64, 256), (32, 128)], [1], ["torch_fp32"], repeats=3, progress=False)
    assert next(probes, None) is None
    for record in records:
        assert record["bandwidth_gbps"] == best
        assert record["bandwidth_by_method"]["between_shapes"] == between
        assert record["roofline_fraction"] == round(bench.roofline_fraction(record["bytes_read"], best, record["median_ms"]), 3)


def test_roofline_fraction_uses_bytes_read():
    # 1 GB at 10 GB/s takes 100 ms: at 100 ms the fraction is 1, at 200 ms 0.5.
    assert bench.roofline_fraction(10**9, 10.0, 100.0) == pytest.approx(1.0)
    assert bench.roofline_fraction(10**9, 10.0, 200.0) == pytest.approx(0.5)
    # A kernel's fraction is at most 1 exactly when its bytes / time is at most the ceiling.
    assert bench.roofline_fraction(3 * 10**8, 10.0, 30.0) <= 1.0


def test_summary_compares_4_bit_kernels_with_their_8_bit_peers():
    # Per shape and batch: fpbench's kernels against torch bf16; at M = 1 also their share of
    # the read and each 4-bit kernel's time over its 8-bit peer's (same family, granularity
    # and activations), where both were timed.
    assert bench._eight_bit_peer("int4_asym/g128@bf16") == "int8/g128@bf16"
    assert bench._eight_bit_peer("mxfp4_e2m1/g32") == "mxfp8_e4m3/g32"
    assert bench._eight_bit_peer("fp4_e2m1/channel@bf16") == "fp8_e4m3/channel@bf16"

    def cell(kernel, m, ms, share, speed, cache=None):
        return {"kernel": kernel, "N": 64, "K": 128, "M": m, "median_ms": ms, "stream_fraction": share,
                "vs_bf16": speed, "stream_gbps": 40.0, **({} if cache is None else {"cache_gbps": cache})}

    records = [cell("torch_bf16", 1, 4.0, 0.3, 1.0), cell("int4/channel@bf16", 1, 1.0, 0.9, 4.0),
               cell("int8/channel@bf16", 1, 2.5, 0.8, 1.6), cell("fp4_e2m1/g128@bf16", 1, 1.2, 0.7, 3.3),
               cell("fp8_e4m3/g128@bf16", 1, 2.0, 0.95, 2.0), cell("nvfp4/g16@bf16", 1, 1.5, 0.6, 2.7),
               cell("int4/channel@bf16", 64, 9.0, 0.1, 0.95)]
    first, second = bench.summary(records).splitlines()
    assert first == ("64x128, M = 1: 5 kernels at 1.60-4.00x torch bf16, 0.60-0.95 of the read in their turns "
                     "(lowest: nvfp4/g16@bf16 0.60, fp4_e2m1/g128@bf16 0.70); 4-bit / 8-bit time 0.40-0.60")
    assert second == "64x128, M = 64: 1 kernel at 0.95-0.95x torch bf16"
    # Kernels slower than the read even with the weight in cache: named, slowest first, three at most.
    paced = [cell("torch_bf16", 1, 4.0, 0.3, 1.0, cache=12.0)] + [
        cell(f"fp6_e3m2/g{g}@bf16", 1, 1.0, 0.5, 4.0, cache=c) for g, c in ((16, 31.0), (32, 25.5), (64, 39.9),
                                                                          (128, 40.0), (256, 28.0), (512, 33.0))]
    assert bench.summary(paced).endswith(
        "; below the read (40.0 GB/s) even in cache, so paced by their decode: fp6_e3m2/g32@bf16 25.5, "
        "fp6_e3m2/g256@bf16 28.0, fp6_e3m2/g16@bf16 31.0 GB/s and 2 more")


def test_kernel_names_expand_and_unknown_ones_are_clear():
    assert bench.parse_kernels(["fp8_e4m3", "torch_bf16"]) == ["fp8_e4m3/channel", "fp8_e4m3/g128", "torch_bf16"]
    with pytest.raises(FpbenchError, match="unknown kernel 'fp5_e2m2'"):
        bench.parse_kernels(["fp5_e2m2"])
    with pytest.raises(FpbenchError, match="unknown kernel"):
        bench.prepare("fpbench_fp5", 64, 256, torch.Generator())


def test_shapes_need_whole_units_and_torch_int4_whole_groups(small_bench):
    assert bench.parse_shapes("576x576,1536x576") == [(576, 576), (1536, 576)]
    for bad in ("576x600", "0x576", "576x0", "576"):
        with pytest.raises(FpbenchError, match="shape"):
            bench.parse_shapes(bad)
    with pytest.raises(FpbenchError, match="torch_int4_bf16 needs K a multiple of 128"):
        bench.run_bench([(64, 576)], [1], ["torch_int4_bf16", "int4/g128"], repeats=3, progress=False)
    # The default list leaves torch's INT4 kernel out on such K; fpbench's g128 kernels take
    # the shorter last group (576 = 4 x 128 + 64).
    assert bench.check_shapes([(64, 576)], bench.parse_kernels(None), asked=False) == [
        name for name in bench.KERNELS if name != "torch_int4_bf16"]
    records = bench.run_bench([(64, 576)], [1], ["int4/g128", "fp6_e3m2/channel"], repeats=3, progress=False)
    assert {r["kernel"] for r in records} == {"torch_fp32", "torch_bf16", "int4/g128", "fp6_e3m2/channel"}
    assert {r["K"] for r in records} == {576}


def test_bf16_suffix_gives_bf16_activations():
    assert bench.parse_kernels(["nvfp4@bf16", "int4/g128@bf16"]) == ["nvfp4/g16@bf16", "int4/g128@bf16"]
    # The default: the torch kernels and fpbench's with bf16 x, as on the latency path.
    default = bench.parse_kernels(None)
    assert default[:4] == list(bench.TORCH_KERNELS) and "fp6_e3m2/channel@bf16" in default
    assert {"mxfp4_e2m1/g32@bf16", "mxfp6_e3m2/g32@bf16", "mxfp8_e4m3/g32@bf16", "nvfp4/g16@bf16"} <= set(default)
    assert all(name.endswith("@bf16") for name in default[4:])
    for wrong in ("int4/g128@fp16", "torch_fp32@bf16"):
        with pytest.raises(FpbenchError, match="only activation suffix is @bf16"):
            bench.parse_kernels([wrong])
    prepared = bench.prepare("int4/g128@bf16", 64, 256, torch.Generator())
    assert prepared.activation_dtype == torch.bfloat16
    x = torch.randn(16, 256).bfloat16()
    assert prepared.call(x, prepared.weights[0]).dtype == torch.bfloat16


def test_kernels_take_turns_call_by_call():
    # Each round calls every kernel once (its next weight copy), in an order that changes
    # between rounds; after a call on every copy (x's first row) and the warm-up round.
    order, rows = [], []
    prepared = [bench.Prepared([f"{name}0", f"{name}1"], 1, lambda x, w: order.append(w) or rows.append(len(x)),
                               torch.float32) for name in "abc"]
    times = bench.interleaved_times(prepared, [torch.zeros(5, 1)] * 3, repeats=8, warmup=1)
    assert order[:9] == ["a0", "a1", "b0", "b1", "c0", "c1", "a0", "b0", "c0"]
    assert rows == [1] * 6 + [5] * (3 + 8 * 3)
    rounds = [order[i:i + 3] for i in range(9, len(order), 3)]
    assert len(rounds) == 8
    for i, calls in enumerate(rounds):
        assert sorted(calls) == [f"{name}{(1 + i) % 2}" for name in "abc"]
    assert len({tuple(w[0] for w in calls) for calls in rounds}) > 1  # not one fixed order
    assert [len(t) for t in times] == [8, 8, 8] and all(s >= 0 for t in times for s in t)
    # the times land with their own kernel
    slow = [bench.Prepared([0], 1, lambda x, w, d=d: time.sleep(d), torch.float32) for d in (0.0, 0.004)]
    fast, slower = bench.interleaved_times(slow, [None, None], repeats=4, warmup=0)
    assert max(fast) < min(slower)

"""fpbench bench on a tiny shape: every kernel (bf16-activation ones included) gives a record."""

import json

import pytest
import torch

from fpbench.bench import kernels as bench
from fpbench.errors import FpbenchError


@pytest.fixture
def small_bench(monkeypatch):
    # Tiny buffers: the test checks the records, not the timings.
    monkeypatch.setattr(bench, "COLD_BYTES", 2 * 2**20)
    monkeypatch.setattr(bench, "BANDWIDTH_BUFFER_BYTES", 8 * 2**20)


def test_records_for_every_kernel(tmp_path, small_bench):
    records = bench.run_bench([(256, 384)], [1, 3], None, repeats=3, out_dir=str(tmp_path), progress=False)
    kernels_seen = {r["kernel"] for r in records}
    assert kernels_seen == set(bench.KERNELS)
    by_kernel = {r["kernel"]: r for r in records if r["M"] == 1}
    assert by_kernel["fpbench_fp6_bf16"]["activation_dtype"] == "bfloat16"
    assert by_kernel["fpbench_int4_bf16"]["activation_dtype"] == "bfloat16"
    assert by_kernel["fpbench_fp6"]["activation_dtype"] == "float32"
    for record in records:
        assert record["median_ms"] > 0 and record["min_ms"] <= record["median_ms"]
        assert {"kernel", "M", "N", "K", "median_ms", "gbps", "roofline_fraction", "vs_bf16"} <= set(record)
    lines = (tmp_path / "bench.jsonl").read_text().splitlines()
    assert len(lines) == len(records) == 2 * len(bench.KERNELS)
    assert json.loads(lines[0])["N"] == 256
    assert "fpbench_fp6_bf16" in bench.table(records)


def test_bf16_kernels_compute_the_product(small_bench):
    gen = torch.Generator().manual_seed(0)
    for name in ("fpbench_fp6_bf16", "fpbench_int4_bf16"):
        prepared = bench.prepare(name, 64, 256, gen)
        x = torch.randn(2, 256, generator=gen).bfloat16()
        y = prepared.call(x, prepared.weights[0])
        assert y.dtype == torch.bfloat16 and y.shape == (2, 64)


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(FpbenchError, match="unknown kernel"):
        bench.prepare("fpbench_fp5", 64, 256, torch.Generator())

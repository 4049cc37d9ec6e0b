"""Latency of weight-only linear kernels against torch's, and the bandwidth roofline.

For each (N, K) weight shape and batch M, every kernel multiplies x [M, K] by a weight
[N, K]. Weights are cold: each kernel cycles through enough distinct copies of its
weight that together they exceed ``COLD_BYTES`` (4x the last-level cache here), so every
call streams its weight from DRAM as in LLM decoding. Timing is the median of
``repeats`` calls after warm-up calls (and one call on every copy when a kernel's
weights are fresh). The roofline is the weight bytes divided by the
streaming-read bandwidth measured on the same machine just before (best of a few reads
of a 512 MiB buffer by all threads): ``roofline_fraction = (bytes / bandwidth) / median``.

Kernels (activations fp32 unless named): ``torch_fp32`` and ``torch_bf16`` (F.linear),
``torch_int8_bf16`` (``_weight_int8pack_mm``, per-channel), ``torch_int4_bf16``
(``_weight_int4pack_mm_for_cpu``, groups of 128), ``fpbench_int4`` (our INT4 g128) and
``fpbench_fp6`` (our FP6 E3M2 per-channel, 4+2 layout), and the same two with bf16
activations, ``fpbench_int4_bf16`` and ``fpbench_fp6_bf16`` (bf16 in and out, as in a
bf16 model: the like-for-like peers of torch_bf16). ``vs_bf16`` = torch_bf16's median /
this kernel's median (above 1 = faster than bf16).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fpbench.kernels import build as kernels
from fpbench.errors import FpbenchError
from fpbench.kernels.linear import GEMM_MIN_ROWS, GEMM_MIN_ROWS_BF16
from fpbench.kernels.packing import INT4_GROUP, pack_fp6, pack_int4
from fpbench.records.environment import environment, utc_now
from fpbench.records.schema import KERNEL_BENCH
from fpbench.records.store import append_jsonl

DEFAULT_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
DEFAULT_BATCHES = (1, 8, 64, 512)
KERNELS = ("torch_fp32", "torch_bf16", "torch_int8_bf16", "torch_int4_bf16", "fpbench_int4", "fpbench_fp6",
           "fpbench_int4_bf16", "fpbench_fp6_bf16")
COLD_BYTES = 128 * 2**20
BANDWIDTH_BUFFER_BYTES = 512 * 2**20


@dataclass
class Prepared:
    """Copies of one kernel's weight for one shape, and how to call it."""

    weights: list
    weight_bytes: int
    call: callable
    activation_dtype: torch.dtype


def parse_shapes(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return list(DEFAULT_SHAPES)
    shapes = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise FpbenchError(f"shape {item!r} is not NxK (e.g. 4096x4096,11008x4096)") from None
        if k % INT4_GROUP:
            raise FpbenchError(f"shape {item}: K must be a multiple of {INT4_GROUP} for the INT4 kernels")
        shapes.append((n, k))
    return shapes


def parse_batches(text: str | None) -> list[int]:
    if not text:
        return list(DEFAULT_BATCHES)
    try:
        batches = [int(v) for v in text.split(",")]
    except ValueError:
        raise FpbenchError(f"batches {text!r} must be comma-separated integers (e.g. 1,8,64)") from None
    if any(b < 1 for b in batches):
        raise FpbenchError(f"batches {text!r} must be >= 1")
    return batches


def measure_bandwidth_gbps(repeats: int = 5) -> float:
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 8, dtype=torch.int64)
    return float(kernels.load().stream_read_gbps(buffer, repeats))


def _copies(weight_bytes: int) -> int:
    return max(2, math.ceil(COLD_BYTES / weight_bytes))


def prepare(kernel: str, n: int, k: int, generator: torch.Generator) -> Prepared:
    """Random weights in the kernel's own storage (the values do not change the time)."""
    module = kernels.load()
    groups = k // INT4_GROUP
    if kernel in ("torch_fp32", "torch_bf16"):
        dtype = torch.float32 if kernel == "torch_fp32" else torch.bfloat16
        nbytes = n * k * torch.finfo(dtype).bits // 8
        weights = [torch.randn(n, k, generator=generator).to(dtype) for _ in range(_copies(nbytes))]
        return Prepared(weights, nbytes, lambda x, w: F.linear(x, w), dtype)
    if kernel == "torch_int8_bf16":
        nbytes = n * k + 2 * n
        weights = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator),
                    torch.rand(n, generator=generator).bfloat16()) for _ in range(_copies(nbytes))]
        return Prepared(weights, nbytes, lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1]), torch.bfloat16)
    if kernel == "torch_int4_bf16":
        nbytes = n * k // 2 + groups * n * 2 * 2
        weights = []
        for _ in range(_copies(nbytes)):
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            scale_zero = torch.stack([torch.rand(groups, n, generator=generator),
                                      torch.zeros(groups, n)], dim=-1).bfloat16()
            weights.append((packed, scale_zero))
        return Prepared(weights, nbytes, lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, w[0], INT4_GROUP, w[1]), torch.bfloat16)
    if kernel in ("fpbench_int4", "fpbench_int4_bf16"):
        nbytes = n * k // 2 + n * groups * 4
        weights = [(pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=generator)),
                    torch.rand(n, groups, generator=generator)) for _ in range(_copies(nbytes))]
        if kernel == "fpbench_int4_bf16":
            return Prepared(weights, nbytes, lambda x, w: module.int4_linear_bf16(
                x, w[0], w[1], GEMM_MIN_ROWS_BF16, "auto", False), torch.bfloat16)
        return Prepared(weights, nbytes, lambda x, w: module.int4_linear(x, w[0], w[1], GEMM_MIN_ROWS, "auto"),
                        torch.float32)
    if kernel in ("fpbench_fp6", "fpbench_fp6_bf16"):
        nbytes = n * k * 3 // 4 + n * 4
        weights = [(*pack_fp6(torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=generator)),
                    torch.rand(n, generator=generator)) for _ in range(_copies(nbytes))]
        if kernel == "fpbench_fp6_bf16":
            return Prepared(weights, nbytes, lambda x, w: module.fp6_linear_bf16(
                x, w[0], w[1], w[2], GEMM_MIN_ROWS_BF16, "auto", False), torch.bfloat16)
        return Prepared(weights, nbytes, lambda x, w: module.fp6_linear(x, w[0], w[1], w[2], GEMM_MIN_ROWS, "auto"),
                        torch.float32)
    raise FpbenchError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")


def time_calls(prepared: Prepared, x: torch.Tensor, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median and minimum milliseconds of one call, cycling through the weight copies.
    On a loaded machine the minimum is the least disturbed call; both are recorded."""
    copies = len(prepared.weights)
    for i in range(warmup):
        prepared.call(x, prepared.weights[i % copies])
    times = []
    for i in range(repeats):
        weight = prepared.weights[(warmup + i) % copies]
        start = time.perf_counter()
        prepared.call(x, weight)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def _repeats_for(m: int, n: int, k: int, repeats: int) -> int:
    # Large-batch GEMMs take tens of milliseconds each: fewer calls keep the run short.
    return max(3, repeats // 4) if m * n * k > 2**33 else repeats


def run_bench(shapes=None, batches=None, kernel_names=None, repeats: int = 21, out_dir: str | None = None,
              progress: bool = True) -> list[dict]:
    """Measure every kernel x shape x batch; returns (and appends to out_dir) the records."""
    shapes = list(shapes or DEFAULT_SHAPES)
    batches = list(batches or DEFAULT_BATCHES)
    kernel_names = list(kernel_names or KERNELS)
    if "torch_bf16" not in kernel_names:
        kernel_names.insert(0, "torch_bf16")  # the headline ratios need it
    module = kernels.load()
    bandwidth = measure_bandwidth_gbps()
    env = environment() | {"kernel_isa": module.best_isa(), "bandwidth_gbps": round(bandwidth, 2)}
    generator = torch.Generator().manual_seed(0)
    records = []
    steps = tqdm(total=len(shapes) * len(kernel_names) * len(batches), desc="bench", disable=not progress)
    for n, k in shapes:
        for kernel in kernel_names:
            prepared = prepare(kernel, n, k, generator)
            # One call on every copy first: on this VM the first pass over freshly
            # allocated weights ran up to 10x slower (no page faults counted), which the
            # few warm-up calls of the first cell did not cover.
            warm_x = torch.zeros(1, k, dtype=prepared.activation_dtype)
            for weight in prepared.weights:
                prepared.call(warm_x, weight)
            for m in batches:
                x = torch.randn(m, k, generator=generator).to(prepared.activation_dtype)
                median_ms, min_ms = time_calls(prepared, x, _repeats_for(m, n, k, repeats))
                gbps = prepared.weight_bytes / (median_ms * 1e-3) / 1e9
                records.append({"kernel": kernel, "M": m, "N": n, "K": k, "median_ms": round(median_ms, 4),
                                "min_ms": round(min_ms, 4),
                                "gbps": round(gbps, 2), "roofline_fraction": round(gbps / bandwidth, 3),
                                "weight_bytes": prepared.weight_bytes, "copies": len(prepared.weights),
                                "activation_dtype": str(prepared.activation_dtype).replace("torch.", ""), **env})
                steps.update()
            del prepared
    steps.close()
    bf16 = {(r["M"], r["N"], r["K"]): r["median_ms"] for r in records if r["kernel"] == "torch_bf16"}
    stamp = utc_now()
    for record in records:
        record["vs_bf16"] = round(bf16[(record["M"], record["N"], record["K"])] / record["median_ms"], 3)
        record["time"] = stamp
    if out_dir:
        append_jsonl(Path(out_dir) / "bench.jsonl", records, KERNEL_BENCH.name)
    return records


def table(records: list[dict], stat: str = "median_ms") -> str:
    """Markdown: one row per shape x batch; per kernel ``stat`` ms, x vs torch_bf16 (same
    statistic) and the roofline fraction at that time."""
    import pandas as pd

    frame = pd.DataFrame(records)
    bf16 = frame[frame.kernel == "torch_bf16"].set_index(["M", "N", "K"])[stat]
    frame["ratio"] = [bf16[(r.M, r.N, r.K)] / r[stat] for _, r in frame.iterrows()]
    frame["roof"] = frame["roofline_fraction"] * frame["median_ms"] / frame[stat]
    frame["cell"] = frame.apply(lambda r: f"{r[stat]:.3f} ({r['ratio']:.2f}x, {r['roof']:.0%})", axis=1)
    wide = frame.pivot_table(index=["N", "K", "M"], columns="kernel", values="cell", aggfunc="first")
    wide = wide[[k for k in KERNELS if k in wide.columns]]
    return wide.reset_index().to_markdown(index=False)

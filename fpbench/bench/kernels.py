"""Latency of weight-only linear kernels against torch's, and the bandwidth roofline.

For each (N, K) weight shape and batch M, every kernel multiplies x [M, K] by a weight
[N, K]. Weights are cold: each kernel cycles through enough distinct copies of its
weight that together they exceed ``COLD_BYTES`` (4x the last-level cache, at least 128
MiB), so every call streams its weight from DRAM as in LLM decoding. Timing is the
median of ``repeats`` calls after one call on every copy of every kernel and warm-up
calls, right before each cell's turns (``interleaved_times``).

Roofline: the streaming-read ceiling is the best of several read loops over a
``BANDWIDTH_BUFFER_BYTES`` buffer by all threads (the compiled loop with each ISA's
widest loads, one stream a thread and eight side by side, and torch's own sum), measured
before the kernels, after each kernel's cells (two passes a loop) and after them all:
other load on a shared machine comes and goes, and a kernel timed in a quiet spell once
streamed 51.7 GB/s against probes of 50.8 before and 44.1 after it. A kernel that reads
``bytes_read`` bytes (packed weights, scales, zero points and x) in ``median_ms`` is at
``roofline_fraction = bytes_read / (bandwidth * median)``, bandwidth the best probe.
The probe takes the maximum over methods so that no kernel can stream faster than "the
ceiling". Each cell also times a plain streaming read of N x K bytes (one and eight
streams a thread, the better kept) in the same turns as its kernels (``prepare_stream``):
``stream_gbps``, and ``stream_fraction`` = the kernel's GB/s over it, the share of what the
memory system gave a read loop in those very turns (the best probe may come from a faster
spell than the cell's). At M = 1 each kernel is also timed on a slice of its weight that
stays in the last-level cache (``cache_gbps``): where memory streams faster than a kernel
decodes, that pace, not the memory's, sets its share of the read.

Kernels: ``torch_fp32`` and ``torch_bf16`` (F.linear), ``torch_int8_bf16``
(``_weight_int8pack_mm``, per-channel), ``torch_int4_bf16``
(``_weight_int4pack_mm_for_cpu``, groups of 128), and fpbench's table-lookup kernel for
any ``FORMAT/GRANULARITY`` it supports (``int4/g128``, ``fp6_e3m2/channel``, ...; a bare
format name means both ``/channel`` and ``/g128``, a bare block format its own block:
``mxfp4_e2m1``, ``nvfp4``), with fp32 activations, or bf16 ones with the suffix ``@bf16``
(``int4/g128@bf16``: as a layer of a model whose rest runs in bf16; on a CPU with AVX-512
BF16 it takes the bf16 dot-product GEMV, or GEMM from ``bf16_gemm_min_rows()`` rows,
otherwise x is widened to fp32 as before). The default list (``KERNELS``) takes bf16 x, as
a model's kernel layers get it on the latency path. ``vs_bf16`` =
torch_bf16's median / this kernel's median (above 1 = faster than bf16), ``vs_fp32`` the
same against torch_fp32.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fpbench.errors import FpbenchError
from fpbench.kernels import build as kernels
from fpbench.kernels.linear import LutLinear, check_kernel_scheme, packed_bytes
from fpbench.kernels.packing import UNIT
from fpbench.kernels.torch_int8 import int8_weight_only_mm
from fpbench.quant.formats import get_format
from fpbench.quant.scheme import Granularity, Scheme
from fpbench.quant.weights import QuantizedWeight, quantize_weight
from fpbench.records.environment import environment, utc_now
from fpbench.records.schema import KERNEL_BENCH
from fpbench.records.store import append_jsonl

DEFAULT_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
DEFAULT_BATCHES = (1, 8, 64, 512)
TORCH_KERNELS = ("torch_fp32", "torch_bf16", "torch_int8_bf16", "torch_int4_bf16")
DEFAULT_FORMATS = ("int4", "int4_asym", "int8", "fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2")
DEFAULT_GRANULARITIES = ("channel", "g128")
DEFAULT_BLOCK_FORMATS = ("mxfp4_e2m1", "mxfp6_e3m2", "mxfp8_e4m3", "nvfp4")  # each at its own block
# By default fpbench's kernels take bf16 x, as in a model on the latency path (its unquantized
# rest runs in bf16: on AVX-512 BF16 the bf16 kernels, elsewhere x widened to fp32 exactly).
KERNELS = (TORCH_KERNELS + tuple(f"{f}/{g}@bf16" for f in DEFAULT_FORMATS for g in DEFAULT_GRANULARITIES)
           + tuple(f"{f}/g{get_format(f).block_size}@bf16" for f in DEFAULT_BLOCK_FORMATS))
TORCH_INT4_GROUP = 128
BANDWIDTH_BUFFER_BYTES = 512 * 2**20
STREAMS = (1, 8)  # streams a thread of the reads timed in each cell's turns (prepare_stream)
CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def largest_cache_bytes(cache_dir: Path = CACHE_DIR) -> int | None:
    """The largest CPU cache Linux reports (``index*/size``: ``48K``, ``107520K``), or None."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in cache_dir.glob("index*/size"):
        try:
            text = path.read_text().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=None)


def cold_bytes(cache_bytes: int | None) -> int:
    """Bytes of weight copies a kernel cycles through: 4x the last-level cache, at least 128 MiB."""
    return max(128 * 2**20, 4 * (cache_bytes or 0))


LARGEST_CACHE = largest_cache_bytes()
COLD_BYTES = cold_bytes(LARGEST_CACHE)
CACHE_SLICE_BYTES = 8 * 2**20  # at most: an in-cache slice of a weight (cache_slice_k)


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
            raise FpbenchError(f"shape {item!r} is not NxK (e.g. 4096x4096,14336x4096)") from None
        if n < 1 or k % UNIT or k < UNIT:
            raise FpbenchError(f"shape {item}: N must be >= 1 and K a multiple of {UNIT} (fpbench's kernels pack "
                               f"{UNIT} weights a unit)")
        shapes.append((n, k))
    return shapes


def check_shapes(shapes: list[tuple[int, int]], kernel_names: list[str], asked: bool) -> list[str]:
    """The kernels to time on these shapes: torch's INT4 kernel takes K in whole groups of 128
    (fpbench's g128 kernels take a shorter last group, as a model's K = 576 layer has), so
    it is an error to ask for it on other K, and it is left out of the default list there."""
    ragged = [f"{n}x{k}" for n, k in shapes if k % TORCH_INT4_GROUP]
    if "torch_int4_bf16" not in kernel_names or not ragged:
        return kernel_names
    if asked:
        raise FpbenchError(f"shape {', '.join(ragged)}: torch_int4_bf16 needs K a multiple of {TORCH_INT4_GROUP}; "
                           "leave it out of --kernels or choose such shapes")
    return [name for name in kernel_names if name != "torch_int4_bf16"]


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


def _format_or_none(name: str):
    try:
        return get_format(name)
    except FpbenchError:
        return None  # reported below, with the kernel names to choose from


def parse_kernels(names: list[str] | None) -> list[str]:
    """Torch kernel names as they are; ``FORMAT`` -> ``FORMAT/channel``, ``FORMAT/g128``
    (a block format: its block, ``mxfp4_e2m1/g32``); an ``@bf16`` suffix is kept. None:
    ``KERNELS`` (fpbench's kernels with bf16 x)."""
    if not names:
        return list(KERNELS)
    out = []
    for spec in names:
        name, at, activations = spec.partition("@")
        if name in TORCH_KERNELS and not at:
            out.append(name)
            continue
        if at and (activations != "bf16" or name in TORCH_KERNELS):
            raise FpbenchError(f"kernel {spec!r}: the only activation suffix is @bf16, for fpbench kernels "
                               "(FORMAT[/GRANULARITY]@bf16); torch_bf16 already runs in bf16")
        fmt, _, gran = name.partition("/")
        block = getattr(_format_or_none(fmt), "block_size", None)
        for g in [gran] if gran else [f"g{block}"] if block else DEFAULT_GRANULARITIES:
            try:
                scheme = Scheme(fmt, Granularity.parse(g))
                check_kernel_scheme(scheme)
            except FpbenchError as exc:
                raise FpbenchError(f"unknown kernel {name!r} ({exc}); choose from {', '.join(TORCH_KERNELS)} "
                                   "or FORMAT[/GRANULARITY] such as int4/g128") from None
            out.append(f"{scheme.format}/{scheme.granularity.short}{at}{activations}")
    return list(dict.fromkeys(out))


def stream_methods() -> dict[str, callable]:
    """Read loops whose best is the streaming ceiling: name -> (buffer, repeats) -> GB/s."""
    module = kernels.load()
    isas = [isa for isa in kernels.runnable_isas() if isa != "avx512vbmi"]  # its read loop is avx512's
    methods = {}
    for isa in isas:  # one stream a thread, and (SIMD) eight side by side: on some CPUs one stream reads less
        for streams in (1, 8) if isa != "scalar" else (1,):
            name = f"read_{isa}" + ("" if streams == 1 else f"_x{streams}")
            methods[name] = (lambda buffer, repeats, isa=isa, streams=streams:
                             float(module.stream_read_gbps(buffer, repeats, isa, streams)))
    methods["torch_sum"] = _torch_sum_gbps
    return methods


def _torch_sum_gbps(buffer: torch.Tensor, repeats: int) -> float:
    view = buffer.view(torch.float32)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        view.sum()
        best = max(best, buffer.numel() * buffer.element_size() / (time.perf_counter() - start) / 1e9)
    return best


def measure_bandwidth_gbps(repeats: int = 5) -> tuple[float, dict[str, float]]:
    """The streaming-read ceiling (GB/s): the maximum over ``stream_methods``, and each one."""
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 8, dtype=torch.int64)
    each = {name: round(method(buffer, repeats), 2) for name, method in stream_methods().items()}
    return max(each.values()), each


def roofline_fraction(bytes_read: int, bandwidth_gbps: float, median_ms: float) -> float:
    """Time the bytes need at the streaming ceiling over the time taken (<= 1 at or below it)."""
    return bytes_read / (bandwidth_gbps * 1e9) / (median_ms * 1e-3)


def cold_copies(weight_bytes: int) -> int:
    return max(2, math.ceil(COLD_BYTES / weight_bytes))


def cache_slice_k(k: int, weight_bytes: int, cache_bytes: int | None, multiple: int = UNIT) -> int:
    """Columns of an N x K weight of ``weight_bytes`` that keep a slice of all N rows in the
    last-level cache, for the in-cache rate: a quarter of that cache, 8 MiB at most (2 MiB
    where Linux reports none), in whole multiples (of the unit and the group), at least
    1024 columns and at most K. All N rows: the threads take the same rows, in chunks of
    the same size, as on the whole weight (on slices of 256 rows, in cache, the bf16 GEMVs
    ran at 0.5-0.84x their pace on 2048 rows: the chunks' and batches' setup counts)."""
    target = CACHE_SLICE_BYTES // 4 if cache_bytes is None else min(CACHE_SLICE_BYTES, cache_bytes // 4)
    columns = max(1024, target * k // weight_bytes) // multiple * multiple
    return max(multiple, min(k, columns))


def resident_seconds(p: Prepared, x: torch.Tensor, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of ``repeats`` calls on one weight copy after ``warmup`` calls: the weight stays
    in the cache, so the time is the kernel's own pace (its decode, not memory's)."""
    weight = p.weights[0]
    for _ in range(warmup):
        p.call(x, weight)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        p.call(x, weight)
        times.append(time.perf_counter() - start)
    return times


def _random_qweight(name: str, n: int, k: int, generator: torch.Generator) -> QuantizedWeight:
    """RTN of a random weight: the codes, and the scales (zero points, NVFP4's tensor
    scale) in the scheme's own scale format, so the layer stores what a real one does."""
    fmt_name, _, gran = name.partition("/")
    return quantize_weight(torch.randn(n, k, generator=generator) * 0.02, get_format(fmt_name).name,
                           Granularity.parse(gran))


def _shuffled(qweight: QuantizedWeight, copy: int) -> QuantizedWeight:
    """Another weight copy with the same storage: the codes rotated (values do not change the time)."""
    codes = qweight.codes.flatten().roll(copy * 7919).reshape(qweight.codes.shape)
    return dataclasses.replace(qweight, codes=codes)


def prepare(kernel: str, n: int, k: int, generator: torch.Generator, copies: int | None = None) -> Prepared:
    """Random weights in the kernel's own storage (the values do not change the time):
    ``copies`` of them, by default enough for cold calls (``cold_copies``)."""
    groups = k // TORCH_INT4_GROUP

    def count(nbytes: int) -> int:
        return copies or cold_copies(nbytes)

    if kernel in ("torch_fp32", "torch_bf16"):
        dtype = torch.float32 if kernel == "torch_fp32" else torch.bfloat16
        nbytes = n * k * torch.finfo(dtype).bits // 8
        weights = [torch.randn(n, k, generator=generator).to(dtype) for _ in range(count(nbytes))]
        return Prepared(weights, nbytes, lambda x, w: F.linear(x, w), dtype)
    if kernel == "torch_int8_bf16":
        nbytes = n * k + 2 * n
        weights = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator),
                    torch.rand(n, generator=generator).bfloat16()) for _ in range(count(nbytes))]
        return Prepared(weights, nbytes, lambda x, w: int8_weight_only_mm(x, w[0], w[1]), torch.bfloat16)
    if kernel == "torch_int4_bf16":
        nbytes = n * k // 2 + groups * n * 2 * 2
        weights = []
        for _ in range(count(nbytes)):
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            scale_zero = torch.stack([torch.rand(groups, n, generator=generator),
                                      torch.zeros(groups, n)], dim=-1).bfloat16()
            weights.append((packed, scale_zero))
        return Prepared(weights, nbytes, lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, w[0], TORCH_INT4_GROUP, w[1]), torch.bfloat16)
    if kernel in TORCH_KERNELS or "/" not in kernel:
        raise FpbenchError(f"unknown kernel {kernel!r}; choose from {', '.join(TORCH_KERNELS)} "
                           "or FORMAT/GRANULARITY such as int4/g128")
    kernel, at, _ = kernel.partition("@")
    qweight = _random_qweight(kernel, n, k, generator)
    first = LutLinear(qweight)
    nbytes = packed_bytes(first)
    weights = [first] + [LutLinear(_shuffled(qweight, copy)) for copy in range(1, count(nbytes))]
    for layer in weights:
        layer.native()  # the compiled handle is built once per layer, as in a model: not timed
    return Prepared(weights, nbytes, lambda x, layer: layer(x), torch.bfloat16 if at else torch.float32)


def prepare_stream(streams: int, n: int, k: int) -> Prepared:
    """A plain streaming read of N x K bytes (an 8-bit weight's size) by all threads with the
    widest loads of the best ISA, ``streams`` streams a thread, cycling through cold copies
    as the kernels do: timed in the same turns as a cell's kernels, it is what the memory
    system gave a read loop in those turns (on a shared machine the bandwidth comes and goes
    by up to 2x between minutes, which a probe before or after the kernels misses)."""
    module = kernels.load()
    nbytes = -(-n * k // 4096) * 4096  # the read loop takes whole 4 KiB pages
    buffers = [torch.ones(nbytes // 8, dtype=torch.int64) for _ in range(cold_copies(nbytes))]
    isa = module.best_isa()
    return Prepared(buffers, nbytes, lambda x, buffer: module.stream_read_gbps(buffer, 1, isa, streams),
                    torch.float32)


def interleaved_times(prepared: list[Prepared], xs: list[torch.Tensor], repeats: int,
                      warmup: int = 2) -> list[list[float]]:
    """Seconds of each call of each kernel (x from xs alike), the kernels taking turns call
    by call, each cycling through its weight copies: a slower or faster spell of a shared
    machine falls on every kernel alike, so their ratios hold (timed one kernel after the
    other, the same kernel's ratio to torch's moved by up to 28% between two runs). The
    records keep each kernel's median and its minimum (its least disturbed call). Each round
    takes the kernels in another order (seeded), so that no kernel always follows the same
    one.

    Before the warm-up rounds, one call on every copy of every kernel (with x's first row):
    on the AMD EPYC VM a weight left untouched for a while is slow on its next read (INT4
    per channel on 4096x4096 after 40 s idle: 0.48 ms a copy on the first pass, 0.27 on the
    next; 0.23 without the pause). Touched only when prepared, the copies of the first
    kernels listed waited while the others were quantized, and the first of fpbench's
    kernels ran up to 1.6x slower than its twin of the same code for its first pass of
    timed calls (FP4 and INT4 per channel either way round)."""
    for p, x in zip(prepared, xs):
        row = x[:1] if isinstance(x, torch.Tensor) else x
        for weight in p.weights:
            p.call(row, weight)
    for i in range(warmup):
        for p, x in zip(prepared, xs):
            p.call(x, p.weights[i % len(p.weights)])
    times = [[] for _ in prepared]
    order = list(range(len(prepared)))
    shuffle = random.Random(0).shuffle
    for i in range(repeats):
        shuffle(order)
        for j in order:
            p = prepared[j]
            weight = p.weights[(warmup + i) % len(p.weights)]
            start = time.perf_counter()
            p.call(xs[j], weight)
            times[j].append(time.perf_counter() - start)
    return times


def cache_gbps(kernel: str, n: int, k: int, p: Prepared, x: torch.Tensor, repeats: int,
               generator: torch.Generator) -> float:
    """GB/s of ``kernel`` on an N x K' slice of its N x K weight (``p``) that stays in the
    last-level cache (``cache_slice_k``), x [1, K']: the pace of its decode, which bounds its
    share of the read where memory streams faster (4- and 6-bit kernels in a fast spell)."""
    granularity = Granularity.parse(kernel.partition("@")[0].partition("/")[2] or "channel")
    group = (granularity.group_size if granularity.kind == "group"
             else TORCH_INT4_GROUP if kernel == "torch_int4_bf16" else 1)
    columns = cache_slice_k(k, p.weight_bytes, LARGEST_CACHE, math.lcm(UNIT, group))
    part = prepare(kernel, n, columns, generator, copies=1) if columns < k else dataclasses.replace(
        p, weights=p.weights[:1])
    median = statistics.median(resident_seconds(part, x[:, :columns].contiguous(), repeats))
    return (part.weight_bytes + columns * x.element_size()) / median / 1e9


def _repeats_for(m: int, n: int, k: int, repeats: int) -> int:
    # Large-batch GEMMs take tens of milliseconds each: fewer calls keep the run short.
    return max(3, repeats // 4) if m * n * k > 2**33 else repeats


def run_bench(shapes=None, batches=None, kernel_names=None, repeats: int = 21, out_dir: str | None = None,
              progress: bool = True) -> list[dict]:
    """Measure every kernel x shape x batch; returns (and appends to out_dir) the records."""
    shapes = list(shapes or DEFAULT_SHAPES)
    batches = list(batches or DEFAULT_BATCHES)
    kernel_names = check_shapes(shapes, parse_kernels(kernel_names), asked=bool(kernel_names))
    for reference in ("torch_fp32", "torch_bf16"):  # the headline ratios need them
        if reference not in kernel_names:
            kernel_names.insert(0, reference)
    module = kernels.load()
    bandwidth, by_method = measure_bandwidth_gbps()
    between = []
    env = environment() | {"kernel_isa": module.best_isa()}
    generator = torch.Generator().manual_seed(0)
    records = []
    steps = tqdm(total=len(shapes) * len(kernel_names) * len(batches), desc="bench", disable=not progress)
    for n, k in shapes:
        prepared = {}
        streams = {count: prepare_stream(count, n, k) for count in STREAMS}
        for kernel in kernel_names:
            prepared[kernel] = prepare(kernel, n, k, generator)
        for m in batches:
            x = torch.randn(m, k, generator=generator)
            xs = [x.to(p.activation_dtype) for p in prepared.values()]
            turns = list(prepared.values()) + list(streams.values())
            times = interleaved_times(turns, xs + [x] * len(streams), _repeats_for(m, n, k, repeats))
            # The better of the reads with one and eight streams a thread, in the same turns.
            stream_gbps = max(p.weight_bytes / statistics.median(samples) / 1e9
                              for p, samples in zip(streams.values(), times[len(prepared):]))
            for (kernel, p), xk, samples in zip(prepared.items(), xs, times):
                median_ms, min_ms = statistics.median(samples) * 1e3, min(samples) * 1e3
                bytes_read = p.weight_bytes + xk.numel() * xk.element_size()
                resident = {} if m != 1 else {
                    "cache_gbps": round(cache_gbps(kernel, n, k, p, xk, repeats, generator), 2)}
                records.append({"kernel": kernel, "M": m, "N": n, "K": k, "median_ms": round(median_ms, 4),
                                "min_ms": round(min_ms, 4),
                                "gbps": round(bytes_read / (median_ms * 1e-3) / 1e9, 2),
                                "weight_bytes": p.weight_bytes, "bytes_read": bytes_read,
                                "stream_gbps": round(stream_gbps, 2),
                                "stream_fraction": round(bytes_read / (median_ms * 1e-3) / 1e9 / stream_gbps, 3),
                                "copies": len(p.weights), **resident,
                                "activation_dtype": str(p.activation_dtype).replace("torch.", ""), **env})
            steps.update(len(prepared))
        del prepared, p, streams
        between.append(round(measure_bandwidth_gbps(2)[0], 2))
    steps.close()
    after, after_by_method = measure_bandwidth_gbps()
    ceiling = max(bandwidth, after, *between)  # the best probe of the run
    for record in records:
        record["roofline_fraction"] = round(roofline_fraction(record["bytes_read"], ceiling, record["median_ms"]), 3)
        record["bandwidth_gbps"] = round(ceiling, 2)
        record["bandwidth_by_method"] = {"before": by_method, "after": after_by_method, "between_shapes": between}
    stamp = utc_now()
    for reference in ("bf16", "fp32"):
        medians = {(r["M"], r["N"], r["K"]): r["median_ms"] for r in records if r["kernel"] == f"torch_{reference}"}
        for record in records:
            record[f"vs_{reference}"] = round(medians[(record["M"], record["N"], record["K"])] / record["median_ms"], 3)
    for record in records:
        record["time"] = stamp
    if out_dir:
        append_jsonl(Path(out_dir) / "bench.jsonl", records, KERNEL_BENCH.name)
    return records


def _eight_bit_peer(kernel: str) -> str:
    """The 8-bit kernel a 4-bit one is compared with: same family and granularity
    (``int4_asym/g128@bf16`` -> ``int8/g128@bf16``, ``mxfp4_e2m1/g32`` -> ``mxfp8_e4m3/g32``,
    ``fp4_e2m1/channel`` -> ``fp8_e4m3/channel``)."""
    name, at, activations = kernel.partition("@")
    fmt, _, gran = name.partition("/")
    peer = "int8" if fmt.startswith("int") else "mxfp8_e4m3" if fmt.startswith("mx") else "fp8_e4m3"
    return f"{peer}/{gran}{at}{activations}"


def summary(records: list[dict]) -> str:
    """One line per shape and batch over fpbench's kernels: their speed against torch bf16
    and, at M = 1 (bound by the weight's bytes), their share of the read timed in the same
    turns (range and the lowest), the 4-bit kernels' time over their 8-bit peers'
    (``_eight_bit_peer``, where both were timed): at the memory limit about half, and the
    kernels that read slower than that read even with the weight in cache (``cache_gbps``):
    their decode, not memory, sets their share."""
    lines = []
    for n, k, m in sorted({(r["N"], r["K"], r["M"]) for r in records}):
        cells = {r["kernel"]: r for r in records if (r["N"], r["K"], r["M"]) == (n, k, m) and "/" in r["kernel"]}
        if not cells:
            continue
        speed = [r["vs_bf16"] for r in cells.values()]
        line = (f"{n}x{k}, M = {m}: {len(cells)} kernel{'s' if len(cells) > 1 else ''} at {min(speed):.2f}-"
                f"{max(speed):.2f}x torch bf16")
        if m == 1:
            shares = sorted(cells.values(), key=lambda r: r["stream_fraction"])
            lowest = ", ".join(f"{r['kernel']} {r['stream_fraction']:.2f}" for r in shares[:2])
            line += (f", {shares[0]['stream_fraction']:.2f}-{shares[-1]['stream_fraction']:.2f} of the read in "
                     f"their turns (lowest: {lowest})")
            ratios = [cells[name]["median_ms"] / cells[_eight_bit_peer(name)]["median_ms"] for name in cells
                      if get_format(name.split("/")[0]).bits == 4 and _eight_bit_peer(name) in cells]
            if ratios:
                line += f"; 4-bit / 8-bit time {min(ratios):.2f}-{max(ratios):.2f}"
            paced = sorted((r for r in cells.values() if r.get("cache_gbps") is not None
                            and r["cache_gbps"] < r["stream_gbps"]), key=lambda r: r["cache_gbps"])
            if paced:
                named = ", ".join(f"{r['kernel']} {r['cache_gbps']:.1f}" for r in paced[:3])
                more = f" and {len(paced) - 3} more" if len(paced) > 3 else ""
                line += (f"; below the read ({paced[0]['stream_gbps']:.1f} GB/s) even in cache, so paced by "
                         f"their decode: {named} GB/s{more}")
        lines.append(line)
    return "\n".join(lines)


def table(records: list[dict], stat: str = "median_ms") -> str:
    """Markdown: one row per kernel x shape x batch: ``stat`` ms, GB/s, GB/s with the weight in
    cache (M = 1), roofline fraction, fraction of the read in the same turns (``vs_read``), x
    vs torch_bf16 and x vs torch_fp32 (same statistic)."""
    import pandas as pd

    frame = pd.DataFrame(records)
    for reference in ("bf16", "fp32"):
        base = frame[frame.kernel == f"torch_{reference}"].set_index(["M", "N", "K"])[stat]
        frame[f"x_vs_{reference}"] = [round(base[(r.M, r.N, r.K)] / r[stat], 2) for _, r in frame.iterrows()]
    # At the fastest call's time the fractions scale by median / min.
    frame["roofline"] = (frame["roofline_fraction"] * frame["median_ms"] / frame[stat]).round(2)
    frame["vs_read"] = (frame["stream_fraction"] * frame["median_ms"] / frame[stat]).round(2)
    frame["GB/s"] = (frame["gbps"] * frame["median_ms"] / frame[stat]).round(1)
    frame["cache GB/s"] = frame["cache_gbps"].round(1) if "cache_gbps" in frame else float("nan")
    frame[stat] = frame[stat].round(3)
    order = {name: i for i, name in enumerate(dict.fromkeys(frame.kernel))}
    frame = frame.sort_values(["N", "K", "M"], kind="stable").sort_values(
        ["N", "K", "M", "kernel"], key=lambda col: col.map(order) if col.name == "kernel" else col, kind="stable")
    columns = ["N", "K", "M", "kernel", stat, "GB/s", "cache GB/s", "roofline", "vs_read", "x_vs_bf16", "x_vs_fp32"]
    return frame[columns].to_markdown(index=False)

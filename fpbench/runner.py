"""One run = one model x one scheme x some tasks: load, quantize, evaluate, record.

This is the Python API the CLI (and a notebook) calls: ``run(RunConfig(...))`` returns
the result records and appends them to the results store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from fpbench import __version__
from fpbench.quant.formats import get_format
from fpbench.quant.model import quantize_model, target_linears
from fpbench.models import load_model
from fpbench.quant.weights import bits_per_weight
from fpbench.records.store import ResultStore
from fpbench.quant.scheme import Scheme
from fpbench.eval.base import EvalOptions, evaluate_task, get_task


@dataclass
class RunConfig:
    scheme: Scheme
    tasks: list[str]
    model: str | None = None
    limit: int | None = None
    seqlen: int | None = None
    data_dir: str | None = None
    seed: int = 0
    include_head: bool = False
    out_dir: str = "results"
    progress: bool = True
    extra: dict = field(default_factory=dict)  # family- or algorithm-specific options
    backend: str = "simulate"  # "kernel": quantized linears run on the compiled kernels

    def key(self) -> str:
        """Stable hash of everything that determines the numbers (plus code version)."""
        payload = asdict(self) | {"scheme": self.scheme.name, "version": __version__}
        if self.backend == "simulate":
            payload.pop("backend")  # keys of runs made before the field existed stay valid
        for volatile in ("out_dir", "progress", "data_dir"):
            payload.pop(volatile)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def task_key(self, task: str) -> str:
        """Key of this configuration restricted to one task: a sweep resumes per task, so
        adding a task to a sweep does not redo the tasks already measured."""
        return replace(self, tasks=[task]).key()


@lru_cache(maxsize=1)
def environment() -> dict:
    """Versions, git revision, CPU: what a reader needs to trust or rerun a number."""
    import transformers

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "fpbench_version": __version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "python_version": platform.python_version(),
        "git_rev": rev, "cpu": cpu, "threads": torch.get_num_threads(),
    }


def model_bits_per_weight(quantized, include_head: bool) -> float:
    """Average storage bits per weight over the quantized layers (scales included)."""
    fmt = get_format(quantized.scheme.format)
    total_bits = total_weights = 0
    for module in target_linears(quantized.model, include_head).values():
        shape = tuple(module.weight.shape)
        total_bits += bits_per_weight(fmt, quantized.scheme.granularity, shape) * module.weight.numel()
        total_weights += module.weight.numel()
    return total_bits / max(total_weights, 1)


def run(config: RunConfig) -> list[dict]:
    tasks = [get_task(name) for name in config.tasks]  # fail on a bad task before loading
    torch.manual_seed(config.seed)
    loaded = load_model(config.model)
    quantized = quantize_model(loaded.model, config.scheme, include_head=config.include_head,
                               progress=config.progress, loaded=loaded, config=config)
    if config.backend == "kernel":
        from fpbench.kernels.linear import use_kernel_linears

        use_kernel_linears(loaded.model, quantized.weights)
    options = EvalOptions(limit=config.limit, seqlen=config.seqlen, data_dir=config.data_dir,
                          seed=config.seed, out_dir=config.out_dir, progress=config.progress,
                          # run identity lets families name their per-item outputs (samples, summaries)
                          extra=dict(config.extra) | {"run_key": config.key(), "scheme": config.scheme.name})
    base = {
        "model": loaded.name, "model_source": loaded.source, **config.scheme.fields(),
        "include_head": config.include_head, "seed": config.seed, "limit": config.limit,
        "backend": config.backend,
        "run_key": config.key(), "options": dict(config.extra),
        "quantize_s": round(quantized.quantize_seconds, 3),
        "bits_per_weight": round(model_bits_per_weight(quantized, config.include_head), 4),
        "caveat": loaded.caveat, **environment(),
    }
    store = ResultStore(config.out_dir)
    records = []
    for task in tasks:
        started = time.perf_counter()
        metrics = evaluate_task(loaded, task, options)
        task_seconds = time.perf_counter() - started
        task_records = [
            base | {"task": task.name, "task_key": config.task_key(task.name),
                    "family": task.family, "metric": m.metric,
                    "value": m.value, "n": m.n, "task_s": round(task_seconds, 3), **m.details,
                    "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            for m in metrics
        ]
        store.append(task_records)  # each task's records land as soon as they exist
        records.extend(task_records)
    return records

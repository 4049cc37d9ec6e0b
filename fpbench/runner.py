"""One run = one model x one scheme x some tasks: load, quantize, evaluate, record.

This is the Python API the CLI (and a notebook) calls: ``run(RunConfig(...))`` returns
the result records and appends them to the results store.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from fpbench import __version__
from fpbench.quant.formats import get_format
from fpbench.quant.model import quantize_model, target_linears
from fpbench.models import load_model
from fpbench.quant.weights import bits_per_weight
from fpbench.records.environment import environment, utc_now
from fpbench.records.store import ResultStore
from fpbench.quant.scheme import Scheme
from fpbench.eval.base import EvalOptions, Metric, evaluate_task, get_task
from fpbench.eval.latency import LatencySettings, latency_path, measure, prepare, weight_bytes
from fpbench.errors import FpbenchError
from fpbench.options import calibrated_scheme, default_of, run_options, schemes_from_values, stage_options
from fpbench.quant.calibration import CalibrationSource

LATENCY_TASK = "latency"


@dataclass
class RunConfig:
    scheme: Scheme
    tasks: list[str]
    model: str | None = None
    limit: int | None = None
    seqlen: int | None = None
    data_dir: str | None = None
    seed: int = default_of("seed")
    include_head: bool = default_of("include_head")
    out_dir: str = default_of("out")
    progress: bool = True
    # Stage options that differ from their defaults (``fpbench.options.run_options``):
    # part of the key, stored in every record, handed to each stage as a typed object.
    options: dict = field(default_factory=dict)
    backend: str = default_of("backend")  # "kernel": quantized linears run on the compiled kernels

    def key(self) -> str:
        """Stable hash of everything that determines the numbers (plus code version)."""
        payload = asdict(self) | {"scheme": self.scheme.name, "version": __version__}
        if self.backend == default_of("backend"):
            payload.pop("backend")
        for volatile in ("out_dir", "progress", "data_dir"):
            payload.pop(volatile)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def task_key(self, task: str) -> str:
        """Key of this configuration restricted to one task: a sweep resumes per task, so
        adding a task to a sweep does not redo the tasks already measured."""
        return replace(self, tasks=[task]).key()

    def stage(self, name: str):
        """The typed options of one stage (``GptqOptions``, ``GenerationOptions``...)."""
        return stage_options(name, self.options)

    @property
    def calibration(self) -> CalibrationSource:
        return CalibrationSource(self.options.get("calib_path") or self.scheme.calib_source, self.seed,
                                 self.data_dir)


def model_bits_per_weight(quantized, include_head: bool) -> float:
    """Average storage bits per weight over the quantized layers (scales included)."""
    fmt = get_format(quantized.scheme.format)
    total_bits = total_weights = 0
    for module in target_linears(quantized.model, include_head).values():
        shape = tuple(module.weight.shape)
        total_bits += bits_per_weight(fmt, quantized.scheme.granularity, shape,
                                      quantized.scheme.scale_format) * module.weight.numel()
        total_weights += module.weight.numel()
    return total_bits / max(total_weights, 1)


def parse_tasks(text: str | None) -> list[str]:
    """``wikitext2,ptb`` -> task names, each checked (an empty list is an error)."""
    tasks = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not tasks:
        from fpbench.data.task_defs import available_tasks

        raise FpbenchError(f"no task given: pass --task with one or more of {', '.join(available_tasks())}")
    for task in tasks:
        get_task(task)
    return tasks


def with_latency(tasks: list[str], scheme: Scheme, backend: str, requested: bool | None) -> list[str]:
    """Tasks plus "latency" when asked for (``requested`` True; None: any --backend kernel
    run) and the scheme runs on a real kernel; a simulated-only scheme gets no latency task."""
    tasks = [t for t in tasks if t != LATENCY_TASK or latency_path(scheme, backend)]
    wanted = requested if requested is not None else backend == "kernel"
    if wanted and latency_path(scheme, backend) and LATENCY_TASK not in tasks:
        tasks.append(LATENCY_TASK)
    return tasks


def plan_runs(values: dict) -> list[RunConfig]:
    """The runs `fpbench run` makes from its option values (one per scheme), every option
    checked before any model loads: tasks, formats, calibration text, kernel support."""
    tasks = parse_tasks(values.get("task"))
    configs = []
    for scheme in schemes_from_values(values):
        if values.get("backend") == "kernel":
            from fpbench.kernels.linear import check_kernel_scheme

            check_kernel_scheme(scheme)
        scheme, scheme_values = calibrated_scheme(scheme, values, values.get("data_dir"))
        backend = values.get("backend") or default_of("backend")
        configs.append(RunConfig(
            scheme=scheme, tasks=with_latency(tasks, scheme, backend, True if values.get("latency") else None),
            model=values.get("model"), limit=values.get("limit"),
            seqlen=values.get("seqlen"), data_dir=values.get("data_dir"), seed=values.get("seed", 0),
            include_head=bool(values.get("include_head")), out_dir=values.get("out") or default_of("out"),
            progress=not values.get("no_progress"), options=run_options(scheme_values),
            backend=backend))
    return configs


def latency_metrics(loaded, quantized, config: RunConfig) -> list[Metric]:
    """The latency task on the run's own model: see ``fpbench.eval.latency``."""
    path = latency_path(config.scheme, config.backend)
    if path is None:
        raise FpbenchError(f"scheme {config.scheme.name} runs simulated only (no kernel): it has no latency; "
                           "use --backend kernel or drop the latency task")
    # The quantized layers by name (a kernel run has swapped them out of nn.Linear by now);
    # a baseline has no codes, so its linear layers.
    layer_names = list(quantized.weights) or list(target_linears(loaded.model, config.include_head))
    model = prepare(loaded.model, path, layer_names, quantized.weights)
    settings = LatencySettings()
    timing = measure(model, model.config.vocab_size, loaded.max_length, settings)
    modules = dict(model.named_modules())
    isa = getattr(modules[layer_names[0]], "isa", None) if layer_names else None
    details = {"latency_path": path, "kernel_isa": isa or f"torch {torch.backends.cpu.get_cpu_capability()}",
               "weight_bytes": weight_bytes(model, layer_names), "batch": 1,
               "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
               "prefill_tokens": timing["prefill_tokens"], "repeats": settings.repeats,
               "decode_loop": timing["decode_loop"]}
    values = {"decode_ms_per_token": timing["decode_ms_per_token"],
              "decode_tokens_per_s": timing["decode_tokens_per_s"],
              "prefill_tokens_per_s": timing["prefill_tokens_per_s"],
              "weight_mb": details["weight_bytes"] / 1e6}
    return [Metric(name, value, settings.new_tokens if name.startswith("decode") else 1, dict(details))
            for name, value in values.items()]


def run(config: RunConfig) -> list[dict]:
    tasks = [get_task(name) for name in config.tasks]  # fail on a bad task before loading
    torch.manual_seed(config.seed)
    loaded = load_model(config.model)
    quantized = quantize_model(loaded.model, config.scheme, include_head=config.include_head,
                               progress=config.progress, loaded=loaded, calibration=config.calibration,
                               gptq=config.stage("gptq"), act_calib=config.stage("act_calib"),
                               act_seqlen=config.seqlen)
    bits = model_bits_per_weight(quantized, config.include_head)  # before kernels replace the layers
    if config.backend == "kernel":
        from fpbench.kernels.linear import use_kernel_linears

        use_kernel_linears(loaded.model, quantized.weights)
    options = EvalOptions(limit=config.limit, seqlen=config.seqlen, data_dir=config.data_dir,
                          seed=config.seed, out_dir=config.out_dir, progress=config.progress,
                          batch_size=config.options.get("batch_size"), generation=config.stage("generation"),
                          zeroshot=config.stage("zeroshot"), scheme=config.scheme.name, run_key=config.key())
    base = {
        "model": loaded.name, "model_source": loaded.source, **config.scheme.fields(),
        "include_head": config.include_head, "seed": config.seed, "limit": config.limit,
        "backend": config.backend,
        "run_key": config.key(), "options": dict(config.options),
        "quantize_s": round(quantized.quantize_seconds, 3),
        "bits_per_weight": round(bits, 4),
        "caveat": loaded.caveat, **environment(),
    }
    store = ResultStore(config.out_dir)
    records = []
    for task in tasks:
        started = time.perf_counter()
        if task.family == "latency":
            metrics = latency_metrics(loaded, quantized, config)
        else:
            metrics = evaluate_task(loaded, task, options)
        task_seconds = time.perf_counter() - started
        task_records = [
            base | {"task": task.name, "task_key": config.task_key(task.name),
                    "family": task.family, "metric": m.metric,
                    "value": m.value, "n": m.n, "task_s": round(task_seconds, 3), **m.details,
                    "time": utc_now()}
            for m in metrics
        ]
        store.append(task_records)  # each task's records land as soon as they exist
        records.extend(task_records)
    return records

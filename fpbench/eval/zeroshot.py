"""Zero-shot multiple choice and cloze tasks, scored by EleutherAI's lm-evaluation-harness.

fpbench does not re-implement lm-eval's scoring: it hands the in-memory (quantized)
model and its tokenizer to lm-eval's ``HFLM`` and runs ``lm_eval.simple_evaluate``, then
copies acc / acc_norm / perplexity and their stderr into ``Metric`` records.

Where a task's data comes from:

- hub (when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are not set): lm-eval's own task
  (``piqa``, ``hellaswag``...), so numbers are comparable with published ones;
- local (offline): an lm-eval config from ``fpbench/data/tasks/lm_eval/`` (``piqa_local``...) that
  reads the JSONL copy in the data folder (``--data-dir`` / ``FPBENCH_DATA_DIR``).

The local configs are templates: lm-eval reads ``data_files`` literally, so fpbench
writes them, with the data folder filled in, into a temporary folder that lm-eval then
includes (``include_path``). ``options.zeroshot.zeroshot_source`` = hub | local forces
one source.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from fpbench.data.sources import OFFLINE_REASON, hub_offline, local_file, missing_data_error, resolve_data_dir
from fpbench.data.task_defs import TASK_DIR, TaskDef
from fpbench.errors import FpbenchError
from fpbench.eval.task_options import ZEROSHOT_SOURCES
from fpbench.eval.base import EvalOptions, Metric

LM_EVAL_TEMPLATE_DIR = TASK_DIR / "lm_eval"
DATA_DIR_PLACEHOLDER = "${FPBENCH_DATA_DIR}"
# lm-eval sorts requests by length, so padding waste stays small: on 2 CPU cores batch
# 16 ran 20 PIQA items of the default model in 8.7 s against 22.0 s with batch 1.
DEFAULT_BATCH_SIZE = 16
# lm-eval result keys are "<metric>,<filter>"; zero-shot loglikelihood tasks use "none".
REPORTED_METRICS = ("acc", "acc_norm", "perplexity")


def write_lm_eval_configs(data_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the local-task templates into ``dest`` with the data folder filled in."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # The placeholder sits inside double-quoted YAML strings: JSON escaping is valid there.
    quoted = json.dumps(str(Path(data_dir).expanduser().resolve()))[1:-1]
    for template in sorted(LM_EVAL_TEMPLATE_DIR.iterdir()):
        if template.suffix == ".yaml":
            (dest / template.name).write_text(template.read_text().replace(DATA_DIR_PLACEHOLDER, quoted))
        elif template.suffix == ".py":
            shutil.copy(template, dest / template.name)
    return dest


@contextlib.contextmanager
def lm_eval_include_dir(data_dir: str | os.PathLike | None = None):
    """A temporary lm-eval include folder holding the local task configs for
    ``data_dir`` (default: ``FPBENCH_DATA_DIR``); yields None when no folder is set."""
    resolved = resolve_data_dir(data_dir)
    if resolved is None:
        yield None
        return
    if not resolved.is_dir():
        raise FpbenchError(f"data folder {resolved} does not exist; fix --data-dir / FPBENCH_DATA_DIR")
    with tempfile.TemporaryDirectory(prefix="fpbench-lm-eval-") as tmp:
        yield write_lm_eval_configs(resolved, tmp)


def choose_source(task: TaskDef, options: EvalOptions) -> tuple[str, str]:
    """(source, lm-eval task name) for an fpbench zero-shot task declaration."""
    source = options.zeroshot.zeroshot_source
    if source not in ZEROSHOT_SOURCES:
        raise FpbenchError(f"zeroshot_source {source!r} is not one of {', '.join(ZEROSHOT_SOURCES)}")
    if source == "auto":
        source = "local" if hub_offline() else "hub"
    if source == "hub":
        return "hub", task.lm_eval["hub"]
    if local_file(task.source, options.data_dir) is None:
        reason = OFFLINE_REASON if hub_offline() else "local source chosen"
        raise missing_data_error(task.name, task.source, options.data_dir, reason)
    return "local", task.lm_eval["local"]


def make_lm(model, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True):
    """lm-eval's HF wrapper around an already-loaded model (no hub look-ups); with
    ``progress`` off its scoring bars stay off too."""

    class InMemoryHFLM(HFLM):
        def get_model_info(self) -> dict:
            # HFLM's version asks the hub for the SHA of `pretrained`, which here is
            # a model object, not a repo id: nothing to look up.
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(self._model.dtype)}

        # lm-eval's evaluator calls these without disable_tqdm, and loglikelihood_rolling
        # passes False to the token scorer; both routes end here.
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or not progress, **kwargs)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    return InMemoryHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def metrics_from_results(results: dict, lm_task: str, details: dict) -> list[Metric]:
    """acc / acc_norm / perplexity (with stderr) of one lm-eval task's results."""
    task_results = results["results"][lm_task]
    n = int(results["n-samples"][lm_task]["effective"])
    metrics = []
    for name in REPORTED_METRICS:
        key = f"{name},none"
        if key in task_results:
            stderr = task_results.get(f"{name}_stderr,none")
            metrics.append(Metric(name, float(task_results[key]), n, details | {
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}))
    if not metrics:
        raise FpbenchError(f"lm-eval task {lm_task} reported none of {', '.join(REPORTED_METRICS)}: "
                           f"{sorted(task_results)}")
    return metrics


def run_lm_eval(lm, lm_task: str, source: str, options: EvalOptions) -> tuple[dict, float, float]:
    """``lm_eval.simple_evaluate`` on one task; returns (results, wall seconds, CPU seconds).

    CPU seconds (all threads of this process) say what the evaluation costs when the
    machine is shared: on an otherwise idle machine, wall ~ CPU / torch threads."""
    configs = lm_eval_include_dir(options.data_dir) if source == "local" else contextlib.nullcontext()
    with configs as include, _quiet_lm_eval():
        # Local tasks need only fpbench's folder; indexing lm-eval's ~14k task files
        # would cost seconds for nothing.
        manager = (TaskManager(include_path=str(include), include_defaults=False)
                   if source == "local" else TaskManager())
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[lm_task], limit=options.limit, task_manager=manager,
                log_samples=False, bootstrap_iters=options.zeroshot.bootstrap_iters,
                random_seed=options.seed)
        except (ConnectionError, OSError) as exc:
            if source != "hub":
                raise
            raise FpbenchError(
                f"lm-eval could not fetch {lm_task} from the hub ({str(exc).splitlines()[0]}); "
                "set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 and --data-dir DIR to use local copies"
            ) from exc
        return results, time.perf_counter() - started, time.process_time() - cpu_started


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every stage at INFO; keep its warnings and its own progress bars."""
    logger = logging.getLogger("lm_eval")
    saved_level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(saved_level)


def evaluate(loaded, task: TaskDef, options: EvalOptions) -> list[Metric]:
    source, lm_task = choose_source(task, options)
    batch_size = options.batch_size or DEFAULT_BATCH_SIZE
    lm = make_lm(loaded.model, loaded.tokenizer, batch_size, progress=options.progress)
    results, seconds, cpu_seconds = run_lm_eval(lm, lm_task, source, options)
    n = int(results["n-samples"][lm_task]["effective"])
    details = {"lm_eval_task": lm_task, "task_source": source, "batch_size": batch_size,
               "eval_s": seconds, "eval_cpu_s": cpu_seconds, "items_per_s": n / seconds,
               "lm_eval_version": lm_eval.__version__}
    return metrics_from_results(results, lm_task, details)

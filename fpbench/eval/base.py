"""Task families: declarations live as YAML in ``fpbench/data/tasks/`` (read by
``fpbench.data.task_defs``); the Python that runs a task family lives in one module per
family here.

A family module exposes ``evaluate(loaded, task, options) -> list[Metric]``. The
generative families (code, summaries) share :class:`GenerativeFamily`: build prompts ->
generate (continuous batching, :mod:`fpbench.eval.generation`) -> score -> write the
per-item artifact -> metrics; a family supplies only its items, prompts and scorer.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub.utils
import transformers

from fpbench.data.task_defs import TaskDef, available_tasks, get_task  # noqa: F401  (re-exported)
from fpbench.errors import FpbenchError
from fpbench.eval.task_options import PROMPT_MODES, GenerationOptions, ZeroShotOptions
from fpbench.eval.generation import DEFAULT_BATCH_SIZE, GenerationResult, GenerationSettings, generate, has_chat_template

# family name -> module holding its evaluate(); families register here, once. The
# "latency" family is timed by the runner (fpbench.eval.latency), which holds the run's
# kernels and quantized weights.
FAMILIES = {
    "perplexity": "fpbench.eval.perplexity",
    "codegen": "fpbench.eval.codegen",
    "summarization": "fpbench.eval.summarization",
    "zeroshot": "fpbench.eval.zeroshot",
}

DEFAULT_SEQLEN = 2048
# Loggers of the libraries under the task families; INFO from them is noise in a run.
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "lm_eval", "accelerate", "filelock")


@dataclass
class EvalOptions:
    """Options every family may read, with the typed options of the families that have
    their own (``GenerationOptions``, ``ZeroShotOptions``)."""

    limit: int | None = None
    seqlen: int | None = None
    data_dir: str | None = None
    seed: int = 0
    batch_size: int | None = None  # sequences per forward/generate call; None: the task's default
    out_dir: str | None = None
    progress: bool = True
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    zeroshot: ZeroShotOptions = field(default_factory=ZeroShotOptions)
    # The run's identity, so families can name their per-item outputs (samples, summaries).
    scheme: str = "run"
    run_key: str | None = None


@dataclass
class Metric:
    metric: str
    value: float
    n: int
    details: dict = field(default_factory=dict)  # stderr, tokens/s, eval seconds...


def evaluate_task(loaded, task: TaskDef, options: EvalOptions) -> list[Metric]:
    family = FAMILIES.get(task.family)
    if family is None:
        raise FpbenchError(f"task {task.name}: unknown family {task.family!r}")
    return importlib.import_module(family).evaluate(loaded, task, options)


def quiet_libraries() -> None:
    """Silence the progress bars and INFO logs of transformers, datasets, huggingface_hub
    and lm-eval (``--no-progress`` / ``--quiet``); their warnings and errors still show.
    fpbench's own bars follow ``EvalOptions.progress``."""
    import datasets  # seconds to import; the task families load it only for hub data

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------- generative families

def choose_prompt_mode(tokenizer, requested: str | None = "auto") -> str:
    """chat (the model's chat template) for instruct models, completion (raw text) for
    base models; ``auto`` picks by whether the tokenizer has a chat template."""
    requested = requested or "auto"
    if requested not in PROMPT_MODES:
        raise FpbenchError(f"prompt mode {requested!r} is unknown; use one of {', '.join(PROMPT_MODES)}")
    if requested == "auto":
        return "chat" if has_chat_template(tokenizer) else "completion"
    return requested


def artifact_path(options: EvalOptions, task_name: str, suffix: str) -> Path:
    """``OUT/generations/TASK__SCHEME[__RUNKEY]SUFFIX``: one file per run, so schemes and
    option sets never overwrite each other's generations."""
    scheme = options.scheme.replace("/", "_")
    key = options.run_key
    name = f"{task_name}__{scheme}" + (f"__{key}" if key else "") + suffix
    return Path(options.out_dir or ".") / "generations" / name


def write_artifact(options: EvalOptions, task_name: str, suffix: str, records) -> Path:
    """Write per-item records (one JSON object a line) to the run's artifact file."""
    path = artifact_path(options, task_name, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


@dataclass
class GenerationPlan:
    """A family's prompts and how to decode them; ``details`` go into every metric."""

    prompts: list[str]
    settings: GenerationSettings
    details: dict
    max_input_tokens: int | None = None  # encoder inputs are cut to this many tokens


class GenerativeFamily:
    """build prompts -> generate -> score -> write artifacts -> metrics.

    A family sets ``artifact_suffix`` / ``artifact_key`` and implements ``items``
    (problems, documents), ``plan`` (prompts and generation settings) and ``score``
    (artifact records and metrics from the generated texts)."""

    artifact_suffix = ".jsonl"
    artifact_key = "artifact_file"
    verb = "generate"  # progress bar label

    def items(self, loaded, task: TaskDef, options: EvalOptions) -> list:
        raise NotImplementedError

    def plan(self, loaded, task: TaskDef, options: EvalOptions, items: list) -> GenerationPlan:
        raise NotImplementedError

    def score(self, task: TaskDef, options: EvalOptions, items: list, result: GenerationResult,
              plan: GenerationPlan) -> tuple[list[dict], list[Metric]]:
        raise NotImplementedError

    def evaluate(self, loaded, task: TaskDef, options: EvalOptions) -> list[Metric]:
        items = self.items(loaded, task, options)
        if options.limit:
            items = items[:options.limit]
        plan = self.plan(loaded, task, options, items)
        result = generate(loaded.model, loaded.tokenizer, plan.prompts, plan.settings, progress=options.progress,
                          desc=f"{task.name} {self.verb}", max_input_tokens=plan.max_input_tokens)
        records, metrics = self.score(task, options, items, result, plan)
        path = write_artifact(options, task.name, self.artifact_suffix, records)
        shared = plan.details | {"new_tokens": result.new_tokens, "generate_s": round(result.seconds, 3),
                                 "tokens_per_s": round(result.tokens_per_s, 2), self.artifact_key: str(path)}
        return [Metric(m.metric, m.value, m.n, shared | m.details) for m in metrics]


def generation_batch_size(task: TaskDef, options: EvalOptions) -> int:
    """Rows per decoding step: the run's --batch-size, else the task's, else the default."""
    return int(options.batch_size or task.batch_size or DEFAULT_BATCH_SIZE)

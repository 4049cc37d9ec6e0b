"""Task families: declarations live as YAML in ``fpbench/data/tasks/`` (read by
``fpbench.data.task_defs``); the Python that runs a task family lives in one module per
family here.

A family module exposes ``evaluate(loaded, task, options) -> list[Metric]``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from fpbench.errors import FpbenchError
from fpbench.data.task_defs import TASK_DIR, available_tasks, get_task  # noqa: F401  (re-exported)

# family name -> module holding its evaluate(); families register here, once.
FAMILIES = {
    "perplexity": "fpbench.eval.perplexity",
    "codegen": "fpbench.eval.codegen",
    "summarization": "fpbench.eval.summarization",
    "zeroshot": "fpbench.eval.zeroshot",
}

DEFAULT_SEQLEN = 2048


@dataclass
class EvalOptions:
    """Options every family may read; family-specific ones go in ``extra``."""

    limit: int | None = None
    seqlen: int | None = None
    data_dir: str | None = None
    seed: int = 0
    batch_size: int | None = None
    out_dir: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class Metric:
    metric: str
    value: float
    n: int
    details: dict = field(default_factory=dict)  # stderr, tokens/s, eval seconds...


def evaluate_task(loaded, task: dict, options: EvalOptions) -> list[Metric]:
    family = FAMILIES.get(task["family"])
    if family is None:
        raise FpbenchError(f"task {task['name']}: unknown family {task['family']!r}")
    return importlib.import_module(family).evaluate(loaded, task, options)

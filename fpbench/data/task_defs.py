"""Task declarations: the YAML files of ``fpbench/data/tasks/`` (dataset source,
split, joining, calibration split). Plain data, read by the layers that need it - the
calibration sampler as much as the task runners - so it sits low in the pipeline."""

from __future__ import annotations

from pathlib import Path

import yaml

from fpbench.errors import FpbenchError

TASK_DIR = Path(__file__).resolve().parent / "tasks"


def available_tasks() -> dict[str, dict]:
    tasks = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if isinstance(spec, dict) and "family" in spec:  # skip lm-eval style configs
            tasks[spec["name"]] = spec
    return tasks


def get_task(name: str) -> dict:
    tasks = available_tasks()
    if name not in tasks:
        raise FpbenchError(f"unknown task {name!r}; known tasks: {', '.join(tasks) or 'none'}")
    return tasks[name]

"""A tiny stand-in model and task family for sweep/report tests (seconds, no data).

``install(task_dir)`` points the task registry at YAML files of family ``fake`` and makes
the runner load a tiny torch model; the fake task's score is a deterministic function of
the quantized weights, so different schemes give different, reproducible numbers.
Environment knobs for crash tests: FAKE_COUNTER (a file counting evaluate calls across
processes) and FAKE_KILL_AT (SIGKILL this process at that call, before it returns).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch import nn

import fpbench.runner
import fpbench.data.task_defs
import fpbench.eval.base
from fpbench.models import LoadedModel
from fpbench.eval.base import Metric

FAKE_TASKS = {"fake_a": 0.0, "fake_b": 1000.0}  # name -> offset added to the score


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def load_model(spec=None, use_cache=True) -> LoadedModel:
    return LoadedModel(tiny_model(), None, "tiny", "random")


def _count_call() -> int:
    counter = os.environ.get("FAKE_COUNTER")
    if not counter:
        return 0
    path = Path(counter)
    calls = int(path.read_text() or 0) + 1 if path.exists() else 1
    path.write_text(str(calls))
    return calls


def evaluate(loaded, task, options):
    calls = _count_call()
    if calls and calls == int(os.environ.get("FAKE_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash in the middle of a run
    weights = [m.weight for m in loaded.model.modules() if isinstance(m, nn.Linear)]
    score = sum(float(w.double().abs().sum()) for w in weights) + float(task.params["offset"])
    return [Metric("score", score, options.limit or 4), Metric("aux", -score, options.limit or 4)]


def write_tasks(task_dir: Path) -> Path:
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, offset in FAKE_TASKS.items():
        (task_dir / f"{name}.yaml").write_text(
            f"name: {name}\nfamily: fake\noffset: {offset}\nheadline: score\n")
    return task_dir


def install(task_dir: Path) -> None:
    fpbench.data.task_defs.TASK_DIR = write_tasks(Path(task_dir))
    if "fake" not in fpbench.data.task_defs.EXTERNAL_FAMILIES:
        fpbench.data.task_defs.register_family("fake", {"offset": True})
    fpbench.eval.base.FAMILIES["fake"] = __name__
    fpbench.runner.load_model = load_model

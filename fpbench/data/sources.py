"""Where datasets come from: a local data folder first, else the hub when reachable.

A :class:`~fpbench.data.task_defs.Source` names a file relative to the data folder
(``--data-dir`` or ``FPBENCH_DATA_DIR``) and/or a hub dataset for
``datasets.load_dataset``. :func:`load_rows` is the one loader every task family and
the calibration sampler use. Missing data is one FpbenchError that names the dataset
and both ways to supply it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fpbench.data.task_defs import Source
from fpbench.errors import FpbenchError

DATA_DIR_ENV = "FPBENCH_DATA_DIR"
OFFLINE_REASON = "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1)"


@dataclass(frozen=True)
class Rows:
    """A dataset's items: text lines (a ``.txt``-like file, or a hub column named by
    ``field``) or records (a ``.jsonl`` file, or whole hub rows); ``local`` says which
    copy they came from (a local copy may name its record fields differently)."""

    items: list
    local: bool


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def hub_offline() -> bool:
    return any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def missing_data_error(dataset: str, source: Source, data_dir: str | os.PathLike | None,
                       reason: str) -> FpbenchError:
    resolved = resolve_data_dir(data_dir)
    where = f"{resolved / source.file}" if resolved and source.file else f"DIR/{source.file}"
    return FpbenchError(
        f"dataset {dataset!r} is not available ({reason}): pass --data-dir DIR or set "
        f"{DATA_DIR_ENV}=DIR with the file at {where}, or make the Hugging Face hub reachable"
    )


def local_file(source: Source, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local copy of a source, or None when no data folder holds it."""
    resolved = resolve_data_dir(data_dir)
    if resolved and source.file and (resolved / source.file).is_file():
        return resolved / source.file
    return None


def read_lines(path: Path) -> list[str]:
    """Lines without line endings (CRLF normalised), blank lines dropped."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [line for line in text.split("\n") if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def check_available(source: Source, dataset: str, data_dir: str | os.PathLike | None = None) -> None:
    """The error load_rows would raise without trying the hub: no local copy, and no hub
    source or the hub offline (a run checks its tasks' data before it loads a model)."""
    if local_file(source, data_dir) is not None:
        return
    if source.hub is None:
        raise missing_data_error(dataset, source, data_dir, "no hub source is defined")
    if hub_offline():
        reason = OFFLINE_REASON if resolve_data_dir(data_dir) else OFFLINE_REASON + " and no data folder is set"
        raise missing_data_error(dataset, source, data_dir, reason)


def check_tasks_data(tasks: list[str], data_dir: str | os.PathLike | None = None) -> None:
    """Each task's dataset readable (check_available), checked before a run loads its model:
    a missing dataset fails at once, not after minutes of loading and quantizing."""
    from fpbench.data.task_defs import get_task

    for name in tasks:
        task = get_task(name)
        if task.source is not None:
            check_available(task.source, task.name, data_dir)


def load_rows(source: Source, dataset: str, data_dir: str | os.PathLike | None = None) -> Rows:
    """The items of a source: its local file when the data folder holds it, else the hub
    split (unless offline), else one error naming the dataset and how to supply it."""
    path = local_file(source, data_dir)
    if path is not None:
        return Rows(read_jsonl(path) if path.suffix == ".jsonl" else read_lines(path), local=True)
    check_available(source, dataset, data_dir)
    hub = source.hub
    try:
        import datasets  # seconds to import; only a hub load needs it

        split = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    except Exception as exc:  # network, missing dataset: all one user-facing problem
        raise missing_data_error(dataset, source, data_dir,
                                 f"hub load failed: {str(exc).splitlines()[0]}") from exc
    items = [row[hub.field] for row in split] if hub.field else [dict(row) for row in split]
    return Rows(items, local=False)


def load_texts(source: Source, dataset: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The text items of a source (perplexity and calibration text)."""
    items = load_rows(source, dataset, data_dir).items
    if items and not isinstance(items[0], str):
        raise FpbenchError(f"dataset {dataset!r} holds records, not text lines; name the text column "
                           "as hub.field, or use a plain text file")
    return items

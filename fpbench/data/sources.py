"""Where datasets come from: a local data folder first, else the hub when reachable.

A source is a mapping from a task YAML: ``local: {file: REL_PATH}`` (relative to the
data folder given by ``--data-dir`` or ``FPBENCH_DATA_DIR``) and ``hub: {path, name,
split, field}`` for ``datasets.load_dataset``. Missing data is one FpbenchError that
names the dataset and both ways to supply it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fpbench.errors import FpbenchError

DATA_DIR_ENV = "FPBENCH_DATA_DIR"


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def hub_offline() -> bool:
    return any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _missing(dataset: str, source: dict, data_dir: Path | None, reason: str) -> FpbenchError:
    local = source.get("local", {}).get("file")
    where = f"{data_dir / local}" if data_dir and local else f"DIR/{local}"
    return FpbenchError(
        f"dataset {dataset!r} is not available ({reason}): pass --data-dir DIR or set "
        f"{DATA_DIR_ENV}=DIR with the file at {where}, or make the Hugging Face hub reachable"
    )


def local_file(source: dict, dataset: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local copy of a source, or None when no data folder holds it."""
    data_dir = resolve_data_dir(data_dir)
    rel = source.get("local", {}).get("file")
    if data_dir and rel and (data_dir / rel).is_file():
        return data_dir / rel
    return None


def read_lines(path: Path) -> list[str]:
    """Lines without line endings (CRLF normalised), blank lines dropped."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [line for line in text.split("\n") if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_texts(source: dict, dataset: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The text items of a source: lines of a local file, or a field of a hub split."""
    path = local_file(source, dataset, data_dir)
    if path is not None:
        return read_lines(path)
    resolved = resolve_data_dir(data_dir)
    hub = source.get("hub")
    if hub is None:
        raise _missing(dataset, source, resolved, "no hub source is defined")
    if hub_offline():
        reason = "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1)"
        if resolved is None:
            reason += " and no data folder is set"
        raise _missing(dataset, source, resolved, reason)
    try:
        import datasets

        split = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    except Exception as exc:  # network, missing dataset: all one user-facing problem
        raise _missing(dataset, source, resolved, f"hub load failed: {str(exc).splitlines()[0]}") from exc
    return [row[hub["field"]] for row in split]

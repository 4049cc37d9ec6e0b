"""Task declarations: the YAML files of ``fpbench/data/tasks/``, read into frozen,
typed :class:`TaskDef` values and checked as they load, so a typo in a YAML is one
error naming the file and the key rather than a KeyError deep inside a run. Plain data,
read by the layers that need it - the calibration sampler as much as the task runners -
so it sits low in the pipeline.

A declaration holds the keys every task may have (``name``, ``family``,
``description``, ``headline``) and the keys of its family (``FAMILY_KEYS``). Datasets
are :class:`Source` values: a file under the data folder and/or a hub dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from fpbench.errors import FpbenchError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_JOIN = "\n\n"
# MBPP's test split (Austin et al. 2021): task ids 11-510.
DEFAULT_TASK_IDS = (11, 510)
CODEGEN_DATASETS = ("humaneval", "mbpp")
COMMON_KEYS = {"name": True, "family": True, "description": False, "headline": False}
# family -> {key: required?}; the key names are TaskDef fields.
FAMILY_KEYS: dict[str, dict[str, bool]] = {
    "perplexity": {"source": True, "calibration": False, "join": False},
    "codegen": {"dataset": True, "source": False, "task_ids": False, "max_new_tokens": False,
                "completion_stop": False, "timeout_s": False, "batch_size": False},
    "summarization": {"source": True, "fields": False, "sentences": False, "max_input_tokens": False,
                      "max_new_tokens": False, "batch_size": False},
    "zeroshot": {"source": True, "lm_eval": True},
    "latency": {},  # timed on the run's own model (fpbench/eval/latency.py); no dataset
}
# Families defined outside the package (see register_family): their own keys, kept in params.
EXTERNAL_FAMILIES: dict[str, dict[str, bool]] = {}
HUB_KEYS = {"path": True, "split": True, "name": False, "field": False}
LOCAL_KEYS = {"file": True, "document": False, "reference": False, "id": False}
RECORD_FIELDS = ("document", "reference", "id")


@dataclass(frozen=True)
class HubSource:
    """Arguments of ``datasets.load_dataset``; ``field`` names the text column of a text source."""

    path: str
    split: str
    name: str | None = None
    field: str | None = None


@dataclass(frozen=True)
class Source:
    """Where a dataset's rows come from: ``file`` under the data folder (``--data-dir`` /
    ``FPBENCH_DATA_DIR``), else the hub. ``record_fields`` renames record fields of the
    local copy whose layout differs from the hub's (summarization: document, reference, id)."""

    file: str | None = None
    hub: HubSource | None = None
    record_fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class TaskDef:
    name: str
    family: str
    path: Path | None = None  # the YAML it was read from
    description: str = ""
    headline: str | None = None  # the metric a report shows first
    source: Source | None = None
    # perplexity
    calibration: Source | None = None  # validation text, only ever used to calibrate
    join: str = DEFAULT_JOIN  # between items of a text source
    # codegen
    dataset: str | None = None  # humaneval | mbpp
    task_ids: tuple[int, int] = DEFAULT_TASK_IDS
    completion_stop: tuple[str, ...] | None = None
    timeout_s: float | None = None
    # summarization: record field names of the hub rows
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sentences: int = 3
    max_input_tokens: int | None = None
    # generative families
    max_new_tokens: int | None = None
    batch_size: int | None = None
    # zeroshot: lm-eval task names, {hub: ..., local: ...}
    lm_eval: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # keys of a family registered with register_family
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def register_family(family: str, keys: Mapping[str, bool]) -> None:
    """Accept declarations of a family defined outside the package; ``keys`` maps each
    of its own keys to whether it is required. Their values land in ``TaskDef.params``."""
    if family in FAMILY_KEYS:
        raise FpbenchError(f"task family {family!r} is built in; choose another name")
    EXTERNAL_FAMILIES[family] = dict(keys)


def _check_keys(where: str, mapping, allowed: Mapping[str, bool]) -> None:
    if not isinstance(mapping, dict):
        raise FpbenchError(f"{where}: expected a mapping of keys, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise FpbenchError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
    missing = [key for key, required in allowed.items() if required and key not in mapping]
    if missing:
        raise FpbenchError(f"{where}: missing required key {missing[0]!r}")


def _typed(where: str, key: str, value, kind: type | tuple[type, ...]):
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise FpbenchError(f"{where}: key {key!r} must be {names}, got {value!r}")
    return value


def _source(where: str, spec) -> Source:
    _check_keys(where, spec, {"local": False, "hub": False})
    hub = local = None
    if "hub" in spec:
        _check_keys(f"{where}.hub", spec["hub"], HUB_KEYS)
        hub = HubSource(**{k: None if v is None else str(v) for k, v in spec["hub"].items()})
    if "local" in spec:
        _check_keys(f"{where}.local", spec["local"], LOCAL_KEYS)
        local = {k: _typed(f"{where}.local", k, v, str) for k, v in spec["local"].items()}
    if hub is None and local is None:
        raise FpbenchError(f"{where}: declare 'local: {{file: ...}}', 'hub: {{path: ..., split: ...}}' or both")
    record_fields = {k: local[k] for k in RECORD_FIELDS if local and k in local}
    return Source(file=local["file"] if local else None, hub=hub, record_fields=MappingProxyType(record_fields))


def _string_map(where: str, key: str, value, allowed: tuple[str, ...]) -> Mapping[str, str]:
    _check_keys(f"{where}.{key}", value, {k: False for k in allowed})
    return MappingProxyType({k: _typed(f"{where}.{key}", k, v, str) for k, v in value.items()})


def parse_task(spec, path: Path) -> TaskDef:
    """A declaration from one YAML document; every problem is one FpbenchError naming the file."""
    where = str(path)
    if not isinstance(spec, dict):
        raise FpbenchError(f"{where}: a task file holds one mapping of keys (name, family, ...)")
    if "family" not in spec:
        raise FpbenchError(f"{where}: missing required key 'family'")
    family = spec["family"]
    families = {**FAMILY_KEYS, **EXTERNAL_FAMILIES}
    if family not in families:
        raise FpbenchError(f"{where}: key 'family' is {family!r}; use one of {', '.join(families)}")
    family_keys = families[family]
    _check_keys(where, spec, COMMON_KEYS | family_keys)
    if family in EXTERNAL_FAMILIES:
        return TaskDef(name=str(spec["name"]), family=family, path=path,
                       description=str(spec.get("description", "")), headline=spec.get("headline"),
                       params=MappingProxyType({k: spec[k] for k in family_keys if k in spec}))
    values: dict[str, Any] = {"name": _typed(where, "name", spec["name"], str), "family": family, "path": path}
    for key, value in spec.items():
        if key in ("name", "family"):
            continue
        if key in ("source", "calibration"):
            values[key] = _source(f"{where}: {key}", value)
        elif key in ("description", "headline", "join"):
            values[key] = _typed(where, key, value, str)
        elif key == "dataset":
            if value not in CODEGEN_DATASETS:
                raise FpbenchError(f"{where}: key 'dataset' is {value!r}; use one of {', '.join(CODEGEN_DATASETS)}")
            values[key] = value
        elif key == "task_ids":
            if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
                raise FpbenchError(f"{where}: key 'task_ids' must be [FIRST, LAST] (integers), got {value!r}")
            values[key] = tuple(value)
        elif key == "completion_stop":
            if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
                raise FpbenchError(f"{where}: key 'completion_stop' must be a list of non-empty strings")
            values[key] = tuple(value)
        elif key == "timeout_s":
            values[key] = float(_typed(where, key, value, (int, float)))
        elif key in ("sentences", "max_input_tokens", "max_new_tokens", "batch_size"):
            if _typed(where, key, value, int) < 1:
                raise FpbenchError(f"{where}: key {key!r} must be a positive integer, got {value!r}")
            values[key] = value
        elif key == "fields":
            values[key] = _string_map(where, key, value, RECORD_FIELDS)
        elif key == "lm_eval":
            values[key] = _string_map(where, key, value, ("hub", "local"))
            if set(value) != {"hub", "local"}:
                raise FpbenchError(f"{where}: key 'lm_eval' needs both 'hub' and 'local' lm-eval task names")
    task = TaskDef(**values)
    if task.dataset == "mbpp" and task.source is None:
        raise FpbenchError(f"{where}: missing required key 'source' (MBPP is read from a file or the hub)")
    return task


def read_task_file(path: Path) -> TaskDef:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FpbenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from exc
    return parse_task(spec, path)


def available_tasks() -> dict[str, TaskDef]:
    """Every declaration in ``TASK_DIR`` (lm-eval's own configs sit in a subfolder)."""
    tasks: dict[str, TaskDef] = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        task = read_task_file(path)
        if task.name in tasks:
            raise FpbenchError(f"{path}: task name {task.name!r} is also declared in {tasks[task.name].path}")
        tasks[task.name] = task
    return tasks


def get_task(name: str) -> TaskDef:
    tasks = available_tasks()
    if name not in tasks:
        raise FpbenchError(f"unknown task {name!r}; known tasks: {', '.join(tasks) or 'none'}")
    return tasks[name]

"""The results store: one JSONL file of records, appended atomically, plus a CSV copy.

Appends take an exclusive file lock and are flushed and fsync'ed, so two processes never
interleave lines and a crash loses at most the record being written. Every record is
checked against its kind's schema (``records.schema``): a writer's invalid record is an
error before anything is written. When reading, a line that is not a valid record (a
crash mid-write, a bad merge, ``{}``, some other program's JSON, nesting deeper than any
record has) is skipped with one warning; records before and after it are kept, and the
next append starts on a fresh line. A file in which no line is a record is an error (it
is not a results file), never silently empty.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

from filelock import FileLock

from fpbench.errors import FpbenchError
from fpbench.records.schema import RESULT, SWEEP, check, validate

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
SWEEPS_JSONL = "sweeps.jsonl"  # one line per sweep invocation: config, shard, counts, wall time
LOG_KINDS = {RESULTS_JSONL: RESULT, SWEEPS_JSONL: SWEEP.name}  # the files a results folder holds
# Records nest three levels at most (decode_step_ms: {rows: {form: ms}}). Deeper lines are
# refused before json.loads, which would recurse once per level and, at a line of 100,000
# "[", raise RecursionError instead of skipping the line.
MAX_NESTING = 16
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class CorruptRecordWarning(UserWarning):
    """Some lines of a results file are not records; they were skipped."""


def _append_locked(path: Path, payload: str) -> None:
    """Append whole lines under an exclusive lock; flush + fsync before releasing it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        with open(path, "a+b") as fh:
            # If a crashed writer left a partial last line, start on a fresh line so the
            # new record is not glued onto it (the partial line is skipped when read).
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(payload.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())


def _lines(records: list[dict], kind: str, dump=None) -> str:
    """The JSON lines of valid records; a record the reader would skip is an error here."""
    lines = []
    for record in records:
        check(record, kind)
        lines.append((dump or record_identity)(record))
        if too_deep(lines[-1]):
            raise FpbenchError(f"refusing to write a {kind} record nested deeper than {MAX_NESTING} levels "
                               "(readers skip such lines); flatten what the writer puts in it")
    return "".join(line + "\n" for line in lines)


def append_jsonl(path: str | os.PathLike, records: list[dict], kind: str) -> None:
    """Append records of ``kind`` (one JSON line each) to a JSONL file, under the same lock
    and partial-line guard as the results store (the benchmark logs use it)."""
    if records:
        _append_locked(Path(path), _lines(records, kind, json.dumps))


def ensure_writable(out_dir: str | os.PathLike) -> None:
    """Create ``out_dir`` if needed and prove a file can be written in it (and its results
    file appended to), so a run fails before loading a model rather than after measuring."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
        if (out_dir / RESULTS_JSONL).exists():
            with open(out_dir / RESULTS_JSONL, "ab"):
                pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FpbenchError(f"cannot write results to {out_dir} ({reason}); pass --out a folder you can "
                           "create and write to") from None


def write_atomic(path: Path, text: str) -> None:
    """Write to a unique temporary file, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def too_deep(line: str) -> bool:
    """Whether a JSON line nests arrays and objects deeper than ``MAX_NESTING`` (brackets
    inside strings do not count)."""
    if line.count("[") + line.count("{") <= MAX_NESTING:  # the common case: no scan needed
        return False
    depth = deepest = 0
    for char in _JSON_STRING.sub('""', line):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest > MAX_NESTING


def parse_record(line: str, kind: str = RESULT) -> tuple[dict | None, str | None]:
    """(record, None) for a valid line of a ``kind`` file, else (None, what is wrong)."""
    if too_deep(line):
        return None, f"nested deeper than {MAX_NESTING} levels"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON (truncated?)"
    problem = validate(record, kind)
    return (None, problem) if problem else (record, None)


def read_jsonl(path: Path, kind: str = RESULT) -> list[dict]:
    """Every record of a JSONL file of ``kind``; lines that are not valid records are
    skipped with one warning that names the first few and why."""
    if not path.is_file():
        return []
    records, bad_lines, nonblank = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            nonblank += 1
            record, problem = parse_record(line, kind)
            if record is None:
                bad_lines.append((number, problem))
            else:
                records.append(record)
    if bad_lines and not records:
        raise FpbenchError(f"{path} has {nonblank} lines and none is a valid {kind} record (line "
                           f"{bad_lines[0][0]}: {bad_lines[0][1]}); it is not an fpbench results file "
                           "(point at the folder holding results.jsonl)")
    if bad_lines:
        shown = "; ".join(f"line {number}: {problem}" for number, problem in bad_lines[:3])
        shown += "; ..." if len(bad_lines) > 3 else ""
        warnings.warn(f"{path}: skipped {len(bad_lines)} truncated or corrupt line(s) ({shown}); "
                      f"the other {len(records)} records are kept", CorruptRecordWarning, stacklevel=2)
    return records


def record_identity(record: dict) -> str:
    """The exact content of a record, to recognise the same record in two files."""
    return json.dumps(record, sort_keys=True, default=str)


def _log_kind(name: str) -> str:
    if name not in LOG_KINDS:
        raise FpbenchError(f"{name!r} is not a file of a results folder; use one of {', '.join(LOG_KINDS)}")
    return LOG_KINDS[name]


class ResultStore:
    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / RESULTS_JSONL

    def append(self, records: list[dict]) -> None:
        if records:
            _append_locked(self.path, _lines(records, RESULT))

    def append_log(self, name: str, record: dict) -> None:
        """Append one record to a side log in the same folder (e.g. the sweep log)."""
        _append_locked(self.dir / name, _lines([record], _log_kind(name)))

    def read_log(self, name: str) -> list[dict]:
        return read_jsonl(self.dir / name, _log_kind(name))

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def merge(self, records: list[dict], name: str = RESULTS_JSONL) -> int:
        """Append the records this store (or its side log ``name``) does not hold yet, by
        exact content; returns how many. Merging several shards' results is idempotent."""
        present = {record_identity(r) for r in read_jsonl(self.dir / name, _log_kind(name))}
        new, seen = [], set()
        for record in records:
            identity = record_identity(record)
            if identity not in present and identity not in seen:
                seen.add(identity)
                new.append(record)
        if new:
            _append_locked(self.dir / name, _lines(new, _log_kind(name)))
        return len(new)

    def write_csv(self, records: list[dict] | None = None) -> Path:
        import pandas as pd

        records = self.read() if records is None else records
        if not records:
            raise FpbenchError(f"no records in {self.path}; run `fpbench run` or `fpbench sweep` first")
        path = self.dir / RESULTS_CSV
        write_atomic(path, pd.json_normalize(records).to_csv(index=False))
        return path


def read_results(paths: list[str | os.PathLike]) -> list[dict]:
    """Records of several results folders (or .jsonl files), in the order given."""
    records = []
    for path in map(Path, paths):
        if path.is_dir():
            if not (path / RESULTS_JSONL).is_file():
                raise FpbenchError(f"{path} holds no {RESULTS_JSONL}; pass a results folder written by "
                                   "`fpbench run`/`fpbench sweep` or a .jsonl file")
            records += ResultStore(path).read()
        elif path.is_file():
            records += read_jsonl(path)
        else:
            raise FpbenchError(f"results path {path} does not exist")
    return records

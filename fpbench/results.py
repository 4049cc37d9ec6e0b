"""The results store: one JSONL file of records, appended atomically, plus a CSV copy.

Appends take an exclusive file lock and are flushed and fsync'ed, so two processes never
interleave lines and a crash loses at most the record being written. A truncated or
corrupt line (a crash mid-write) is skipped with a warning when reading; records before
and after it are kept.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from filelock import FileLock

from .errors import FpbenchError

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"


class ResultStore:
    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / RESULTS_JSONL
        self._lock = FileLock(str(self.path) + ".lock")

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)
        with self._lock:
            with open(self.path, "a+b") as fh:
                # If a crashed writer left a partial last line, start on a fresh line.
                fh.seek(0, os.SEEK_END)
                if fh.tell() > 0:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        fh.write(b"\n")
                fh.write(payload.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path}:{number}: skipping a truncated or corrupt record")
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    def write_csv(self) -> Path:
        import pandas as pd

        records = self.read()
        if not records:
            raise FpbenchError(f"no records in {self.path}; run `fpbench run` first")
        path = self.dir / RESULTS_CSV
        tmp = path.with_suffix(".csv.tmp")
        pd.json_normalize(records).to_csv(tmp, index=False)
        os.replace(tmp, path)
        return path

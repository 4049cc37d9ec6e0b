"""The results store: atomic locked appends, corrupt lines, merges, CSV."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock

from fpbench.errors import FpbenchError
from fpbench.records.store import CorruptRecordWarning, ResultStore, read_results

REPO = Path(__file__).parent.parent


def records(n: int, tag: str = "a", pad: int = 0) -> list[dict]:
    return [{"model": "m", "scheme": f"s{i}", "task": "t", "metric": "x", "value": i + 0.5,
             "writer": tag, "i": i, "pad": "p" * pad} for i in range(n)]


def test_append_read_round_trip(tmp_path):
    store = ResultStore(tmp_path / "out")
    assert store.read() == []
    store.append(records(3))
    store.append([])
    store.append(records(2, "b"))
    assert store.read() == records(3) + records(2, "b")
    text = store.path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 5


def test_truncated_last_line_is_skipped_with_a_warning_and_the_next_append_is_clean(tmp_path):
    store = ResultStore(tmp_path)
    store.append(records(3))
    with open(store.path, "a") as fh:  # a writer killed mid-line
        fh.write(json.dumps(records(1, "lost")[0])[:25])
    with pytest.warns(CorruptRecordWarning, match=r"skipped 1 .*line 4.*other 3 records are kept"):
        assert store.read() == records(3)
    store.append(records(1, "after"))
    with pytest.warns(CorruptRecordWarning):
        assert store.read() == records(3) + records(1, "after")
    lines = store.path.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["writer"] == "after"


def test_corrupt_middle_lines_keep_the_records_around_them(tmp_path):
    store = ResultStore(tmp_path)
    store.append(records(2))
    with open(store.path, "ab") as fh:
        fh.write(b'{"model": "m", "val\n[1, 2]\n\xff\xfe garbage\n\n')
    store.append(records(2, "b"))
    with pytest.warns(CorruptRecordWarning, match="skipped 3") as caught:
        assert store.read() == records(2) + records(2, "b")
    assert len(caught) == 1  # one warning for the file, not one per line


def test_a_file_with_no_record_is_a_one_line_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("model,scheme,value\nm,fp16,1.0\n")
    with pytest.raises(FpbenchError, match="not an fpbench results file") as info:
        ResultStore(tmp_path).read()
    assert "\n" not in str(info.value)
    assert path.read_text() == "model,scheme,value\nm,fp16,1.0\n"  # never rewritten


APPENDER = textwrap.dedent("""
    import sys
    from fpbench.records.store import ResultStore
    out, tag, count, pad = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = ResultStore(out)
    for i in range(count):
        # 3 records per append, each about `pad` bytes: large writes are where unlocked
        # appenders would interleave.
        store.append([{"writer": tag, "i": i, "j": j, "pad": tag * pad} for j in range(3)])
""")


def test_concurrent_appends_from_several_processes_never_interleave(tmp_path):
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    writers, appends, pad = 4, 40, 20000
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), chr(97 + w),
                               str(appends), str(pad)], cwd=REPO) for w in range(writers)]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == writers * appends * 3
    parsed = [json.loads(line) for line in lines]  # every line is one whole record
    for record in parsed:
        assert record["pad"] == record["writer"] * pad
    assert len({(r["writer"], r["i"], r["j"]) for r in parsed}) == len(parsed)
    # Each append's records stay together and in order.
    for k in range(0, len(parsed), 3):
        group = parsed[k:k + 3]
        assert [r["j"] for r in group] == [0, 1, 2] and len({(r["writer"], r["i"]) for r in group}) == 1


def test_append_waits_for_the_lock(tmp_path):
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    out = tmp_path / "out"
    out.mkdir()
    lock = FileLock(str(out / "results.jsonl") + ".lock")
    with lock:
        proc = subprocess.Popen([sys.executable, str(script), str(out), "z", "1", "10"], cwd=REPO)
        time.sleep(3)  # ample time for the child to start and reach its append
        assert proc.poll() is None  # blocked on the lock
        assert not (out / "results.jsonl").exists() or (out / "results.jsonl").read_text() == ""
    assert proc.wait(timeout=60) == 0
    assert len(ResultStore(out).read()) == 3


def test_merge_is_idempotent_and_keeps_order(tmp_path):
    shard1, shard2, merged = ResultStore(tmp_path / "s1"), ResultStore(tmp_path / "s2"), ResultStore(tmp_path / "m")
    shard1.append(records(3, "one"))
    shard2.append(records(2, "two"))
    assert merged.merge(read_results([tmp_path / "s1", tmp_path / "s2" / "results.jsonl"])) == 5
    assert merged.merge(read_results([tmp_path / "s1", tmp_path / "s2"])) == 0
    assert merged.read() == records(3, "one") + records(2, "two")
    with pytest.raises(FpbenchError, match="does not exist"):
        read_results([tmp_path / "nope"])
    with pytest.raises(FpbenchError, match="holds no results.jsonl"):
        read_results([tmp_path])


def test_write_csv_matches_records(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(FpbenchError, match="no records"):
        store.write_csv()
    nested = [r | {"options": {"backend": "kernel"}} for r in records(3)]
    store.append(nested)
    frame = pd.read_csv(store.write_csv())
    assert frame["value"].tolist() == [0.5, 1.5, 2.5]
    assert frame["options.backend"].tolist() == ["kernel"] * 3
    assert not list(tmp_path.glob("*.tmp"))


def test_append_jsonl_appends_whole_lines_after_a_partial_one(tmp_path):
    from fpbench.records.store import append_jsonl

    path = tmp_path / "logs" / "bench.jsonl"
    append_jsonl(path, [{"a": 1}, {"b": 2}])
    append_jsonl(path, [])
    with open(path, "a") as fh:
        fh.write('{"half": ')  # a writer died mid-line
    append_jsonl(path, [{"c": 3}])
    assert path.read_text().splitlines() == ['{"a": 1}', '{"b": 2}', '{"half": ', '{"c": 3}']

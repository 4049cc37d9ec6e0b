"""The results store: atomic locked appends, corrupt and invalid lines, merges, CSV, preflight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock

from fpbench.errors import FpbenchError
from fpbench.records.store import (MAX_NESTING, CorruptRecordWarning, ResultStore, append_jsonl, ensure_writable,
                                   read_jsonl, read_results)

REPO = Path(__file__).parent.parent
# The smallest valid accuracy record (records/schema.py: ACCURACY.required).
CORE = {"model": "m", "format": "int4", "task": "t", "metric": "x", "n": 4, "seed": 0,
        "time": "2026-01-01T00:00:00+00:00"}


def records(n: int, tag: str = "a", pad: int = 0) -> list[dict]:
    return [CORE | {"scheme": f"s{i}", "value": i + 0.5, "writer": tag, "i": i, "pad": "p" * pad}
            for i in range(n)]


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
    core = {"model": "m", "scheme": "s", "format": "int4", "task": "t", "metric": "x", "value": 1.0, "n": 1,
            "seed": 0, "time": "2026-01-01T00:00:00+00:00"}
    for i in range(count):
        # 3 records per append, each about `pad` bytes: large writes are where unlocked
        # appenders would interleave.
        store.append([core | {"writer": tag, "i": i, "j": j, "pad": tag * pad} for j in range(3)])
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


def bench_rows(*kernels: str) -> list[dict]:
    return [{"kernel": k, "M": 1, "N": 64, "K": 128, "median_ms": 0.5, "time": "2026-01-01T00:00:00+00:00"}
            for k in kernels]


def test_append_jsonl_appends_whole_lines_after_a_partial_one(tmp_path):
    path = tmp_path / "logs" / "bench.jsonl"
    append_jsonl(path, bench_rows("a", "b"), "kernel_bench")
    append_jsonl(path, [], "kernel_bench")
    with open(path, "a") as fh:
        fh.write('{"half": ')  # a writer died mid-line
    append_jsonl(path, bench_rows("c"), "kernel_bench")
    lines = path.read_text().splitlines()
    assert lines[2] == '{"half": ' and len(lines) == 4
    assert [json.loads(lines[i])["kernel"] for i in (0, 1, 3)] == ["a", "b", "c"]
    with pytest.warns(CorruptRecordWarning, match="line 3: not JSON"):
        assert read_jsonl(path, "kernel_bench") == bench_rows("a", "b", "c")


# --- records that are JSON but not records -------------------------------------------------------

INVALID_LINES = {  # line -> why the store skips it (the warning's words)
    "{}": "field(s) 'model', 'scheme', 'format', ... missing",
    '{"name": "some other tool", "version": 3}': "missing",
    json.dumps(CORE | {"scheme": "s", "value": "0.5"}): "field 'value' is str",
    json.dumps(CORE | {"scheme": "s", "value": 0.5, "n": True}): "field 'n' is bool",
    json.dumps(CORE | {"scheme": "s", "value": 0.5, "seed": None}): "field 'seed' is NoneType",
    json.dumps(CORE | {"scheme": 7, "value": 0.5}): "field 'scheme' is int",
    '"just a string"': "a JSON str, not an object",
    "[" * 100_000 + "]" * 100_000: f"nested deeper than {MAX_NESTING} levels",
    "[" * 100_000: f"nested deeper than {MAX_NESTING} levels",
}


@pytest.mark.parametrize("line", INVALID_LINES, ids=range(len(INVALID_LINES)))
def test_an_invalid_line_is_skipped_with_a_warning_naming_it(tmp_path, line):
    store = ResultStore(tmp_path)
    store.append(records(2))
    with open(store.path, "a") as fh:
        fh.write(line + "\n")
    store.append(records(1, "after"))
    with pytest.warns(CorruptRecordWarning) as caught:
        assert store.read() == records(2) + records(1, "after")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "skipped 1 truncated or corrupt line(s) (line 3: " in message
    assert INVALID_LINES[line] in message and message.endswith("the other 3 records are kept")


def test_all_invalid_lines_together_make_one_warning_and_keep_every_record(tmp_path):
    store = ResultStore(tmp_path)
    store.append(records(2))
    with open(store.path, "a") as fh:
        fh.write("".join(line + "\n" for line in INVALID_LINES))
    store.append(records(2, "after"))
    with pytest.warns(CorruptRecordWarning, match=rf"skipped {len(INVALID_LINES)} .*; \.\.\.\); the other 4"):
        assert read_results([tmp_path]) == records(2) + records(2, "after")


def test_nesting_limit_counts_brackets_not_string_contents(tmp_path):
    deep_but_fine = CORE | {"scheme": "s", "value": 1.0, "note": "[{" * 1000,
                            "options": {"a": {"b": [[1, 2], [3]]}}}
    # record {, options {, then lists: MAX_NESTING - 1 lists are one level too many.
    nested = json.loads("[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1))
    store = ResultStore(tmp_path)
    store.append([deep_but_fine])
    with pytest.raises(FpbenchError, match=f"nested deeper than {MAX_NESTING} levels"):
        store.append([CORE | {"scheme": "s", "value": 1.0, "options": {"x": nested}}])
    with open(store.path, "a") as fh:  # as another program could write it
        fh.write(json.dumps(CORE | {"scheme": "s", "value": 1.0, "options": {"x": nested}}) + "\n")
        fh.write(json.dumps(CORE | {"scheme": "s", "value": 2.0, "options": {"x": nested[0]}}) + "\n")
    with pytest.warns(CorruptRecordWarning, match=f"skipped 1 .*line 2: nested deeper than {MAX_NESTING}"):
        assert [r["value"] for r in store.read()] == [1.0, 2.0]


def test_report_and_dry_run_survive_invalid_lines(tmp_path):
    from click.testing import CliRunner

    from fpbench.cli import main

    store = ResultStore(tmp_path / "out")
    store.append(records(2) + records(2, "b"))
    with open(store.path, "a") as fh:
        fh.write("".join(line + "\n" for line in INVALID_LINES))
    runner = CliRunner()
    report = runner.invoke(main, ["report", str(tmp_path / "out"), "--no-plots"])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "out" / "REPORT.md").is_file()
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 4
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"name": "t", "models": ["default"], "schemes": ["int4/g128/rtn"],
                                  "tasks": ["wikitext2"]}))
    dry = runner.invoke(main, ["sweep", str(config), "--dry-run", "--out", str(tmp_path / "out")])
    assert dry.exit_code == 0, dry.output
    assert "1 runs, 1 to run, 0 already done" in dry.output


def test_writers_cannot_append_an_invalid_record(tmp_path):
    store = ResultStore(tmp_path)
    store.append(records(1))
    before = store.path.read_bytes()
    for bad in ({}, CORE | {"scheme": "s", "value": None}, CORE | {"scheme": "s", "value": 1.0, "n": "4"}):
        with pytest.raises(FpbenchError, match="refusing to write an invalid result record") as info:
            store.append(records(1, "fine") + [bad])  # nothing of a bad batch is written
        assert "\n" not in str(info.value)
    with pytest.raises(FpbenchError, match="refusing to write an invalid sweep record"):
        store.append_log("sweeps.jsonl", {"sweep": "t"})
    with pytest.raises(FpbenchError, match="not a file of a results folder"):
        store.append_log("notes.jsonl", {"sweep": "t"})
    with pytest.raises(FpbenchError, match="invalid kernel_bench record.*'median_ms' is str"):
        append_jsonl(tmp_path / "bench.jsonl", [bench_rows("a")[0] | {"median_ms": "fast"}], "kernel_bench")
    with pytest.raises(FpbenchError, match="record kind 'bench' is unknown"):
        append_jsonl(tmp_path / "bench.jsonl", bench_rows("a"), "bench")
    assert store.path.read_bytes() == before and not (tmp_path / "bench.jsonl").exists()


@pytest.mark.parametrize("folder", sorted(p.name for p in Path(__file__).resolve().parents[1].glob("reference*")
                                           if (p / "results.jsonl").is_file()))
def test_committed_results_read_without_skipping_a_line(tmp_path, folder):
    copy = tmp_path / folder
    shutil.copytree(REPO / folder, copy)
    lines = {name: sum(1 for line in (copy / name).read_text().splitlines() if line.strip())
             for name in ("results.jsonl", "sweeps.jsonl")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped line would be a CorruptRecordWarning
        assert len(ResultStore(copy).read()) == lines["results.jsonl"] > 0
        assert len(ResultStore(copy).read_log("sweeps.jsonl")) == lines["sweeps.jsonl"] > 0
        for name, kind in (("bench.jsonl", "kernel_bench"), ("e2e.jsonl", "e2e_bench"),
                           ("generation.jsonl", "generation_bench")):
            path = copy / "bench" / name
            if path.is_file():
                assert len(read_jsonl(path, kind)) == len(path.read_text().splitlines())


# --- preflight -------------------------------------------------------------------------------------

def test_ensure_writable_creates_the_folder_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "a" / "b"
    ensure_writable(out)
    assert out.is_dir() and list(out.iterdir()) == []
    ResultStore(out).append(records(1))
    ensure_writable(out)  # an existing results file is opened for appending, not changed
    assert ResultStore(out).read() == records(1)


@pytest.mark.parametrize("make_out", [
    lambda tmp: tmp / "a-file" / "sub",  # a parent that is a regular file stops root as well
    lambda tmp: tmp / "a-file",  # the folder's own name taken by a file
    lambda tmp: Path("/proc/self/fpbench-out"),  # procfs refuses new entries to everyone
], ids=["under-a-file", "is-a-file", "procfs"])
def test_ensure_writable_is_a_one_line_error_naming_the_path_and_the_fix(tmp_path, make_out):
    (tmp_path / "a-file").write_text("not a folder")
    out = make_out(tmp_path)
    with pytest.raises(FpbenchError) as info:
        ensure_writable(out)
    message = str(info.value)
    assert "\n" not in message and str(out) in message and "pass --out a folder you can" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_ensure_writable_refuses_a_read_only_folder(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(FpbenchError, match="Permission denied"):
            ensure_writable(tmp_path)
    finally:
        tmp_path.chmod(0o755)

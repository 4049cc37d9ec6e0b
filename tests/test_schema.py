"""The record schema and the environment: every writer's records validate, a bad field is
named, and the environment outside a git checkout says nothing on stderr."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fpbench.errors import FpbenchError
from fpbench.records import environment as env_module
from fpbench.records.environment import environment, git_revision, utc_now
from fpbench.records.schema import (ACCURACY, ANALYZE, KINDS, LATENCY, RESULT, check, kind_of, validate)

from test_sweep import fake  # noqa: F401 - the fake task family and tiny model, as a fixture

REPO = Path(__file__).parent.parent
STAMP = "2026-01-01T00:00:00+00:00"


def accuracy(**changes) -> dict:
    return {"model": "m", "scheme": "int4/g128/rtn", "format": "int4", "task": "wikitext2",
            "metric": "perplexity", "value": 21.5, "n": 8, "seed": 0, "time": STAMP} | changes


# --- the schema --------------------------------------------------------------------------------

def test_every_kind_lists_distinct_typed_fields():
    for kind in KINDS.values():
        assert kind.required
        # A field listed twice (a scheme field among the optional ones) has one type.
        assert all(kind.optional[name] == kind.required[name] for name in set(kind.required) & set(kind.optional))
        for types in kind.fields.values():
            assert types and all(isinstance(t, type) for t in types)


def test_latency_fields_are_reserved_and_optional_on_accuracy_rows():
    assert set(LATENCY) == {"decode_ms_per_token", "decode_tokens_per_s", "prefill_tokens_per_s", "weight_bytes",
                            "kernel_isa", "cpu"}
    assert not set(LATENCY) & set(ACCURACY.required)
    measured = accuracy(decode_ms_per_token=12.5, decode_tokens_per_s=80, prefill_tokens_per_s=950.0,
                        weight_bytes=101_000_000, kernel_isa="avx2", cpu="AMD EPYC")
    assert validate(measured) is None and validate(accuracy()) is None
    assert "'weight_bytes' is float" in validate(accuracy(weight_bytes=1.5e8))


@pytest.mark.parametrize("record, problem", [
    ({}, "field(s) 'model', 'scheme', 'format', ... missing"),
    ([accuracy()], "a JSON list, not an object"),
    (accuracy(value="21.5"), "accuracy field 'value' is str '21.5', not number"),
    (accuracy(value=None), "'value' is NoneType"),
    (accuracy(n=True), "'n' is bool"),  # True is an int to Python, not a count
    (accuracy(n=np.int64(8)), "'n' is int64"),  # numpy scalars are not JSON numbers
    (accuracy(seed=1.0), "'seed' is float"),
    (accuracy(granularity=128), "'granularity' is int '128', not string or null"),
    (accuracy(options=[]), "'options' is list"),
    (accuracy(include_head="no"), "'include_head' is str"),
    ({k: v for k, v in accuracy().items() if k != "time"}, "field(s) 'time' missing"),
    (accuracy(task="analyze-layers", n=None), None),  # analyze rows: no seed needed, n may be null
    (accuracy(task="analyze-layers", bits="8"), "analyze field 'bits' is str"),
])
def test_validate_names_the_first_problem(record, problem):
    found = validate(record, RESULT)
    assert found == problem if problem is None else problem in found


def test_values_json_allows_are_numbers():
    assert validate(accuracy(value=float("nan"))) is None  # a NaN metric is a measurement too
    assert validate(accuracy(value=np.float64(1.5))) is None  # a float subclass that json writes as a float
    assert validate(accuracy(value=3)) is None


def test_check_is_the_writers_one_line_error():
    check(accuracy())
    with pytest.raises(FpbenchError, match=r"refusing to write an invalid result record \(accuracy field 'n'") as info:
        check(accuracy(n="8"))
    assert "\n" not in str(info.value)
    with pytest.raises(FpbenchError, match="record kind 'results' is unknown; use one of result, accuracy"):
        kind_of({}, "results")


def test_result_files_hold_accuracy_and_analyze_rows():
    assert kind_of(accuracy(), RESULT) is ACCURACY
    assert kind_of(accuracy(task="analyze-synthetic"), RESULT) is ANALYZE
    assert kind_of({"task": 3}, RESULT) is ACCURACY


# --- the writers' records validate ---------------------------------------------------------------

def test_runner_records_validate_and_carry_the_environment(tmp_path, fake):  # noqa: F811
    from fpbench.quant.scheme import Scheme
    from fpbench.runner import RunConfig, run

    records = run(RunConfig(Scheme.parse("int8/channel/rtn"), ["fake_a"], limit=4, out_dir=str(tmp_path),
                            progress=False))
    assert len(records) == 2
    for record in records:
        assert validate(record) is None and kind_of(record, RESULT) is ACCURACY
        assert set(ACCURACY.required) | set(environment()) | {"granularity", "algo", "task_s"} <= set(record)
        assert {k: record[k] for k in environment()} == environment()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["time"])
    stored = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert stored == records


def test_analyze_records_validate_and_hold_json_numbers(tmp_path):
    from fpbench.analyze import run_synthetic

    frame, _, _ = run_synthetic(tmp_path, formats=("int8", "fp8_e4m3"), block_schemes=("mxfp4_e2m1/g32/rtn",))
    stored = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    exact = [r for r in stored if r["method"] == "exact"]
    assert len(exact) == len(frame) and len(stored) > len(exact)
    for record in stored:
        assert validate(record) is None and kind_of(record, RESULT) is ANALYZE
        assert all(not isinstance(v, str) for k, v in record.items() if k in ("n", "value", "bits", "seed"))
    assert all(r["bits"] == 8 and isinstance(r["bits"], int) for r in exact)  # numpy int64 was written as "8"


def test_bench_rows_of_every_kind_validate(tmp_path, monkeypatch):
    from fpbench.bench import e2e
    from fpbench.bench import kernels as bench

    monkeypatch.setattr(bench, "COLD_BYTES", 2 * 2**20)  # tiny buffers: the records matter, not the times
    monkeypatch.setattr(bench, "BANDWIDTH_BUFFER_BYTES", 8 * 2**20)
    rows = bench.run_bench([(64, 256)], [1], ["torch_fp32", "fp6_e3m2/channel"], repeats=2, out_dir=str(tmp_path),
                           progress=False)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    e2e_rows = e2e.run_e2e(new_tokens=3, out_dir=str(tmp_path), progress=False, shape=shape, include_default=False)
    for name, kind, written in (("bench.jsonl", "kernel_bench", rows), ("e2e.jsonl", "e2e_bench", e2e_rows)):
        stored = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert stored == written and all(validate(r, kind) is None for r in stored)
        assert all({k: r[k] for k in environment()} == environment() for r in stored)


def test_committed_generation_bench_rows_validate():
    path = REPO / "reference-full" / "bench" / "generation.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(validate(r, "generation_bench") is None for r in rows)
    assert validate(rows[0] | {"problems": "3"}, "generation_bench") is not None


# --- the environment ----------------------------------------------------------------------------

def test_utc_now_is_iso_seconds_in_utc():
    import datetime as dt

    stamp = utc_now()
    parsed = dt.datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == dt.timedelta(0) and parsed.microsecond == 0
    assert abs((dt.datetime.now(dt.timezone.utc) - parsed).total_seconds()) < 5


def test_environment_fields():
    import platform

    import torch

    found = environment()
    assert validate(accuracy() | found) is None
    assert found["torch_version"] == torch.__version__ and found["threads"] == torch.get_num_threads()
    assert found["python_version"] == platform.python_version()
    # The SIMD flags are the CPU's own, whatever this machine has.
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    assert set(found["cpu_flags"].split()) <= set(flags)
    assert ("avx2" in found["cpu_flags"].split()) == ("avx2" in flags)
    if shutil.which("git") and (REPO / ".git").exists():
        expected = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
        assert found["git_rev"] == expected


def test_git_revision_outside_a_checkout_is_none_and_silent(tmp_path, capfd):
    assert git_revision(tmp_path) is None
    (tmp_path / "broken" / ".git").mkdir(parents=True)  # a .git that git itself rejects ("fatal: ...")
    assert git_revision(tmp_path / "broken") is None
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_environment_of_a_copy_outside_a_checkout_prints_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(env_module, "PACKAGE_DIR", tmp_path)
    environment.cache_clear()
    try:
        assert environment()["git_rev"] is None
    finally:
        environment.cache_clear()
    assert capfd.readouterr().err == ""
    # The same in a fresh process importing a copy of the package that is in no checkout.
    shutil.copytree(REPO / "fpbench", tmp_path / "pkg" / "fpbench", ignore=shutil.ignore_patterns("__pycache__"))
    child = subprocess.run([sys.executable, "-c", "from fpbench.records.environment import environment as e; "
                            "import json; print(json.dumps(e()))"], cwd=tmp_path, capture_output=True, text=True,
                           env={"PYTHONPATH": str(tmp_path / "pkg"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert child.returncode == 0 and child.stderr == ""
    assert json.loads(child.stdout)["git_rev"] is None

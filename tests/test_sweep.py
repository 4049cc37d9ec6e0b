"""Sweep configs, run-list expansion, shards, resume and crash recovery.

Runs use a tiny torch model and a fake task family (tests/fake_fpbench.py), so a whole
sweep takes well under a second in-process; the crash test kills a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from fpbench import runner
from fpbench.cli import main
from fpbench.errors import FpbenchError
from fpbench.records.store import CorruptRecordWarning, ResultStore
from fpbench.sweep import (CONFIG_KEYS, EXTRA_KEYS, RUN_FIELD_KEYS, expand, load_config, parse_shard, plan,
                           run_sweep, select_shard)

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
SCHEMES = ["fp16", "int8/channel/rtn", "int4/g16/rtn", "fp6_e3m2/channel/rtn"]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Fake tasks + tiny model installed in this process; model loading must not happen
    through the real loader."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    import fake_fpbench

    import fpbench.data.task_defs
    import fpbench.eval.base

    monkeypatch.setattr(fpbench.data.task_defs, "TASK_DIR", fpbench.data.task_defs.TASK_DIR)
    monkeypatch.setitem(fpbench.eval.base.FAMILIES, "fake", "fake_fpbench")
    monkeypatch.setattr(runner, "load_model", runner.load_model)
    fake_fpbench.install(tmp_path / "tasks")
    return fake_fpbench


def write_config(path: Path, **overrides) -> Path:
    config = {"name": "t", "models": ["default"], "schemes": SCHEMES, "tasks": ["fake_a"], "limit": 4}
    config.update(overrides)
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def record_keys(out: Path) -> Counter:
    return Counter((r["task_key"], r["metric"]) for r in ResultStore(out).read())


# --- config validation (before any model loads) -------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_model", refuse)


@pytest.mark.parametrize("overrides, message", [
    ({"model": ["default"]}, "unknown key 'model'"),
    ({"schemes": [{"format": "int4", "granularity": "channel", "bitz": 4}]}, "unknown scheme key 'bitz'"),
    ({"schemes": [{"format": "int5x", "granularity": "channel"}]}, "int5x"),
    ({"schemes": ["int4/g0/rtn"]}, "granularity"),
    ({"schemes": [{"format": "int4", "granularity": "group:abc"}]}, "group:G"),
    ({"schemes": [{"format": "int4", "granularity": 128}]}, "group:128"),
    ({"schemes": [{"format": "int4", "granularity": "channel", "algo": "awq"}]}, "unknown algorithm"),
    ({"schemes": [{"format": "int8", "granularity": "channel", "act_format": "int77x"}]}, "int77x"),
    ({"schemes": [{"format": "int8", "granularity": "channel", "gptq_block": -1}]}, "gptq_block"),
    ({"schemes": [{"format": "int8", "granularity": "channel", "backend": "gpu"}]}, "backend"),
    ({"options": {"temprature": 0.5}}, "unknown option 'temprature'"),
    ({"options": {"prompt_mode": "poem"}}, "prompt_mode"),
    ({"schemes": ["fp16", "fp16"]}, "listed twice"),
    ({"tasks": ["no_such_task"]}, "unknown task 'no_such_task'"),
    ({"limit": 0}, "limit"),
    ({"limit": {"fake_b": 3}}, "not in tasks"),
    ({"models": ["./no/such/dir"]}, "not found"),
    ({"seed": 1, "seeds": [1, 2]}, "seed or seeds"),
    ({"schemes": []}, "'schemes' is missing"),
])
def test_bad_configs_fail_before_any_model_loads(tmp_path, fake, no_model_load, overrides, message):
    path = write_config(tmp_path / "bad.yaml", **overrides)
    with pytest.raises(FpbenchError, match="bad.yaml") as info:
        load_config(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    # The CLI prints the same problem on one line and exits 2.
    result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("schemes: [fp16\n")
    with pytest.raises(FpbenchError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FpbenchError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_latency_false_turns_off_the_kernel_runs_own_latency(tmp_path, fake):
    kernel = {"name": "fp6_e3m2/channel/rtn", "backend": "kernel"}
    default = load_config(write_config(tmp_path / "a.yaml", schemes=["int8/channel/rtn", kernel]))
    off = load_config(write_config(tmp_path / "b.yaml", schemes=["int8/channel/rtn", kernel], latency=False))
    on = load_config(write_config(tmp_path / "c.yaml", schemes=["int8/channel/rtn", kernel], latency=True))
    mixed = load_config(write_config(tmp_path / "d.yaml", latency=False,
                                     schemes=["int8/channel/rtn", dict(kernel, latency=True)]))

    def timed(config):
        return [r.scheme.name for r, _ in expand(config) if "latency" in r.tasks]

    assert timed(default) == ["fp6_e3m2/channel/rtn"]  # kernel runs measure it by default
    assert timed(off) == []
    assert timed(on) == ["int8/channel/rtn", "fp6_e3m2/channel/rtn"]  # int8/channel: torch's int8 kernel
    assert timed(mixed) == ["fp6_e3m2/channel/rtn"]  # the scheme's own key wins


def test_scheme_mapping_keys_go_to_scheme_runconfig_or_options(tmp_path, fake):
    path = write_config(tmp_path / "c.yaml", schemes=[
        "int4/g128/rtn",
        {"format": "int4", "granularity": "group:128", "algo": "gptq", "damp": 0.01, "act_order": True},
        {"name": "fp6_e3m2/channel/rtn", "backend": "kernel"},
        {"format": "int8", "granularity": "channel", "act_format": "fp8_e4m3",
         "act_granularity": "token-dynamic"},
        {"format": "int8", "granularity": "channel", "backend": "simulate"},
    ], options={"batch_size": 2})
    config = load_config(path)
    runs = [r for r, _ in expand(config)]
    # a kernel scheme also gets the latency task, in its (first) run
    assert [(r.scheme.name, r.tasks[-1]) for r in runs if "latency" in r.tasks] == [("fp6_e3m2/channel/rtn", "latency")]
    assert [r.scheme.name for r in runs] == [
        "int4/g128/rtn", "int4/g128/gptq@wikitext2",  # GPTQ names its default calibration source
        "fp6_e3m2/channel/rtn", "int8/channel/rtn/a:fp8_e4m3-token-dynamic", "int8/channel/rtn"]
    # damp: 0.01 is the default: the same run (and key) as leaving it out.
    assert runs[1].options == {"act_order": True, "batch_size": 2}
    assert runs[2].backend == "kernel" and runs[2].options == {"batch_size": 2}
    assert runs[3].scheme.act_format == "fp8_e4m3" and runs[3].backend == "simulate"
    # backend: simulate is the default: the same run as leaving it out (a duplicate here).
    assert runs[4].key() == expand(load_config(write_config(
        tmp_path / "d.yaml", schemes=["int8/channel/rtn"], options={"batch_size": 2})))[0][0].key()
    assert len({r.key() for r in runs}) == 5
    assert [label for _, label in expand(config)][2] == "fp6_e3m2/channel/rtn[backend=kernel]"
    assert all(key in CONFIG_KEYS for key in ("models", "schemes", "tasks", "limit"))
    assert "backend" in RUN_FIELD_KEYS and {"damp", "calib_samples", "samples"} <= set(EXTRA_KEYS)


def test_resources_are_checked_before_any_model_loads(tmp_path, fake, no_model_load, monkeypatch):
    monkeypatch.delenv("FPBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    gptq = write_config(tmp_path / "g.yaml", schemes=[
        {"format": "int4", "granularity": "group:128", "algo": "gptq", "calib": "c4"}])
    with pytest.raises(FpbenchError, match="c4"):
        plan(load_config(gptq), str(tmp_path / "out"))
    kernel = write_config(tmp_path / "k.yaml", schemes=[{"name": "int8/tensor/rtn", "backend": "kernel"}])
    result = CliRunner().invoke(main, ["sweep", str(kernel), "--dry-run", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "int8/tensor/rtn[backend=kernel]" in result.output


def test_repo_configs_are_valid():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        config = load_config(path)
        assert config.schemes and config.tasks, path
    default = load_config(REPO / "configs" / "default.yaml")
    assert [s.scheme.name for s in default.schemes] == [
        "fp16", "int8/channel/rtn", "int4/channel/rtn", "int4/g128/rtn", "int4_asym/g32/rtn",
        "fp8_e4m3/channel/rtn", "fp6_e3m2/channel/rtn", "fp6_e2m3/channel/rtn", "fp4_e2m1/g32/rtn"]
    assert default.models == ["default"] and default.limits == {"wikitext2": 8}


# --- expansion and shards -------------------------------------------------------------------

def test_expansion_order_seeds_and_per_task_limits(tmp_path, fake):
    config = load_config(write_config(tmp_path / "c.yaml", tasks=["fake_a", "fake_b"],
                                      limit={"fake_a": 2, "fake_b": None}, seeds=[0, 1]))
    runs = expand(config)
    # 2 seeds x 4 schemes x 2 limit groups
    assert len(runs) == 16
    assert [(r.seed, r.scheme.name, r.tasks, r.limit) for r, _ in runs[:2]] == [
        (0, "fp16", ["fake_a"], 2), (0, "fp16", ["fake_b"], None)]
    assert len({r.key() for r, _ in runs}) == 16
    same_limit = expand(load_config(write_config(tmp_path / "d.yaml", tasks=["fake_a", "fake_b"])))
    assert len(same_limit) == 4 and same_limit[0][0].tasks == ["fake_a", "fake_b"]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 20])
def test_shards_cover_the_run_list_exactly_once(tmp_path, fake, count):
    config = load_config(write_config(tmp_path / "c.yaml", tasks=["fake_a", "fake_b"],
                                      limit={"fake_a": 2, "fake_b": 3}, seeds=[0, 1, 2]))
    runs = [r.key() for r, _ in expand(config)]
    assert len(runs) == 24
    shards = [[r.key() for r, _ in select_shard(expand(config), (i, count))] for i in range(1, count + 1)]
    assert sorted(sum(shards, [])) == sorted(runs)  # every run once, none twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    again = [[r.key() for r, _ in select_shard(expand(config), (i, count))] for i in range(1, count + 1)]
    assert again == shards  # deterministic


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "2/0", "-1/3"])
def test_bad_shard_specs(text):
    with pytest.raises(FpbenchError, match="shard"):
        parse_shard(text)


def test_dry_run_lists_runs_and_estimate_without_loading(tmp_path, fake, no_model_load):
    path = write_config(tmp_path / "c.yaml")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "4 runs, 4 to run, 0 already done; estimated time" in result.output
    for scheme in SCHEMES:
        assert scheme in result.output
    shard = CliRunner().invoke(main, ["sweep", str(path), "--dry-run", "--shard", "1/3", "--out", str(tmp_path)])
    assert "2 runs, 2 to run" in shard.output


# --- running, resume, force -------------------------------------------------------------------

def test_sweep_runs_resumes_and_forces(tmp_path, fake):
    out = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml"))
    first = run_sweep(config, str(out), progress=False)
    assert (first.runs, first.ran, first.skipped, first.failed) == (4, 4, 0, [])
    assert first.records == 8  # 4 schemes x 2 metrics
    counts = record_keys(out)
    assert len(counts) == 8 and set(counts.values()) == {1}

    again = run_sweep(config, str(out), progress=False)
    assert (again.ran, again.skipped, again.records) == (0, 4, 0)
    assert record_keys(out) == counts

    # Adding a task runs only the new task (resume is per task), once per scheme.
    wider = load_config(write_config(tmp_path / "c.yaml", tasks=["fake_a", "fake_b"]))
    assert [p.pending_tasks for p in plan(wider, str(out))] == [["fake_b"]] * 4
    grown = run_sweep(wider, str(out), progress=False)
    assert (grown.ran, grown.records) == (4, 8)
    assert len(record_keys(out)) == 16 and set(record_keys(out).values()) == {1}

    forced = run_sweep(wider, str(out), force=True, progress=False)
    assert (forced.ran, forced.skipped, forced.records) == (4, 0, 16)
    assert set(record_keys(out).values()) == {2}
    log = ResultStore(out).read_log("sweeps.jsonl")
    assert [entry["ran"] for entry in log] == [4, 0, 4, 4]


def test_pending_tasks_need_their_data_before_any_run(tmp_path, fake, monkeypatch, no_model_load):
    # A pending task whose dataset is neither in the data folder nor reachable fails the
    # sweep at once: otherwise each run would load its model and then fail.
    import fpbench.data.task_defs

    monkeypatch.delenv("FPBENCH_DATA_DIR", raising=False)
    real = REPO / "fpbench" / "data" / "tasks" / "wikitext2.yaml"
    (fpbench.data.task_defs.TASK_DIR / "wikitext2.yaml").write_text(real.read_text())
    config = load_config(write_config(tmp_path / "c.yaml", tasks=["fake_a", "wikitext2"]))
    with pytest.raises(FpbenchError, match="dataset 'wikitext2' is not available"):
        run_sweep(config, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_sweep_cli_failure_is_reported_and_others_run(tmp_path, fake, monkeypatch):
    real_run = runner.run

    def flaky(config):
        if config.scheme.name == "int8/channel/rtn":
            raise FpbenchError("dataset 'x' is not available")
        return real_run(config)

    monkeypatch.setattr(runner, "run", flaky)
    path = write_config(tmp_path / "c.yaml")
    result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    assert "1 of 4 runs failed" in result.output and "dataset 'x' is not available" in result.output
    assert "3 ran" in result.output
    assert len(ResultStore(tmp_path / "out").read()) == 6
    assert (tmp_path / "out" / "REPORT.md").is_file()


def test_sweep_no_report_writes_records_only(tmp_path, fake):
    path = write_config(tmp_path / "c.yaml")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--no-report", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(ResultStore(out).read()) == 8 and not (out / "REPORT.md").exists()


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import fake_fpbench
    fake_fpbench.install({tasks!r})
    from fpbench.cli import main
    main(["sweep", {config!r}, "--out", {out!r}, "--no-progress"])
""")


def test_resume_after_kill_9_mid_run(tmp_path, fake):
    out = tmp_path / "out"
    config_path = write_config(tmp_path / "c.yaml")
    script = tmp_path / "sweep_child.py"
    script.write_text(CRASH_SCRIPT.format(tests=str(TESTS_DIR), tasks=str(tmp_path / "tasks"),
                                          config=str(config_path), out=str(out)))
    counter = tmp_path / "calls"
    env = os.environ | {"FAKE_COUNTER": str(counter), "FAKE_KILL_AT": "3", "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]  # killed by SIGKILL in the third run
    before = ResultStore(out).read()
    assert [r["scheme"] for r in before] == ["fp16", "fp16", "int8/channel/rtn", "int8/channel/rtn"]

    # A writer that died mid-line leaves a truncated record: it must be ignored, not fatal.
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(before[-1])[:57])

    config = load_config(config_path)
    with pytest.warns(CorruptRecordWarning):
        pending = [p.label for p in plan(config, str(out)) if p.pending_tasks]
    assert pending == ["int4/g16/rtn", "fp6_e3m2/channel/rtn"]
    with pytest.warns(CorruptRecordWarning, match="skipped 1 truncated or corrupt line"):
        resumed = run_sweep(config, str(out), progress=False)
    assert (resumed.ran, resumed.skipped) == (2, 2)
    with pytest.warns(CorruptRecordWarning):
        after = ResultStore(out).read()
    assert after[:4] == before  # records written before the crash are intact
    assert [r["scheme"] for r in after[4:]] == ["int4/g16/rtn", "int4/g16/rtn",
                                                 "fp6_e3m2/channel/rtn", "fp6_e3m2/channel/rtn"]
    counts = Counter((r["task_key"], r["metric"]) for r in after)
    assert len(counts) == 8 and set(counts.values()) == {1}  # the killed run redone once, no duplicates

    # The numbers do not depend on the crash: a clean sweep elsewhere gives the same values.
    clean = run_sweep(config, str(tmp_path / "clean"), progress=False)
    assert clean.ran == 4
    clean_values = {(r["task_key"], r["metric"]): r["value"] for r in ResultStore(tmp_path / "clean").read()}
    assert clean_values == {(r["task_key"], r["metric"]): r["value"] for r in after}


def test_report_after_a_sweep_shows_the_stored_numbers(tmp_path, fake):
    from fpbench.records.report import make_report

    out = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", tasks=["fake_a", "fake_b"]))
    run_sweep(config, str(out), progress=False)
    table, base, columns = make_report(out, plots=False)["tables"]["tiny"]
    assert base == "fp16" and columns == ["fake_a score", "fake_b score"]  # headline: score only
    stored = ResultStore(out).read()
    for record in (r for r in stored if r["metric"] == "score"):
        assert table.loc[record["scheme"], f"{record['task']} score"] == record["value"]
        assert table.loc[record["scheme"], "bits_per_weight"] == record["bits_per_weight"]
    # Quantization changed the weights, so the fake score moved away from the baseline.
    assert (table.drop(index="fp16")["Δ fake_a score"].abs() > 0).all()


def test_limit_override(tmp_path, fake):
    path = write_config(tmp_path / "c.yaml", limit={"fake_a": 3})
    assert load_config(path, "none").limits == {"fake_a": None}
    assert load_config(path, "5").limits == {"fake_a": 5}
    with pytest.raises(FpbenchError, match="limit override"):
        load_config(path, "lots")

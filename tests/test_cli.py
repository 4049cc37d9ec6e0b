import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fpbench.cli import main

REQUIRED_FIELDS = {"model", "scheme", "format", "granularity", "algo", "task", "metric", "value", "n",
                   "quantize_s", "task_s", "torch_version", "transformers_version", "fpbench_version",
                   "git_rev", "time", "seed", "bits_per_weight", "run_key"}


def test_formats_table():
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if line.startswith("| fp6_e3m2 "))
    assert "28" in row and "0.0625" in row and "64" in row


def test_run_writes_records_csv_and_report(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--model", str(tiny_model_dir), "--format", "int4", "--granularity", "group:32",
            "--task", "wikitext2,ptb", "--limit", "1", "--seqlen", "32", "--data-dir", str(data_dir),
            "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["wikitext2", "ptb"]
    assert REQUIRED_FIELDS <= set(records[0])
    assert records[0]["scheme"] == "int4/g32/rtn" and records[0]["granularity"] == "group:32"
    assert "int4/g32/rtn" in result.output
    assert (out / "results.csv").is_file() and "int4/g32/rtn" in (out / "REPORT.md").read_text()
    # A corrupt (truncated) last line does not lose earlier records or stop the next run.
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"model": "trunc')
    result = CliRunner().invoke(main, args[:3] + ["--format", "fp16"] + args[7:])
    assert result.exit_code == 0, result.output
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["scheme"] == "fp16"


@pytest.mark.parametrize("args,message", [
    (["--format", "fp7_e9m9", "--granularity", "channel"], "format 'fp7_e9m9'"),
    (["--format", "int4", "--task", ""], "no task given"),
    (["--format", "int4", "--task", ",,"], "no task given"),
    (["--format", "int4", "--granularity", "group:0"], "granularity"),
    (["--format", "fp16", "--task", "nosuchtask"], "unknown task 'nosuchtask'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    if "--task" not in args:
        args = args + ["--task", "wikitext2"]
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.strip().count("\n") == 0


def test_installed_entry_point_reports_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "fpbench.cli", "run", "--format", "int4",
                           "--granularity", "group:0", "--task", "wikitext2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_default_model_end_to_end(data_dir, tmp_path):
    """The real default model: int4_asym/g32 reproduces its own Q4_1 baseline, while
    int4 per-channel is clearly worse."""
    result = CliRunner().invoke(main, [
        "run", "--scheme", "fp32", "--scheme", "int4_asym/g32/rtn", "--scheme", "int4/channel/rtn",
        "--task", "wikitext2", "--limit", "1", "--seqlen", "256", "--data-dir", str(data_dir),
        "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    ppl = {json.loads(l)["scheme"]: json.loads(l)["value"] for l in (tmp_path / "results.jsonl").read_text().splitlines()}
    assert 5 < ppl["fp32"] < 60
    assert abs(ppl["int4_asym/g32/rtn"] - ppl["fp32"]) / ppl["fp32"] < 0.01
    assert ppl["int4/channel/rtn"] > 1.2 * ppl["fp32"]
    assert "Q4_1" in (tmp_path / "REPORT.md").read_text()


README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def readme_commands() -> list[str]:
    """Every `fpbench ...` command in the code blocks of the README and docs/, continuation
    lines joined and trailing comments dropped."""
    commands, in_block, pending = [], False, ""
    for line in "\n".join(path.read_text() for path in [README, *DOCS]).splitlines():
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        text = re.sub(r"\s+#.*$", "", text)
        if text.startswith("fpbench "):
            commands.append(text)
    return commands


def test_readme_has_commands():
    commands = readme_commands()
    assert len(commands) > 20 and "fpbench run --format fp6 --task humaneval" in commands


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command, data_dir, tmp_path, monkeypatch):
    """`run` and `sweep` commands are checked in full with --dry-run (formats, tasks,
    calibration data, kernel support; no model loads); the others parse their options."""
    monkeypatch.chdir(README.parent)
    args = shlex.split(command.replace("DATA", str(data_dir)).replace("${SLURM_ARRAY_TASK_ID}", "1").replace("$K", "1"))[1:]
    if args[0] in ("run", "sweep"):
        if "--out" not in args:
            args += ["--out", str(tmp_path / "out")]
        result = CliRunner().invoke(main, args + ["--dry-run"])
        assert result.exit_code == 0, f"{command}\n{result.output}"
        return
    if args[0] == "report":  # results folders named in the README: empty stand-ins
        monkeypatch.chdir(tmp_path)
        for folder in (a for a in args[1:] if not a.startswith("-") and args[args.index(a) - 1] != "--out"):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    ctx = main.make_context("fpbench", list(args), resilient_parsing=False)
    with ctx:
        name, sub, rest = main.resolve_command(ctx, ctx.protected_args + ctx.args)
        if name == "lm-eval":
            return  # every argument belongs to lm-eval's own parser
        while isinstance(sub, type(main)) and rest:
            sub_ctx = sub.make_context(name, list(rest), parent=ctx)
            name, sub, rest = sub.resolve_command(sub_ctx, sub_ctx.protected_args + sub_ctx.args)
        sub.make_context(name, list(rest), parent=ctx)


@pytest.mark.slow
def test_headline_command_as_typed(tmp_path, monkeypatch):
    """`fpbench run --format fp6 --task humaneval --limit 2` runs as typed: per-channel
    scales by default, two problems on the embedded model, executed in the sandbox."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--format", "fp6", "--task", "humaneval", "--limit", "2"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "results" / "results.jsonl").read_text().splitlines()]
    assert {r["scheme"] for r in records} == {"fp6_e3m2/channel/rtn"}
    assert {r["metric"] for r in records} >= {"pass@1"} and all(r["n"] == 2 for r in records)


def test_missing_dataset_is_an_error_before_the_model_loads(tmp_path, monkeypatch):
    # Offline without the file: one line naming the dataset and both fixes, exit 2, before
    # the model loads (not after minutes of loading and quantizing); with the file in
    # --data-dir the check passes and the run goes on to load the model.
    import fpbench.runner

    class Loaded(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Loaded("model loaded")

    monkeypatch.delenv("FPBENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(fpbench.runner, "load_model", refuse)
    args = ["run", "--format", "int4", "--task", "humaneval,wikitext2", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "dataset 'wikitext2' is not available" in result.output and "--data-dir" in result.output
    (tmp_path / "data" / "wikitext2").mkdir(parents=True)
    (tmp_path / "data" / "wikitext2" / "wiki.test.raw").write_text("some text\n")
    result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path / "data")])
    assert isinstance(result.exception, Loaded)


def test_unwritable_out_is_an_error_before_the_model_loads(tmp_path, monkeypatch):
    import fpbench.runner

    monkeypatch.setattr(fpbench.runner, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["run", "--format", "int4", "--task", "wikitext2", "--out", str(blocker / "out")])
    assert result.exit_code == 2 and "cannot write results" in result.output
    assert result.output.strip().count("\n") == 0
    sweep = tmp_path / "s.yaml"
    sweep.write_text("schemes: [fp16]\ntasks: [wikitext2]\nlimit: 1\n")
    result = CliRunner().invoke(main, ["sweep", str(sweep), "--out", str(blocker / "out")])
    assert result.exit_code == 2 and "cannot write results" in result.output

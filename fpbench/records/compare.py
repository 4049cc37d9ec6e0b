"""Reproduction check: every fresh record beside the reference record of the same run,
with a verdict per metric.

Two records describe the same measurement when they agree on ``MATCH_FIELDS`` (model,
scheme, task, metric, limits, seed, stage options); the code version is left out on
purpose, so a reference measured by an earlier release is still compared. Verdicts:

- ``equal``: the same value to 1e-12 (relative);
- ``within tolerance``: a difference no larger than what the metric's own noise allows:
  perplexity relative 1e-3 (BLAS summation order differs across CPUs); accuracies and
  pass@k the larger of the two standard errors (the record's ``stderr``, else the
  binomial sqrt(p(1-p)/n)); ROUGE the reference's bootstrap 95% interval;
- ``differs``: beyond that;
- ``not judged``: latency and throughput, which belong to a machine (shown side by side);
  and the metrics of GPTQ-quantized models measured on another CPU than the reference
  (another name or other SIMD flags: two AMD EPYC generations report the same name):
  GPTQ rounds each weight after the error feedback of the ones before, so a last-bit
  difference in the fp32 BLAS that builds the Hessians and block inputs changes later
  rounding decisions. The quick tier's int4/g128 GPTQ perplexity read 27.07 on an AMD
  EPYC (AVX2), 23.92 on an Intel Xeon, 26.57 on that Xeon with MKL and oneDNN limited to
  AVX2, and 26.98 on an AMD EPYC with AVX-512: the same code, the CPU's summation order
  only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MATCH_FIELDS = ("model", "scheme", "task", "metric", "limit", "seqlen", "seed", "include_head", "backend",
                "options")
PERPLEXITY_RTOL = 1e-3
EQUAL_RTOL = 1e-12
VERDICTS = ("equal", "within tolerance", "differs", "not judged")


def match_key(record: dict) -> str:
    fields = [record.get(name) for name in MATCH_FIELDS]
    if fields[-1] == {}:
        fields[-1] = None  # records without stage options wrote {} or nothing
    return json.dumps(fields, sort_keys=True, default=str)


def _is_latency(record: dict) -> bool:
    return record.get("family") == "latency" or str(record.get("metric", "")).startswith(("decode_", "prefill_"))


def _stderr(record: dict) -> float:
    if isinstance(record.get("stderr"), (int, float)) and math.isfinite(record["stderr"]):
        return float(record["stderr"])
    p, n = record.get("value"), record.get("n")
    if isinstance(p, (int, float)) and 0 <= p <= 1 and isinstance(n, int) and n > 0:
        return math.sqrt(p * (1 - p) / n)
    return 0.0


def _cpu(record: dict) -> tuple:
    return record.get("cpu"), record.get("cpu_flags")


def judge(fresh: dict, reference: dict) -> tuple[str, str]:
    """(verdict, the tolerance it was judged with, in words)."""
    if _is_latency(fresh):
        return "not judged", "machine-specific"
    if fresh.get("algo") == "gptq" and _cpu(fresh) != _cpu(reference):
        return "not judged", "GPTQ on another CPU"
    value, ref = float(fresh["value"]), float(reference["value"])
    if value == ref or abs(value - ref) <= EQUAL_RTOL * max(abs(ref), 1e-300):
        return "equal", "-"
    metric = str(fresh.get("metric"))
    if metric == "perplexity" or fresh.get("family") == "perplexity":
        ok, tolerance = abs(value - ref) <= PERPLEXITY_RTOL * abs(ref), f"rel {PERPLEXITY_RTOL:g}"
    elif metric.startswith("rouge") and "ci95_low" in reference and "ci95_high" in reference:
        ok = reference["ci95_low"] <= value <= reference["ci95_high"]
        tolerance = f"CI [{reference['ci95_low']:.2f}, {reference['ci95_high']:.2f}]"
    elif metric.startswith(("acc", "pass@", "exact")) or fresh.get("family") in ("zeroshot", "codegen"):
        bound = max(_stderr(fresh), _stderr(reference))
        ok, tolerance = abs(value - ref) <= bound, f"±{bound:.4f} (stderr)"
    else:
        ok, tolerance = abs(value - ref) <= PERPLEXITY_RTOL * abs(ref), f"rel {PERPLEXITY_RTOL:g}"
    return ("within tolerance" if ok else "differs"), tolerance


@dataclass
class Comparison:
    rows: list[dict]  # one per fresh record that has a reference
    only_fresh: int  # fresh records with no reference record
    only_reference: int  # reference records not reproduced
    fresh_cpus: list[str]
    reference_cpus: list[str]

    def counts(self) -> dict[str, int]:
        return {v: sum(r["verdict"] == v for r in self.rows) for v in VERDICTS}

    @property
    def differs(self) -> int:
        return self.counts()["differs"]

    def summary(self) -> str:
        counts = self.counts()
        return (f"reproduction: {len(self.rows)} metrics compared: {counts['equal']} equal, "
                f"{counts['within tolerance']} within tolerance, {counts['differs']} differ, "
                f"{counts['not judged']} not judged (latency, GPTQ on another CPU); "
                f"{self.only_fresh} without a reference, "
                f"{self.only_reference} reference metrics not rerun")


def compare(fresh: list[dict], reference: list[dict]) -> Comparison:
    by_key: dict[str, dict] = {}
    for record in reference:
        by_key[match_key(record)] = record  # the latest reference record of a key wins
    rows, matched = [], set()
    latest: dict[str, dict] = {}
    for record in fresh:
        latest[match_key(record)] = record
    for key, record in latest.items():
        ref = by_key.get(key)
        if ref is None or not isinstance(record.get("value"), (int, float)) or not isinstance(
                ref.get("value"), (int, float)):
            continue
        matched.add(key)
        verdict, tolerance = judge(record, ref)
        rows.append({"model": record.get("model"), "scheme": record.get("scheme"), "task": record.get("task"),
                     "metric": record.get("metric"), "value": record["value"], "reference": ref["value"],
                     "delta": record["value"] - ref["value"], "tolerance": tolerance, "verdict": verdict})
    cpus = lambda records: sorted({str(r.get("cpu")) for r in records if r.get("cpu")})  # noqa: E731
    return Comparison(rows, only_fresh=len(latest) - len(matched), only_reference=len(set(by_key) - matched),
                      fresh_cpus=cpus(fresh), reference_cpus=cpus(reference))


def comparison_markdown(comparison: Comparison, reference_dir: str) -> str:
    import pandas as pd

    lines = ["## Reproduction check", "",
             f"Fresh records against the reference in `{reference_dir}` (same model, scheme, task, metric, "
             "limits, seed and options). Measured on: " + (", ".join(comparison.fresh_cpus) or "?")
             + "; reference measured on: " + (", ".join(comparison.reference_cpus) or "?") + ".", "",
             comparison.summary() + ".", ""]
    if comparison.rows:
        table = pd.DataFrame(comparison.rows)
        order = {v: i for i, v in enumerate(("differs", "within tolerance", "not judged", "equal"))}
        table = table.sort_values(by="verdict", key=lambda col: col.map(order), kind="stable")
        lines += [table.to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines)

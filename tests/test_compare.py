"""The reproduction check: verdicts per metric family, and `fpbench report --reference`
exits 1 when a metric differs beyond its tolerance."""

import json

from click.testing import CliRunner

from fpbench.cli import main
from fpbench.records.compare import compare, judge


def _record(scheme="int4/g128/rtn", task="wikitext2", metric="perplexity", value=30.0, **extra):
    base = {"model": "m", "scheme": scheme, "task": task, "metric": metric, "value": value, "n": 8,
            "limit": 8, "seed": 0, "include_head": False, "backend": "simulate", "options": {},
            "family": "perplexity", "format": "int4", "run_key": "k", "cpu": "CPU A", "time": "2026-12-01T00:00:00+00:00"}
    return base | extra


def test_verdicts_follow_each_metric_tolerance():
    ref = _record()
    assert judge(_record(value=30.0), ref)[0] == "equal"
    assert judge(_record(value=30.02), ref)[0] == "within tolerance"  # rel 6.7e-4
    assert judge(_record(value=30.1), ref)[0] == "differs"  # rel 3.3e-3
    acc = dict(task="piqa", metric="acc", family="zeroshot")
    assert judge(_record(value=0.62, stderr=0.05, **acc), _record(value=0.58, stderr=0.05, **acc))[0] == \
        "within tolerance"
    assert judge(_record(value=0.75, stderr=0.05, **acc), _record(value=0.58, stderr=0.05, **acc))[0] == "differs"
    # pass@1 without a stored stderr: the binomial one, sqrt(p(1-p)/n)
    code = dict(task="humaneval", metric="pass@1", family="codegen", n=40)
    assert judge(_record(value=0.125, **code), _record(value=0.15, **code))[0] == "within tolerance"
    rouge = dict(task="cnn_dailymail", metric="rouge1", family="summarization")
    ref = _record(value=28.0, ci95_low=26.0, ci95_high=30.0, **rouge)
    assert judge(_record(value=29.5, **rouge), ref)[0] == "within tolerance"
    assert judge(_record(value=31.0, **rouge), ref)[0] == "differs"
    latency = dict(task="latency", metric="decode_tokens_per_s", family="latency")
    assert judge(_record(value=50.0, **latency), _record(value=20.0, **latency))[0] == "not judged"
    # GPTQ's rounding decisions follow the CPU's BLAS: judged on the reference's CPU only
    gptq = dict(scheme="int4/g128/gptq@wikitext2", algo="gptq")
    assert judge(_record(value=23.9, cpu="CPU B", **gptq), _record(value=27.1, **gptq)) == \
        ("not judged", "GPTQ on another CPU")
    assert judge(_record(value=23.9, **gptq), _record(value=27.1, **gptq))[0] == "differs"
    # the same name on another generation (an AVX2 and an AVX-512 AMD EPYC): its flags differ
    assert judge(_record(value=26.98, cpu_flags="avx2 fma f16c avx512f", **gptq),
                 _record(value=27.07, cpu_flags="avx2 fma f16c", **gptq)) == ("not judged", "GPTQ on another CPU")
    assert judge(_record(value=23.9, cpu_flags="avx2", **gptq), _record(value=27.1, cpu_flags="avx2", **gptq))[0] \
        == "differs"


def test_records_match_on_the_run_not_on_the_code_version():
    fresh = [_record(fpbench_version="0.2.0", run_key="new", cpu="CPU B"), _record(scheme="fp16", value=19.0)]
    reference = [_record(fpbench_version="0.1.0"), _record(scheme="fp8_e4m3/channel/rtn")]
    result = compare(fresh, reference)
    assert [row["verdict"] for row in result.rows] == ["equal"]
    assert result.only_fresh == 1 and result.only_reference == 1
    assert result.fresh_cpus == ["CPU A", "CPU B"] and result.reference_cpus == ["CPU A"]


def _store(path, records):
    path.mkdir()
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_report_reference_exits_1_when_a_scheme_changed(tmp_path):
    reference = _store(tmp_path / "reference", [_record(), _record(scheme="fp16", value=19.4)])
    same = _store(tmp_path / "same", [_record(value=30.01), _record(scheme="fp16", value=19.4)])
    result = CliRunner().invoke(main, ["report", same, "--reference", reference, "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "1 equal, 1 within tolerance, 0 differ" in result.output
    assert "## Reproduction check" in (tmp_path / "same" / "REPORT.md").read_text()
    # a deliberately changed scheme: int4 per-group became much worse
    changed = _store(tmp_path / "changed", [_record(value=41.8), _record(scheme="fp16", value=19.4)])
    result = CliRunner().invoke(main, ["report", changed, "--reference", reference, "--no-plots"])
    assert result.exit_code == 1
    assert "differs: int4/g128/rtn wikitext2 perplexity" in result.output
    assert "| int4/g128/rtn" in (tmp_path / "changed" / "REPORT.md").read_text()

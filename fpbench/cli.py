"""The `fpbench` command line: a thin layer over the Python API (no logic of its own)."""

from __future__ import annotations

import os
import sys
import warnings

import click

from fpbench.errors import FpbenchError
from fpbench.options import click_option, click_options, default_of


# Options several commands share: the rows of the options table.
no_progress_option = click_option("no_progress")
seed_option = click_option("seed")


def out_option(default: str | None, help: str):
    """``--out`` (a folder, passed as ``out_dir``)."""
    return click.option("--out", "out_dir", default=default, show_default=default is not None,
                        type=click.Path(file_okay=False), help=help)


def data_dir_option(help: str | None = None):
    return click_option("data_dir", **({"help": help} if help else {}))


def _quiet(no_progress: bool) -> None:
    """--no-progress: the libraries' bars and info logs go too, not only fpbench's."""
    if no_progress:
        from fpbench.eval.base import quiet_libraries

        quiet_libraries()


class _Group(click.Group):
    """Turn every FpbenchError into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FpbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """fpbench: compare number formats (INT4/8, FP4/6/8, FP16/BF16) for LLM quantization.

    \b
    Examples:
      fpbench formats
      fpbench run --format fp6_e3m2 --granularity channel --task wikitext2 --limit 8
      fpbench run --model path/or/hf-id --format int4 --granularity group:128 --task ptb
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Warnings (e.g. a skipped corrupt results line) print as one line, not two.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


@main.command()
def formats():
    """Table of every registered format: bits, exponent/mantissa bits, bias, max,
    smallest normal and subnormal, number of finite codes.

    Any fpN_eXmY (e.g. fp5_e2m2) and intN / intN_asym also parse where a format is asked.
    """
    import pandas as pd

    from fpbench.quant.formats import format_table

    table = pd.DataFrame(format_table()).set_index("format")
    click.echo(table.to_markdown(floatfmt=".6g"))


@main.command()
@click_options(exclude=("calib_path",))
def run(**values):
    """Quantize a model with one or more schemes and evaluate it on tasks.

    Appends one record per metric to OUT/results.jsonl (and refreshes results.csv and
    REPORT.md), then prints a table. Every option is checked (formats, tasks, calibration
    data, kernel support) before the model loads.

    \b
    Examples:
      fpbench run --format fp6 --task humaneval
      fpbench run --format fp6_e3m2 --task wikitext2 --limit 8
      fpbench run --model path/or/hf-id --format int4 --granularity group:128 --task ptb
      fpbench run --scheme fp16 --scheme int4/g128/rtn --task wikitext2,ptb --limit 4
      fpbench run --scheme fp6_e3m2/channel/rtn --task piqa,hellaswag,boolq --limit 50
      fpbench run --format fp6_e3m2 --backend kernel --task wikitext2 --limit 4
      fpbench run --format int4 --granularity group:128 --algo gptq --calib wikitext2 \\
          --calib-seqlen 512 --task wikitext2,ptb --limit 8
      fpbench run --scheme int8/channel/rtn --scheme fp8_e4m3/channel/rtn --act-format int8 \\
          --task wikitext2 --limit 8
      fpbench run --scheme int8/channel/rtn/a:int8-tensor-static --task wikitext2
      fpbench run --scheme fp16 --task humaneval --samples 10 --temperature 0.8 --seed 1
      fpbench run --scheme int4/g128/rtn --task cnn_dailymail --limit 20
    """
    from fpbench.runner import plan_runs, run as run_one

    _quiet(values["no_progress"])
    configs = plan_runs(values)
    for config in configs:
        if values["latency"] and "latency" not in config.tasks:
            click.echo(f"note: {config.scheme.name} runs simulated only (no kernel): no latency measured", err=True)
    if values["dry_run"]:
        for config in configs:
            click.echo(f"{config.scheme.name}  tasks={','.join(config.tasks)}  key={config.key()}"
                       + (f"  options={config.options}" if config.options else ""))
        click.echo(f"{len(configs)} run(s) checked; nothing loaded (--dry-run)")
        return
    import pandas as pd

    from fpbench.records.report import write_report
    from fpbench.records.store import ensure_writable

    ensure_writable(values["out"])  # before any model loads: a run is never computed to be lost
    from fpbench.data.sources import check_tasks_data

    check_tasks_data(sorted({t for c in configs for t in c.tasks}), values.get("data_dir"))
    records = []
    for config in configs:
        click.echo(f"run: {config.scheme.name} on {','.join(config.tasks)}", err=True)
        records += run_one(config)
    write_report(values["out"])
    table = pd.DataFrame(records)[["scheme", "task", "metric", "value", "n", "quantize_s", "task_s"]]
    click.echo(table.to_markdown(index=False, floatfmt=".4f"))
    click.echo(f"records appended to {os.path.join(values['out'], 'results.jsonl')}")


@main.command()
@click.option("--shapes", default=None, metavar="NxK,...",
              help="Weight shapes [out x in], K a multiple of 64 (torch_int4_bf16: of 128, and left out of "
                   "the default kernels otherwise). Default: 4096x4096,11008x4096,4096x11008.")
@click.option("--batches", default=None, metavar="M1,M2",
              help="Batch sizes (tokens per call). Default: 1,8,64,512.")
@click.option("--kernels", "kernel_names", default=None, metavar="K1,K2",
              help="torch_fp32,torch_bf16,torch_int8_bf16,torch_int4_bf16 and/or FORMAT[/GRANULARITY] "
                   "of fpbench's kernel (int4/g128, fp6_e3m2/channel; a bare format: channel and g128), "
                   "with fp32 x, or bf16 x with @bf16 (int4/g128@bf16: the bf16 dot-product GEMV and GEMM "
                   "where the CPU has AVX-512 BF16). Default: the torch kernels and int4, int4_asym, int8, "
                   "fp4_e2m1, fp6_e2m3, fp6_e3m2, fp8_e4m3, fp8_e5m2 per channel and g128, and "
                   "mxfp4_e2m1, mxfp6_e3m2, mxfp8_e4m3, nvfp4 at their own blocks, with bf16 x, as a "
                   "model's layers get it on the latency path.")
@click.option("--repeats", type=click.IntRange(min=3), default=21, show_default=True,
              help="Timed calls per cell (the median is reported); the kernels of a shape and "
                   "batch take turns call by call.")
@click.option("--e2e", is_flag=True, help="Instead: decode tokens/s (batch 1) of a random ~1B Llama-shaped "
                                          "model and of the default model: torch fp32 and bf16 vs the FP6 "
                                          "kernel in the compiled decode loop, the FP6 kernel with the "
                                          "loop's per-layer work in Python and in transformers' generate, "
                                          "and llama.cpp when installed.")
@click.option("--generation", is_flag=True,
              help="Instead: HumanEval generation throughput of fpbench's continuous batching vs a plain "
                   "loop of model.generate at batch 8, both timed in this run on the default model.")
@click.option("--problems", type=click.IntRange(min=1), default=None,
              help="With --generation: the first N HumanEval problems (default: all 164).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="--e2e: tokens generated per measurement.")
@out_option("results/bench", "Folder for bench.jsonl (one record per kernel x shape x batch), "
                              "e2e.jsonl (--e2e) or generation.jsonl (--generation).")
@no_progress_option
def bench(shapes, batches, kernel_names, repeats, e2e, generation, problems, new_tokens, out_dir, no_progress):
    """Median latency of fpbench's kernels (any 4/6/8-bit format) vs torch fp32, bf16, int8 and int4
    weight-only linears, with GB/s and the fraction of the measured bandwidth roofline.

    Weights are cold (cycled through copies larger than the cache); at batch 1 each kernel
    is also timed on a slice of its weight that stays in cache (the pace of its decode,
    which bounds its share of the read where memory streams faster). Builds the kernels
    on first use. Timings on a shared machine are noisy: compare within one run.

    \b
    Examples:
      fpbench bench --shapes 4096x4096 --batches 1,8 --out results/bench
      fpbench bench --e2e --new-tokens 128
      fpbench bench --generation --problems 40
    """
    from fpbench.bench.kernels import parse_batches, parse_shapes, run_bench, summary, table

    if generation:
        from fpbench.bench.generation import generation_summary, run_generation_bench
        from fpbench.models import load_model

        record = run_generation_bench(load_model("default"), problems, out_dir=out_dir, progress=not no_progress)
        click.echo(generation_summary(record))
        click.echo(f"record appended to {os.path.join(out_dir, 'generation.jsonl')}")
        return

    if e2e:
        from fpbench.bench.e2e import e2e_table, run_e2e

        click.echo(e2e_table(run_e2e(new_tokens=new_tokens, out_dir=out_dir, progress=not no_progress)))
        return
    names = [k.strip() for k in kernel_names.split(",")] if kernel_names else None
    records = run_bench(parse_shapes(shapes), parse_batches(batches), names, repeats, out_dir,
                        progress=not no_progress)
    first = records[0]
    click.echo(f"CPU: {first['cpu']} ({first['threads']} threads; flags {first['cpu_flags']}); "
               f"streaming read {first['bandwidth_gbps']} GB/s; cells: median ms (x vs torch_bf16, roofline)")
    click.echo(table(records))
    click.echo("Fastest call of each cell (least disturbed by other load):")
    click.echo(table(records, "min_ms"))
    click.echo(summary(records))
    click.echo(f"records appended to {os.path.join(out_dir, 'bench.jsonl')}")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--shard", default=None, metavar="I/N",
              help="Run only shard I of N (round-robin over the run list), e.g. 2/4; the N shards "
                   "cover every run exactly once.")
@click.option("--dry-run", is_flag=True, help="List the runs (done / to run) and a time estimate; run nothing.")
@click.option("--force", is_flag=True, help="Redo runs whose records already exist (default: skip them).")
@out_option("results", "Folder of the results store; reruns resume from its records.")
@click.option("--limit", "limit_override", default=None, metavar="N|none",
              help="Override the config's limit for every task; 'none' evaluates the full test sets.")
@data_dir_option("Folder with local dataset copies (overrides the config's data_dir; also FPBENCH_DATA_DIR).")
@click.option("--no-report", is_flag=True,
              help="Skip the report at the end (e.g. when several sweeps are followed by one `fpbench report`).")
@no_progress_option
def sweep(config_path, shard, dry_run, force, out_dir, limit_override, data_dir, no_report, no_progress):
    """Run a sweep config: models x schemes x tasks, resuming from stored records.

    The config is validated before any model loads. Each finished task's records are
    appended at once, so an interrupted sweep (even kill -9) resumes where it stopped.

    \b
    Examples:
      fpbench sweep configs/default.yaml --dry-run
      fpbench sweep configs/zeroquant42.yaml --out results
      fpbench sweep configs/zeroquant42.yaml --shard 2/4 --out results-shard2
      fpbench sweep configs/default.yaml --limit none --out results-full
    """
    from fpbench.records.report import write_report
    from fpbench.sweep import estimate_text, load_config, parse_shard, plan, plan_table, run_sweep, summary_text

    _quiet(no_progress)
    config = load_config(config_path, limit_override, data_dir)
    shard_spec = parse_shard(shard)
    if dry_run:
        planned = plan(config, out_dir, shard_spec, force, progress=False)
        click.echo(plan_table(planned))
        click.echo(estimate_text(planned))
        return
    from fpbench.records.store import ensure_writable

    ensure_writable(out_dir)
    summary = run_sweep(config, out_dir, shard_spec, force, progress=not no_progress, echo=click.echo)
    click.echo(summary_text(summary))
    if (summary.records or summary.skipped) and not no_report:
        click.echo(f"report: {write_report(out_dir)}")
    if summary.failed:
        raise FpbenchError(f"{len(summary.failed)} of {summary.runs} runs failed (first: "
                           f"{summary.failed[0][0]}: {summary.failed[0][1]}); rerun the sweep to retry them")


@main.command()
@click.argument("results_paths", metavar="RESULTS_DIR...", nargs=-1, required=True,
                type=click.Path(exists=True))
@click.option("--format", "output_format", type=click.Choice(["markdown", "csv"]), default="markdown",
              show_default=True, help="How the tables are printed (all files are written either way).")
@out_option(None, "Where the report goes; the records of every RESULTS_DIR are merged into its "
                  "results.jsonl first. Default: the first RESULTS_DIR.")
@click.option("--baseline", default=None, metavar="SCHEME",
              help="Row the Δ columns compare against. Default: fp16 (else bf16, fp32).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--reference", "reference_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Compare every record with the record of the same run in this results folder "
                   "(e.g. the committed reference/): a verdict per metric, written to REPORT.md; "
                   "exit code 1 when a metric differs beyond its tolerance.")
def report(results_paths, output_format, out_dir, baseline, no_plots, reference_dir):
    """Rebuild every table and plot from stored records: OUT/REPORT.md, OUT/tables/*.csv,
    OUT/plots/*.png, OUT/results.csv.

    \b
    Examples:
      fpbench report results
      fpbench report results --format csv
      fpbench report shard1/ shard2/ shard3/ --out results   # merge shards, then report
      fpbench report results --reference reference
    """
    from fpbench.records.report import make_report, tables_text

    if out_dir is None:
        if not os.path.isdir(results_paths[0]):
            raise FpbenchError(f"{results_paths[0]} is a file; pass --out DIR for the report")
        out_dir = results_paths[0]
    made = make_report(out_dir, sources=list(results_paths), baseline=baseline, plots=not no_plots)
    click.echo(tables_text(made["tables"], output_format))
    click.echo(f"report: {made['report']} ({len(made['written'])} tables and plots beside it)")
    if reference_dir:
        _reproduction_check(out_dir, reference_dir, made["report"])


def _reproduction_check(out_dir: str, reference_dir: str, report_path) -> None:
    from fpbench.records.compare import compare, comparison_markdown
    from fpbench.records.store import ResultStore

    comparison = compare(ResultStore(out_dir).read(), ResultStore(reference_dir).read())
    section = comparison_markdown(comparison, reference_dir)
    with open(report_path, "a", encoding="utf-8") as fh:
        fh.write("\n" + section)
    for row in comparison.rows:
        if row["verdict"] == "differs":
            click.echo(f"differs: {row['scheme']} {row['task']} {row['metric']}: {row['value']:.6g} vs "
                       f"reference {row['reference']:.6g} (tolerance {row['tolerance']})")
    click.echo(comparison.summary())
    if comparison.differs:
        click.echo(f"error: {comparison.differs} metric(s) differ from {reference_dir} beyond tolerance "
                   f"(see the Reproduction check in {report_path})", err=True)
        sys.exit(1)


@main.command("lm-eval", context_settings=dict(ignore_unknown_options=True, allow_extra_args=True,
                                               help_option_names=[]))
@click.pass_context
def lm_eval_cmd(ctx):
    """lm-eval's own command line, with `--model fpbench` available.

    Every argument goes to lm-eval (`fpbench lm-eval --help` shows its flags). fpbench
    registers its model type (model_args: pretrained, scheme or format/granularity/algo/
    clip, include_head) and adds its offline task configs (piqa_local, hellaswag_local...,
    tag fpbench_zeroshot_local) reading the data folder from --data-dir or FPBENCH_DATA_DIR.

    \b
    Examples:
      fpbench lm-eval --model fpbench --model_args pretrained=HuggingFaceTB/SmolLM2-135M,format=int4,granularity=group:128,algo=rtn --tasks piqa
      fpbench lm-eval run --model fpbench --model_args scheme=fp6_e3m2/channel/rtn --tasks piqa_local --limit 50 --data-dir shared/data
    """
    from fpbench.eval.lm_eval_model import lm_eval_command_line

    if ctx.args in ([], ["-h"], ["--help"]):
        click.echo(ctx.get_help() + "\n\nlm-eval's own help follows.\n")
    lm_eval_command_line(ctx.args if ctx.args else ["--help"])


@main.group()
def analyze():
    """Where a floating-point grid beats an integer one (van Baalen et al., arXiv 2303.17951).

    \b
    Examples:
      fpbench analyze synthetic --out results/analyze
      fpbench analyze layers --calib wikitext2 --data-dir DATA --out results/analyze
    """


@analyze.command("synthetic")
@out_option("results", "Folder for analyze_synthetic*.csv / .png and the results store.")
def analyze_synthetic(out_dir):
    """Expected SQNR of INT8, FP8 (E2M5, E3M4, E4M3, E5M2) and the 4-6-bit formats, each at
    its best clipping, on unit-variance Gaussian, Laplace and Student-t (30 down to 2.5
    degrees of freedom) distributions: exact, from closed-form partial moments.

    \b
    Example:
      fpbench analyze synthetic --out results/analyze
    """
    from fpbench.analyze import run_synthetic
    from fpbench.records.report import write_report

    _, table, paths = run_synthetic(out_dir)
    write_report(out_dir)
    click.echo(table.to_markdown(floatfmt=".2f"))
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@analyze.command("layers")
@click.option("--model", default=None, metavar="ID|DIR|FILE.gguf", help="As for `fpbench run`; default: the embedded model.")
@click.option("--calib", default="wikitext2", show_default=True, metavar="SOURCE|FILE",
              help="Text whose activations are analyzed: wikitext2, ptb, c4, code, or a .txt/.jsonl file.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None,
              help="Windows of text (one batch). Default: 1.")
@click.option("--calib-seqlen", type=click.IntRange(min=2), default=default_of("calib_seqlen"), show_default=True,
              help="Tokens per window (lowered to the model's limit).")
@data_dir_option("Folder with local dataset copies (also FPBENCH_DATA_DIR).")
@seed_option
@click.option("--include-head", is_flag=True, help="Also analyze the output head.")
@out_option("results", "Folder for analyze_layers*.csv / .png and the results store.")
@no_progress_option
def analyze_layers(model, calib, calib_samples, calib_seqlen, data_dir, seed, include_head, out_dir, no_progress):
    """Per linear layer: kurtosis and max/std of the weight and of its input activations,
    and the SQNR of each 8-bit format for weight per tensor / per channel and input per
    tensor (best clip) / per token; then the fraction of layers each format wins.

    \b
    Example:
      fpbench analyze layers --calib wikitext2 --data-dir DATA --out results/analyze
    """
    from fpbench.analyze import DEFAULT_LAYER_SAMPLES, run_layers
    from fpbench.quant.calibration import calibration_windows
    from fpbench.models import load_model
    from fpbench.records.report import write_report

    _quiet(no_progress)
    loaded = load_model(model)
    windows = calibration_windows(loaded.tokenizer, calib, calib_samples or DEFAULT_LAYER_SAMPLES, calib_seqlen,
                                  seed, data_dir, loaded.max_length)
    _, summary, paths = run_layers(loaded, windows, out_dir, include_head=include_head,
                                   progress=not no_progress, calib=calib)
    write_report(out_dir)
    click.echo(summary.to_markdown(index=False, floatfmt=".3f"))
    click.echo("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()

"""The `fpbench` command line: a thin layer over the Python API (no logic of its own)."""

from __future__ import annotations

import os
import sys

import click

from .errors import FpbenchError
from .scheme import ALGOS, CLIPS, Granularity, Scheme


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


@main.command()
def formats():
    """Table of every registered format: bits, exponent/mantissa bits, bias, max,
    smallest normal and subnormal, number of finite codes.

    Any fpN_eXmY (e.g. fp5_e2m2) and intN / intN_asym also parse where a format is asked.
    """
    import pandas as pd

    from .formats import format_table

    table = pd.DataFrame(format_table()).set_index("format")
    click.echo(table.to_markdown(floatfmt=".6g"))


def _schemes(format_name, granularity, algo, clip, scheme_names) -> list[Scheme]:
    if scheme_names and format_name:
        raise FpbenchError("give either --scheme (repeatable) or --format/--granularity/--algo, not both")
    if scheme_names:
        return [Scheme.parse(name) for name in scheme_names]
    if not format_name:
        raise FpbenchError("no format given: pass --format NAME (see `fpbench formats`) or --scheme NAME")
    return [Scheme(format_name, Granularity.parse(granularity) if granularity else None, algo, clip)]


@main.command()
@click.option("--model", default=None, metavar="ID|DIR|FILE.gguf",
              help="Hub id, local transformers directory, or .gguf file. Default: the embedded "
                   "SmolLM2-135M-Instruct (a Q4_1 GGUF; see README).")
@click.option("--format", "format_name", metavar="NAME",
              help="Weight format: fp16, bf16, fp32, int8, int4, int4_asym, fp8_e4m3, fp8_e5m2, "
                   "fp6_e3m2, fp6_e2m3, fp4_e2m1, any fpN_eXmY or intN (see `fpbench formats`).")
@click.option("--granularity", metavar="tensor|channel|group:G",
              help="Scale granularity; required for non-baseline formats. Groups that do not "
                   "divide a row leave a shorter last group.")
@click.option("--algo", type=click.Choice(ALGOS), default="rtn", show_default=True,
              help="Quantization algorithm.")
@click.option("--clip", type=click.Choice(CLIPS), default="none", show_default=True,
              help="Scale choice: absmax, or a per-group clipping search minimising MSE.")
@click.option("--scheme", "scheme_names", multiple=True, metavar="NAME",
              help="A scheme by name, e.g. int4/g128/rtn or fp16; repeat to run several in one go.")
@click.option("--task", "task_names", required=True, metavar="T1,T2",
              help="Comma-separated tasks, e.g. wikitext2,ptb.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate at most this many items (perplexity: windows).")
@click.option("--seqlen", type=click.IntRange(min=2), default=None,
              help="Perplexity window length in tokens. Default 2048, or the model's maximum.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with local dataset copies (also FPBENCH_DATA_DIR); used before the hub.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include-head", is_flag=True, help="Also quantize the output head (lm_head).")
@click.option("--out", "out_dir", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the results store (results.jsonl, results.csv, REPORT.md).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run(model, format_name, granularity, algo, clip, scheme_names, task_names, limit, seqlen,
        data_dir, seed, include_head, out_dir, no_progress):
    """Quantize a model with one or more schemes and evaluate it on tasks.

    Appends one record per metric to OUT/results.jsonl (and refreshes results.csv and
    REPORT.md), then prints a table.

    \b
    Examples:
      fpbench run --format fp6_e3m2 --granularity channel --task wikitext2 --limit 8
      fpbench run --model path/or/hf-id --format int4 --granularity group:128 --task ptb
      fpbench run --scheme fp16 --scheme int4/g128/rtn --task wikitext2,ptb --limit 4
    """
    import pandas as pd

    from .report import write_report
    from .runner import RunConfig
    from .runner import run as run_one
    from .tasks import get_task

    schemes = _schemes(format_name, granularity, algo, clip, scheme_names)
    tasks = [t.strip() for t in task_names.split(",") if t.strip()]
    for task in tasks:
        get_task(task)
    records = []
    for scheme in schemes:
        config = RunConfig(scheme=scheme, tasks=tasks, model=model, limit=limit, seqlen=seqlen,
                           data_dir=data_dir, seed=seed, include_head=include_head,
                           out_dir=out_dir, progress=not no_progress)
        records += run_one(config)
    write_report(out_dir)
    table = pd.DataFrame(records)[["scheme", "task", "metric", "value", "n", "quantize_s", "task_s"]]
    click.echo(table.to_markdown(index=False, floatfmt=".4f"))
    click.echo(f"records appended to {os.path.join(out_dir, 'results.jsonl')}")


if __name__ == "__main__":
    main()

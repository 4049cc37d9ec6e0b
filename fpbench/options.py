"""Every option of a run, declared once: name, type, default, help, the stage that reads
it, and whether it enters the run key.

``fpbench run``'s flags and the keys a sweep config accepts are generated from
``OPTIONS``; :func:`run_options` is the one rule for which values enter a run key (both
commands call it, so a run has the same key whichever command made it). A stage receives
a small typed object (:func:`stage_options`), never the whole run configuration.

A stage option's default is the default of its field in the stage's own dataclass
(``GptqOptions``, ``ActCalibOptions``, ``GenerationOptions``, ``ZeroShotOptions``), so
it is written once, next to the code that uses it. Adding an option: a field there, and
one ``Option`` row here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import click

from fpbench.errors import FpbenchError
from fpbench.eval.task_options import PROMPT_MODES, ZEROSHOT_SOURCES, GenerationOptions, ZeroShotOptions
from fpbench.quant.gptq import GptqOptions
from fpbench.quant.model import ActCalibOptions
from fpbench.quant.scheme import ACT_GRANULARITIES, ALGOS, CLIPS

# Stages. "run": a field of the run itself (RunConfig); "scheme": builds the Scheme (its
# name is the key); "output": where and how results are shown (never in a key); the
# others name the dataclass that receives the option.
STAGES = {
    "gptq": GptqOptions,
    "act_calib": ActCalibOptions,
    "generation": GenerationOptions,
    "zeroshot": ZeroShotOptions,
}

# Defaults of options that are not a stage field; a weight format that needs scales gets
# per-channel ones (ZeroQuant(4+2)'s "coarse" granularity), activations per-token ones.
DEFAULT_GRANULARITY = "channel"
DEFAULT_ACT_GRANULARITY = "token-dynamic"
BACKENDS = ("simulate", "kernel")


@dataclass(frozen=True)
class Option:
    name: str  # sweep key, record key, and (with dashes) the CLI flag
    help: str
    stage: str  # "run", "scheme", "output", or a key of STAGES
    type: Any = None  # a click type; None: inferred from the default (bool -> flag)
    default: Any = None  # for run/scheme/output options; stage options take their field's
    in_key: bool = True  # part of the run key (stage options: when not at their default)
    cli: bool = True  # a flag of `fpbench run`
    sweep: bool = True  # a key of a sweep config (scheme mapping or `options`)
    metavar: str | None = None
    multiple: bool = False
    flag: str | None = None  # CLI flag when it is not --name-with-dashes

    @property
    def field_default(self) -> Any:
        if self.stage in STAGES:
            return {f.name: f.default for f in dataclasses.fields(STAGES[self.stage])}[self.name]
        return self.default

    @property
    def is_flag(self) -> bool:
        return isinstance(self.field_default, bool) and self.type is None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value) -> Any:
        """A sweep value of this option, checked against its type; returns it."""
        if value is None and self.field_default is None:
            return None
        if self.is_flag:
            if not isinstance(value, bool):
                raise FpbenchError(f"bad value {value!r} for {self.name}: true or false")
            return value
        kind = self.type or click.STRING
        if isinstance(kind, (click.IntRange,)) or kind is click.INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise FpbenchError(f"bad value {value!r} for {self.name}: an integer ({self.help})")
        if isinstance(kind, click.FloatRange) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FpbenchError(f"bad value {value!r} for {self.name}: a number ({self.help})")
        try:
            return kind.convert(value, None, None)
        except click.BadParameter as exc:
            raise FpbenchError(f"bad value {value!r} for {self.name}: {exc.message}") from None


def _positive(minimum: int = 1) -> click.IntRange:
    return click.IntRange(min=minimum)


OPTIONS: tuple[Option, ...] = (
    # --- the run
    Option("model", "Hub id, local transformers directory, or .gguf file. Default: the embedded "
           "SmolLM2-135M-Instruct (a Q4_1 GGUF; see README).", "run", metavar="ID|DIR|FILE.gguf", sweep=False),
    Option("task", "Comma-separated tasks, e.g. wikitext2,ptb (see README for the list).", "run",
           metavar="T1,T2", sweep=False, in_key=False),
    Option("limit", "Evaluate at most this many items (perplexity: windows).", "run", type=_positive(),
           sweep=False),
    Option("seqlen", "Perplexity window length in tokens. Default 2048, or the model's maximum.", "run",
           type=_positive(2), sweep=False),
    Option("data_dir", "Folder with local dataset copies (also FPBENCH_DATA_DIR); used before the hub.",
           "run", type=click.Path(file_okay=False), in_key=False, sweep=False),
    Option("seed", "Random seed: which calibration windows, sampled generations.", "run", type=click.INT,
           default=0, sweep=False),
    Option("include_head", "Also quantize the output head (lm_head).", "run", default=False, sweep=False),
    Option("backend", "simulate: dequantized fp32 weights; kernel: packed weights on the compiled CPU "
           "kernels (built on first use).", "run", type=click.Choice(BACKENDS), default="simulate"),
    Option("latency", "Also time the run's own model on this CPU (the 'latency' task: decode ms/token and "
           "tokens/s at batch 1, prefill tokens/s, weight MB). Always on with --backend kernel; schemes "
           "simulated without a kernel have no latency.", "run", default=False),
    # --- the scheme (its name is the key)
    Option("format", "Weight format: fp16, bf16, fp32, int8, int4, int4_asym, fp8_e4m3, fp8_e5m2, fp6 "
           "(= fp6_e3m2), fp6_e2m3, fp4_e2m1, any fpN_eXmY or intN (see `fpbench formats`).", "scheme",
           metavar="NAME", sweep=False, flag="--format"),
    Option("granularity", f"Scale granularity: tensor, channel or group:G. Default: {DEFAULT_GRANULARITY} "
           "(a block format: its own block). Groups that do not divide a row leave a shorter last group.",
           "scheme", metavar="tensor|channel|group:G", sweep=False),
    Option("scale_format", "Format the scales are stored in: fp16 (default), fp32, bf16, e8m0 (powers of "
           "two), e4m3, or any float format (see README). Block formats (mxfp*, nvfp4) keep their own.",
           "scheme", metavar="NAME", sweep=False),
    Option("algo", "Quantization algorithm.", "scheme", type=click.Choice(ALGOS), default="rtn", sweep=False),
    Option("clip", "Scale choice: absmax, or a per-group clipping search minimising MSE.", "scheme",
           type=click.Choice(CLIPS), default="none", sweep=False),
    Option("scheme", "A scheme by name, e.g. int4/g128/rtn or fp16; repeat to run several in one go.",
           "scheme", metavar="NAME", multiple=True, sweep=False),
    Option("calib", "Calibration text of GPTQ and static activation scales: wikitext2 or ptb (validation "
           "split), c4 (hub), code (the Python standard library's source), or a .txt / .jsonl ('text' "
           "field) file. Default: wikitext2. Joins the scheme name (int4/g128/gptq@code).", "scheme",
           metavar="SOURCE|FILE", sweep=False),
    Option("act_format", "Also quantize the input of every quantized linear (W8A8): int8, fp8_e4m3, "
           "fp8_e5m2, fp8_e3m4, ... Applies to each --scheme without an /a:... part.", "scheme",
           metavar="NAME", sweep=False),
    Option("act_granularity", "Activation scales: one per token computed on the fly (token-dynamic, the "
           "default) or one per tensor fixed by calibration on --calib text (tensor-static).", "scheme",
           type=click.Choice(ACT_GRANULARITIES), sweep=False),
    Option("act_clip", "tensor-static: calibration absmax, or the clip with the least squared error.",
           "scheme", type=click.Choice(CLIPS), default="none", sweep=False),
    # --- GPTQ
    Option("calib_samples", "GPTQ: number of random calibration windows.", "gptq", type=_positive()),
    Option("calib_seqlen", "GPTQ: tokens per calibration window (lowered to the model's limit).", "gptq",
           type=_positive(2)),
    Option("damp", "GPTQ: damping added to diag(H), as a fraction of its mean.", "gptq",
           type=click.FloatRange(min=0)),
    Option("gptq_block", "GPTQ: columns per lazy batch update.", "gptq", type=_positive()),
    Option("act_order", "GPTQ: quantize columns by decreasing diag(H).", "gptq"),
    Option("static_groups", "GPTQ with groups: all group scales from the original weights "
           "(order-independent).", "gptq"),
    # --- static activation scales
    Option("act_calib_samples", "tensor-static: calibration windows (each --seqlen tokens long).",
           "act_calib", type=_positive()),
    # --- generative tasks
    Option("samples", "Code tasks: completions per problem (pass@k for k <= samples). Default 1 (greedy).",
           "generation", type=_positive()),
    Option("temperature", "Generative tasks: sampling temperature; 0 = greedy. Default 0, or 0.8 with "
           "--samples > 1.", "generation", type=click.FloatRange(min=0)),
    Option("max_new_tokens", "Generative tasks: generated tokens per answer (default from the task YAML).",
           "generation", type=_positive()),
    Option("prompt_mode", "Generative tasks: chat template (instruct models) or raw prompt; auto picks "
           "chat when the tokenizer has a chat template.", "generation", type=click.Choice(PROMPT_MODES)),
    Option("timeout_s", "Code tasks: seconds per program execution (default from the task YAML).",
           "generation", type=click.FloatRange(min=0, min_open=True)),
    Option("batch_size", "Generative tasks: sequences decoded together (default from the task YAML); "
           "zero-shot tasks: lm-eval's batch size (default 16).", "eval", type=_positive()),
    # --- zero-shot tasks
    Option("zeroshot_source", "Zero-shot data: auto (a local copy under the data folder, else the hub), "
           "hub or local.", "zeroshot", type=click.Choice(ZEROSHOT_SOURCES)),
    Option("bootstrap_iters", "Zero-shot: bootstrap iterations for the standard error.", "zeroshot",
           type=click.IntRange(min=0)),
    # --- derived: a --calib file's resolved path (its base name joins the scheme name)
    Option("calib_path", "Calibration text file (absolute path).", "calibration", cli=False, sweep=False),
    # --- output
    Option("out", "Folder of the results store (results.jsonl, results.csv, REPORT.md).", "output",
           type=click.Path(file_okay=False), default="results", in_key=False, sweep=False),
    Option("no_progress", "Hide progress bars and the libraries' progress and info logs.", "output",
           default=False, in_key=False, sweep=False),
    Option("dry_run", "Check the options, print the runs and their keys, and stop before loading a model.",
           "output", default=False, in_key=False, sweep=False),
)

BY_NAME = {option.name: option for option in OPTIONS}
# Options a stage reads that live on the task-evaluation options (several families share them).
EVAL_FIELDS = ("batch_size",)


def option(name: str) -> Option:
    return BY_NAME[name]


def default_of(name: str) -> Any:
    return BY_NAME[name].field_default


def sweep_keys() -> dict[str, Option]:
    """Keys a sweep config accepts in a scheme mapping or its top-level ``options``."""
    return {o.name: o for o in OPTIONS if o.sweep and o.stage not in ("run", "scheme", "output")}


def run_field_keys() -> dict[str, Option]:
    """Sweep scheme-mapping keys that set a field of the run itself (how its layers compute)."""
    return {o.name: o for o in OPTIONS if o.sweep and o.stage == "run"}


def run_options(values: dict) -> dict:
    """The stage options of a run as they enter its key and its records: the values that
    differ from their defaults, in table order. The one rule for `run` and `sweep`."""
    out = {}
    for opt in OPTIONS:
        if opt.stage in ("run", "scheme", "output") or not opt.in_key or opt.name not in values:
            continue
        value = values[opt.name]
        if value is not None and value != opt.field_default:
            out[opt.name] = value
    return out


def stage_options(stage: str, values: dict):
    """The typed options object of one stage, from a run's option values."""
    cls = STAGES[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def click_option(name: str, **overrides):
    """The click option of one table row (``overrides``: e.g. another help or default
    where a command uses the option differently)."""
    opt = BY_NAME[name]
    default = opt.field_default
    kwargs: dict = {"help": opt.help}
    if opt.is_flag:
        kwargs["is_flag"] = True
    elif opt.multiple:
        kwargs.update(type=opt.type, multiple=True)
    else:
        kwargs.update(type=opt.type, default=default, show_default=default is not None)
    if opt.metavar:
        kwargs["metavar"] = opt.metavar
    kwargs.update(overrides)
    return click.option(opt.cli_flag, opt.name, **kwargs)


def click_options(stages: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()):
    """Decorator adding the table's CLI flags (of ``stages``, or all) to a click command."""

    def decorate(command):
        for opt in reversed(OPTIONS):
            if opt.cli and opt.name not in exclude and (stages is None or opt.stage in stages):
                command = click_option(opt.name)(command)
        return command

    return decorate


# ---------------------------------------------------------------- schemes from option values

def default_granularity(format_name: str) -> str:
    """Per-channel scales for a format that needs scales; a block format's own block."""
    from fpbench.quant.formats import get_format

    block = getattr(get_format(format_name), "block_size", None)
    return f"group:{block}" if block else DEFAULT_GRANULARITY


def default_act_granularity(act_format: str) -> str:
    """Per-token scales; a block format's own blocks (dynamic), the only kind it has."""
    from fpbench.quant.formats import get_format
    from fpbench.quant.scheme import BLOCK_ACT_GRANULARITY

    return BLOCK_ACT_GRANULARITY if getattr(get_format(act_format), "block_size", None) else DEFAULT_ACT_GRANULARITY


def schemes_from_values(values: dict) -> list:
    """The schemes a run's flags name: ``--scheme`` (repeatable), or ``--format`` with
    ``--granularity`` (default per-channel), ``--algo``, ``--clip``; then the ``--act-*``
    options join each scheme that has no activation part of its own."""
    from fpbench.quant.scheme import Granularity, Scheme

    names, format_name = values.get("scheme") or (), values.get("format")
    if names and format_name:
        raise FpbenchError("give either --scheme (repeatable) or --format/--granularity/--algo, not both")
    if names:
        schemes = [Scheme.parse(name) for name in names]
    elif format_name:
        granularity = values.get("granularity") or default_granularity(format_name)
        schemes = [Scheme(format_name, Granularity.parse(granularity), values.get("algo") or "rtn",
                          values.get("clip") or "none", scale_format=values.get("scale_format"))]
    else:
        raise FpbenchError("no format given: pass --format NAME (see `fpbench formats`) or --scheme NAME")
    return [_with_activation(s, values) for s in schemes]


def _with_activation(scheme, values: dict):
    act_format, act_granularity = values.get("act_format"), values.get("act_granularity")
    act_clip = values.get("act_clip") or "none"
    if act_format or act_granularity or act_clip != "none":
        if scheme.act_format is not None:
            raise FpbenchError(f"scheme {scheme.name} already names its activation format; drop --act-*")
        if act_format and not act_granularity:
            act_granularity = default_act_granularity(act_format)
        scheme = scheme.with_(act_format=act_format, act_granularity=act_granularity, act_clip=act_clip)
    if scheme.act_format is not None and values.get("backend") == "kernel":
        raise FpbenchError("activation quantization runs with --backend simulate only; drop --backend kernel")
    return scheme


def needs_calibration(scheme) -> bool:
    return scheme.algo == "gptq" or scheme.act_granularity == "tensor-static"


def calibrated_scheme(scheme, values: dict, data_dir=None) -> tuple:
    """The scheme with its calibration source named, and the option values that go with it.

    GPTQ always names its source (``int4/g128/gptq@wikitext2``); static activation scales
    name it when ``--calib`` is given (``int8/channel/rtn@ptb/a:int8-tensor-static``). A
    file joins by its base name, its resolved path becomes ``calib_path``. The source is
    read once here, so a missing one is an error before any model loads."""
    from pathlib import Path

    from fpbench.quant.calibration import check_source

    values = dict(values)
    if not needs_calibration(scheme):
        return scheme, values
    explicit = values.get("calib")
    if scheme.algo == "gptq" or (explicit and not scheme.calib):
        source = scheme.calib or explicit or scheme.calib_source
    else:
        source = scheme.calib_source
    check_source(values.get("calib_path") or source, data_dir)
    if Path(source).suffix in (".txt", ".jsonl"):
        values["calib_path"] = str(Path(source).expanduser().resolve())
        source = Path(source).name
    if scheme.algo == "gptq" or explicit:
        scheme = scheme.with_(calib=source)
    return scheme, values

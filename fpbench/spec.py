"""From command-line options to the schemes and run options of ``fpbench run``: which
schemes the flags name, how activation flags join them, and the calibration a scheme
needs (checked before any model loads). The CLI only parses flags and calls these."""

from __future__ import annotations

from fpbench.quant.calibration import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQLEN
from fpbench.errors import FpbenchError
from fpbench.quant.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP
from fpbench.quant.scheme import Granularity, Scheme


def schemes_from_options(format_name, granularity, algo, clip, scheme_names) -> list[Scheme]:
    if scheme_names and format_name:
        raise FpbenchError("give either --scheme (repeatable) or --format/--granularity/--algo, not both")
    if scheme_names:
        return [Scheme.parse(name) for name in scheme_names]
    if not format_name:
        raise FpbenchError("no format given: pass --format NAME (see `fpbench formats`) or --scheme NAME")
    return [Scheme(format_name, Granularity.parse(granularity) if granularity else None, algo, clip)]


def with_activation(scheme: Scheme, act_format, act_granularity, act_clip, backend) -> Scheme:
    """--act-* options join a scheme that has no activation part of its own."""
    if act_format or act_granularity or act_clip != "none":
        if scheme.act_format is not None:
            raise FpbenchError(f"scheme {scheme.name} already names its activation format; drop --act-*")
        scheme = scheme.with_(act_format=act_format, act_granularity=act_granularity, act_clip=act_clip)
    if scheme.act_format is not None and backend == "kernel":
        raise FpbenchError("activation quantization runs with --backend simulate only; drop --backend kernel")
    return scheme


def static_act_setup(scheme: Scheme, extra: dict, data_dir, act_calib_samples, gptq_options) -> tuple[Scheme, dict]:
    """Static activation scales calibrate on the scheme's source; an explicit --calib joins
    the name as for GPTQ (``int8/channel/rtn@ptb/a:int8-tensor-static``)."""
    from fpbench.quant.calibration import check_source

    if scheme.algo != "gptq" and gptq_options.get("calib") and not scheme.calib:
        named, named_extra = gptq_setup(scheme, data_dir, **gptq_options)
        scheme = named
        extra = extra | {k: v for k, v in named_extra.items() if k == "calib_path"}
    else:
        check_source(scheme.calib_source, data_dir)
    return scheme, extra | {"act_calib_samples": act_calib_samples}


def gptq_setup(scheme: Scheme, data_dir, calib, calib_samples, calib_seqlen, damp, gptq_block,
                act_order, static_groups) -> tuple[Scheme, dict]:
    """The calibration source joins the scheme name (``int4/g128/gptq@code``; a file by its
    base name); it is checked before any model loads. Other GPTQ options go in extra."""
    from pathlib import Path

    from fpbench.quant.calibration import check_source

    source = scheme.calib or calib or scheme.calib_source  # the name's source, --calib, the default
    check_source(source, data_dir)
    options = {"calib_samples": calib_samples, "calib_seqlen": calib_seqlen, "damp": damp,
               "gptq_block": gptq_block, "act_order": act_order, "static_groups": static_groups}
    defaults = {"calib_samples": DEFAULT_CALIB_SAMPLES, "calib_seqlen": DEFAULT_CALIB_SEQLEN,
                "damp": DEFAULT_DAMP, "gptq_block": DEFAULT_BLOCK_SIZE, "act_order": False,
                "static_groups": False}
    # Only what differs from the defaults, as a sweep entry writes it: same run, same key.
    extra = {k: v for k, v in options.items() if v != defaults[k]}
    if Path(source).suffix in (".txt", ".jsonl"):
        extra["calib_path"] = str(Path(source).expanduser().resolve())
        source = Path(source).name
    return scheme.with_(calib=source), extra


def calibrated_scheme(scheme: Scheme, data_dir, act_calib_samples, gptq_options: dict) -> tuple[Scheme, dict]:
    """The scheme with its calibration source named (GPTQ, static activation scales) and
    the run options that go with it (``RunConfig.extra``)."""
    extra: dict = {}
    if scheme.algo == "gptq":
        scheme, extra = gptq_setup(scheme, data_dir, **gptq_options)
    if scheme.act_granularity == "tensor-static":
        scheme, extra = static_act_setup(scheme, extra, data_dir, act_calib_samples, gptq_options)
    return scheme, extra

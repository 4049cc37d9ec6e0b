"""fpbench as an lm-eval model type: ``--model fpbench`` loads a model the way fpbench
does (hub id, local directory, .gguf, or the embedded default), quantizes it with a
scheme, and evaluates it with lm-eval's own HF wrapper. Importing this module registers it:

    import fpbench.eval.lm_eval_model  # noqa: F401  (registers "fpbench")
    import lm_eval
    lm_eval.simple_evaluate(model="fpbench", tasks=["piqa"],
                            model_args="pretrained=HuggingFaceTB/SmolLM2-135M,format=int4,"
                                       "granularity=group:128,algo=rtn")

model_args: ``pretrained`` (default: the embedded model), either ``scheme`` (a scheme
name such as ``int4/g128/rtn``) or ``format`` / ``granularity`` / ``algo`` / ``clip``
(default: ``fp32``, i.e. unquantized), ``include_head``, ``seed``, ``data_dir`` (for
calibration data), and any other ``HFLM`` argument (``max_length``, ``add_bos_token``...).
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from fpbench.errors import FpbenchError
from fpbench.quant.calibration import CalibrationSource
from fpbench.eval.zeroshot import lm_eval_include_dir
from fpbench.models import load_model
from fpbench.quant.model import quantize_model
from fpbench.quant.scheme import Granularity, Scheme

MODEL_NAME = "fpbench"
UNQUANTIZED_FORMAT = "fp32"  # fpbench loads models in fp32; rounding to fp32 is the identity


def scheme_from_args(scheme=None, format=None, granularity=None, algo="rtn", clip="none") -> Scheme:
    """The scheme named by lm-eval model_args (``scheme=`` or its fields, not both)."""
    if scheme and format:
        raise FpbenchError("model_args: give either scheme=NAME or format=/granularity=/algo=, not both")
    if scheme:
        return Scheme.parse(str(scheme))
    return Scheme(str(format or UNQUANTIZED_FORMAT),
                  Granularity.parse(str(granularity)) if granularity else None, str(algo), str(clip))


@register_model(MODEL_NAME)
class FpbenchLM(HFLM):
    """lm-eval's HFLM around a model that fpbench loaded and quantized in memory."""

    def __init__(self, pretrained: str | None = None, scheme: str | None = None, format: str | None = None,
                 granularity: str | None = None, algo: str = "rtn", clip: str = "none",
                 include_head: bool = False, seed: int = 0, data_dir: str | None = None,
                 device: str | None = None, batch_size: int | str = 1, **hflm_args):
        self.scheme = scheme_from_args(scheme, format, granularity, algo, clip)
        torch.manual_seed(seed)
        self.loaded = load_model(None if pretrained is None else str(pretrained))
        # Calibrated algorithms (GPTQ) draw their text from the scheme's source with this
        # seed and data folder.
        calibration = CalibrationSource(self.scheme.calib_source, seed, data_dir)
        self.quantized = quantize_model(self.loaded.model, self.scheme, include_head=bool(include_head),
                                        loaded=self.loaded, calibration=calibration)
        model = self.loaded.model
        # lm-eval's command line asks for cuda:0 by default; like HFLM, fall back to the
        # CPU when there is no GPU.
        if device and device != "cpu" and not (device.startswith("cuda") and not torch.cuda.is_available()):
            model = model.to(device)
        super().__init__(pretrained=model, tokenizer=self.loaded.tokenizer, batch_size=batch_size, **hflm_args)

    def get_model_info(self) -> dict:
        # Instead of HFLM's hub SHA look-up (network): what fpbench knows about the model.
        return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(self._model.dtype), "fpbench_model": self.loaded.name,
                "fpbench_model_source": self.loaded.source, **self.scheme.fields(),
                "quantize_s": round(self.quantized.quantize_seconds, 3), "caveat": self.loaded.caveat}


def _pop_option(args: list[str], name: str) -> tuple[list[str], str | None]:
    """Remove ``name VALUE`` / ``name=VALUE`` from args; return (rest, VALUE)."""
    rest, value, i = [], None, 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(name + "="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return rest, value


def lm_eval_command_line(args: list[str]) -> None:
    """lm-eval's own command line (``lm-eval run ...``), with the fpbench model
    registered and fpbench's local task configs (``piqa_local``..., tag
    ``fpbench_zeroshot_local``) added as lm-eval's ``--include_path``.

    ``--data-dir DIR`` (or ``FPBENCH_DATA_DIR``) names the data folder those configs
    read; it is fpbench's option and is not passed on. lm-eval takes one include path,
    so a user's own ``--include_path`` replaces fpbench's folder (with a warning).
    """
    from lm_eval.__main__ import cli_evaluate  # builds lm-eval's whole argument parser

    args, data_dir = _pop_option(list(args), "--data-dir")
    user_include = any(a == "--include_path" or a.startswith("--include_path=") for a in args)
    help_only = not args or all(a in ("-h", "--help") for a in args)
    with lm_eval_include_dir(data_dir) as include:
        if include is not None and not user_include and not help_only:
            args += ["--include_path", str(include)]
        elif include is not None and user_include:
            print("fpbench: --include_path given, so fpbench's local task configs are not included "
                  "(lm-eval takes one include path)", file=sys.stderr)
        saved_argv = sys.argv
        sys.argv = ["lm-eval", *args]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved_argv

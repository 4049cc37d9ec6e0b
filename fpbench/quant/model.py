"""Module surgery: apply a scheme to every linear layer of a model.

Which layers: every ``nn.Linear`` except the output head (``get_output_embeddings``),
unless ``include_head``; embeddings are not linear layers and stay as loaded. This covers
decoder-only blocks and both encoder and decoder of encoder-decoder models.
The model keeps dequantized weights (simulation); the codes and scales of each layer are
returned so a packer/kernel can use them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fpbench.errors import FpbenchError
from fpbench.quant.activations import DEFAULT_ACT_CALIB_SAMPLES, ActQuantizers, attach_act_quantizers, calibrate
from fpbench.quant.calibration import DEFAULT_CALIB_SEQLEN, CalibrationSource
from fpbench.quant.formats import get_format
from fpbench.quant.gptq import GptqOptions, quantize_model_gptq
from fpbench.quant.layers import set_weight, target_linears
from fpbench.quant.scheme import Scheme
from fpbench.quant.weights import QuantizedWeight, quantize_weight


@dataclass
class QuantizedModel:
    model: nn.Module
    scheme: Scheme
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    quantize_seconds: float = 0.0
    act_quantizers: ActQuantizers | None = None  # input quantizers (W8A8); .remove() undoes them


@dataclass(frozen=True)
class ActCalibOptions:
    """Static activation scales (``tensor-static``): how many windows calibrate them."""

    act_calib_samples: int = DEFAULT_ACT_CALIB_SAMPLES


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: Scheme, include_head: bool = False, progress: bool = True,
                   loaded=None, calibration: CalibrationSource | None = None,
                   gptq: GptqOptions | None = None, act_calib: ActCalibOptions | None = None,
                   act_seqlen: int | None = None, calib_windows: torch.Tensor | None = None,
                   calibration_ids: torch.Tensor | None = None) -> QuantizedModel:
    """Quantize ``model`` in place according to ``scheme``; returns codes and timing.

    Calibration text (GPTQ, static activation scales) comes from ``calibration`` (default:
    the scheme's source) tokenized with ``loaded.tokenizer``, or is given directly:
    ``calibration_ids`` for GPTQ, ``calib_windows`` for activation scales."""
    start = time.perf_counter()
    result = QuantizedModel(model, scheme)
    calibration = calibration or CalibrationSource(scheme.calib_source)
    if scheme.is_baseline:
        fmt = get_format(scheme.format)
        for module in target_linears(model, include_head).values():
            set_weight(module, fmt.round(module.weight.data))
    elif scheme.algo == "rtn":
        layers = target_linears(model, include_head)
        for name, module in tqdm(layers.items(), desc=f"quantize {scheme.name}",
                                 disable=not progress, leave=False):
            qweight = quantize_weight(module.weight.data, scheme.format, scheme.granularity,
                                      scheme.clip, scheme.scale_format)
            set_weight(module, qweight.dequantize())
            result.weights[name] = qweight
    elif scheme.algo == "gptq":
        result.weights = quantize_model_gptq(model, target_linears(model, include_head), scheme,
                                             gptq or GptqOptions(), progress=progress, loaded=loaded,
                                             calibration=calibration, calibration_ids=calibration_ids)
    else:
        raise FpbenchError(f"algorithm {scheme.algo!r} is not available; use --algo rtn or gptq")
    if scheme.act_format is not None:
        # After the weights, so static scales are calibrated on the quantized model.
        layers = target_linears(model, include_head)
        result.act_quantizers = attach_act_quantizers(layers, scheme.act_format, scheme.act_granularity,
                                                      scheme.act_clip)
        if scheme.act_granularity == "tensor-static":
            if calib_windows is None:
                calib_windows = _act_calibration_windows(loaded, calibration, act_calib or ActCalibOptions(),
                                                         act_seqlen)
            calibrate(model, result.act_quantizers, calib_windows, progress)
    result.quantize_seconds = time.perf_counter() - start
    return result


def _act_calibration_windows(loaded, calibration: CalibrationSource, options: ActCalibOptions,
                             seqlen: int | None) -> torch.Tensor:
    """Windows as long as the evaluation windows (``seqlen``), so that token positions (and
    their position-dependent outliers) match."""
    if loaded is None:
        raise FpbenchError("tensor-static activation scales need calibration text: pass loaded= "
                           "(a LoadedModel) or calib_windows= to quantize_model, or use token-dynamic")
    return calibration.windows(loaded.tokenizer, options.act_calib_samples, seqlen or DEFAULT_CALIB_SEQLEN,
                               loaded.max_length)

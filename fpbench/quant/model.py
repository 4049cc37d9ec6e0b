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
from fpbench.quant.activations import ActQuantizers, attach_act_quantizers, calibrate
from fpbench.quant.weights import QuantizedWeight, quantize_weight
from fpbench.quant.scheme import Scheme


@dataclass
class QuantizedModel:
    model: nn.Module
    scheme: Scheme
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    quantize_seconds: float = 0.0
    act_quantizers: ActQuantizers | None = None  # input quantizers (W8A8); .remove() undoes them


def target_linears(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_head or module is not head)
    }


def _set_weight(module: nn.Linear, weight: torch.Tensor) -> None:
    # A new Parameter, not `.data =`: a head tied to the input embedding must not drag
    # the embedding along when it is quantized (--include-head).
    module.weight = nn.Parameter(weight, requires_grad=False)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: Scheme, include_head: bool = False,
                   progress: bool = True, **algo_options) -> QuantizedModel:
    """Quantize ``model`` in place according to ``scheme``; returns codes and timing."""
    start = time.perf_counter()
    result = QuantizedModel(model, scheme)
    if scheme.is_baseline:
        from fpbench.quant.formats import get_format
        fmt = get_format(scheme.format)
        for module in target_linears(model, include_head).values():
            _set_weight(module, fmt.round(module.weight.data))
    elif scheme.algo == "rtn":
        layers = target_linears(model, include_head)
        for name, module in tqdm(layers.items(), desc=f"quantize {scheme.name}",
                                 disable=not progress, leave=False):
            qweight = quantize_weight(module.weight.data, scheme.format, scheme.granularity,
                                      scheme.clip, scheme.scale_format)
            _set_weight(module, qweight.dequantize().to(module.weight.dtype))
            result.weights[name] = qweight
    elif scheme.algo == "gptq":
        from fpbench.quant.gptq import quantize_model_gptq

        result.weights = quantize_model_gptq(model, target_linears(model, include_head), scheme,
                                             progress=progress, **algo_options)
    else:
        raise FpbenchError(f"algorithm {scheme.algo!r} is not available; use --algo rtn or gptq")
    if scheme.act_format is not None:
        # After the weights, so static scales are calibrated on the quantized model.
        layers = target_linears(model, include_head)
        result.act_quantizers = attach_act_quantizers(layers, scheme.act_format, scheme.act_granularity,
                                                      scheme.act_clip)
        if scheme.act_granularity == "tensor-static":
            calibrate(model, result.act_quantizers, _act_calibration_windows(scheme, algo_options), progress)
    result.quantize_seconds = time.perf_counter() - start
    return result


def _act_calibration_windows(scheme: Scheme, options: dict) -> torch.Tensor:
    """Token windows for static activation scales: ``calib_windows`` if given, else drawn
    from the scheme's calibration source (``Scheme.calib_source``) with the
    run's seed and data folder; ``act_calib_samples`` in the run's extra options sets their
    number, and they are as long as the evaluation windows so that token positions (and
    their position-dependent outliers) match."""
    if options.get("calib_windows") is not None:
        return options["calib_windows"]
    from fpbench.quant.activations import DEFAULT_ACT_CALIB_SAMPLES
    from fpbench.quant.calibration import DEFAULT_CALIB_SEQLEN, calibration_windows

    loaded, config = options.get("loaded"), options.get("config")
    if loaded is None:
        raise FpbenchError("tensor-static activation scales need calibration text: pass loaded= "
                           "(a LoadedModel) or calib_windows= to quantize_model, or use token-dynamic")
    extra = dict(getattr(config, "extra", None) or {})
    seqlen = getattr(config, "seqlen", None) or DEFAULT_CALIB_SEQLEN
    return calibration_windows(
        loaded.tokenizer, extra.get("calib_path") or scheme.calib_source,
        n_samples=extra.get("act_calib_samples") or DEFAULT_ACT_CALIB_SAMPLES, seqlen=seqlen,
        seed=getattr(config, "seed", 0), data_dir=getattr(config, "data_dir", None),
        max_length=loaded.max_length,
    )

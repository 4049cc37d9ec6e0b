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

from .errors import FpbenchError
from .quant import QuantizedWeight, quantize_weight
from .scheme import Scheme


@dataclass
class QuantizedModel:
    model: nn.Module
    scheme: Scheme
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    quantize_seconds: float = 0.0


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
        from .formats import get_format
        fmt = get_format(scheme.format)
        for module in target_linears(model, include_head).values():
            _set_weight(module, fmt.round(module.weight.data))
    elif scheme.algo == "rtn":
        layers = target_linears(model, include_head)
        for name, module in tqdm(layers.items(), desc=f"quantize {scheme.name}",
                                 disable=not progress, leave=False):
            qweight = quantize_weight(module.weight.data, scheme.format, scheme.granularity,
                                      scheme.clip)
            _set_weight(module, qweight.dequantize().to(module.weight.dtype))
            result.weights[name] = qweight
    else:
        raise FpbenchError(f"algorithm {scheme.algo!r} is not available; use --algo rtn")
    result.quantize_seconds = time.perf_counter() - start
    return result

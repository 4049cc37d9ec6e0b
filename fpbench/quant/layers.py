"""Which layers a scheme quantizes, and how a quantized weight goes back into one: the
two pieces of module surgery that RTN (``quant.model``) and GPTQ (``quant.gptq``) share."""

from __future__ import annotations

import torch
from torch import nn


def target_linears(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` except the output head (``get_output_embeddings``), unless
    ``include_head``; embeddings are not linear layers and stay as loaded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_head or module is not head)
    }


def set_weight(module: nn.Linear, weight: torch.Tensor) -> None:
    # A new Parameter, not `.data =`: a head tied to the input embedding must not drag
    # the embedding along when it is quantized (--include-head).
    module.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)

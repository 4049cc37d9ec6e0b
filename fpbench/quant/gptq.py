"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323), for any number format.

Read next to the paper:

- Sec. 3, Eq. (1)-(3): each linear layer minimises ||WX - ŴX||²; its Hessian is
  H = 2XXᵀ over the calibration tokens (``accumulate`` / ``hessian``), and quantizing
  column q moves the not-yet-quantized columns by -(w_q - quant(w_q)) / [H⁻¹]_qq · (H⁻¹)_q,:.
- Sec. 4, Step 1: every row is quantized in the same column order, so one H⁻¹ serves all.
- Sec. 4, Step 2 "lazy batch updates": the update is applied inside a block of B columns
  at once, and to the columns right of the block only when the block is done.
- Sec. 4, Step 3 "Cholesky reformulation": the rows of the upper Cholesky factor of H⁻¹
  hold exactly the H⁻¹ entries the update needs, without a numerically fragile
  rank-one downdate per column; H is dampened by λ = ``damp`` x mean(diag H) first.
- Sec. 5 (group-wise results): with groups, a group's scale is chosen when the column loop
  reaches the group, from the weights as the earlier updates have left them.
- "act-order" (process columns by decreasing diag(H), the heuristic of the authors'
  reference code) and "static groups" (all group scales from the original weights, so
  they do not depend on the order): both from the reference implementation.

Format-generic: scales come from ``quant.compute_scales`` and each column is rounded with
``quant.grid_values``, the same arithmetic as RTN (``quant.quantize_weight``), so the
codes/scales/zero points are a ``QuantizedWeight`` exactly like RTN's. Ragged groups (a
576-wide row with G = 128) get their last, shorter group's scale from just its columns,
which is what RTN's padding rule gives too. Scales are rounded to the scheme's scale
format when they are chosen. Block formats (MX, NVFP4) are groups of their block size:
a block's scale is chosen by the format's rule when the loop reaches the block (or from
the original weights with ``static_groups``); NVFP4's per-tensor scale comes from the
original weights, before any update, as a calibrated checkpoint fixes it.

``quantize_model_gptq`` runs the published sequential procedure over a decoder-only
model: the inputs of block b come from blocks 0..b-1 already quantized; one block's
activations are held at a time.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from fpbench.quant.calibration import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQLEN, CalibrationSource
from fpbench.errors import FpbenchError
from fpbench.quant.layers import set_weight
from fpbench.quant.formats import BaselineFormat, NumberFormat, get_format
from fpbench.quant.weights import (QuantizedWeight, compute_scales, effective_scales, grid_values, group_count,
                                   quantize_weight, tensor_scale_of)
from fpbench.quant.scheme import Granularity, Scheme, check_block_granularity, scale_format_of

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01  # λ as a fraction of the mean diagonal of H (paper: 1%)
DEFAULT_BLOCK_SIZE = 128  # B, columns per lazy batch update (paper: 128)
DAMP_RETRY_FACTOR = 10  # a non-positive-definite H is retried with 10x the damping
MAX_DAMP_RETRIES = 6

_CHANNEL = Granularity("channel")


# ---------------------------------------------------------------- one layer -------------

def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float, layer_name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ (Step 3). If H + λI is not positive definite
    (too few calibration tokens, float error) retry with more damping and say so."""
    mean_diag = torch.diag(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for _ in range(MAX_DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        more = damp * DAMP_RETRY_FACTOR if damp > 0 else DEFAULT_DAMP
        log.warning("GPTQ %s: H + %g*mean(diag H)*I is not positive definite; retrying with damping %g",
                    layer_name or "layer", damp, more)
        damp = more
    raise FpbenchError(
        f"GPTQ {layer_name or 'layer'}: the Hessian is not positive definite even with damping {damp:g}; "
        "use more calibration data (--calib-samples) or a larger --damp"
    )


@contextmanager
def _one_thread():
    """The column loop works on single columns (a few hundred numbers): split across
    threads, its many tiny ops cost 10-50x more CPU time in synchronisation (measured)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@torch.no_grad()
@_one_thread()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: NumberFormat | str,
                         granularity: Granularity | None, clip: str = "none", damp: float = DEFAULT_DAMP,
                         block_size: int = DEFAULT_BLOCK_SIZE, act_order: bool = False,
                         static_groups: bool = False, layer_name: str = "",
                         scale_format: str | None = None) -> QuantizedWeight:
    """Quantize one weight W [N rows, K columns] given H [K, K] (columns = input features)."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if isinstance(fmt, BaselineFormat):
        raise FpbenchError(f"GPTQ needs a quantized format with scales; {fmt.name} is a plain cast, use --algo rtn")
    granularity = check_block_granularity(fmt, granularity)
    scale_format = scale_format_of(fmt, scale_format)
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    n_cols = W.shape[1]
    if H.shape != (n_cols, n_cols) or not torch.isfinite(H).all():
        raise FpbenchError(f"GPTQ {layer_name}: Hessian must be a finite {n_cols}x{n_cols} matrix, got {tuple(H.shape)}")

    # Dead inputs (always zero in the calibration data, H_jj = 0) cannot change the layer
    # output; as in the reference code their weights are set to 0 and H_jj to 1.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = granularity.kind == "group"
    group_size = granularity.group_size if grouped else n_cols
    n_groups = group_count(n_cols, granularity)
    # Per-channel/per-tensor scales, and "static" group scales, come from the original
    # weights: exactly RTN's. Other group scales are filled in as the loop reaches them.
    tensor_scale = tensor_scale_of(W, fmt)
    scales, zero_points = compute_scales(W, fmt, granularity, clip, scale_format, tensor_scale)

    # Step 1 with act-order: a column order (decreasing diag H) shared by all rows.
    if act_order:
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
    else:
        order = torch.arange(n_cols)
    position_of = torch.argsort(order)  # original column -> processing position
    W, H = W[:, order], H[order][:, order]

    Hinv = _upper_cholesky_of_inverse(H, damp, layer_name)
    code_values = torch.zeros_like(W)  # the grid value chosen for each weight
    order_list = order.tolist()
    scale_ready = [not grouped or static_groups] * n_groups

    # Step 2: lazy batch updates, B columns at a time.
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            group = order_list[i1 + i] // group_size
            if not scale_ready[group]:
                # The group's first column (in processing order) is reached: its scale is
                # chosen from its columns as updated so far. All of them are still to be
                # quantized; those right of this block have not yet received this block's
                # updates, so apply them here (W1 holds the same values for in-block ones).
                positions = position_of[group * group_size:min((group + 1) * group_size, n_cols)]
                current = W[:, positions] - Err1[:, :i] @ Hinv[i1:i1 + i, positions]
                group_scale, group_zero = compute_scales(current, fmt, _CHANNEL, clip, scale_format, tensor_scale)
                scales[:, group] = group_scale[:, 0]
                if zero_points is not None:
                    zero_points[:, group] = group_zero[:, 0]
                scale_ready[group] = True
            slot = group if grouped else 0
            scale = effective_scales(scales[:, slot], tensor_scale)
            w = W1[:, i]
            # Same arithmetic as quant.quantize_weight, so H ∝ I reproduces RTN bit for bit.
            zero = None if zero_points is None else zero_points[:, slot]
            code_value = grid_values(w, fmt, scale, zero)
            q = code_value * scale if zero is None else (code_value - zero) * scale
            code_values[:, i1 + i] = code_value
            # Eq. (3) with the Cholesky row: the error, scaled by 1/[H⁻¹]_qq, moves the
            # remaining columns of the block along row q of the factor.
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # W1[:, i:] -= err ⊗ Hinv1[i, i:]
            Err1[:, i] = err
        # The deferred update of every column right of the block (Step 2).
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    codes = fmt.encode(code_values[:, position_of])  # back to the original column order
    return QuantizedWeight(codes, scales, zero_points, fmt.name, granularity, scale_format, tensor_scale)


# ---------------------------------------------------------------- whole model ----------

class _StopForward(Exception):
    """Raised by the hook that captures the first block's inputs: nothing after it runs."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList holding the most parameters
    (``model.model.layers`` for Llama-style models)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise FpbenchError("GPTQ here handles decoder-only models; use --algo rtn for encoder-decoder models")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise FpbenchError(f"{type(model).__name__}: no list of transformer blocks found; use --algo rtn")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


@torch.no_grad()
def _first_block_inputs(model: nn.Module, blocks: nn.ModuleList, calibration_ids: torch.Tensor):
    """Hidden states entering block 0 for every window, and the keyword arguments the
    model passes to its blocks (rotary embeddings, causal mask...). Those are the same
    for every window because all windows have one length and no padding."""
    hidden, block_kwargs = [], {}

    def grab(module, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        block_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in calibration_ids:
            try:
                model(input_ids=window[None], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(hidden), block_kwargs


def _run_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
    out = block(hidden, **block_kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _block_hessians(block: nn.Module, layers: dict[str, nn.Linear], inputs: torch.Tensor,
                    block_kwargs: dict) -> dict[str, torch.Tensor]:
    """H = 2XXᵀ / tokens for every layer in the block, X = the layer's inputs over all
    calibration windows (averaging keeps H's scale independent of the sample count)."""
    sums = {name: None for name in layers}
    tokens = dict.fromkeys(layers, 0)
    # q/k/v (and gate/up) read the very same tensor: compute its XXᵀ once.
    last = {"input": None, "xxt": None}

    def hook(name):
        def accumulate(module, args, output):
            x = args[0]
            if x is not last["input"]:
                flat = x.reshape(-1, x.shape[-1]).float()
                last["input"], last["xxt"] = x, flat.T @ flat
            sums[name] = last["xxt"].clone() if sums[name] is None else sums[name].add_(last["xxt"])
            tokens[name] += x.numel() // x.shape[-1]
        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        for index in range(inputs.shape[0]):
            _run_block(block, inputs[index:index + 1], block_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    last.clear()
    return {name: 2 * sums[name] / tokens[name] for name in layers}


@torch.no_grad()
def gptq_model(model: nn.Module, layers: dict[str, nn.Linear], scheme: Scheme,
               calibration_ids: torch.Tensor, damp: float = DEFAULT_DAMP,
               block_size: int = DEFAULT_BLOCK_SIZE, act_order: bool = False,
               static_groups: bool = False, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize ``layers`` of ``model`` in place, block after block (the published
    sequential procedure); returns each layer's codes and scales."""
    blocks = decoder_blocks(model)
    owner = {module: name for name, module in layers.items()}
    inputs, block_kwargs = _first_block_inputs(model, blocks, calibration_ids)
    outputs = torch.empty_like(inputs)
    weights: dict[str, QuantizedWeight] = {}
    for block in tqdm(blocks, desc=f"GPTQ {scheme.name}", disable=not progress, leave=False):
        in_block = {owner[m]: m for m in block.modules() if m in owner}
        hessians = _block_hessians(block, in_block, inputs, block_kwargs)
        for name, module in in_block.items():
            qweight = gptq_quantize_weight(module.weight.data, hessians.pop(name), scheme.format,
                                           scheme.granularity, scheme.clip, damp, block_size,
                                           act_order, static_groups, layer_name=name,
                                           scale_format=scheme.scale_format)
            set_weight(module, qweight.dequantize())
            weights[name] = qweight
        # The next block's inputs come from this block with its weights quantized.
        for index in range(inputs.shape[0]):
            outputs[index:index + 1] = _run_block(block, inputs[index:index + 1], block_kwargs)
        inputs, outputs = outputs, inputs
    outside = [name for name in layers if name not in weights]
    if outside:
        log.warning("GPTQ: %s lie outside the transformer blocks; quantized with RTN", ", ".join(outside))
        for name in outside:
            module = layers[name]
            qweight = quantize_weight(module.weight.data, scheme.format, scheme.granularity, scheme.clip,
                                      scheme.scale_format)
            set_weight(module, qweight.dequantize())
            weights[name] = qweight
    return weights


@dataclass(frozen=True)
class GptqOptions:
    """GPTQ's settings (``fpbench.options`` exposes each as a flag and a sweep key)."""

    calib_samples: int = DEFAULT_CALIB_SAMPLES  # random calibration windows
    calib_seqlen: int = DEFAULT_CALIB_SEQLEN  # tokens per window (lowered to the model's limit)
    damp: float = DEFAULT_DAMP
    gptq_block: int = DEFAULT_BLOCK_SIZE
    act_order: bool = False
    static_groups: bool = False


def quantize_model_gptq(model: nn.Module, layers: dict[str, nn.Linear], scheme: Scheme,
                        options: GptqOptions = GptqOptions(), progress: bool = True,
                        loaded=None, calibration: CalibrationSource | None = None,
                        calibration_ids: torch.Tensor | None = None) -> dict[str, QuantizedWeight]:
    """Entry point for ``quant.model.quantize_model``: calibration windows drawn from
    ``calibration`` (default: the scheme's source) unless ``calibration_ids`` are given."""
    if calibration_ids is None:
        if loaded is None:
            raise FpbenchError("GPTQ needs calibration data: pass loaded= (with a tokenizer) or calibration_ids=")
        calibration = calibration or CalibrationSource(scheme.calib_source)
        calibration_ids = calibration.windows(loaded.tokenizer, options.calib_samples, options.calib_seqlen,
                                              loaded.max_length)
    damp = options.damp
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise FpbenchError(f"--damp must be a non-negative number (got {damp!r}); default {DEFAULT_DAMP}")
    return gptq_model(model, layers, scheme, calibration_ids, damp=damp, block_size=options.gptq_block,
                      act_order=options.act_order, static_groups=options.static_groups, progress=progress)

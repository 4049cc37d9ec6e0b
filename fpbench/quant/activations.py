"""Activation fake-quantization: the input of every quantized linear layer (W8A8).

One ``ActQuantizer`` per layer, registered as a forward pre-hook, rounds the layer's
input onto the activation format before the matmul, so ``linear(Q(x), Q(W))`` is what a
W8A8 kernel computes (in exact arithmetic). Three granularities (the first and last as
in van Baalen et al., arXiv 2303.17951, section 4):

- ``token-dynamic``: one scale per token (row of the flattened input), its absmax mapped
  onto the format's largest value, computed on the fly for every forward pass.
- ``block-dynamic`` (block formats only, and theirs): one scale per block of the
  format's size along each token's features (MX: 32, E8M0; NVFP4: 16, E4M3), by the
  format's own rule, on the fly; NVFP4's per-tensor fp32 scale is the absmax of the
  whole input, also on the fly (a deployment would calibrate it; dynamic is its upper
  bound on accuracy).
- ``tensor-static``: one scale for the whole tensor, fixed after calibration on sample
  text. ``clip="none"`` takes the calibration absmax; ``clip="mse"`` picks, among
  ``ACT_CLIP_RATIOS`` times that absmax, the clip with the smallest squared error summed
  over the calibration data (computed exactly with ``qerror``: one sort per batch, no
  re-rounding per candidate). After ``calibrate`` returns, inference never changes a
  scale; an input beyond the calibrated range saturates, as on hardware.

Activation scales of the integer and minifloat formats stay fp32 (``ACT_SCALE_FORMAT``:
a W8A8 kernel computes them on the fly in fp32); block formats use their own.

Calibration observes the inputs of the model whose *weights* are already quantized, with
activation quantization switched off (every layer sees full-precision inputs), so one
pass fixes every layer's range; the MSE choice needs a second pass because its candidate
clips are fractions of the final absmax.

``attach_act_quantizers`` returns an ``ActQuantizers`` mapping (layer name -> quantizer)
whose ``remove()`` takes every hook off again.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fpbench.errors import FpbenchError
from fpbench.quant.formats import BaselineFormat, IntFormat, NumberFormat, get_format
from fpbench.quant.weights import compute_scales, effective_scales, expand_to_weight, fake_quantize, tensor_scale_of
from fpbench.quant.scheme import BLOCK_ACT_GRANULARITY, Granularity, check_act_granularity, check_block_granularity

# Candidate static clips for clip="mse": absmax * 2^(-k/4), k = 0..24 (1 down to 1/64).
# Wider than the weights' CLIP_RATIOS because a per-tensor activation range is set by a
# few outlier channels, and the best INT8 clip can sit far below them.
ACT_CLIP_RATIOS = tuple(2.0 ** (-k / 4) for k in range(25))
DEFAULT_ACT_CALIB_SAMPLES = 8  # windows of calibration text for static scales
PER_TOKEN = Granularity("channel")  # one scale per row of the [tokens, features] view
ACT_SCALE_FORMAT = "fp32"


class ActQuantizer:
    """Fake-quantizes one linear layer's input (a forward pre-hook)."""

    def __init__(self, fmt: NumberFormat | str, granularity: str, clip: str = "none"):
        self.format = get_format(fmt) if isinstance(fmt, str) else fmt
        if isinstance(self.format, BaselineFormat):
            raise FpbenchError(f"activation format {self.format.name} is a baseline; use int8, fp8_e4m3, ...")
        self.granularity = check_act_granularity(self.format, granularity)
        self.clip = clip
        self.scale: torch.Tensor | None = None  # static: one scale, set by calibration
        self.zero_point: torch.Tensor | None = None
        self.mode = "quantize"  # "absmax" / "mse": observe (calibration); "off": pass through
        self.enabled = True
        self.lo = self.hi = None  # observed range during calibration
        self.clip_errors: np.ndarray | None = None
        self.handle = None

    @property
    def is_static(self) -> bool:
        return self.granularity == "tensor-static"

    def __call__(self, module, args):
        x = args[0]
        if self.mode == "absmax":
            self._observe_range(x)
            return None
        if self.mode == "mse":
            self._observe_clip_errors(x)
            return None
        if self.mode == "off" or not self.enabled:
            return None
        return (self.quantize(x), *args[1:])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == BLOCK_ACT_GRANULARITY:
            rows = x.reshape(-1, x.shape[-1]).float()
            blocks = check_block_granularity(self.format, None)
            tensor_scale = tensor_scale_of(rows, self.format)
            scales, _ = compute_scales(rows, self.format, blocks, tensor_scale=tensor_scale)
            scale = expand_to_weight(effective_scales(scales, tensor_scale), blocks, tuple(rows.shape))
            return fake_quantize(rows, self.format, scale).reshape(x.shape).to(x.dtype)
        if not self.is_static:
            rows = x.reshape(-1, x.shape[-1]).float()
            scale, zero_point = compute_scales(rows, self.format, PER_TOKEN, scale_format=ACT_SCALE_FORMAT)
            return fake_quantize(rows, self.format, scale, zero_point).reshape(x.shape).to(x.dtype)
        if self.scale is None:
            raise FpbenchError("static activation scales are not calibrated; call calibrate() "
                               "(or quantize_model with a tensor-static scheme) first")
        return fake_quantize(x.float(), self.format, self.scale, self.zero_point).to(x.dtype)

    # -- calibration -------------------------------------------------------------------
    def _observe_range(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().float().min(), x.detach().float().max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _candidate_clips(self) -> np.ndarray:
        absmax = float(torch.maximum(self.lo.abs(), self.hi.abs()))
        return absmax * np.asarray(ACT_CLIP_RATIOS)

    def _observe_clip_errors(self, x: torch.Tensor) -> None:
        from fpbench.quant.qerror import Sample, mse, positive_grid

        grid = positive_grid(self.format)
        sample = Sample(x.detach())
        errors = mse(sample, grid, self._candidate_clips() / grid[-1]) * sample.count
        self.clip_errors = errors if self.clip_errors is None else self.clip_errors + errors

    def finish_calibration(self) -> None:
        """Fix the static scale from what was observed; inference never changes it."""
        if self.lo is None:
            raise FpbenchError("no calibration data reached this layer; check the calibration windows")
        lo, hi = self.lo, self.hi
        if self.clip == "mse":
            ratio = ACT_CLIP_RATIOS[int(np.argmin(self.clip_errors))]
            lo, hi = lo * ratio, hi * ratio
        # compute_scales on the two-element tensor [lo, hi] gives the scale (and zero
        # point) that maps exactly that range onto the grid: the same rule as weights.
        scale, zero_point = compute_scales(torch.stack([lo, hi]).reshape(1, 2), self.format,
                                           Granularity("tensor"), scale_format=ACT_SCALE_FORMAT)
        self.scale = scale.reshape(()).clone()
        self.zero_point = None if zero_point is None else zero_point.reshape(()).clone()
        self.mode = "quantize"


class ActQuantizers(dict):
    """Layer name -> ActQuantizer, with the hooks that apply them."""

    def remove(self) -> None:
        for quantizer in self.values():
            if quantizer.handle is not None:
                quantizer.handle.remove()
                quantizer.handle = None
        self.clear()


def attach_act_quantizers(layers: dict[str, nn.Module], fmt: NumberFormat | str, granularity: str,
                          clip: str = "none") -> ActQuantizers:
    """Register one input quantizer on each layer; static ones still need ``calibrate``."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if clip == "mse" and granularity != "tensor-static":
        raise FpbenchError("activation MSE clipping applies to tensor-static scales only; "
                           "drop -mse or use tensor-static")
    if clip == "mse" and isinstance(fmt, IntFormat) and not fmt.symmetric:
        raise FpbenchError(f"activation MSE clipping needs a symmetric format, not {fmt.name}; "
                           "use int8 or an fp8 format")
    quantizers = ActQuantizers()
    for name, module in layers.items():
        quantizer = ActQuantizer(fmt, granularity, clip)
        quantizer.handle = module.register_forward_pre_hook(quantizer)
        quantizers[name] = quantizer
    return quantizers


@torch.no_grad()
def calibrate(model: nn.Module, quantizers: ActQuantizers, windows: torch.Tensor,
              progress: bool = True) -> None:
    """Fix every static quantizer's scale from the calibration token windows [n, seqlen]."""
    static = [q for q in quantizers.values() if q.is_static]
    if not static:
        return
    passes = ["absmax"] + (["mse"] if any(q.clip == "mse" for q in static) else [])
    for stage in passes:
        for quantizer in static:
            quantizer.mode = stage if (stage == "absmax" or quantizer.clip == "mse") else "off"
        for window in tqdm(windows, desc=f"calibrate activations ({stage})", disable=not progress,
                           leave=False):
            ids = window.unsqueeze(0)
            # An encoder-decoder model's decoder linears see the same text as the encoder's.
            extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
            model(input_ids=ids, **extra)
    for quantizer in static:
        quantizer.finish_calibration()

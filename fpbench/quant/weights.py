"""Tensor-level quantization primitives (no modules, no models).

``compute_scales`` chooses one scale (and, for asymmetric integers, one zero point) per
tensor, output channel or group; ``fake_quantize`` rounds values onto the format grid
under given scales; ``quantize_weight`` does both for RTN and keeps the integer codes so
a packer/kernel can use them.

Scales map a group's absolute maximum onto the format's largest value
(``scale = absmax / fmt.max``); with ``clip="mse"`` the absmax is shrunk by the ratio in
``CLIP_RATIOS`` that minimises each group's squared error. Asymmetric integers map
[min, max] onto [0, 2^b - 1] with a full-precision zero point (``x = (code - zp) * scale``,
as torchao's float-domain zero point and llama.cpp's Q4_1 "min").

Groups whose size does not divide the row (e.g. G = 128 on a 576-wide layer) are ragged:
the last group of each row holds the remaining ``K mod G`` weights and has its own scale.
This is the same as padding the row with copies of its last weight, which changes no
absmax/min/max; the padding is never stored.

Scales are numbers too: every scheme stores its scales (and asymmetric zero points) in a
scale format, and the simulation rounds them to it (RNE, saturating) before any weight is
rounded, so what is simulated is what a packed kernel would hold. The default is fp16
(``DEFAULT_SCALE_FORMAT``, as GPTQ/AWQ checkpoints store them); fp32, bf16, e8m0, fp8_e4m3
or any float format of the registry can be chosen. A scale that rounds to 0 (a group whose
absmax is below the scale format's smallest value times the element max) flushes its group
to 0 instead of dividing by zero: codes 0, dequantized 0, never NaN. An all-zero group keeps
scale 1. Block formats (MX, NVFP4) choose their scales by their own rule
(``BlockFormat.block_scales``) in their own scale format, with blocks as groups; NVFP4's
fp32 per-tensor scale is kept in ``QuantizedWeight.tensor_scale`` because its product
with the E4M3 block scales is not exact in either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fpbench.errors import FpbenchError
from fpbench.quant.formats import BaselineFormat, BlockFormat, IntFormat, NumberFormat, get_format
from fpbench.quant.scheme import DEFAULT_SCALE_FORMAT, Granularity, check_block_granularity, default_scale_format, scale_format_of

# Candidate clipping ratios for clip="mse": 1.0 down to 0.5 in steps of 0.025.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))
TENSOR_SCALE_BITS = 32  # NVFP4's per-tensor scale is one fp32 number


@dataclass
class QuantizedWeight:
    """Codes [N, K] (original column order) plus scales (and zero points) [N, n_groups]
    of one weight matrix. Scales are fp32 tensors holding values of ``scale_format``
    exactly; ``tensor_scale`` (NVFP4 only, else None) is the fp32 per-tensor scale that
    multiplies them: a weight is ``decode(code) * fp32(scale * tensor_scale)``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    format: str
    granularity: Granularity
    scale_format: str = DEFAULT_SCALE_FORMAT
    tensor_scale: torch.Tensor | None = None

    @property
    def effective_scales(self) -> torch.Tensor:
        return effective_scales(self.scales, self.tensor_scale)

    def dequantize(self) -> torch.Tensor:
        fmt = get_format(self.format)
        values = fmt.decode(self.codes)
        shape = tuple(self.codes.shape)
        if self.zero_points is not None:
            values = values - expand_to_weight(self.zero_points, self.granularity, shape)
        return values * expand_to_weight(self.effective_scales, self.granularity, shape)


def effective_scales(scales: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """The scale a value is divided by: the block scale, times the tensor scale if any."""
    return scales if tensor_scale is None else scales * tensor_scale


def group_count(in_features: int, granularity: Granularity) -> int:
    if granularity.kind == "group":
        return math.ceil(in_features / granularity.group_size)
    return 1


def _grouped(w: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View a [N, K] weight as [rows, groups, group_len] for per-group statistics."""
    n, k = w.shape
    if granularity.kind == "tensor":
        return w.reshape(1, 1, n * k)
    if granularity.kind == "channel":
        return w.reshape(n, 1, k)
    size = granularity.group_size
    groups = math.ceil(k / size)
    pad = groups * size - k
    if pad:  # ragged last group: pad with copies of the last weight (changes no statistic)
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, groups, size)


def expand_to_weight(per_group: torch.Tensor, granularity: Granularity, shape) -> torch.Tensor:
    """Broadcast [N, n_groups] (or [1, 1]) scales to a full [N, K] weight."""
    n, k = shape
    if granularity.kind == "group":
        return per_group.repeat_interleave(granularity.group_size, dim=1)[:, :k]
    return per_group.expand(n, k)


def _scales_for_range(fmt: NumberFormat, lo: torch.Tensor, hi: torch.Tensor, scale_fmt: NumberFormat):
    """Scale (and zero point) mapping [lo, hi] onto the format's grid, both rounded to
    the scale format (a zero point after the scale it depends on)."""
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
        scale = scale_fmt.round(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero_point = fmt.qmin - lo / torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, scale_fmt.round(zero_point)
    absmax = torch.maximum(lo.abs(), hi.abs())
    scale = absmax / fmt.max
    return scale_fmt.round(torch.where(scale > 0, scale, torch.ones_like(scale))), None


def grid_values(x: torch.Tensor, fmt: NumberFormat, scale: torch.Tensor,
                zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """The grid value (``decode(code)``) each x rounds to under ``scale`` (and zero point).
    Where a scale is 0 (it underflowed in its scale format) the value is 0, not NaN."""
    zero_scale = scale == 0
    scaled = torch.where(zero_scale, 0.0, x / torch.where(zero_scale, torch.ones_like(scale), scale))
    if zero_point is not None:
        scaled = scaled + zero_point  # a zero-scale group lands on round(zero point): value 0
    return fmt.round(scaled)


def fake_quantize(x: torch.Tensor, fmt: NumberFormat, scale: torch.Tensor,
                  zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Round x onto ``scale * (grid - zero_point)``; scale broadcasts against x."""
    if isinstance(fmt, BaselineFormat):
        return fmt.round(x)
    values = grid_values(x, fmt, scale, zero_point)
    if zero_point is None:
        return values * scale
    return (values - zero_point) * scale


def compute_scales(w: torch.Tensor, fmt: NumberFormat, granularity: Granularity,
                   clip: str = "none", scale_format: str | None = None,
                   tensor_scale: torch.Tensor | None = None):
    """Per-group scales [N, n_groups] ([1, 1] per tensor), in the scale format (the
    format's default when None), and zero points (or None). A block format's scales
    follow its own rule, relative to ``tensor_scale`` (NVFP4: ``tensor_scale_of(w)`` of
    the whole weight)."""
    grouped = _grouped(w.float(), granularity)
    if isinstance(fmt, BlockFormat):
        if clip != "none":
            raise FpbenchError(f"{fmt.name} picks its block scales by its own rule; drop --clip {clip}")
        return fmt.block_scales(grouped.abs().amax(dim=2), tensor_scale), None
    scale_fmt = get_format(scale_format or default_scale_format(fmt))
    asymmetric = isinstance(fmt, IntFormat) and not fmt.symmetric
    if asymmetric:
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    else:
        hi = grouped.abs().amax(dim=2)
        lo = -hi
    scale, zero_point = _scales_for_range(fmt, lo, hi, scale_fmt)
    if clip == "mse":
        best_err = torch.full_like(scale, math.inf)
        best_scale, best_zero = scale.clone(), None if zero_point is None else zero_point.clone()
        for ratio in CLIP_RATIOS:
            s, z = _scales_for_range(fmt, lo * ratio, hi * ratio, scale_fmt)
            err = (fake_quantize(grouped, fmt, s[..., None], None if z is None else z[..., None])
                   - grouped).pow(2)
            if granularity.kind == "group" and w.shape[1] % granularity.group_size:
                err[:, -1, w.shape[1] % granularity.group_size:] = 0  # ignore the padding
            err = err.sum(dim=2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            if z is not None:
                best_zero = torch.where(better, z, best_zero)
        scale, zero_point = best_scale, best_zero
    return scale, zero_point


def tensor_scale_of(w: torch.Tensor, fmt: NumberFormat) -> torch.Tensor | None:
    """NVFP4's per-tensor scale from the whole tensor's absmax; None for other formats."""
    if isinstance(fmt, BlockFormat) and fmt.has_tensor_scale:
        return fmt.tensor_scale_for(w.detach().float().abs().amax())
    return None


def _rtn(w: torch.Tensor, fmt: NumberFormat | str, granularity: Granularity | None, clip: str,
         scale_format: str | None):
    """RTN's scales and grid values, shared by ``quantize_weight`` and ``fake_quantize_weight``."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    granularity = check_block_granularity(fmt, granularity)
    scale_format = scale_format_of(fmt, scale_format)
    tensor_scale = tensor_scale_of(w, fmt)
    scales, zero_points = compute_scales(w, fmt, granularity, clip, scale_format, tensor_scale)
    shape = tuple(w.shape)
    scale = expand_to_weight(effective_scales(scales, tensor_scale), granularity, shape)
    zero = None if zero_points is None else expand_to_weight(zero_points, granularity, shape)
    values = grid_values(w.float(), fmt, scale, zero)
    weight = QuantizedWeight(None, scales, zero_points, fmt.name, granularity, scale_format, tensor_scale)
    return fmt, weight, values, scale, zero


def quantize_weight(w: torch.Tensor, fmt: NumberFormat | str, granularity: Granularity | None,
                    clip: str = "none", scale_format: str | None = None) -> QuantizedWeight:
    """RTN: scales from the weight itself, then round every element to nearest.
    A block format's granularity is its block (``None`` means that too)."""
    fmt, weight, values, _, _ = _rtn(w, fmt, granularity, clip, scale_format)
    weight.codes = fmt.encode(values)
    return weight


def fake_quantize_weight(w: torch.Tensor, fmt: NumberFormat | str, granularity: Granularity | None,
                         clip: str = "none", scale_format: str | None = None) -> torch.Tensor:
    """``quantize_weight(...).dequantize()``, bit for bit, without building the codes."""
    _, _, values, scale, zero = _rtn(w, fmt, granularity, clip, scale_format)
    return values * scale if zero is None else (values - zero) * scale


def bits_per_weight(fmt: NumberFormat, granularity: Granularity | None, shape,
                    scale_format: str | None = None) -> float:
    """Storage bits per weight: codes, scales and zero points at the scale format's
    width (the format's default when None), NVFP4's fp32 tensor scale once."""
    granularity = None if isinstance(fmt, BaselineFormat) else check_block_granularity(fmt, granularity)
    if granularity is None:
        return float(fmt.bits)
    n, k = shape
    groups = 1 if granularity.kind == "tensor" else n * group_count(k, granularity)
    scale_bits = get_format(scale_format_of(fmt, scale_format)).bits
    per_group = scale_bits * (2 if isinstance(fmt, IntFormat) and not fmt.symmetric else 1)
    tensor_bits = TENSOR_SCALE_BITS if isinstance(fmt, BlockFormat) and fmt.has_tensor_scale else 0
    return fmt.bits + (groups * per_group + tensor_bits) / (n * k)

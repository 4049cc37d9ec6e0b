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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fpbench.quant.formats import BaselineFormat, IntFormat, NumberFormat, get_format
from fpbench.quant.scheme import Granularity

# Candidate clipping ratios for clip="mse": 1.0 down to 0.5 in steps of 0.025.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))
SCALE_BITS = 16  # scales and zero points are counted as fp16 in bits-per-weight


@dataclass
class QuantizedWeight:
    """Codes [N, K] plus scales (and zero points) [N, n_groups] of one weight matrix."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    format: str
    granularity: Granularity

    def dequantize(self) -> torch.Tensor:
        fmt = get_format(self.format)
        values = fmt.decode(self.codes)
        shape = tuple(self.codes.shape)
        if self.zero_points is not None:
            values = values - expand_to_weight(self.zero_points, self.granularity, shape)
        return values * expand_to_weight(self.scales, self.granularity, shape)


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


def _scales_for_range(fmt: NumberFormat, lo: torch.Tensor, hi: torch.Tensor):
    """Scale (and zero point) mapping [lo, hi] onto the format's grid."""
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, fmt.qmin - lo / scale
    absmax = torch.maximum(lo.abs(), hi.abs())
    scale = absmax / fmt.max
    return torch.where(scale > 0, scale, torch.ones_like(scale)), None


def fake_quantize(x: torch.Tensor, fmt: NumberFormat, scale: torch.Tensor,
                  zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Round x onto ``scale * (grid - zero_point)``; scale broadcasts against x."""
    if isinstance(fmt, BaselineFormat):
        return fmt.round(x)
    if zero_point is None:
        return fmt.round(x / scale) * scale
    return (fmt.round(x / scale + zero_point) - zero_point) * scale


def compute_scales(w: torch.Tensor, fmt: NumberFormat, granularity: Granularity,
                   clip: str = "none"):
    """Per-group scales [N, n_groups] ([1, 1] per tensor) and zero points (or None)."""
    grouped = _grouped(w.float(), granularity)
    asymmetric = isinstance(fmt, IntFormat) and not fmt.symmetric
    if asymmetric:
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    else:
        hi = grouped.abs().amax(dim=2)
        lo = -hi
    scale, zero_point = _scales_for_range(fmt, lo, hi)
    if clip == "mse":
        best_err = torch.full_like(scale, math.inf)
        best_scale, best_zero = scale.clone(), None if zero_point is None else zero_point.clone()
        for ratio in CLIP_RATIOS:
            s, z = _scales_for_range(fmt, lo * ratio, hi * ratio)
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


def quantize_weight(w: torch.Tensor, fmt: NumberFormat | str, granularity: Granularity,
                    clip: str = "none") -> QuantizedWeight:
    """RTN: scales from the weight itself, then round every element to nearest."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    scales, zero_points = compute_scales(w, fmt, granularity, clip)
    shape = tuple(w.shape)
    scaled = w.float() / expand_to_weight(scales, granularity, shape)
    if zero_points is not None:
        scaled = scaled + expand_to_weight(zero_points, granularity, shape)
    return QuantizedWeight(fmt.encode(scaled), scales, zero_points, fmt.name, granularity)


def bits_per_weight(fmt: NumberFormat, granularity: Granularity | None, shape) -> float:
    """Storage bits per weight, counting scales and zero points (at SCALE_BITS each)."""
    if granularity is None:
        return float(fmt.bits)
    n, k = shape
    groups = 1 if granularity.kind == "tensor" else n * group_count(k, granularity)
    per_group = SCALE_BITS * (2 if isinstance(fmt, IntFormat) and not fmt.symmetric else 1)
    return fmt.bits + groups * per_group / (n * k)

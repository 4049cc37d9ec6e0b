"""The linear layer that runs on the compiled kernels, and the model surgery that installs it.

``LutLinear`` serves every weight-only scheme whose codes have at most 8 bits (see
``KERNEL_FORMATS``): the packed codes (``packing``), the format's value table, one scale
per output channel or per group of G input weights, and for asymmetric integers one
zero point per scale. Scales and zero points are stored in their scale format's width
(fp16 by default, E8M0 codes for MX, E4M3 codes and the tensor scale for NVFP4:
``packing.stored_scales``), so ``packed_bytes`` is what the scheme's bits per weight
count. The weight it multiplies by is ``(table[code] - zero_point) * scale`` computed in
fp32, bit-identical to ``QuantizedWeight.dequantize()``; outputs equal a float64 product
with those weights up to fp32 summation order. bfloat16 (or fp16) inputs are widened to fp32 (exact) and the
result is rounded once to the input dtype, after the bias; on a CPU with AVX-512 BF16 (ISA
``avx512bf16``), bf16 inputs take the bf16 dot-product kernels instead (exact products of x
with the unscaled values, the scale applied to each group's fp32 sum): the GEMV below
``bf16_gemm_min_rows()`` rows (``cpp/lut_bf16_gemv.h``; groups of 16, 32 or a multiple of 32
weights, of 64 for 8-bit codes; with zero points per channel or a multiple of 32 / 64, each
row's zero-point term taken off its sum), the GEMM from there (``cpp/lut_bf16.h``; with zero
points each group's sum S of x * value becomes (S - zero * sum of x) * scale).

Supported shapes: K (in_features) a multiple of 64; G a multiple of 16 (16 covers the
NVFP4-style blocks, 32 the MX blocks: any scale passed as fp32 values works unchanged),
with a ragged last group when G does not divide K, as the quantizer makes it.
"""

from __future__ import annotations

import torch
from torch import nn

from fpbench.errors import FpbenchError
from fpbench.kernels import build as kernels
from fpbench.kernels.packing import (UNIT, aligned, code_bits, code_indices, decode_params, pack_codes, stored_scales,
                                     value_table)
from fpbench.quant.formats import BlockFormat, FloatFormat, IntFormat, get_format
from fpbench.quant.scheme import Granularity
from fpbench.quant.weights import QuantizedWeight

GROUP_MULTIPLE = 16  # G must be a multiple of this
INT_BITS = (4, 8)
FLOAT_BITS = (4, 6, 8)
KERNEL_FORMATS = "fpN_eXmY with N in 4, 6, 8 (fp4_e2m1, fp6_e2m3, fp6_e3m2, fp8_e4m3, fp8_e5m2, fp8_e3m4), " \
                 "int4, int4_asym, int8, int8_asym, and the block formats with float elements " \
                 "(mxfp4_e2m1, mxfp6_*, mxfp8_*, nvfp4) at their own block"
KERNEL_GRANULARITIES = f"channel or group:G with G a multiple of {GROUP_MULTIPLE}"


def kernel_support_error(format_name: str, granularity, act_format: str | None = None) -> str | None:
    """Why ``--backend kernel`` cannot run this weight format x granularity, or None."""
    fmt = get_format(format_name)
    if isinstance(fmt, BlockFormat):
        # A block format runs as its element format with one (effective) scale per block.
        if act_format or not isinstance(fmt.element, FloatFormat):
            problem = "quantized activations" if act_format else f"format {fmt.name} (integer elements)"
        elif granularity != Granularity("group", fmt.block_size):
            problem = f"granularity {granularity} for {fmt.name}"
        else:
            return kernel_support_error(fmt.element_name, granularity)
    elif act_format:
        problem = "quantized activations"
    elif isinstance(fmt, FloatFormat) and fmt.bits not in FLOAT_BITS:
        problem = f"format {fmt.name}"
    elif isinstance(fmt, IntFormat) and fmt.bits not in INT_BITS:
        problem = f"format {fmt.name}"
    elif not isinstance(fmt, (FloatFormat, IntFormat)):
        problem = f"baseline {fmt.name}"
    elif granularity is None or granularity.kind == "tensor":
        problem = f"granularity {granularity}"
    elif granularity.kind == "group" and granularity.group_size % GROUP_MULTIPLE:
        problem = f"group size {granularity.group_size}"
    else:
        return None
    return (f"--backend kernel cannot run {problem}; it runs weight-only {KERNEL_FORMATS} at "
            f"{KERNEL_GRANULARITIES}; use --backend simulate")


def element_view(qweight: QuantizedWeight) -> QuantizedWeight:
    """A block-format weight as the kernels hold it: element codes, and per block the
    scale ``fp32(block scale x tensor scale)`` that ``QuantizedWeight.dequantize`` applies
    (so the product per weight is the same fp32 operation, bit for bit)."""
    fmt = get_format(qweight.format)
    if not isinstance(fmt, BlockFormat):
        return qweight
    if fmt.element_scale != 1.0:
        raise FpbenchError(f"the kernels run block formats with float elements, not {fmt.name}")
    return QuantizedWeight(qweight.codes, qweight.effective_scales, None, fmt.element_name, qweight.granularity,
                           "fp32")


class LutLinear(nn.Module):
    """Packed codes of any supported format, decoded through the format's value table."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, isa: str | None = None):
        super().__init__()
        stored_as = qweight  # scales as the scheme stores them (block formats: block scales)
        qweight = element_view(qweight)
        if problem := kernel_support_error(qweight.format, qweight.granularity):
            raise FpbenchError(problem)
        self.out_features, self.in_features = qweight.codes.shape
        if self.in_features % UNIT:
            raise FpbenchError(f"the kernels need in_features divisible by {UNIT}, got {self.in_features}; "
                               "use --backend simulate for this model")
        self.format = qweight.format
        self.bits = code_bits(qweight.format)
        self.group_size = (qweight.granularity.group_size if qweight.granularity.kind == "group"
                           else self.in_features)
        self.isa = kernels.isa(isa)
        self.decode = decode_params(qweight.format)
        plane_a, plane_b = pack_codes(code_indices(qweight.codes, qweight.format), self.bits)
        self.register_buffer("plane_a", plane_a)
        self.register_buffer("plane_b", aligned(torch.empty(0, dtype=torch.uint8)) if plane_b is None else plane_b)
        self.register_buffer("table", value_table(qweight.format))
        scales, scale_table = stored_scales(stored_as.scales.reshape(self.out_features, -1), stored_as.scale_format,
                                            stored_as.tensor_scale)
        self.register_buffer("scales", aligned(scales))
        self.register_buffer("scale_table", scale_table)
        self.register_buffer("tensor_scale", torch.empty(0) if stored_as.tensor_scale is None
                             else stored_as.tensor_scale.float().reshape(1))  # counted, folded into scale_table
        zero_points, zero_table = (torch.empty(0), torch.empty(0)) if stored_as.zero_points is None else \
            stored_scales(stored_as.zero_points.reshape(self.out_features, -1), stored_as.scale_format)
        self.register_buffer("zero_points", aligned(zero_points))
        self.register_buffer("zero_table", zero_table)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._native = None

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                       isa: str | None = None) -> LutLinear:
        return cls(qweight, bias, isa)

    @classmethod
    def stacked(cls, layers: list[LutLinear]) -> LutLinear:
        """One layer whose output rows are ``layers``' rows in order (q, k, v of an
        attention; gate and up of an MLP): one kernel call instead of several. Each output
        row is the same dot product in the same order as in its own layer, so the
        outputs equal the separate calls' bit for bit."""
        first = layers[0]
        same = ("in_features", "format", "bits", "group_size", "isa", "decode")
        if any(getattr(layer, key) != getattr(first, key) for layer in layers for key in same):
            raise FpbenchError("only layers with the same input width, format, group size and ISA stack")
        if len({layer.bias is None for layer in layers}) > 1:
            raise FpbenchError("layers stack only when all or none of them have a bias")
        for name in ("scales", "zero_points"):
            if len({layer._buffers[name].dtype for layer in layers}) > 1:
                raise FpbenchError("only layers whose scales are stored alike stack")
        for name in ("scale_table", "zero_table"):  # NVFP4: a table per tensor scale
            if any(not torch.equal(layer._buffers[name], first._buffers[name]) for layer in layers):
                raise FpbenchError("only layers with the same scale table (NVFP4: tensor scale) stack")
        stacked = cls.__new__(cls)
        nn.Module.__init__(stacked)
        for key in same:
            setattr(stacked, key, getattr(first, key))
        stacked.out_features = sum(layer.out_features for layer in layers)
        for name in ("plane_a", "plane_b", "scales", "zero_points", "bias"):
            parts = [layer._buffers[name] for layer in layers]
            stacked.register_buffer(name, None if parts[0] is None else aligned(torch.cat(parts)))
        for name in ("table", "scale_table", "zero_table", "tensor_scale"):
            stacked.register_buffer(name, first._buffers[name])
        stacked._native = None
        return stacked

    def _args(self):
        b = self._buffers
        return (b["plane_a"], b["plane_b"], b["table"], b["scales"], b["zero_points"], self.bits,
                self.in_features, self.group_size, self.decode, self.isa, b["scale_table"], b["zero_table"])

    def native(self):
        """The compiled layer (``KernelLinear``: buffers checked and laid out once, a few
        microseconds per call instead of tens), built on first use."""
        if self._native is None:
            self._native = kernels.load().KernelLinear(*self._args(), self._buffers["bias"])
        return self._native

    def compiled_projection(self):
        """This layer for the compiled decode step (``eval/lean_decode.py``)."""
        return kernels.load().Projection(self.native())

    def _apply(self, fn, recurse=True):
        # Device moves only: ``model.to(torch.bfloat16)`` must not round the fp32 value and
        # scale tables or widen the stored scales (the bytes the scheme counts).
        for name, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        self._native = None
        return self

    def __getstate__(self):
        state = super().__getstate__()
        return state | {"_native": None}  # a compiled handle is rebuilt, not copied

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [N, K], decoded by the kernel's own code path for its ISA."""
        return self.native().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., K] -> [..., N] in x's dtype: bf16/fp16 inputs widened to fp32 (exact), the
        bias added to the fp32 product, one rounding to x's dtype. One compiled call: the
        scalar ISA from ``scalar_gemm_min_rows()`` rows dequantizes once and calls torch's
        fp32 GEMM; the SIMD ISAs run their GEMV, or their blocked GEMM from
        ``blocked_min_rows()`` rows (decoded panels reused from cache); bf16 x on
        ``avx512bf16`` takes the bf16 dot-product GEMV, or GEMM from ``bf16_gemm_min_rows()``
        rows."""
        return self.native().forward(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"group_size={self.group_size}, isa={self.isa}")


def packed_bytes(module: LutLinear) -> int:
    """Bytes a layer's weights occupy: packed codes, scales and zero points in their
    stored width, and NVFP4's tensor scale (no bias, no per-format tables)."""
    return sum(t.numel() * t.element_size() for t in (module.plane_a, module.plane_b, module.scales,
                                                       module.zero_points, module.tensor_scale))


def kernel_linear_for(qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> nn.Module:
    return LutLinear(qweight, bias)


def use_kernel_linears(model: nn.Module, weights: dict[str, QuantizedWeight]) -> int:
    """Replace each quantized linear (``QuantizedModel.weights`` names) by its kernel
    module built from the stored codes and scales; returns how many were replaced."""
    if not weights:
        raise FpbenchError(f"--backend kernel needs a quantized scheme ({KERNEL_FORMATS}), not a baseline")
    kernels.load()  # build (or fail with a clear message) before touching the model
    for name, qweight in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, kernel_linear_for(qweight, old.bias))
    return len(weights)


def check_kernel_scheme(scheme) -> None:
    """Fail before any model loads when ``--backend kernel`` cannot run ``scheme``. GPTQ
    schemes run too: their codes are stored in the original column order."""
    if scheme.is_baseline:
        raise FpbenchError(f"--backend kernel needs a quantized scheme ({KERNEL_FORMATS}), not {scheme.name}")
    if problem := kernel_support_error(scheme.format, scheme.granularity, getattr(scheme, "act_format", None)):
        raise FpbenchError(f"{scheme.name}: {problem}")

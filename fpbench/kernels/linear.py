"""Linear layers that run on the compiled kernels, and the model surgery that installs them.

``FP6Linear`` holds the "4+2" packed FP6 E3M2 codes (see ``packing``) and one fp32 scale
per output channel; ``Int4Linear`` holds symmetric INT4 codes with one fp32 scale per
128 input weights, the like-for-like comparison (ZeroQuant(4+2) compares FP6 per-channel
with INT4 fine-grained). Both return the input dtype. bfloat16 inputs (a bf16 model) go
to the kernels' bf16 path: exact bf16 weights, products summed in fp32 (vdpbf16ps where
the CPU has AVX512_BF16, else x widened to fp32), so the output equals a float64 product
of the bf16 input with the exact dequantized weights up to fp32 summation order and the
final rounding to bf16. Other dtypes compute in fp32. Their dequantized weights equal
``QuantizedWeight.dequantize()`` exactly; fp32 outputs equal the simulated path up to
fp32 summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from fpbench.kernels import build as kernels
from fpbench.errors import FpbenchError
from fpbench.kernels.packing import INT4_GROUP, aligned, pack_fp6, pack_int4
from fpbench.quant.weights import QuantizedWeight

# Batch rows (tokens) from which the kernels dequantize the weights and call torch's
# dense GEMM instead of streaming the packed weights through their own register tiles.
# fp32: the streaming kernel beat the dequantize-then-GEMM path at every batch measured
# (1..512), so never. bf16: dequantized tiles on torch's bf16 GEMM win from about 64 rows on.
GEMM_MIN_ROWS = 2**31
GEMM_MIN_ROWS_BF16 = 64


class FP6Linear(nn.Module):
    def __init__(self, packed_hi4: torch.Tensor, packed_lo2: torch.Tensor, scales: torch.Tensor,
                 in_features: int, bias: torch.Tensor | None = None, isa: str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = packed_hi4.shape[0]
        self.isa = kernels.isa(isa)
        self.register_buffer("packed_hi4", aligned(packed_hi4))
        self.register_buffer("packed_lo2", aligned(packed_lo2))
        self.register_buffer("scales", scales.reshape(-1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                       isa: str | None = None) -> FP6Linear:
        if qweight.format != "fp6_e3m2" or qweight.granularity.kind != "channel" or qweight.zero_points is not None:
            raise FpbenchError(f"FP6Linear needs fp6_e3m2 codes with per-channel scales, got "
                               f"{qweight.format}/{qweight.granularity.short}; quantize with "
                               "--format fp6_e3m2 --granularity channel")
        packed_hi4, packed_lo2 = pack_fp6(qweight.codes)
        return cls(packed_hi4, packed_lo2, qweight.scales, qweight.codes.shape[1], bias, isa)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [N, K]: scale[n] * fp6(code[n, k]), decoded by the kernel's own code path."""
        return kernels.load().fp6_dequantize(self.packed_hi4, self.packed_lo2, self.scales,
                                             self.in_features, self.isa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        module = kernels.load()
        if rows.dtype == torch.bfloat16:
            # Without a bias the kernel rounds to bf16 itself; with one, the bias is
            # added to the fp32 result first (one rounding).
            y = module.fp6_linear_bf16(rows, self.packed_hi4, self.packed_lo2, self.scales,
                                       GEMM_MIN_ROWS_BF16, self.isa, self.bias is not None)
        else:
            y = module.fp6_linear(rows.float(), self.packed_hi4, self.packed_lo2, self.scales,
                                  GEMM_MIN_ROWS, self.isa)
        return _finish(y, self.bias, x, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, isa={self.isa}"


class Int4Linear(nn.Module):
    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 isa: str | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.isa = kernels.isa(isa)
        self.register_buffer("packed", aligned(packed))
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                       isa: str | None = None) -> Int4Linear:
        granularity = qweight.granularity
        if (qweight.format != "int4" or granularity.kind != "group" or granularity.group_size != INT4_GROUP
                or qweight.zero_points is not None):
            raise FpbenchError(f"Int4Linear needs symmetric int4 codes in groups of {INT4_GROUP}, got "
                               f"{qweight.format}/{granularity.short}; quantize with --format int4 "
                               f"--granularity group:{INT4_GROUP}")
        return cls(pack_int4(qweight.codes), qweight.scales, bias, isa)

    def dequantized_weight(self) -> torch.Tensor:
        return kernels.load().int4_dequantize(self.packed, self.scales, self.isa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        module = kernels.load()
        if rows.dtype == torch.bfloat16:
            y = module.int4_linear_bf16(rows, self.packed, self.scales, GEMM_MIN_ROWS_BF16, self.isa,
                                        self.bias is not None)
        else:
            y = module.int4_linear(rows.float(), self.packed, self.scales, GEMM_MIN_ROWS, self.isa)
        return _finish(y, self.bias, x, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, isa={self.isa}"


def _finish(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, out_features: int) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


KERNEL_LINEARS = {"fp6_e3m2/channel": FP6Linear, "int4/g128": Int4Linear}


def kernel_linear_for(qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> nn.Module:
    key = f"{qweight.format}/{qweight.granularity.short}"
    if key not in KERNEL_LINEARS or qweight.zero_points is not None:
        raise FpbenchError(f"no compiled kernel for {key}; --backend kernel supports "
                           f"{', '.join(KERNEL_LINEARS)} (RTN), or use --backend simulate")
    return KERNEL_LINEARS[key].from_quantized(qweight, bias)


def use_kernel_linears(model: nn.Module, weights: dict[str, QuantizedWeight]) -> int:
    """Replace each quantized linear (``QuantizedModel.weights`` names) by its kernel
    module built from the stored codes and scales; returns how many were replaced."""
    if not weights:
        raise FpbenchError("--backend kernel needs a quantized scheme (fp6_e3m2/channel or int4/g128), "
                           "not a baseline")
    kernels.load()  # build (or fail with a clear message) before touching the model
    for name, qweight in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, kernel_linear_for(qweight, old.bias))
    return len(weights)


def check_kernel_scheme(scheme) -> None:
    """Fail before any model loads when ``--backend kernel`` cannot run ``scheme``."""
    granularity = scheme.granularity.short if scheme.granularity else None
    key = f"{scheme.format}/{granularity}"
    if key not in KERNEL_LINEARS or getattr(scheme, "act_format", None):
        raise FpbenchError(f"--backend kernel runs only {', '.join(KERNEL_LINEARS)} weight-only schemes, "
                           f"not {scheme.name}; use --backend simulate for it")

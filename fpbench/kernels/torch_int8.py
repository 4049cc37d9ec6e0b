"""torch's weight-only INT8 CPU kernel (``_weight_int8pack_mm``), called safely.

The peer fpbench measures its INT8 kernel against. On AVX-512 torch's kernel loads x
with 32-byte aligned loads and reads K in steps of 16: it faults on a row that starts
unaligned (a view into a larger buffer) and returns garbage when K is not a multiple of
16. So x is copied when unaligned, and an odd K is padded with zeros (exact: a zero code
times a zero activation adds nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K_MULTIPLE = 16


def padded_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] with zero columns up to a multiple of ``K_MULTIPLE``."""
    return F.pad(codes, (0, -codes.shape[1] % K_MULTIPLE)).contiguous()


def int8_weight_only_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ (codes [N, K'] int8 * scales [N] bf16).T -> [M, N] bf16, where K' is
    K or K padded by ``padded_codes`` (padded here when it is not yet)."""
    if codes.shape[1] % K_MULTIPLE:
        codes = padded_codes(codes)
    if x.shape[1] != codes.shape[1]:
        x = F.pad(x, (0, codes.shape[1] - x.shape[1]))  # a fresh tensor
    elif x.data_ptr() % 64 or not x.is_contiguous():
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation is 64-byte aligned
    return torch._weight_int8pack_mm(x, codes, scales)

"""The "4+2" storage of FP6 codes (ZeroQuant(4+2), Sec. 5) and the INT4 nibble storage.

An FP6 E3M2 code is ``sign<<5 | exponent<<2 | mantissa``. It is split into its high
4 bits (``code >> 2``: sign and exponent) and its low 2 bits (``code & 3``: mantissa),
stored in two separate arrays so that every vector load is aligned and no code
straddles a byte boundary:

- ``packed_hi4``: uint8 [N, Kp/2], 4 bits per weight;
- ``packed_lo2``: uint8 [N, Kp/4], 2 bits per weight;

where Kp is K rounded up to a multiple of ``FP6_BLOCK`` (256) with code 0 (= +0.0)
in the padding. Each row is a sequence of 256-weight blocks; a block is 128 bytes of
``packed_hi4`` and 64 bytes of ``packed_lo2``, every 64 bytes read as 32 little-endian
uint16 *lanes* (one 512-bit register). Bit order, for weight ``k = 256*b + 32*i + p``
of a row (block b, slice i = 0..7, position p = 0..31):

- lane ``j = 2p`` if ``p < 16`` else ``2(p - 16) + 1`` (so ``p = kmap(j)``,
  ``kmap(2t) = t``, ``kmap(2t+1) = 16 + t``);
- high 4 bits: byte offset ``128*b + 64*(i // 4) + 2*j`` (uint16 lane, little-endian),
  bits ``4*(i % 4) .. 4*(i % 4) + 3``;
- low 2 bits: byte offset ``64*b + 2*j``, bits ``2*i .. 2*i + 1``.

Why this lane order: a table lookup on uint16 lanes yields bf16 patterns; the even
lanes widened to fp32 are weights k..k+15 and the odd lanes k+16..k+31, so the kernel
multiplies them with x[k:k+16] and x[k+16:k+32] without any shuffle.

INT4 (symmetric, codes -7..7, groups of ``INT4_GROUP`` = 128) stores ``code + 8`` as a
nibble in the same lane order as ``packed_hi4``, one 64-byte register per group:
weight ``k = 128*g + 32*i + kmap(j)`` sits in bytes ``64*g + 2*j`` (uint16 lane), bits
``4*i .. 4*i + 3``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import FpbenchError

FP6_BLOCK = 256
INT4_GROUP = 128
_SLICE = 32

# LANE_TO_POS[j] = position p (0..31) inside a 32-weight slice held by uint16 lane j.
LANE_TO_POS = np.array([j // 2 if j % 2 == 0 else 16 + j // 2 for j in range(_SLICE)])


def padded_k(in_features: int) -> int:
    return math.ceil(in_features / FP6_BLOCK) * FP6_BLOCK


def _lanes_to_bytes(lanes: np.ndarray) -> torch.Tensor:
    """uint16 lanes [..., L] -> uint8 bytes [N, 2*L*...] in little-endian order."""
    n = lanes.shape[0]
    return torch.from_numpy(np.ascontiguousarray(lanes.astype("<u2")).view(np.uint8).reshape(n, -1).copy())


def _bytes_to_lanes(packed: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(packed.cpu().numpy()).view("<u2").astype(np.int64)


def pack_fp6(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP6 codes uint8 [N, K] (values 0..63) -> (packed_hi4 [N, Kp/2], packed_lo2 [N, Kp/4])."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise FpbenchError(f"pack_fp6 needs uint8 codes [N, K], got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 63:
        raise FpbenchError("pack_fp6: codes must be 6-bit (0..63); encode with get_format('fp6_e3m2').encode")
    n, k = codes.shape
    kp = padded_k(k)
    padded = np.zeros((n, kp), dtype=np.int64)
    padded[:, :k] = codes.cpu().numpy()
    blocks = kp // FP6_BLOCK
    # [N, blocks, slice i (8), lane j (32)] with lane j holding position LANE_TO_POS[j].
    by_lane = padded.reshape(n, blocks, 8, _SLICE)[..., LANE_TO_POS]
    hi = by_lane >> 2
    lo = by_lane & 3
    # Nibble i % 4 of the uint16 lane in half i // 4 of the block.
    hi = hi.reshape(n, blocks, 2, 4, _SLICE)
    hi_lanes = sum(hi[:, :, :, i, :] << (4 * i) for i in range(4))  # [N, blocks, 2, 32]
    lo_lanes = sum(lo[:, :, i, :] << (2 * i) for i in range(8))  # [N, blocks, 32]
    return _lanes_to_bytes(hi_lanes), _lanes_to_bytes(lo_lanes)


def unpack_fp6(packed_hi4: torch.Tensor, packed_lo2: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_fp6``: uint8 codes [N, in_features]."""
    n = packed_hi4.shape[0]
    kp = packed_hi4.shape[1] * 2
    if kp % FP6_BLOCK or packed_lo2.shape != (n, kp // 4) or in_features > kp:
        raise FpbenchError(f"unpack_fp6: inconsistent shapes hi4 {tuple(packed_hi4.shape)}, "
                           f"lo2 {tuple(packed_lo2.shape)} for K={in_features}")
    blocks = kp // FP6_BLOCK
    hi_lanes = _bytes_to_lanes(packed_hi4).reshape(n, blocks, 2, _SLICE)
    lo_lanes = _bytes_to_lanes(packed_lo2).reshape(n, blocks, _SLICE)
    hi = np.stack([(hi_lanes >> (4 * i)) & 15 for i in range(4)], axis=3).reshape(n, blocks, 8, _SLICE)
    lo = np.stack([(lo_lanes >> (2 * i)) & 3 for i in range(8)], axis=2)
    by_lane = (hi << 2) | lo
    codes = np.empty_like(by_lane)
    codes[..., LANE_TO_POS] = by_lane
    return torch.from_numpy(codes.reshape(n, kp)[:, :in_features].astype(np.uint8))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Symmetric INT4 codes int8 [N, K] (-8..7, K a multiple of 128) -> uint8 [N, K/2]."""
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise FpbenchError(f"pack_int4 needs int8 codes [N, K], got {codes.dtype} of shape {tuple(codes.shape)}")
    n, k = codes.shape
    if k % INT4_GROUP:
        raise FpbenchError(f"the INT4 kernel needs K divisible by {INT4_GROUP}, got K={k}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise FpbenchError("pack_int4: codes must lie in -8..7")
    nibbles = codes.cpu().numpy().astype(np.int64) + 8
    by_lane = nibbles.reshape(n, k // INT4_GROUP, 4, _SLICE)[..., LANE_TO_POS]
    lanes = sum(by_lane[:, :, i, :] << (4 * i) for i in range(4))  # [N, groups, 32]
    return _lanes_to_bytes(lanes)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 codes [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    lanes = _bytes_to_lanes(packed).reshape(n, k // INT4_GROUP, _SLICE)
    by_lane = np.stack([(lanes >> (4 * i)) & 15 for i in range(4)], axis=2)
    codes = np.empty_like(by_lane)
    codes[..., LANE_TO_POS] = by_lane
    return torch.from_numpy((codes.reshape(n, k) - 8).astype(np.int8))

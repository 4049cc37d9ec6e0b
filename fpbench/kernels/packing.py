"""The "4+2" storage of FP6 codes (ZeroQuant(4+2), Sec. 5) and the INT4 nibble storage.

An FP6 E3M2 code is ``sign<<5 | exponent<<2 | mantissa``. It is split into its high
4 bits (``code >> 2``: sign and exponent) and its low 2 bits (``code & 3``: mantissa),
stored in two separate arrays so that every vector load is aligned and no code
straddles a byte boundary:

- ``packed_hi4``: uint8 [N, Kp/2], 4 bits per weight;
- ``packed_lo2``: uint8 [N, 64 * ceil(Kp/256)], 2 bits per weight;

where Kp is K rounded up to a multiple of ``FP6_GRANULE`` (128) with code 0 (= +0.0)
in the padding. Each row is a sequence of 256-weight blocks; a block is 128 bytes of
``packed_hi4`` and 64 bytes of ``packed_lo2``, every 64 bytes read as 32 little-endian
uint16 *lanes* (one 512-bit register). When Kp is an odd multiple of 128, the last
block is a *half block* of 128 weights (slices 0..3): 64 bytes of ``packed_hi4`` (the
first half of a block) and a full 64 bytes of ``packed_lo2`` whose fields 4..7 are 0
(so a 576-wide row takes 512 bytes instead of the 576 of padding to 768). Bit order,
for weight ``k = 256*b + 32*i + p`` of a row (block b, slice i = 0..7, position
p = 0..31):

- lane ``j = 2p`` if ``p < 16`` else ``2(p - 16) + 1`` (so ``p = kmap(j)``,
  ``kmap(2t) = t``, ``kmap(2t+1) = 16 + t``);
- high 4 bits: byte offset ``128*b + 64*(i // 4) + 2*j`` (uint16 lane, little-endian),
  bits ``4*(i % 4) .. 4*(i % 4) + 3``;
- low 2 bits: byte offset ``64*b + 2*j``, bits ``2*i .. 2*i + 1``.

Why this lane order: a table lookup on uint16 lanes yields bf16 patterns; the even
lanes widened to fp32 are weights k..k+15 and the odd lanes k+16..k+31, so the kernel
multiplies them with x[k:k+16] and x[k+16:k+32] without any shuffle.

Both arrays start at a 64-byte boundary (``aligned``), so every vector load is one
cache line.

INT4 (symmetric, codes -7..7, groups of ``INT4_GROUP`` = 128) stores ``code + 8`` as a
nibble in the same lane order as ``packed_hi4``, one 64-byte register per group:
weight ``k = 128*g + 32*i + kmap(j)`` sits in bytes ``64*g + 2*j`` (uint16 lane), bits
``4*i .. 4*i + 3``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fpbench.errors import FpbenchError

FP6_BLOCK = 256
FP6_GRANULE = 128  # K is padded to a multiple of this: a final half block
INT4_GROUP = 128
ALIGN_BYTES = 64  # packed arrays start on a cache line (see ``aligned``)
_SLICE = 32

# LANE_TO_POS[j] = position p (0..31) inside a 32-weight slice held by uint16 lane j.
LANE_TO_POS = np.array([j // 2 if j % 2 == 0 else 16 + j // 2 for j in range(_SLICE)])


def padded_k(in_features: int) -> int:
    return math.ceil(in_features / FP6_GRANULE) * FP6_GRANULE


def lo2_row_bytes(kp: int) -> int:
    """Bytes of ``packed_lo2`` per row: 64 per started 256-weight block."""
    return 64 * math.ceil(kp / FP6_BLOCK)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous at a ``ALIGN_BYTES`` boundary (copied only when it is not).

    The kernels read 64-byte vectors; from a misaligned array every one of them spans
    two cache lines, which made a batch-1 FP6 call 2.4x slower here. torch's CPU
    allocator aligns to 64 bytes; numpy's (malloc) only to 16."""
    tensor = tensor.contiguous()
    if tensor.data_ptr() % ALIGN_BYTES:
        tensor = tensor.clone()
    if tensor.data_ptr() % ALIGN_BYTES:
        raise FpbenchError(f"could not allocate a {ALIGN_BYTES}-byte aligned copy for the packed weights")
    return tensor


def _lanes_to_bytes(lanes: np.ndarray) -> torch.Tensor:
    """uint16 lanes [..., L] -> uint8 bytes [N, 2*L*...] in little-endian order, in
    torch-allocated (64-byte aligned) memory."""
    n = lanes.shape[0]
    array = np.ascontiguousarray(lanes.astype("<u2")).view(np.uint8).reshape(n, -1)
    out = torch.empty(array.shape, dtype=torch.uint8)
    out.numpy()[...] = array
    return aligned(out)


def _bytes_to_lanes(packed: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(packed.cpu().numpy()).view("<u2").astype(np.int64)


def pack_fp6(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP6 codes uint8 [N, K] (values 0..63) -> (packed_hi4 [N, Kp/2], packed_lo2 [N, 64*ceil(Kp/256)])."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise FpbenchError(f"pack_fp6 needs uint8 codes [N, K], got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 63:
        raise FpbenchError("pack_fp6: codes must be 6-bit (0..63); encode with get_format('fp6_e3m2').encode")
    n, k = codes.shape
    kp = padded_k(k)
    blocks = math.ceil(kp / FP6_BLOCK)
    # Laid out as whole blocks; a final half block then drops its absent second half of
    # high nibbles (its 2-bit fields 4..7 stay, as zeros).
    padded = np.zeros((n, blocks * FP6_BLOCK), dtype=np.int64)
    padded[:, :k] = codes.cpu().numpy()
    # [N, blocks, slice i (8), lane j (32)] with lane j holding position LANE_TO_POS[j].
    by_lane = padded.reshape(n, blocks, 8, _SLICE)[..., LANE_TO_POS]
    hi = by_lane >> 2
    lo = by_lane & 3
    # Nibble i % 4 of the uint16 lane in half i // 4 of the block.
    hi = hi.reshape(n, blocks, 2, 4, _SLICE)
    hi_lanes = sum(hi[:, :, :, i, :] << (4 * i) for i in range(4))  # [N, blocks, 2, 32]
    lo_lanes = sum(lo[:, :, i, :] << (2 * i) for i in range(8))  # [N, blocks, 32]
    hi_lanes = hi_lanes.reshape(n, blocks * 2, _SLICE)[:, : kp // 128]  # halves actually stored
    return _lanes_to_bytes(hi_lanes), _lanes_to_bytes(lo_lanes)


def unpack_fp6(packed_hi4: torch.Tensor, packed_lo2: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_fp6``: uint8 codes [N, in_features]."""
    n = packed_hi4.shape[0]
    kp = packed_hi4.shape[1] * 2
    if kp % FP6_GRANULE or packed_lo2.shape != (n, lo2_row_bytes(kp)) or in_features > kp:
        raise FpbenchError(f"unpack_fp6: inconsistent shapes hi4 {tuple(packed_hi4.shape)}, "
                           f"lo2 {tuple(packed_lo2.shape)} for K={in_features}")
    blocks = math.ceil(kp / FP6_BLOCK)
    hi_halves = _bytes_to_lanes(packed_hi4).reshape(n, kp // 128, _SLICE)
    hi_lanes = np.zeros((n, blocks * 2, _SLICE), dtype=np.int64)
    hi_lanes[:, : kp // 128] = hi_halves
    hi_lanes = hi_lanes.reshape(n, blocks, 2, _SLICE)
    lo_lanes = _bytes_to_lanes(packed_lo2).reshape(n, blocks, _SLICE)
    hi = np.stack([(hi_lanes >> (4 * i)) & 15 for i in range(4)], axis=3).reshape(n, blocks, 8, _SLICE)
    lo = np.stack([(lo_lanes >> (2 * i)) & 3 for i in range(8)], axis=2)
    by_lane = (hi << 2) | lo
    codes = np.empty_like(by_lane)
    codes[..., LANE_TO_POS] = by_lane
    return torch.from_numpy(codes.reshape(n, blocks * FP6_BLOCK)[:, :in_features].astype(np.uint8))


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

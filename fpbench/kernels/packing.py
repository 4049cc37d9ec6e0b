"""Storage of weight codes for the compiled kernels: 4-bit, "4+2" 6-bit and 8-bit planes.

A code is the format's bit pattern as an unsigned index ``0 .. 2^bits - 1``: float codes
as they are, symmetric integers in two's complement (``code & (2^bits - 1)``), and
asymmetric integers as they are. ``value_table`` holds the exact value of every index,
from the format's own decoder, and ``decode_params`` the format's parameters for the
kernels' arithmetic decoders, so the kernels hold no per-format code.

Each row of K weights (K a multiple of ``UNIT`` = 64) is a sequence of 64-weight units.
Inside a unit, code *position* p holds the weight at offset ``POSITION_TO_K[p]``: the
order in which the kernels' byte-table lookup (vpshufb) and bf16-to-fp32 widening emit
fp32 lanes, so the decoded vectors come out in natural k order with no shuffle. Per
unit:

- 8-bit: 64 bytes in natural order (the kernels widen 8-bit codes 8 or 16 at a time
  with vpmovsx/vpmovzx, or gather them from the fp32 table, so no lane order is needed);
- 4-bit: 32 bytes, position t in the low nibble of byte t, position 32 + t in the high
  nibble;
- 6-bit ("4+2", ZeroQuant(4+2) Sec. 5): the code's high 4 bits (``code >> 2``) in a
  4-bit plane laid out as above, and its low 2 bits (``code & 3``) in a 2-bit plane of
  16 bytes, position p in bits ``2*(p // 16) .. 2*(p // 16) + 1`` of byte ``p % 16``.
  Every vector load of either plane is aligned and no code straddles a byte.

All planes start at a 64-byte boundary (``aligned``). Scales and zero points keep the
width of their scale format (``stored_scales``).
"""

from __future__ import annotations

import numpy as np
import torch

from fpbench.errors import FpbenchError
from fpbench.quant.formats import FloatFormat, IntFormat, PowerOfTwoFormat, get_format

UNIT = 64
ALIGN_BYTES = 64  # packed arrays start on a cache line (see ``aligned``)
CODE_BITS = (4, 6, 8)  # widths with a packed layout


def _position_to_k(p: int) -> int:
    # A 32-position half: 128-bit lane (p // 16); unpacklo/hi_epi8 words (bit 3); even
    # words widen by a shift, odd ones by a mask (bit 0); word pair index (bits 1-2).
    half, q = divmod(p, 32)
    lane, r16 = divmod(q, 16)
    word_vec, r = divmod(r16, 8)
    return 32 * half + 8 * (2 * word_vec + r % 2) + 4 * lane + r // 2


POSITION_TO_K = np.array([_position_to_k(p) for p in range(UNIT)])


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous at a ``ALIGN_BYTES`` boundary (copied only when it is not).

    The kernels read 32- and 64-byte vectors; from a misaligned array many of them span
    two cache lines, which made a batch-1 call 2.4x slower here. torch's CPU allocator
    aligns to 64 bytes; numpy's (malloc) only to 16."""
    tensor = tensor.contiguous()
    if tensor.data_ptr() % ALIGN_BYTES:
        tensor = tensor.clone()
    if tensor.data_ptr() % ALIGN_BYTES:
        raise FpbenchError(f"could not allocate a {ALIGN_BYTES}-byte aligned copy for the packed weights")
    return tensor


def code_bits(format_name: str) -> int:
    """Bits per stored code: 4, 6 or 8 (the narrowest packed width that holds the format)."""
    fmt = get_format(format_name)
    if not isinstance(fmt, (FloatFormat, IntFormat)) or fmt.bits > 8:
        raise FpbenchError(f"format {format_name} has no packed layout; the kernels take formats of at most 8 bits")
    return next(width for width in CODE_BITS if fmt.bits <= width)


def value_table(format_name: str) -> torch.Tensor:
    """fp32 [2^code_bits]: the exact value of every code index (unused indices are 0)."""
    fmt = get_format(format_name)
    width = code_bits(format_name)
    table = torch.zeros(1 << width, dtype=torch.float64)
    values = fmt.decode_table  # float64, codes qmin..qmax for integers, 0..2^bits-1 for floats
    if isinstance(fmt, IntFormat):
        table[torch.arange(fmt.qmin, fmt.qmax + 1) & ((1 << width) - 1)] = values
    else:
        # A float format narrower than its width (e.g. fp5_e2m2 in 6 bits) keeps its sign
        # bit at bit fmt.bits - 1, so its codes are the indices below 2^fmt.bits.
        table[: 1 << fmt.bits] = values
    return table.float()


# decode_params kinds and special-value rules, as pick_decoder (cpp/lut_pack.h) reads them.
DECODE_TABLE, DECODE_SIGNED_INT, DECODE_UNSIGNED_INT, DECODE_FLOAT = range(4)
SPECIAL_RULES = {"finite": 0, "fn": 1, "ieee": 2}


def decode_params(format_name: str) -> list[int]:
    """``[kind, ebits, mbits, bias, special]``: what the kernels need to decode a code by
    arithmetic instead of the value table (integers convert, minifloats place their bits
    in an fp32 pattern); the kernels fall back to the table for anything else."""
    fmt = get_format(format_name)
    if isinstance(fmt, IntFormat):
        return [DECODE_SIGNED_INT if fmt.symmetric else DECODE_UNSIGNED_INT, 0, 0, 0, 0]
    if isinstance(fmt, FloatFormat):
        return [DECODE_FLOAT, fmt.ebits, fmt.mbits, fmt.bias, SPECIAL_RULES[fmt.special]]
    return [DECODE_TABLE, 0, 0, 0, 0]


def code_indices(codes: torch.Tensor, format_name: str) -> torch.Tensor:
    """Stored codes (uint8, or int8 two's complement for symmetric integers) -> uint8 indices."""
    width = code_bits(format_name)
    return (codes.to(torch.int16) & ((1 << width) - 1)).to(torch.uint8)


def _to_bytes(array: np.ndarray) -> torch.Tensor:
    out = torch.empty(array.shape, dtype=torch.uint8)
    out.numpy()[...] = array
    return aligned(out)


def pack_codes(indices: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 code indices [N, K] -> (plane_a, plane_b): 8-bit [N, K] and None, 4-bit
    [N, K/2] and None, or 6-bit 4-bit plane [N, K/2] and 2-bit plane [N, K/4]."""
    if indices.dim() != 2 or indices.dtype != torch.uint8:
        raise FpbenchError(f"pack_codes needs uint8 codes [N, K], got {indices.dtype} of shape {tuple(indices.shape)}")
    if bits not in CODE_BITS:
        raise FpbenchError(f"no packed layout for {bits}-bit codes; use one of {CODE_BITS}")
    n, k = indices.shape
    if k % UNIT:
        raise FpbenchError(f"the kernels need K (in_features) divisible by {UNIT}, got K={k}")
    if indices.numel() and int(indices.max()) >= 1 << bits:
        raise FpbenchError(f"pack_codes: codes must be below 2^{bits}")
    if bits == 8:
        return _to_bytes(indices.cpu().numpy()), None
    # [N, units, position]: position p holds weight POSITION_TO_K[p] of its unit.
    by_pos = indices.cpu().numpy().reshape(n, k // UNIT, UNIT)[..., POSITION_TO_K]
    high = by_pos >> 2 if bits == 6 else by_pos
    plane4 = (high[..., :32] | (high[..., 32:] << 4)).astype(np.uint8).reshape(n, k // 2)
    if bits == 4:
        return _to_bytes(plane4), None
    low = (by_pos & 3).reshape(n, k // UNIT, 4, 16)
    plane2 = (low[:, :, 0] | low[:, :, 1] << 2 | low[:, :, 2] << 4 | low[:, :, 3] << 6).astype(np.uint8)
    return _to_bytes(plane4), _to_bytes(plane2.reshape(n, k // 4))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fp32 tensors, NaN included (any NaN matches any NaN)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def stored_scales(values: torch.Tensor, format_name: str,
                  multiplier: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales (or zero points) as the kernels store them, in their scale
    format's width: (stored, table). fp16 and bf16 values as such (table empty); 8-bit
    (or narrower) float and power-of-two formats (E4M3, E8M0, ...) as uint8 codes with a
    256-entry fp32 table of each code's value times ``multiplier`` (NVFP4's tensor scale:
    the same fp32 product as ``QuantizedWeight.effective_scales``); anything else as fp32
    values. The kernels' fp32 value of every entry equals ``values * multiplier`` bit for
    bit (checked here; fp32 is kept where it would not)."""
    values = values.float().contiguous()
    effective = values if multiplier is None else values * multiplier.float()
    empty = torch.empty(0)
    fmt = get_format(format_name)
    if multiplier is None and format_name in ("fp16", "bf16"):
        stored = values.to(torch.float16 if format_name == "fp16" else torch.bfloat16)
        if _same_bits(stored.float(), values):
            return stored, empty
    elif isinstance(fmt, (FloatFormat, PowerOfTwoFormat)) and fmt.bits <= 8:
        try:
            codes = fmt.encode(values)
        except FpbenchError:  # a value the format cannot hold (NaN of a finite format)
            return effective.contiguous(), empty
        table = torch.zeros(256, dtype=torch.float32)
        table[: 1 << fmt.bits] = fmt.decode_table.float()
        if multiplier is not None:
            table = table * multiplier.float()
        if _same_bits(table[codes.long()], effective):
            return codes.contiguous(), table
    return effective.contiguous(), empty


def unpack_codes(plane_a: torch.Tensor, plane_b: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 code indices [N, K]."""
    a = plane_a.cpu().numpy()
    n = a.shape[0]
    if bits == 8:
        return torch.from_numpy(a.copy())
    units = a.reshape(n, -1, 32)
    high = np.concatenate([units & 15, units >> 4], axis=2)
    if bits == 4:
        by_pos = high
    else:
        b = plane_b.cpu().numpy().reshape(n, -1, 1, 16)
        low = np.concatenate([(b >> (2 * i)) & 3 for i in range(4)], axis=2).reshape(n, -1, UNIT)
        by_pos = high << 2 | low
    codes = np.empty_like(by_pos)
    codes[..., POSITION_TO_K] = by_pos
    return torch.from_numpy(codes.reshape(n, -1).astype(np.uint8))

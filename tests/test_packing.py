"""Round trips of the 4+2 FP6 and the INT4 nibble packings, and their documented bit order."""

import numpy as np
import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.kernels.packing import (FP6_BLOCK, LANE_TO_POS, lo2_row_bytes, pack_fp6, pack_int4, padded_k, unpack_fp6,
                             unpack_int4)


def _every_code_row(k):
    return (torch.arange(k) % 64).to(torch.uint8)


@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (5, 576), (2, 1), (7, 1000)])
def test_fp6_round_trip_random(shape):
    codes = torch.randint(0, 64, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed_hi4, packed_lo2 = pack_fp6(codes)
    n, k = shape
    assert packed_hi4.shape == (n, padded_k(k) // 2) and packed_lo2.shape == (n, lo2_row_bytes(padded_k(k)))
    assert packed_hi4.dtype == packed_lo2.dtype == torch.uint8
    assert torch.equal(unpack_fp6(packed_hi4, packed_lo2, k), codes)


def test_fp6_round_trip_every_code_at_every_position():
    # 64 rows, row r holds code (r + k) % 64 at k: every code visits every lane and slice.
    k = 2 * FP6_BLOCK
    codes = ((torch.arange(64)[:, None] + torch.arange(k)[None, :]) % 64).to(torch.uint8)
    assert torch.equal(unpack_fp6(*pack_fp6(codes), k), codes)


def test_fp6_bit_order_matches_documentation():
    # An independent reading of the documented layout, weight by weight.
    codes = torch.randint(0, 64, (2, 600), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    packed_hi4, packed_lo2 = (t.numpy() for t in pack_fp6(codes))
    pos_to_lane = {int(p): j for j, p in enumerate(LANE_TO_POS)}
    for n in range(2):
        for k in range(600):
            b, i, p = k // 256, (k % 256) // 32, k % 32
            j = pos_to_lane[p]
            assert j == (2 * p if p < 16 else 2 * (p - 16) + 1)
            hi_off = 128 * b + 64 * (i // 4) + 2 * j
            hi_lane = int(packed_hi4[n, hi_off]) | int(packed_hi4[n, hi_off + 1]) << 8
            lo_lane = int(packed_lo2[n, 64 * b + 2 * j]) | int(packed_lo2[n, 64 * b + 2 * j + 1]) << 8
            code = ((hi_lane >> (4 * (i % 4))) & 15) << 2 | (lo_lane >> (2 * i)) & 3
            assert code == int(codes[n, k])


def test_fp6_padding_is_code_zero_and_density():
    codes = torch.full((1, 300), 63, dtype=torch.uint8)
    packed_hi4, packed_lo2 = pack_fp6(codes)
    # K = 300 -> Kp = 384: one block and a half block (64 bytes of nibbles, 64 of fields)
    assert padded_k(300) == 384 and packed_hi4.numel() == 192 and packed_lo2.numel() == 128
    full = unpack_fp6(packed_hi4, packed_lo2, 384)
    assert torch.all(full[0, 300:] == 0) and torch.all(full[0, :300] == 63)
    assert padded_k(512) == 512 and sum(t.numel() for t in pack_fp6(torch.zeros(1, 512, dtype=torch.uint8))) == 384


@pytest.mark.parametrize("k,row_bytes", [(576, 512), (100, 128), (128, 128), (256, 192), (4096, 3072), (5632, 4224)])
def test_fp6_half_block_row_sizes(k, row_bytes):
    # 6 bits per weight in whole blocks; a final half block costs 128 bytes (96 of codes).
    codes = torch.randint(0, 64, (3, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed_hi4, packed_lo2 = pack_fp6(codes)
    assert packed_hi4.shape[1] + packed_lo2.shape[1] == row_bytes
    assert torch.equal(unpack_fp6(packed_hi4, packed_lo2, k), codes)


def test_fp6_rejects_bad_codes():
    with pytest.raises(FpbenchError):
        pack_fp6(torch.full((1, 8), 64, dtype=torch.uint8))
    with pytest.raises(FpbenchError):
        pack_fp6(torch.zeros(8, dtype=torch.uint8))


def test_int4_round_trip_every_value():
    codes = ((torch.arange(16)[:, None] + torch.arange(256)[None, :]) % 16 - 8).to(torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (16, 128)
    assert torch.equal(unpack_int4(packed), codes)
    # bit order: weight k of group g, slice i, lane j at bytes 64g + 2j, bits 4i..4i+3
    lanes = np.ascontiguousarray(packed.numpy()).view("<u2")
    for k in range(0, 256, 7):
        g, i, p = k // 128, (k % 128) // 32, k % 32
        j = 2 * p if p < 16 else 2 * (p - 16) + 1
        assert ((int(lanes[3, 32 * g + j]) >> (4 * i)) & 15) - 8 == int(codes[3, k])


def test_int4_needs_whole_groups():
    with pytest.raises(FpbenchError, match="divisible by 128"):
        pack_int4(torch.zeros(2, 100, dtype=torch.int8))


def test_packed_arrays_are_cache_line_aligned():
    from fpbench.kernels.packing import ALIGN_BYTES, aligned

    for shape in [(3, 100), (17, 576), (1, 4096)]:
        codes = torch.randint(0, 64, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for packed in pack_fp6(codes):
            assert packed.data_ptr() % ALIGN_BYTES == 0
    assert pack_int4(torch.zeros(5, 256, dtype=torch.int8)).data_ptr() % ALIGN_BYTES == 0
    misaligned = torch.arange(200, dtype=torch.uint8)[3:131]
    assert misaligned.data_ptr() % ALIGN_BYTES != 0
    copy = aligned(misaligned)
    assert copy.data_ptr() % ALIGN_BYTES == 0 and torch.equal(copy, misaligned)

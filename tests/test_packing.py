"""The packed layouts: round trips for every width, the documented bit order, alignment."""

import numpy as np
import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.kernels.packing import POSITION_TO_K, code_indices, pack_codes, unpack_codes


def test_position_order_is_a_permutation_matching_the_kernel():
    from fpbench.kernels import build as kernels

    assert sorted(POSITION_TO_K.tolist()) == list(range(64))
    module = kernels.load()
    assert [module.position_to_k(p) for p in range(64)] == POSITION_TO_K.tolist()


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("shape", [(1, 64), (3, 576), (5, 4096)])
def test_round_trip(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    planes = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(*planes, bits), codes)
    n, k = shape
    sizes = {4: [(n, k // 2)], 6: [(n, k // 2), (n, k // 4)], 8: [(n, k)]}[bits]
    assert [tuple(p.shape) for p in planes if p is not None] == sizes  # exactly bits/8 bytes per weight


def test_bit_order_matches_documentation():
    # One 6-bit code at every position, checked against the layout written out by hand.
    for k in range(64):
        codes = torch.zeros(1, 64, dtype=torch.uint8)
        codes[0, k] = 0b101110  # high 4 bits 1011, low 2 bits 10
        plane4, plane2 = pack_codes(codes, 6)
        p = int(np.nonzero(POSITION_TO_K == k)[0][0])
        expected4 = np.zeros(32, dtype=np.uint8)
        expected4[p % 32] = 0b1011 << (4 * (p // 32))
        expected2 = np.zeros(16, dtype=np.uint8)
        expected2[p % 16] = 0b10 << (2 * (p // 16))
        assert np.array_equal(plane4[0].numpy(), expected4) and np.array_equal(plane2[0].numpy(), expected2)


def test_symmetric_int_codes_are_twos_complement():
    codes = torch.tensor([[-8, -7, -1, 0, 1, 7]], dtype=torch.int8)
    assert code_indices(codes, "int4").tolist() == [[8, 9, 15, 0, 1, 7]]
    assert code_indices(torch.tensor([[-127, 127]], dtype=torch.int8), "int8").tolist() == [[129, 127]]


def test_bad_input_is_refused():
    with pytest.raises(FpbenchError, match="divisible by 64"):
        pack_codes(torch.zeros(2, 100, dtype=torch.uint8), 4)
    with pytest.raises(FpbenchError, match="below 2\\^4"):
        pack_codes(torch.full((1, 64), 16, dtype=torch.uint8), 4)
    with pytest.raises(FpbenchError, match="uint8"):
        pack_codes(torch.zeros(2, 64, dtype=torch.int32), 8)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_packed_arrays_are_cache_line_aligned(bits):
    for plane in pack_codes(torch.zeros(3, 192, dtype=torch.uint8), bits):
        assert plane is None or plane.data_ptr() % 64 == 0

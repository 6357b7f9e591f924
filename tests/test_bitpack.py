"""Tests of dense LSB-first k-bit packing (qpack.bitpack) against a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpack import pack_codes, unpack_codes
from qpack.bitpack import packed_size, padding_is_zero

ALL_BITS = list(range(1, 9))
EDGE_COUNTS = [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 63, 64, 65, 100, 1001]


def ref_pack(codes: list[int], k: int) -> bytes:
    """The spec's bit order, one bit at a time: code i holds stream bits [i*k, (i+1)*k),
    its least significant bit first; stream bit j is bit j % 8 of byte j // 8."""
    nbits = len(codes) * k
    out = bytearray((nbits + 7) // 8)  # padding bits stay zero
    for i, code in enumerate(codes):
        assert 0 <= code < (1 << k)
        for b in range(k):
            if (code >> b) & 1:
                j = i * k + b
                out[j // 8] |= 1 << (j % 8)
    return bytes(out)


def ref_unpack(data: bytes, k: int, count: int) -> list[int]:
    codes = []
    for i in range(count):
        code = 0
        for b in range(k):
            j = i * k + b
            code |= ((data[j // 8] >> (j % 8)) & 1) << b
        codes.append(code)
    return codes


def random_codes(rng: np.random.Generator, count: int, bits: int) -> np.ndarray:
    return rng.integers(0, 1 << bits, size=count, dtype=np.int64)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    return codes, bits


# --------------------------------------------------------------------------- reference


def test_reference_itself_on_a_hand_example():
    # Guard the oracle: 4-bit [1, 2, 3] -> low nibble 1, high nibble 2, then 3 + zero pad.
    assert ref_pack([1, 2, 3], 4) == bytes([0x21, 0x03])
    assert ref_unpack(bytes([0x21, 0x03]), 4, 3) == [1, 2, 3]


@settings(max_examples=100, deadline=None)
@given(codes_and_bits())
def test_pack_matches_reference_and_round_trips(case):
    codes, bits = case
    arr = np.array(codes, dtype=np.int64)
    packed = pack_codes(arr, bits)
    assert packed.dtype == np.uint8
    assert packed.ndim == 1
    assert packed.size == packed_size(len(codes), bits) == -(-len(codes) * bits // 8)
    assert packed.tobytes() == ref_pack(codes, bits)
    assert padding_is_zero(packed, bits, len(codes))
    out = unpack_codes(packed.tobytes(), bits, len(codes))
    assert out.dtype == np.uint8
    assert out.tolist() == codes
    # unpacking a numpy buffer works the same as unpacking bytes
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("count", EDGE_COUNTS)
def test_edge_counts_every_width(bits, count):
    rng = np.random.default_rng(1000 * bits + count)
    codes = random_codes(rng, count, bits)
    if count:
        codes[-1] = (1 << bits) - 1  # a set top bit right before the padding
    packed = pack_codes(codes, bits)
    assert packed.tobytes() == ref_pack(codes.tolist(), bits)
    assert packed.size == (count * bits + 7) // 8
    assert unpack_codes(packed.tobytes(), bits, count).tolist() == codes.tolist()
    # and the reference stream unpacks to the same codes
    assert unpack_codes(ref_pack(codes.tolist(), bits), bits, count).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", ALL_BITS)
def test_all_ones_and_all_zeros(bits):
    for count in (1, 7, 8, 9, 31):
        ones = np.full(count, (1 << bits) - 1)
        packed = pack_codes(ones, bits).tobytes()
        assert packed == ref_pack(ones.tolist(), bits)
        # exactly count*bits bits are set: no code leaks into the padding
        assert sum(bin(b).count("1") for b in packed) == count * bits
        assert pack_codes(np.zeros(count, dtype=np.uint8), bits).tobytes() == bytes(
            packed_size(count, bits)
        )


@pytest.mark.parametrize("bits", ALL_BITS)
def test_input_shape_and_integer_dtype_do_not_matter(bits):
    rng = np.random.default_rng(bits)
    codes = random_codes(rng, 24, bits)
    expected = ref_pack(codes.tolist(), bits)
    for variant in (
        codes.astype(np.uint8),
        codes.astype(np.int32),
        codes.astype(np.uint16),
        codes.reshape(4, 6),
        codes.tolist(),
    ):
        assert pack_codes(variant, bits).tobytes() == expected


def test_packed_size_formula():
    for bits in ALL_BITS:
        for count in range(0, 70):
            assert packed_size(count, bits) == -(-count * bits // 8)
    assert packed_size(10**12, 3) == 375 * 10**9
    assert packed_size(10**12 + 1, 3) == 375 * 10**9 + 1


# --------------------------------------------------------------------------- worked examples


def test_worked_example_3_bit():
    # Codes 1..7,0 at 3 bits; code i sits at stream bits [3i, 3i+3), LSB first:
    #   c0=1 -> bits 0..2 = 1,0,0      c1=2 -> bits 3..5  = 0,1,0
    #   c2=3 -> bits 6..8 = 1,1,0      c3=4 -> bits 9..11 = 0,0,1
    #   c4=5 -> bits 12..14 = 1,0,1    c5=6 -> bits 15..17 = 0,1,1
    #   c6=7 -> bits 18..20 = 1,1,1    c7=0 -> bits 21..23 = 0,0,0
    # byte 0 = bits 0..7  = 1,0,0,0,1,0,1,1 (LSB first) = 1+16+64+128 = 0xD1
    # byte 1 = bits 8..15 = 0,0,0,1,1,0,1,0            = 8+16+64     = 0x58
    # byte 2 = bits 16..23 = 1,1,1,1,1,0,0,0           = 31          = 0x1F
    # (check: sum(c_i << 3i) = 2054353 = 0x1F58D1, little-endian D1 58 1F)
    packed = pack_codes(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    assert packed.tobytes() == bytes([0xD1, 0x58, 0x1F])
    assert unpack_codes(bytes([0xD1, 0x58, 0x1F]), 3, 8).tolist() == [1, 2, 3, 4, 5, 6, 7, 0]


def test_worked_example_4_bit():
    # first code in the low nibble: 0x21 = (2 << 4) | 1, then 3 and a zero high nibble
    packed = pack_codes(np.array([1, 2, 3]), 4)
    assert packed.tobytes() == bytes([0x21, 0x03])
    assert unpack_codes(bytes([0x21, 0x03]), 4, 3).tolist() == [1, 2, 3]


def test_worked_example_1_bit_and_5_bit():
    # 1 bit: [1,0,1,1,0,0,0,0 | 1] -> 0b00001101 = 0x0D, then 0x01
    assert pack_codes(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tobytes() == b"\x0d\x01"
    # 5 bits: [31, 1] -> stream bits 0..4 set, bit 5 set -> 0x3F, then 0x00 (bits 8..9)
    assert pack_codes(np.array([31, 1]), 5).tobytes() == b"\x3f\x00"
    # 5 bits: [0, 16] -> bit 9 set -> 0x00, 0x02
    assert pack_codes(np.array([0, 16]), 5).tobytes() == b"\x00\x02"


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("bits", ALL_BITS)
def test_padding_is_zero_detects_each_padding_bit(bits):
    checked = 0
    for count in (1, 2, 3, 5, 7, 9, 13):
        rng = np.random.default_rng(count)
        codes = random_codes(rng, count, bits)
        packed = pack_codes(codes, bits)
        assert padding_is_zero(packed, bits, count)
        used = count * bits
        total = packed.size * 8
        for j in range(used, total):  # every padding bit, one at a time
            bad = packed.copy()
            bad[j // 8] |= 1 << (j % 8)
            assert not padding_is_zero(bad, bits, count), (bits, count, j)
            assert not padding_is_zero(bad.tobytes(), bits, count)
            # unpacking ignores the padding: the codes are unchanged
            assert unpack_codes(bad, bits, count).tolist() == codes.tolist()
            checked += 1
        for j in range(used):  # flipping a code bit keeps the padding clean
            other = packed.copy()
            other[j // 8] ^= 1 << (j % 8)
            assert padding_is_zero(other, bits, count)
    if bits != 8:
        assert checked > 0


@pytest.mark.parametrize("bits", ALL_BITS)
def test_padding_is_zero_without_spare_bits(bits):
    count = 8  # 8 codes fill exactly `bits` bytes
    packed = np.full(packed_size(count, bits), 0xFF, dtype=np.uint8)
    assert padding_is_zero(packed, bits, count)
    assert padding_is_zero(b"", bits, 0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", ALL_BITS)
def test_out_of_range_codes_raise(bits):
    with pytest.raises(ValueError):
        pack_codes(np.array([0, 1 << bits, 0]), bits)
    with pytest.raises(ValueError):
        pack_codes(np.array([0, -1]), bits)
    with pytest.raises(ValueError):
        pack_codes(np.array([256]), bits)
    # the largest legal code is fine
    pack_codes(np.array([(1 << bits) - 1]), bits)


@pytest.mark.parametrize("bad", [0, 9, -1, 16, True, 3.0, None, "4"])
def test_bad_bits_raise(bad):
    with pytest.raises(ValueError):
        pack_codes(np.array([0, 1]), bad)
    with pytest.raises(ValueError):
        unpack_codes(b"\x00\x00", bad, 1)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unpack_from_too_few_bytes_raises(bits):
    count = 11
    need = packed_size(count, bits)
    with pytest.raises(ValueError):
        unpack_codes(bytes(need - 1), bits, count)
    assert unpack_codes(bytes(need), bits, count).tolist() == [0] * count

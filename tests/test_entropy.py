"""Huffman coding kernels (spec section 5.2): lengths, the vectorized encoder, and the two
decoders (zlib inflate for streams with a spare codeword, bitarray otherwise)."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpack import entropy as H


def naive_encode(symbols, lengths):
    """Bit by bit, straight from the spec: codewords MSB first into an LSB-first stream."""
    codes = H.canonical_codes(lengths)
    bits = []
    for s in symbols:
        n = int(lengths[s])
        bits.extend((int(codes[s]) >> (n - 1 - i)) & 1 for i in range(n))
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes()


def kraft_units(lengths):
    used = lengths[lengths > 0].astype(np.int64)
    return int(np.sum(1 << (15 - used)))


counts_st = st.lists(st.integers(0, 10**6), min_size=2, max_size=256).map(np.array)


@settings(max_examples=200, deadline=None)
@given(counts_st)
def test_lengths_leave_one_spare_codeword_of_the_longest_length(counts):
    lengths = H.huffman_lengths(counts)
    assert (lengths[counts == 0] == 0).all()
    assert (lengths[counts > 0] > 0).all()
    if counts.any():
        assert lengths.max() <= H.MAX_CODE_LENGTH
        assert H.has_spare_codeword(lengths)
        assert kraft_units(lengths) == (1 << 15) - (1 << (15 - int(lengths.max())))


def test_lengths_stay_within_the_limit_for_skewed_counts():
    counts = np.array([2**i for i in range(40)][:256])  # Fibonacci-like skew needs limiting
    lengths = H.huffman_lengths(counts)
    assert lengths.max() == H.MAX_CODE_LENGTH and H.has_spare_codeword(lengths)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_encoder_matches_the_spec_and_both_decoders_invert_it(data):
    alphabet = data.draw(st.sampled_from([2, 4, 16, 64, 256]))
    symbols = np.array(
        data.draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=3000)),
        dtype=np.uint8,
    )
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=alphabet))
    stream = H.encode_symbols(symbols, lengths).tobytes()
    assert stream == naive_encode(symbols, lengths)
    assert H._bitarray_decode(stream, lengths, symbols.size).tolist() == symbols.tolist()
    decoded, used = H._inflate(stream, lengths, symbols.size)
    assert decoded.tolist() == symbols.tolist()
    assert used == int(lengths[symbols].astype(np.int64).sum())
    assert H.decode_symbols(stream, lengths, symbols.size)[0].tolist() == symbols.tolist()


def reference_decode(stream, lengths, count):
    """What a spec decoder accepts, bit by bit: ``count`` codewords that end in the last
    byte, followed by zero padding. Returns (symbols, used bits), or None."""
    try:
        symbols = H._bitarray_decode(stream, lengths, count)
    except ValueError:
        return None
    used = int(lengths[symbols].astype(np.int64).sum())
    if -(-used // 8) != len(stream) or (used % 8 and stream[-1] >> (used % 8)):
        return None
    return symbols.tolist(), used


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_inflate_route_accepts_exactly_what_a_bit_by_bit_decoder_accepts(data):
    """The DEFLATE route learns the used bit count from the symbols it decodes past the
    stream (see entropy._TRAILER) instead of summing lengths: on valid streams, streams
    cut short, extended, or with set padding bits, it must agree with the reference."""
    alphabet = data.draw(st.sampled_from([2, 4, 16, 256]))
    symbols = np.array(
        data.draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=300)),
        dtype=np.uint8,
    )
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=alphabet))
    stream = bytearray(H.encode_symbols(symbols, lengths).tobytes())
    count = max(1, symbols.size + data.draw(st.sampled_from([0, 0, 0, -1, 1, 2])))
    edit = data.draw(st.sampled_from(["none", "append", "cut", "pad", "flip"]))
    if edit == "append":
        stream += bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=3)))
    elif edit == "cut" and len(stream) > 1:
        del stream[-1]
    elif edit == "pad":
        stream[-1] |= 1 << data.draw(st.integers(0, 7))
    elif edit == "flip":
        stream[data.draw(st.integers(0, len(stream) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    stream = bytes(stream)
    expected = reference_decode(stream, lengths, count)
    try:
        decoded, used = H._inflate(stream, lengths, count)
        got = (decoded.tolist(), used)
    except ValueError:
        got = None
    assert got == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=600))
def test_pair_table_and_single_symbol_encoders_agree(values):
    symbols = np.array(values, dtype=np.uint8)
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=256))
    single = H.encode_symbols(symbols, lengths).tobytes()  # below PAIR_TABLE_MIN
    saved = H.PAIR_TABLE_MIN
    try:
        H.PAIR_TABLE_MIN = 0
        paired = H.encode_symbols(symbols, lengths).tobytes()
    finally:
        H.PAIR_TABLE_MIN = saved
    assert single == paired == naive_encode(symbols, lengths)


def test_encoder_spans_block_boundaries():
    rng = np.random.default_rng(5)
    symbols = np.minimum(rng.geometric(0.3, size=3 * H.PAIR_BLOCK + 7) - 1, 255).astype(np.uint8)
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=256))
    stream = H.encode_symbols(symbols, lengths).tobytes()
    assert stream == naive_encode(symbols, lengths)


def test_complete_codes_use_the_bitarray_decoder():
    lengths = np.array([1, 2, 3, 3], dtype=np.uint8)  # the spec's worked example
    assert not H.has_spare_codeword(lengths)
    symbols = np.array([0, 0, 1, 2, 0, 3], dtype=np.uint8)
    stream = H.encode_symbols(symbols, lengths).tobytes()
    assert stream == bytes([0x34, 0x07])
    assert H.decode_symbols(stream, lengths, 6)[0].tolist() == symbols.tolist()


def test_prefix_makes_a_raw_deflate_stream():
    lengths = np.array([1, 2, 3, 4], dtype=np.uint8)
    assert H.has_spare_codeword(lengths)  # 1/2 + 1/4 + 1/8 + 1/16 = 1 - 1/16
    prefix = H.deflate_prefix(lengths)
    assert len(prefix) == 142
    symbols = np.array([3, 0, 0, 3, 1, 2, 0], dtype=np.uint8)
    stream = H.encode_symbols(symbols, lengths).tobytes()
    # end-of-block is the spare codeword 1111 (MSB first): append it and inflate to the end
    bits = sum(int(lengths[s]) for s in symbols)
    tail = int.from_bytes(stream, "little") | (0b1111 << bits)
    whole = tail.to_bytes(-(-(bits + 4) // 8), "little")
    out = zlib.decompress(prefix + whole, -15)
    assert out == symbols.tobytes()


@pytest.mark.parametrize("spare", [True, False])
def test_decoders_reject_short_streams(spare):
    lengths = np.array([1, 2, 3, 4 if spare else 3], dtype=np.uint8)
    assert H.has_spare_codeword(lengths) == spare
    symbols = np.array([3, 3, 2, 1] * 10, dtype=np.uint8)
    stream = H.encode_symbols(symbols, lengths).tobytes()
    assert H.decode_symbols(stream, lengths, symbols.size)[0].tolist() == symbols.tolist()
    for cut in (1, 2, 5):
        with pytest.raises(ValueError):
            H.decode_symbols(stream[:-cut], lengths, symbols.size)


def test_spare_codeword_in_the_stream_is_an_error():
    lengths = np.array([1, 2, 3, 4], dtype=np.uint8)
    stream = bytes([0xFF, 0xFF])  # 1111 is the spare codeword
    with pytest.raises(ValueError):
        H.decode_symbols(stream, lengths, 3)
    incomplete = np.array([2, 2, 2, 0], dtype=np.uint8)  # 11 is free: fallback decoder
    assert not H.has_spare_codeword(np.array([2, 2, 0, 0], dtype=np.uint8))
    with pytest.raises(ValueError):
        H.decode_symbols(bytes([0xFF]), np.array([2, 2, 0, 0], dtype=np.uint8), 2)
    assert H.has_spare_codeword(incomplete)


def test_encoding_a_symbol_without_codeword_fails():
    with pytest.raises(ValueError, match="no codeword"):
        H.encode_symbols(np.array([0, 3], dtype=np.uint8), np.array([1, 1, 0, 0]))


def test_accelerated_and_standard_zlib_agree():
    """qpack._zlib may pick ISA-L; its CRC-32 and inflate must equal the stdlib's."""
    from qpack import _zlib

    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, 100_003).astype(np.uint8)
    for view in (data.tobytes(), memoryview(data), data):
        assert _zlib.crc32(view) == zlib.crc32(view)
    assert _zlib.crc32(b"123456789") == 0xCBF43926
    symbols = np.minimum(rng.geometric(0.2, size=50_000) - 1, 255).astype(np.uint8)
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=256))
    stream = H.deflate_prefix(lengths) + H.encode_symbols(symbols, lengths).tobytes()
    padded = stream + bytes(8)  # some inflaters read ahead (see entropy._inflate)
    fast = _zlib.decompressobj(-15).decompress(padded, symbols.size)
    assert fast == zlib.decompressobj(-15).decompress(padded, symbols.size)
    assert fast == symbols.tobytes()


def test_decoding_without_the_accelerator(tmp_path):
    """Every valid vector decodes to the same values with the stdlib zlib alone."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import qpack

    folder = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "valid"
    script = (
        "import sys, json, numpy as np\n"
        "sys.modules['isal'] = None  # as if it were not installed\n"
        "import qpack, qpack._zlib as z\n"
        "assert z.BACKEND == 'zlib'\n"
        "out = {}\n"
        "for p in sorted(sys.argv[1:]):\n"
        "    arrays = qpack.load_numpy(p)\n"
        "    out[p] = {k: np.ascontiguousarray(a).tobytes().hex() for k, a in arrays.items()}\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(p) for p in sorted(folder.glob("*.qpk"))]
    res = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for p in paths:
        arrays = qpack.load_numpy(p)
        assert got[p] == {k: np.ascontiguousarray(a).tobytes().hex() for k, a in arrays.items()}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=256))
def test_tree_is_an_optimal_huffman_tree(weights):
    """Two-queue construction against the textbook heap construction: same total cost."""
    import heapq

    heap = list(weights)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    depths = H._tree_depths(np.array(weights))
    assert int((np.array(weights) * depths).sum()) == cost
    assert sum(2.0 ** -int(d) for d in depths) == 1.0


@pytest.mark.parametrize("tail", [1, 2, 3])
def test_encoder_tail_with_the_largest_symbol(tail):
    symbols = np.array([7] * 8 + [255] * tail, dtype=np.uint8)
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=256))
    stream = H.encode_symbols(symbols, lengths).tobytes()
    assert stream == naive_encode(symbols, lengths)
    assert H.decode_symbols(stream, lengths, symbols.size)[0].tolist() == symbols.tolist()


@settings(max_examples=100, deadline=None)
@given(st.integers(15, 60), st.integers(2, 14))
def test_length_limiting_keeps_a_complete_code_heaviest_shortest(n, cap):
    weights = np.array([2**i for i in range(n)], dtype=np.int64)  # a maximally deep tree
    if n > 1 << cap:
        return
    depth = H._tree_depths(weights)
    limited = H._limit_depths(weights, depth, cap)
    assert limited.max() <= cap
    assert sum(2.0 ** -int(d) for d in limited) == 1.0
    order = np.argsort(-weights, kind="stable")
    assert (np.diff(limited[order]) >= 0).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_derived_group_histograms_equal_counting(bits, count, seed):
    rng = np.random.default_rng(seed)
    codes = np.minimum(rng.geometric(0.4, count) - 1, (1 << bits) - 1).astype(np.uint8)
    hists, _ = H.group_histograms(codes, bits)
    assert sorted(hists) == list(H.group_choices(bits))
    for group, hist in hists.items():
        direct = np.bincount(H.group_codes(codes, bits, group), minlength=1 << (group * bits))
        assert hist.tolist() == direct.tolist()

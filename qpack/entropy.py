"""Canonical Huffman coding of quantized codes (spec/FORMAT.md section 5.2).

Codes are grouped ``group`` at a time into symbols (``symbol = sum(code_j << (j * bits))``,
so a symbol is at most 8 bits wide and the alphabet has at most 256 entries). Symbols are
coded with a canonical Huffman code of lengths 1..15 (DEFLATE's assignment: shorter codes
first, then increasing symbol value), written most-significant bit first into the same
LSB-first bit stream as fixed-width packing, and zero-padded to a whole byte.

Speed: with the compiled kernels (:mod:`qpack.kernels`) both directions run in C.
Without them, encoding is vectorized numpy, and for decoding, the reference writer leaves
exactly one codeword of the greatest length unused (:func:`huffman_lengths`); giving that
codeword to DEFLATE's end-of-block symbol makes the stream the body of a DEFLATE dynamic
block, so zlib's C inflater decodes it (:func:`deflate_prefix`). Streams from other
writers go through bitarray's canonical decoder instead. Every route gives the same
symbols and accepts the same streams.

The module is longer than most: code-length limiting, canonical assignment, the chunk
index and the three decoding routes are one concern (one stream format), and splitting
them would scatter the invariants each route must keep identical.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from . import kernels
from ._zlib import ERRORS, decompressobj
from .bitpack import pack_codes, packed_size, unpack_codes

__all__ = [
    "MAX_CODE_LENGTH",
    "group_choices",
    "group_codes",
    "ungroup_symbols",
    "huffman_lengths",
    "canonical_codes",
    "kraft_ok",
    "length_stats",
    "encode_symbols",
    "decode_symbols",
    "chunk_starts",
    "pack_lengths",
    "unpack_lengths",
    "entropy_bits",
]

MAX_CODE_LENGTH = 15
# The chunk index (spec 5.2) the writer adds (see index_chunk): to streams of at least
# CHUNK_INDEX_MIN symbols where four-lane decoding pays, and to every stream of at least
# CHUNK_INDEX_ALWAYS (for decoders that split a stream across threads or a GPU), in chunks
# of at most CHUNK_SYMBOLS.
CHUNK_SYMBOLS = 1 << 14
CHUNK_INDEX_MIN = 1 << 14
CHUNK_INDEX_ALWAYS = 1 << 18
LANES = 4  # chunks the compiled decoder decodes side by side
# Codewords averaging this many bits or more decode faster four chunks side by side than
# with lookups of several codewords at once (measured on 1 Mi symbols: 1.6x at 7.1 bits,
# 1.4x at 5.1, 1.05x at 4.1, 0.9x at 3.1 and below).
LANES_MIN_BITS = 4
# Symbols per block in the encoder: enough to amortize numpy's per-call cost, few enough
# that the uint64 temporaries stay in cache.
PAIR_BLOCK = 1 << 17


def group_choices(bits: int) -> range:
    """Group sizes allowed with ``bits``-bit codes: symbols of at most 8 bits."""
    return range(1, 8 // bits + 1)


def group_codes(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Combine runs of ``group`` codes into one symbol each (zero codes pad the last run)."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if group == 1:
        return codes
    count = -(-codes.size // group)
    if group == 2:  # two strided passes of byte arithmetic
        second = codes[1::2]
        if second.size < count:
            second = np.append(second, np.uint8(0))
        return codes[0::2] | (second << np.uint8(bits))
    padded = np.zeros(count * group, dtype=np.uint8)
    padded[: codes.size] = codes
    runs = padded.reshape(count, group)
    symbols = runs[:, 0].copy()
    for j in range(1, group):
        symbols |= runs[:, j] << np.uint8(j * bits)
    return symbols


@cache
def _symbol_codes(bits: int, group: int) -> np.ndarray:
    """The ``group`` codes of every symbol, as rows of a (256, width) uint8 table whose
    width is ``group`` rounded up to 1, 2, 4 or 8 bytes, so a row is one machine word."""
    width = 1 << (group - 1).bit_length()
    symbols = np.arange(256)
    table = np.zeros((256, width), dtype=np.uint8)
    for j in range(group):
        table[:, j] = (symbols >> (j * bits)) & ((1 << bits) - 1)
    return table


def ungroup_symbols(symbols: np.ndarray, bits: int, group: int, count: int) -> np.ndarray:
    """Split symbols back into their first ``count`` codes (the codes padding the last
    symbol are dropped; :mod:`qpack.decoder` checks them on the symbol). One table lookup
    per symbol yields all of its codes at once."""
    if group == 1:
        return symbols[:count]
    table = _symbol_codes(bits, group)
    width = table.shape[1]
    words = table.view(f"<u{width}").reshape(-1)
    codes = np.take(words, symbols.astype(np.intp)).view(np.uint8).reshape(-1, width)
    codes = codes[:, :group].reshape(-1) if width != group else codes.reshape(-1)
    return codes[:count]


def huffman_lengths(counts: np.ndarray, limit: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Code length of every symbol (0 for unused ones), at most ``limit`` bits, leaving
    exactly one codeword of the greatest length unused (see the module docstring).

    Deterministic: ties are broken by symbol value. A single used symbol gets length 1.
    The optimal tree is limited to ``limit - 1`` bits by :func:`_limit_depths`, then the
    last symbol in canonical order (the largest of the longest) moves one level down,
    beside the spare codeword.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    weights = counts[used]
    depth = _tree_depths(weights)
    if depth.max() >= limit:
        depth = _limit_depths(weights, depth, limit - 1)
    lengths[used] = depth
    last = np.flatnonzero(lengths == depth.max())[-1]
    lengths[last] += 1
    return lengths


def _limit_depths(weights: np.ndarray, depth: np.ndarray, cap: int) -> np.ndarray:
    """Depths of at most ``cap`` with the same number of leaves and a complete code, as in
    JPEG (ITU-T T.81, Annex K.3): two leaves below the cap become one leaf a level up and
    a shorter leaf splits into two, until no leaf is below the cap; then the heaviest
    symbols take the shortest lengths (ties by symbol value)."""
    per_length = np.bincount(depth).tolist()
    for i in range(len(per_length) - 1, cap, -1):
        while per_length[i] > 0:
            j = i - 2
            while per_length[j] == 0:
                j -= 1
            per_length[i] -= 2
            per_length[i - 1] += 1
            per_length[j + 1] += 2
            per_length[j] -= 1
    ascending = np.repeat(np.arange(len(per_length)), per_length)
    order = np.lexsort((np.arange(weights.size), -weights))  # heaviest first
    out = np.empty(weights.size, dtype=np.int64)
    out[order] = ascending
    return out


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over ``weights`` (all > 0, at least two).

    The two-queue construction: leaves sorted by (weight, index), and internal nodes, which
    are made in nondecreasing weight order, so each step merges the two lightest fronts
    (a leaf first on ties). Deterministic, and linear after the sort."""
    n = len(weights)
    order = np.lexsort((np.arange(n), weights))
    weight = [int(weights[i]) for i in order] + [0] * (n - 1)
    parent = [0] * (2 * n - 1)
    leaf, node = 0, n  # fronts of the two queues; internal node k sits at index n + k
    for made in range(n, 2 * n - 1):
        # the lighter front twice (unrolled: this loop is the encoder's slowest Python)
        if leaf < n and (node >= made or weight[leaf] <= weight[node]):
            first, leaf = leaf, leaf + 1
        else:
            first, node = node, node + 1
        if leaf < n and (node >= made or weight[leaf] <= weight[node]):
            second, leaf = leaf, leaf + 1
        else:
            second, node = node, node + 1
        weight[made] = weight[first] + weight[second]
        parent[first] = parent[second] = made
    depth = [0] * (2 * n - 1)
    for k in range(2 * n - 3, -1, -1):  # the root is the last node made
        depth[k] = depth[parent[k]] + 1
    out = np.zeros(n, dtype=np.int64)
    out[order] = depth[:n]
    return out


def length_stats(lengths: np.ndarray) -> tuple[int, int, int]:
    """(shortest, longest, Kraft sum in units of 2^-15) of the nonzero code lengths, all
    exact integers; (0, 0, 0) when every length is 0. One pass: a count per length."""
    counts = np.bincount(lengths, minlength=MAX_CODE_LENGTH + 1).tolist()
    used = [n for n in range(1, len(counts)) if counts[n]]
    if not used:
        return 0, 0, 0
    units = sum(counts[n] << (MAX_CODE_LENGTH - n) for n in used)
    return used[0], used[-1], units


def kraft_ok(lengths: np.ndarray) -> bool:
    """Whether the lengths can form a prefix code (Kraft sum at most 1)."""
    return length_stats(lengths)[2] <= 1 << MAX_CODE_LENGTH


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """DEFLATE-style canonical code values for the given lengths (0 where unused): the
    first code of each length as in RFC 1951 3.2.2, plus each symbol's rank among the
    symbols of its length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    per_length = np.bincount(lengths, minlength=MAX_CODE_LENGTH + 1).tolist()
    first = [0] * len(per_length)
    code = 0
    for n in range(1, len(per_length)):
        code = (code + (per_length[n - 1] if n > 1 else 0)) << 1
        first[n] = code
    starts = np.cumsum([0] + per_length[:-1])  # where each length begins in sorted order
    order = np.lexsort((np.arange(lengths.size), lengths))
    ranked = lengths[order]
    codes = np.zeros(lengths.size, dtype=np.int64)
    codes[order] = np.array(first)[ranked] + np.arange(lengths.size) - starts[ranked]
    codes[lengths == 0] = 0
    return codes


_REVERSED_BYTE = np.array([int(f"{v:08b}"[::-1], 2) for v in range(256)], dtype=np.uint64)


def _reversed_codes(lengths: np.ndarray) -> np.ndarray:
    """Each symbol's canonical codeword with its bits reversed, as uint64: the value whose
    LSB-first bits are the codeword MSB first, ready to OR into an LSB-first stream."""
    values = canonical_codes(lengths).astype(np.uint64)  # < 2^15
    reversed16 = (_REVERSED_BYTE[values & np.uint64(0xFF)] << np.uint64(8)) | _REVERSED_BYTE[
        values >> np.uint64(8)
    ]
    return reversed16 >> (np.uint64(16) - np.asarray(lengths).astype(np.uint64))


PAIR_TABLE_MIN = 1 << 15  # symbols from which encode_symbols looks up pairs of them


def chunk_starts(symbols: np.ndarray, lengths: np.ndarray, chunk: int) -> np.ndarray:
    """The chunk index of spec 5.2: the stream bit at which each run of ``chunk`` symbols
    after the first begins (the running sum of the codeword lengths), as int64."""
    per_symbol = np.zeros(256, dtype=np.uint8)
    per_symbol[: lengths.size] = lengths
    bits = np.take(per_symbol, np.asarray(symbols, dtype=np.uint8))
    if bits.size <= chunk:
        return np.zeros(0, dtype=np.int64)
    sums = np.add.reduceat(bits, np.arange(0, bits.size, chunk), dtype=np.int64)
    return np.cumsum(sums[:-1])


def encode_symbols(
    symbols: np.ndarray,
    lengths: np.ndarray,
    counts: np.ndarray | None = None,
    chunk: int = 0,
    starts: np.ndarray | None = None,
) -> np.ndarray:
    """Write each symbol's canonical codeword, MSB first, into an LSB-first byte stream.
    With ``chunk``, the stream's chunk index (:func:`chunk_starts`) goes into ``starts``,
    an int64 array of ``ceil(len(symbols) / chunk) - 1`` entries.

    Vectorized, in blocks of :data:`PAIR_BLOCK` symbols: one lookup in a 64 Ki table gives the
    bit-reversed codewords of two symbols at once (at most 30 bits), two of those make a
    run of four symbols (at most 60 bits, one uint64), and each run lands at its bit
    offset in at most two 64-bit words. Runs sharing a word hold disjoint bits, so the
    word is their sum: a difference of prefix sums (exact modulo 2^64). ``counts``, the
    symbols' histogram, is computed when not given."""
    lengths = np.asarray(lengths)
    symbols = np.asarray(symbols, dtype=np.uint8).reshape(-1)
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if counts is None:
        counts = np.bincount(symbols, minlength=lengths.size)
    if counts.size > lengths.size or not lengths[counts[: lengths.size] > 0].all():
        raise ValueError("a symbol to encode has no codeword (code length 0)")
    total = int(counts @ lengths.astype(np.int64))
    if kernels.native is not None:
        out = np.empty(-(-total // 8), dtype=np.uint8)
        index = (chunk, starts) if chunk else ()
        kernels.native.huffman_encode(symbols, np.ascontiguousarray(lengths, np.uint8), out, *index)
        return out
    if chunk:
        starts[:] = chunk_starts(symbols, lengths, chunk)
    code = np.zeros(256, dtype=np.uint64)
    size = np.zeros(256, dtype=np.uint64)
    code[: lengths.size] = _reversed_codes(lengths)
    size[: lengths.size] = lengths
    words = np.zeros(total // 64 + 2, dtype="<u8")
    # runs of four symbols, unless the stream is too short to pay for the pair tables
    paired = symbols.size // 4 * 4 if symbols.size >= PAIR_TABLE_MIN else 0
    base = 0
    if paired:
        # pair index: first | second << 8, so the first symbol cycles fastest
        first_code, first_size = np.tile(code, 256), np.tile(size, 256)
        pair_code = first_code | (np.repeat(code, 256) << first_size)
        pair_size = first_size + np.repeat(size, 256)
    for start in range(0, paired, PAIR_BLOCK):
        pairs = symbols[start : min(paired, start + PAIR_BLOCK)].view("<u2")
        # first and second pair of each run of four, as contiguous indices; mode="clip"
        # (every pair is in range) skips the bounds check
        first, second = pairs[0::2].astype(np.intp), pairs[1::2].astype(np.intp)
        run = np.take(pair_code, first, mode="clip")
        shift = np.take(pair_size, first, mode="clip")
        run |= np.take(pair_code, second, mode="clip") << shift
        shift += np.take(pair_size, second, mode="clip")
        offsets = np.cumsum(shift)
        offsets -= shift
        offsets += np.uint64(base)
        base += int(shift.sum())
        _place(words, run, offsets)
    rest = symbols[paired:]  # one codeword per run: a short stream, or at most three left
    if rest.size:
        shift = np.take(size, rest)
        offsets = np.cumsum(shift)
        offsets -= shift
        offsets += np.uint64(base)
        _place(words, np.take(code, rest), offsets)
    return words.view(np.uint8)[: -(-total // 8)].copy()


def _place(words: np.ndarray, run: np.ndarray, offsets: np.ndarray) -> None:
    """OR runs of at most 63 bits into ``words`` at increasing bit offsets."""
    word = offsets >> np.uint64(6)
    shift = offsets & np.uint64(63)
    last = np.append(np.flatnonzero(word[1:] != word[:-1]), word.size - 1)
    where = word[last].astype(np.intp)
    for part, to in (
        (run << shift, where),
        ((run >> np.uint64(1)) >> (np.uint64(63) - shift), where + 1),  # past the word
    ):
        sums = np.cumsum(part)[last]
        sums[1:] -= sums[:-1].copy()
        words[to] |= sums  # |=: a word may also hold bits placed by another call


def has_spare_codeword(lengths: np.ndarray) -> bool:
    """Whether exactly one codeword of the greatest length is unused (what
    :func:`huffman_lengths` writes), so :func:`deflate_prefix` applies."""
    _, longest, units = length_stats(lengths)
    return longest > 0 and units == (1 << MAX_CODE_LENGTH) - (1 << (MAX_CODE_LENGTH - longest))


def _deflate_header() -> bytes:
    """The fixed part of :func:`deflate_prefix`: 104 bits, exactly 13 bytes."""
    bits: list[int] = []

    def put(value: int, width: int) -> None:  # header fields go in LSB first
        bits.extend((value >> i) & 1 for i in range(width))

    for _ in range(3):
        put(0, 1)  # BFINAL = 0
        put(1, 2)  # BTYPE = fixed Huffman
        put(0, 7)  # end of block: code 0000000
    put(1, 1)  # BFINAL
    put(2, 2)  # BTYPE = dynamic Huffman
    put(257 - 257, 5)  # HLIT: 257 literal/length codes
    put(1 - 1, 5)  # HDIST: 1 distance code
    put(19 - 4, 4)  # HCLEN: all 19 code-length codes
    for symbol in (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15):
        put(4 if symbol < 16 else 0, 3)  # code-length code: 4 bits for each of 0..15
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes()


_DEFLATE_HEADER = _deflate_header()
# A code-length codeword is the 4-bit length itself, written MSB first: bit-reversed nibble.
_NIBBLE_REVERSED = bytes(int(f"{v:04b}"[::-1], 2) for v in range(16)) + bytes(240)


def deflate_prefix(lengths: np.ndarray) -> bytes:
    """Bytes that turn a stream coded with ``lengths`` (which must have a spare codeword)
    into a raw DEFLATE stream (RFC 1951) of the symbols as literal bytes.

    Three empty fixed-Huffman blocks (10 bits each) bring the total to a whole number of
    bytes; then the final dynamic block's header declares 257 literal/length codes (the
    symbols, then end-of-block on the spare codeword, which DEFLATE's canonical order puts
    last), one unused distance code, and a code-length code of 4 bits for each of 0..15,
    followed by the 258 code lengths."""
    table = np.zeros(258, dtype=np.uint8)  # 256 literals, end-of-block, one distance code
    table[: lengths.size] = lengths
    table[256] = lengths.max()
    nibbles = np.frombuffer(table.tobytes().translate(_NIBBLE_REVERSED), dtype=np.uint8)
    return _DEFLATE_HEADER + (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def decode_symbols(
    data: bytes,
    lengths: np.ndarray,
    count: int,
    out: np.ndarray | None = None,
    chunk: int | None = None,
    starts: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Decode ``count`` symbols; returns them and the number of stream bits they used.
    ``out``, a writable uint8 array of ``count`` elements, receives the symbols where the
    compiled decoder runs. ``chunk`` and ``starts`` are the stream's chunk index, if it
    has one (spec 5.2): the compiled decoder then decodes several chunks at once, and
    every route checks that each chunk begins where ``starts`` says.

    Raises ValueError when the stream ends early, holds a bit pattern that is no code, or
    does not match its chunk index. Through the DEFLATE route the returned count is exact
    only for a stream that fills its bytes with zero padding (fewer than 8 bits); any
    other raises ValueError there.
    """
    if count == 0:
        return np.zeros(0, dtype=np.uint8), 0
    if kernels.native is not None:
        out = np.empty(count, dtype=np.uint8) if out is None else out
        lengths = np.ascontiguousarray(lengths, dtype=np.uint8)
        if chunk is None:
            return out, kernels.native.huffman_decode(data, lengths, count, out)
        lanes = lanes_pay(len(data), count)
        return out, kernels.native.huffman_decode_chunks(
            data, lengths, count, *_index_args(chunk, starts, count), out, lanes
        )
    symbols, used = _decode_numpy(data, lengths, count)
    if chunk is not None and not np.array_equal(chunk_starts(symbols, lengths, chunk), starts):
        raise ValueError("does not begin a chunk where chunk_starts says")
    return symbols, used


_NO_STARTS = np.zeros(0, dtype=np.int64)  # the chunk index of a stream without one


def _index_args(chunk: int, starts, count: int) -> tuple[int, np.ndarray]:
    """A chunk index as the compiled kernels take it: a chunk of at most ``count`` (one
    chunk either way; a larger one would not fit a C integer) and int64 starts."""
    return min(chunk, count), np.ascontiguousarray(starts, dtype=np.int64)


def index_chunk(count: int, nbytes: int) -> int | None:
    """The chunk the writer indexes a stream of ``count`` symbols in ``nbytes`` with (spec
    5.2), None for none: none under :data:`CHUNK_INDEX_MIN` symbols, nor under
    :data:`CHUNK_INDEX_ALWAYS` where the codewords are too short for four-lane decoding to
    pay (:func:`lanes_pay`). Chunks of at most :data:`CHUNK_SYMBOLS`, as many whole ones
    as a multiple of :data:`LANES` (in streams under 2^27 symbols), so that four-lane
    decoding covers all but fewer symbols than there are chunks."""
    if count < CHUNK_INDEX_MIN:
        return None
    if count < CHUNK_INDEX_ALWAYS and not lanes_pay(nbytes, count):
        return None
    rounds = -(-count // (LANES * CHUNK_SYMBOLS))  # steps of four chunks of at most 16384
    return count // (LANES * rounds)


def lanes_pay(nbytes: int, count: int) -> bool:
    """Whether a stream of ``count`` symbols in ``nbytes`` decodes faster four chunks side by
    side (its codewords average :data:`LANES_MIN_BITS` or more)."""
    return 8 * nbytes >= LANES_MIN_BITS * count


def _decode_numpy(data: bytes, lengths: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """:func:`decode_symbols` without the compiled kernels (``count`` > 0)."""
    if has_spare_codeword(lengths):
        return _inflate(data, lengths, count)
    try:
        symbols = _bitarray_decode(data, lengths, count)
    except ValueError:
        raise ValueError("ends early or holds an invalid codeword") from None
    per_symbol = np.zeros(256, dtype=np.int64)
    per_symbol[: lengths.size] = lengths
    used_bits = int(_histogram(symbols) @ per_symbol)
    if used_bits > 8 * len(data):
        raise ValueError("ends early")
    return symbols, used_bits


def decode_values(
    data: bytes,
    lengths: np.ndarray,
    count: int,
    scale,
    zero_point,
    out: np.ndarray,
    chunk: int | None = None,
    starts: np.ndarray | None = None,
    *,
    row: int = 0,
    run: int = 0,
) -> int:
    """:func:`decode_symbols` for symbols of one code each, writing each code's float32
    value (spec 6.1, run by run as :func:`qpack.schemes.dequantize` with ``row`` and
    ``run``) into ``out`` instead of the symbol; returns the used bits. The chunk index,
    if any, is checked, not used to decode. Compiled kernels only."""
    index = (0, _NO_STARTS) if chunk is None or count == 0 else _index_args(chunk, starts, count)
    return kernels.native.huffman_dequantize(
        data,
        np.ascontiguousarray(lengths, dtype=np.uint8),
        count,
        np.ascontiguousarray(scale, dtype=np.float32),
        np.ascontiguousarray(zero_point, dtype=np.float32),
        out,
        *index,
        row,
        run,
    )


def _histogram(symbols: np.ndarray) -> np.ndarray:
    """Counts of the 256 byte values, taken two bytes at a time (half the work of
    ``np.bincount`` on bytes), or by the compiled kernel."""
    if kernels.native is not None:
        counts = np.zeros(256, dtype=np.int64)
        kernels.native.histogram(np.ascontiguousarray(symbols, dtype=np.uint8), counts)
        return counts
    if symbols.size < 1 << 18:  # the 64 Ki table below would cost more than it saves
        return np.bincount(symbols, minlength=256)
    pairs = symbols[: symbols.size // 2 * 2].view("<u2")
    counts = np.bincount(pairs, minlength=1 << 16).reshape(256, 256)
    total = counts.sum(axis=0) + counts.sum(axis=1)
    if symbols.size % 2:
        total[symbols[-1]] += 1
    return total


# After the stream: 8 zero bits, then ones. Whatever the padding p (0..7 zero bits), the
# inflater decodes the p + 8 zeros as a short, predictable tail of symbols and then meets
# end-of-block, the all-ones spare codeword; the tail tells p, hence the used bit count,
# without summing the code lengths of every symbol. Eight bytes of ones also cover ISA-L's
# read-ahead.
_TRAILER = b"\x00" + b"\xff" * 8
_TAIL_MAX = 17  # at most 15 all-zero codewords (for p + 8 <= 15 bits) and one more


def _inflate(data: bytes, lengths: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Symbols and used bits of a stream whose lengths have a spare codeword."""
    inflater = decompressobj(-15)
    try:
        out = inflater.decompress(
            b"".join((deflate_prefix(lengths), data, _TRAILER)), count + _TAIL_MAX
        )
    except ERRORS:  # a pattern that is no codeword (only with a bad prefix)
        raise ValueError("holds an invalid codeword") from None
    if len(out) < count:
        raise ValueError("ends early")
    if not inflater.eof:  # more symbols than expected
        raise ValueError("does not end in its last byte")
    zeros, ones = _tail_bits(lengths, out[count:])
    padding = zeros - 8
    if not 0 <= padding < 8:
        raise ValueError("does not end in its last byte with zero padding")
    # end-of-block must come from the trailer's ones, not from stray bits in the data
    end = 8 * len(data) + 8 + ones + int(lengths.max())
    if len(inflater.unused_data) != len(data) + len(_TRAILER) - -(-end // 8):
        raise ValueError("does not end in its last byte")
    return np.frombuffer(out, dtype=np.uint8, count=count), 8 * len(data) - padding


def _tail_bits(lengths: np.ndarray, tail: bytes) -> tuple[int, int]:
    """The zero bits and then one bits (before end-of-block) that decode to ``tail``:
    a run of the all-zero codeword, then at most one codeword of the form 0...01...1.
    (-1, 0) when the tail has another shape."""
    shortest = int(lengths[lengths > 0].min())
    first = int(np.argmax(lengths == shortest))  # the all-zero codeword
    run = len(tail) - len(tail.lstrip(bytes([first])))
    rest = tail[run:]
    if not rest:
        return run * shortest, 0
    if len(rest) > 1:
        return -1, 0
    value, width = _codeword(lengths, rest[0])
    ones = value.bit_length()
    if value != (1 << ones) - 1 or ones == width:  # not 0...01...1 (all ones is end-of-block)
        return -1, 0
    return run * shortest + width - ones, ones


def _codeword(lengths: np.ndarray, symbol: int) -> tuple[int, int]:
    """Canonical codeword value and length of one symbol."""
    return int(canonical_codes(lengths)[symbol]), int(lengths[symbol])


def _bitarray_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    from bitarray import bitarray
    from bitarray.util import canonical_decode

    stream = bitarray(endian="little")
    stream.frombytes(bytes(data))
    per_length = [int(np.count_nonzero(lengths == n)) for n in range(MAX_CODE_LENGTH + 1)]
    per_length[0] = 0
    # canonical order: by length, then by symbol value
    order = np.lexsort((np.arange(lengths.size), lengths))
    ordered = [int(s) for s in order if lengths[s] > 0]
    return np.fromiter(canonical_decode(stream, per_length, ordered), np.uint8, count)


def pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths (0..15) as 4-bit nibbles, first symbol in the low nibble."""
    return pack_codes(lengths, 4).tobytes()


def unpack_lengths(data: bytes, alphabet: int) -> np.ndarray:
    if len(data) != packed_size(alphabet, 4):
        raise ValueError(f"code_lengths must be {packed_size(alphabet, 4)} bytes")
    return unpack_codes(data, 4, alphabet)


def entropy_bits(codes: np.ndarray, alphabet: int) -> float:
    """Empirical entropy bound ``n * H(codes)`` in bits."""
    if codes.size == 0:
        return 0.0
    flat = codes.reshape(-1)
    if flat.dtype != np.uint8:
        return _entropy_of_counts(np.bincount(flat, minlength=alphabet))
    # counted a block at a time: np.bincount widens its input to 8 bytes per code, which
    # on a hostile file's decoded codes would be 8x their (already large) size
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, flat.size, PAIR_BLOCK):
        counts += _histogram(flat[start : start + PAIR_BLOCK])
    return _entropy_of_counts(counts)


def stream_bits(symbols_counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits the stream takes for a histogram of symbols under the given lengths."""
    return int((symbols_counts.astype(np.int64) * lengths.astype(np.int64)).sum())


def best_group(codes: np.ndarray, bits: int) -> tuple[int, np.ndarray, int, np.ndarray, np.ndarray]:
    """The group size with the smallest stream plus code length table:
    (group, code lengths, stream bytes, symbols, symbol histogram).

    Each group is first judged by a cheap estimate of its Huffman stream, the larger of
    the histogram's entropy bound and one bit per symbol (no codeword is shorter: for
    low-entropy codes that floor, not the entropy, decides, and it favours larger
    groups); the two best are then coded for real and the smaller stream wins (ties go to
    the smaller group)."""
    hists, symbols = group_histograms(codes, bits)

    def estimate(group: int) -> float:
        hist = hists[group]
        stream = max(_entropy_of_counts(hist), float(hist.sum()))
        return stream / 8 + packed_size(1 << (group * bits), 4)

    finalists = sorted(sorted(hists, key=estimate)[:2])
    best = None
    for group in finalists:
        lengths = huffman_lengths(hists[group])
        stream = math.ceil(stream_bits(hists[group], lengths) / 8)
        size = stream + packed_size(1 << (group * bits), 4)
        if best is None or size < best[0]:
            best = (size, group, lengths, stream)
    _, group, lengths, stream = best
    chosen = symbols[group] if group in symbols else group_codes(codes, bits, group)
    return group, lengths, stream, chosen, hists[group]


def group_histograms(
    codes: np.ndarray, bits: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The symbol histogram of every allowed group size, and the symbols of the sizes it
    had to group. A group's histogram is derived from that of twice the group where there
    is one (a symbol of 2g codes is two symbols of g codes), so the codes are grouped and
    counted once per doubling chain rather than once per size."""
    count = codes.size
    hists: dict[int, np.ndarray] = {}
    symbols: dict[int, np.ndarray] = {}
    for group in sorted(group_choices(bits), reverse=True):
        alphabet = 1 << (group * bits)
        if 2 * group in hists:
            pairs = hists[2 * group].reshape(alphabet, alphabet)  # [second][first]
            hist = pairs.sum(axis=0) + pairs.sum(axis=1)
            if 2 * -(-count // (2 * group)) > -(-count // group):
                hist[0] -= 1  # the second half of the last run was all padding
        else:
            symbols[group] = group_codes(codes, bits, group)
            hist = _histogram(symbols[group])[:alphabet]
        hists[group] = hist
    return dict(sorted(hists.items())), symbols


def _entropy_of_counts(counts: np.ndarray) -> float:
    """``n * H`` in bits for a histogram."""
    used = counts[counts > 0].astype(np.float64)
    return float(-(used * np.log2(used / used.sum())).sum()) if used.size > 1 else 0.0

"""Canonical Huffman coding of quantized codes (spec/FORMAT.md section 5.2).

Codes are grouped ``group`` at a time into symbols (``symbol = sum(code_j << (j * bits))``,
so a symbol is at most 8 bits wide and the alphabet has at most 256 entries). Symbols are
coded with a canonical Huffman code of lengths 1..15 (DEFLATE's assignment: shorter codes
first, then increasing symbol value), written most-significant bit first into the same
LSB-first bit stream as fixed-width packing, and zero-padded to a whole byte.

Speed: encoding is vectorized numpy. For decoding, the reference writer leaves exactly one
codeword of the greatest length unused (:func:`huffman_lengths`); giving that codeword to
DEFLATE's end-of-block symbol makes the stream the body of a DEFLATE dynamic block, so
zlib's C inflater decodes it (:func:`deflate_prefix`). Streams from other writers go
through bitarray's canonical decoder instead; both give the same symbols and errors.
"""

from __future__ import annotations

import heapq
import math
import zlib

import numpy as np

from .bitpack import BLOCK, pack_codes, packed_size, unpack_codes

__all__ = [
    "MAX_CODE_LENGTH",
    "group_choices",
    "group_codes",
    "ungroup_symbols",
    "huffman_lengths",
    "canonical_codes",
    "kraft_ok",
    "encode_symbols",
    "decode_symbols",
    "pack_lengths",
    "unpack_lengths",
    "entropy_bits",
]

MAX_CODE_LENGTH = 15


def group_choices(bits: int) -> range:
    """Group sizes allowed with ``bits``-bit codes: symbols of at most 8 bits."""
    return range(1, 8 // bits + 1)


def group_codes(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Combine runs of ``group`` codes into one symbol each (zero codes pad the last run)."""
    if group == 1:
        return codes.astype(np.uint8, copy=False)
    count = -(-codes.size // group)
    padded = np.zeros(count * group, dtype=np.uint16)
    padded[: codes.size] = codes
    runs = padded.reshape(count, group)
    symbols = runs[:, 0].copy()
    for j in range(1, group):
        symbols |= runs[:, j] << (j * bits)
    return symbols.astype(np.uint8)


def ungroup_symbols(symbols: np.ndarray, bits: int, group: int, count: int) -> np.ndarray:
    """Split symbols back into ``count`` codes; the padding codes are returned separately
    as the second value so the caller can check they are zero."""
    if group == 1:
        return symbols[:count], symbols[count:]
    mask = (1 << bits) - 1
    shifts = (np.arange(group, dtype=np.uint8) * bits)[None, :]
    codes = ((symbols[:, None] >> shifts) & mask).astype(np.uint8).reshape(-1)
    return codes[:count], codes[count:]


def huffman_lengths(counts: np.ndarray, limit: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Code length of every symbol (0 for unused ones), at most ``limit`` bits, leaving
    exactly one codeword of the greatest length unused (see the module docstring).

    Deterministic: ties are broken by symbol value. A single used symbol gets length 1.
    The tree is built for ``limit - 1`` bits, then the last symbol in canonical order (the
    largest of the longest) moves one level down, beside the spare codeword. Lengths over
    the limit are avoided by halving the counts (keeping them >= 1) and rebuilding, which
    costs next to nothing on real data.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    weights = counts[used].copy()
    while True:
        depth = _tree_depths(weights)
        if depth.max() < limit:
            lengths[used] = depth
            last = np.flatnonzero(lengths == depth.max())[-1]
            lengths[last] += 1
            return lengths
        weights = (weights + 1) // 2


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over ``weights`` (all > 0, at least two)."""
    heap = [(int(w), i, (i,)) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    depth = np.zeros(len(weights), dtype=np.int64)
    order = len(weights)
    while len(heap) > 1:
        w1, _, leaves1 = heapq.heappop(heap)
        w2, _, leaves2 = heapq.heappop(heap)
        merged = leaves1 + leaves2
        depth[list(merged)] += 1
        heapq.heappush(heap, (w1 + w2, order, merged))
        order += 1
    return depth


def kraft_ok(lengths: np.ndarray) -> bool:
    """Whether the lengths can form a prefix code (Kraft sum at most 1)."""
    used = lengths[lengths > 0].astype(np.int64)
    return int(np.sum(1 << (MAX_CODE_LENGTH - used))) <= 1 << MAX_CODE_LENGTH


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """DEFLATE-style canonical code values for the given lengths (0 where unused)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    code = 0
    previous = 0
    for length in range(1, MAX_CODE_LENGTH + 1):
        symbols = np.flatnonzero(lengths == length)
        code <<= length - previous
        previous = length
        codes[symbols] = code + np.arange(symbols.size)
        code += symbols.size
    return codes


def _reversed_codes(lengths: np.ndarray) -> np.ndarray:
    """Each symbol's canonical codeword with its bits reversed, as uint64: the value whose
    LSB-first bits are the codeword MSB first, ready to OR into an LSB-first stream."""
    values = canonical_codes(lengths)
    reversed_ = np.zeros(lengths.size, dtype=np.uint64)
    for bit in range(MAX_CODE_LENGTH):
        has = lengths > bit
        top = (values >> np.maximum(lengths.astype(np.int64) - 1 - bit, 0)) & 1
        reversed_[has] |= (top[has] << bit).astype(np.uint64)
    return reversed_


def encode_symbols(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Write each symbol's canonical codeword, MSB first, into an LSB-first byte stream.

    Vectorized, in blocks of :data:`~qpack.bitpack.BLOCK` symbols: codewords are merged
    four at a time (at most 60 bits, one uint64), each merged run lands at its bit offset
    in at most two 64-bit words, and runs sharing a word are OR-ed together with
    ``reduceat`` (offsets only grow, so they are adjacent)."""
    lengths = np.asarray(lengths)
    symbols = np.asarray(symbols, dtype=np.uint8).reshape(-1)
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint8)
    counts = np.bincount(symbols, minlength=lengths.size)
    if counts.size > lengths.size or not lengths[counts[: lengths.size] > 0].all():
        raise ValueError("a symbol to encode has no codeword (code length 0)")
    total = int(counts @ lengths.astype(np.int64))
    # one lookup per symbol: bit-reversed codeword in the low 16 bits, its length above
    table = _reversed_codes(lengths) | (lengths.astype(np.uint64) << np.uint64(16))
    words = np.zeros(total // 64 + 2, dtype="<u8")
    base = 0
    for first in range(0, symbols.size, BLOCK):
        block = symbols[first : first + BLOCK]
        quads = -(-block.size // 4)
        entry = np.zeros(quads * 4, dtype=np.uint64)  # padding entries are 0 bits long
        entry[: block.size] = np.take(table, block.astype(np.intp))
        entry = entry.reshape(quads, 4)
        size = entry >> np.uint64(16)
        code = entry & np.uint64(0xFFFF)
        run = code[:, 0].copy()
        shift = size[:, 0].copy()
        for j in range(1, 4):
            run |= code[:, j] << shift
            shift += size[:, j]
        start = np.cumsum(shift)
        start -= shift
        start += np.uint64(base)
        base += int(shift.sum())
        word = start >> np.uint64(6)
        offset = start & np.uint64(63)
        # Runs landing in the same word hold disjoint bits, so their OR is their sum, and
        # a word's sum is a difference of prefix sums (exact modulo 2^64).
        last = np.append(np.flatnonzero(word[1:] != word[:-1]), word.size - 1)
        where = word[last].astype(np.intp)
        for part, to in (
            (run << offset, where),
            ((run >> np.uint64(1)) >> (np.uint64(63) - offset), where + 1),  # past the word
        ):
            sums = np.cumsum(part)[last]
            sums[1:] -= sums[:-1].copy()
            words[to] |= sums  # |=: the first and last words are shared with other blocks
    return words.view(np.uint8)[: -(-total // 8)].copy()


def has_spare_codeword(lengths: np.ndarray) -> bool:
    """Whether exactly one codeword of the greatest length is unused (what
    :func:`huffman_lengths` writes), so :func:`deflate_prefix` applies."""
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 0:
        return False
    longest = int(used.max())
    kraft = int(np.sum(1 << (longest - used)))  # in units of 2^-longest
    return kraft == (1 << longest) - 1


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
_NIBBLE_REVERSED = np.array([int(f"{v:04b}"[::-1], 2) for v in range(16)], dtype=np.uint8)


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
    return _DEFLATE_HEADER + pack_codes(_NIBBLE_REVERSED[table], 4).tobytes()


def decode_symbols(data: bytes, lengths: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` symbols; returns them and the number of stream bits they used.

    Raises ValueError when the stream ends early or holds a bit pattern that is no code.
    """
    if count == 0:
        return np.zeros(0, dtype=np.uint8), 0
    if has_spare_codeword(lengths):
        symbols = _inflate(data, lengths, count)
    else:
        symbols = _bitarray_decode(data, lengths, count)
    used_bits = int(np.bincount(symbols, minlength=lengths.size) @ lengths.astype(np.int64))
    return symbols, used_bits


def _inflate(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    try:
        out = zlib.decompressobj(-15).decompress(deflate_prefix(lengths) + data, count)
    except zlib.error:  # a pattern that is no codeword
        raise ValueError("invalid codeword") from None
    if len(out) < count:  # ran out of bytes, or met the spare codeword (end of block)
        raise ValueError("stream ended early")
    return np.frombuffer(out, dtype=np.uint8)


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
    counts = np.bincount(codes.reshape(-1), minlength=alphabet).astype(np.float64)
    p = counts[counts > 0] / codes.size
    return float(-(counts[counts > 0] * np.log2(p)).sum()) if p.size > 1 else 0.0


def stream_bits(symbols_counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits the stream takes for a histogram of symbols under the given lengths."""
    return int((symbols_counts.astype(np.int64) * lengths.astype(np.int64)).sum())


def best_group(codes: np.ndarray, bits: int) -> tuple[int, np.ndarray, int]:
    """The group size giving the smallest stream plus code length table:
    (group, code lengths, stream bytes)."""
    best = None
    for group in group_choices(bits):
        symbols = group_codes(codes, bits, group)
        alphabet = 1 << (group * bits)
        hist = np.bincount(symbols, minlength=alphabet)
        lengths = huffman_lengths(hist)
        stream = math.ceil(stream_bits(hist, lengths) / 8)
        if best is None or stream + packed_size(alphabet, 4) < best[3]:
            best = (group, lengths, stream, stream + packed_size(alphabet, 4))
    return best[:3]

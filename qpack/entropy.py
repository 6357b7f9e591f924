"""Canonical Huffman coding of quantized codes (spec/FORMAT.md section 5.2).

Codes are grouped ``group`` at a time into symbols (``symbol = sum(code_j << (j * bits))``,
so a symbol is at most 8 bits wide and the alphabet has at most 256 entries). Symbols are
coded with a canonical Huffman code of lengths 1..15 (DEFLATE's assignment: shorter codes
first, then increasing symbol value), written most-significant bit first into the same
LSB-first bit stream as fixed-width packing, and zero-padded to a whole byte.

Encoding is vectorized numpy; decoding uses bitarray's C decoder.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from .bitpack import pack_codes, packed_size, unpack_codes

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
    """Code length of every symbol (0 for unused ones), at most ``limit`` bits.

    Deterministic: ties are broken by symbol value. A single used symbol gets length 1.
    Lengths over the limit are avoided by halving the counts (keeping them >= 1) and
    rebuilding, which costs next to nothing on real data.
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
        if depth.max() <= limit:
            lengths[used] = depth
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


def encode_symbols(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Write each symbol's canonical codeword, MSB first, into an LSB-first byte stream."""
    values = canonical_codes(lengths)
    sym_len = lengths.astype(np.int64)[symbols]
    if symbols.size and not sym_len.min():
        raise ValueError("a symbol to encode has no codeword (code length 0)")
    sym_code = values[symbols]
    total = int(sym_len.sum())
    starts = np.cumsum(sym_len) - sym_len
    stream = np.zeros(total, dtype=np.uint8)
    for k in range(int(sym_len.max(initial=0))):
        has = sym_len > k
        bit = (sym_code[has] >> (sym_len[has] - 1 - k)) & 1
        stream[starts[has] + k] = bit
    return np.packbits(stream, bitorder="little")


def decode_symbols(data: bytes, lengths: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` symbols; returns them and the number of stream bits they used.

    Raises ValueError when the stream ends early or holds a bit pattern that is no code.
    """
    from bitarray import bitarray
    from bitarray.util import canonical_decode

    if count == 0:
        return np.zeros(0, dtype=np.uint8), 0
    stream = bitarray(endian="little")
    stream.frombytes(bytes(data))
    per_length = [int(np.count_nonzero(lengths == n)) for n in range(MAX_CODE_LENGTH + 1)]
    per_length[0] = 0
    # canonical order: by length, then by symbol value
    order = np.lexsort((np.arange(lengths.size), lengths))
    ordered = [int(s) for s in order if lengths[s] > 0]
    symbols = np.fromiter(canonical_decode(stream, per_length, ordered), np.uint8, count)
    used_bits = int(lengths.astype(np.int64)[symbols].sum())
    return symbols, used_bits


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

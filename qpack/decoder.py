"""Decoding one tensor's checked bytes to values (spec sections 5 and 6), and the checks
on the way: padding bits, Huffman stream bounds, values that overflow float32.

:func:`decode_payload` picks the route: the compiled kernels where built (codes straight
from the payload to float32), else numpy (unpack or Huffman-decode the codes, then
dequantize). Both give the same bits. Reading the bytes and checking their CRC is the
reader's part (:mod:`qpack.reader`), and so is splitting a Huffman stream with a chunk
index into ranges decoded on several threads (:func:`split_ranges`, :func:`decode_range`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from itertools import pairwise

import numpy as np

from . import errors as E
from . import kernels
from .bitpack import padding_is_zero, unpack_codes
from .container import HALF, HUFFMAN, PACKED, RAW, TensorEntry
from .dtypes import NUMPY_DTYPES
from .entropy import decode_symbols, decode_values, lanes_pay, ungroup_symbols
from .schemes import decodes_finite, dequantize, dequantize_stream

__all__ = [
    "Dequantizer",
    "check_decodes_finite",
    "check_packed_padding",
    "check_raw",
    "decode_codes",
    "decode_codes_values",
    "decode_payload",
    "decode_range",
    "range_symbols",
    "scratch",
    "scratch_scope",
    "split_ranges",
]

Dequantizer = Callable[[TensorEntry, np.ndarray, "np.ndarray | None"], np.ndarray]

# Per-thread buffers reused for payload bytes and codes: fresh memory costs a page fault per
# 4 KiB, which is as much as decoding it. Larger tensors get their own buffers.
SCRATCH_MAX = 1 << 24


_scratch = threading.local()


def scratch(slot: str, size: int) -> np.ndarray | None:
    """This thread's reusable uint8 buffer ``slot``, at least ``size`` bytes (None when
    ``size`` is over :data:`SCRATCH_MAX`). Nothing returned to a caller may alias it."""
    if size > SCRATCH_MAX:
        return None
    buffer = getattr(_scratch, slot, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(max(size, 1 << 16), dtype=np.uint8)
        setattr(_scratch, slot, buffer)
    return buffer[:size]


@contextlib.contextmanager
def scratch_scope() -> Iterator[None]:
    """Drop this thread's scratch buffers on leaving, so a long-lived thread (the caller's)
    does not keep them after a load. Worker threads drop theirs when they end."""
    try:
        yield
    finally:
        _scratch.__dict__.clear()


def decode_codes_values(
    entry: TensorEntry, codes: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """The float32 values that codes decode to (spec section 6.1), in the tensor's shape
    (written into ``out``, a flat float32 array of ``numel`` elements, when given)."""
    row, run = entry.runs
    return dequantize(codes, entry.scale, entry.zero_point, out, row=row, run=run).reshape(
        entry.shape
    )


def decode_payload(
    entry: TensorEntry,
    data: bytes | memoryview,
    path=None,
    out: np.ndarray | None = None,
    dequant: Dequantizer | None = None,
) -> np.ndarray:
    """Turn one tensor's checked bytes into an array of its shape (decoded into ``out``, a
    flat array as described in :meth:`Reader.arrays`, when given). ``dequant(entry, codes,
    out)``, if given, does the last step instead of :func:`decode_codes_values`: the same
    values by other means (e.g. torch's multithreaded kernels); the compiled kernels, where
    built, take its place: they read the codes straight from the payload."""
    if entry.storage in (RAW, HALF):  # the stored elements, or binary16 widened exactly
        check_raw(entry, data, path)
        half = entry.storage == HALF
        stored = np.frombuffer(data, dtype="<f2" if half else NUMPY_DTYPES[entry.dtype])
        if out is None:
            out = stored.astype(np.float32 if half else stored.dtype.newbyteorder("="))
        else:
            out[...] = stored
        return out.reshape(entry.shape)
    check_decodes_finite(entry, path)
    if kernels.native is not None:
        return _native_values(entry, data, path, out)
    # group 1: the symbols are the codes, and the plain dequantizer is faster than a lookup
    if entry.storage == HUFFMAN and entry.group > 1:
        if entry.scale.size == 1:
            return _huffman_values(entry, data, path, out)
        return _huffman_row_blocks(entry, data, path, out)
    # only the fixed-width unpacker writes codes into a buffer of ours
    unpacked = entry.storage == PACKED and entry.bits < 8
    codes = decode_codes(entry, data, path, scratch("codes", entry.numel) if unpacked else None)
    return (dequant or decode_codes_values)(entry, codes, out)


def decode_codes(
    entry: TensorEntry, data: bytes | memoryview, path=None, out: np.ndarray | None = None
) -> np.ndarray:
    """The flat integer codes of a quantized tensor, after checking their padding (into
    ``out``, a uint8 array of ``numel`` elements, where that saves a copy)."""
    if entry.storage == HUFFMAN:
        return _huffman_codes(entry, data, path)
    return _packed_codes(entry, data, path, out)


def check_raw(entry: TensorEntry, data, path=None) -> None:
    """Reject raw bytes no value of the dtype has (bool bytes other than 0 and 1)."""
    if entry.dtype == "bool" and np.frombuffer(data, dtype=np.uint8).max(initial=0) > 1:
        raise E.DataError("bool bytes must be 0 or 1", path=path, tensor=entry.name)


def check_decodes_finite(entry: TensorEntry, path=None) -> None:
    """Reject a quantized tensor whose scale and zero point overflow float32."""
    if not decodes_finite(entry.bits, entry.scale, entry.zero_point):
        raise E.HeaderError(
            "scale * (code - zero_point) overflows float32", path=path, tensor=entry.name
        )


def check_packed_padding(entry: TensorEntry, data, path=None) -> None:
    """Reject fixed-width codes whose padding bits are not zero."""
    if not padding_is_zero(data, entry.bits, entry.numel):
        raise E.DataError(
            "padding bits after the last code are not zero", path=path, tensor=entry.name
        )


def _packed_codes(entry: TensorEntry, data, path, out: np.ndarray | None) -> np.ndarray:
    check_packed_padding(entry, data, path)
    if entry.bits == 8:  # the bytes are the codes: no copy
        return np.frombuffer(data, dtype=np.uint8, count=entry.numel)
    return unpack_codes(data, entry.bits, entry.numel, out)


def _native_values(entry: TensorEntry, data, path, out: np.ndarray | None) -> np.ndarray:
    """Decode a quantized tensor with the compiled kernels: the packed bytes or the
    Huffman stream go straight to float32 (through a buffer of symbols only where a
    symbol holds several codes), with the checks of the numpy route."""
    if out is None:
        out = np.empty(entry.numel, dtype=np.float32)
    scale, zero = entry.scale, entry.zero_point
    row, run = entry.runs
    if entry.storage == PACKED:
        check_packed_padding(entry, data, path)
        dequantize_stream(data, entry.bits, 0, entry.numel, scale, zero, out, row=row, run=run)
    elif _fused(entry):
        # a symbol is a code: straight to its value (checking any chunk index on the way)
        lengths, chunk, starts = entry.code_lengths, entry.chunk, entry.chunk_starts
        _huffman_stream(
            entry,
            data,
            path,
            lambda n: (
                None,
                decode_values(data, lengths, n, scale, zero, out, chunk, starts, row=row, run=run),
            ),
        )
    else:
        count = -(-entry.numel // entry.group)
        symbols = _huffman_symbols(entry, data, path, scratch("symbols", count))
        dequantize_stream(
            symbols, entry.bits, entry.group, entry.numel, scale, zero, out, row=row, run=run
        )
    return out.reshape(entry.shape)


def _fused(entry: TensorEntry) -> bool:
    """Whether the compiled route decodes a Huffman stream straight to values (a symbol is
    one code, and four-lane decoding of the chunks does not pay), else through a buffer
    of symbols."""
    return entry.group == 1 and not (entry.chunk and lanes_pay(entry.length, entry.numel))


def split_ranges(entry: TensorEntry, pieces: int) -> list[tuple[int, int]]:
    """Up to ``pieces`` ranges ``[first, last)`` of a tensor's symbols, whole chunks of its
    chunk index of about equal size, that :func:`decode_range` decodes independently (on
    several threads); one range, the whole tensor, where the tensor cannot split: no
    Huffman stream with two chunks or more, or no compiled kernels (the numpy route
    decodes a stream through zlib, which starts at a byte, not at a chunk's bit)."""
    huffman = entry.storage == HUFFMAN
    count = -(-entry.numel // entry.group) if huffman else entry.numel
    chunks = -(-count // entry.chunk) if huffman and entry.chunk and kernels.native else 1
    pieces = min(pieces, chunks)
    if pieces < 2:
        return [(0, count)]
    bounds = [k * chunks // pieces * entry.chunk for k in range(pieces)] + [count]
    return list(pairwise(bounds))


def range_symbols(entry: TensorEntry) -> np.ndarray | None:
    """The buffer of symbols that the ranges of a split tensor share (each decodes into
    its own part), or None where its symbols go straight to values."""
    return None if _fused(entry) else np.empty(-(-entry.numel // entry.group), dtype=np.uint8)


def decode_range(
    entry: TensorEntry,
    data,
    path,
    out: np.ndarray,
    symbols: np.ndarray | None,
    first: int,
    last: int,
) -> None:
    """Decode symbols ``[first, last)`` of a Huffman-coded tensor, a range from
    :func:`split_ranges`, to their codes' values in ``out`` (the whole tensor's flat
    float32 output) by the compiled kernels, through ``symbols`` (from
    :func:`range_symbols`). The checks are those of the whole stream's decoding that fall
    in the range: its chunks begin where the index says, the one after its end included;
    the range that ends the stream makes the end checks. So the first range in order that
    fails fails as the whole decoding would, and all pass only where it would. The caller
    checks the scale first (:func:`check_decodes_finite`), as :func:`decode_payload`."""
    native, count, group = kernels.native, -(-entry.numel // entry.group), entry.group
    lengths = np.ascontiguousarray(entry.code_lengths, dtype=np.uint8)
    scale = np.ascontiguousarray(entry.scale, dtype=np.float32)
    zero = np.ascontiguousarray(entry.zero_point, dtype=np.float32)
    row, run = entry.runs
    index = (entry.chunk, entry.chunk_starts)
    if symbols is None:  # straight to values
        decode = native.huffman_dequantize
        args = (data, lengths, count, scale, zero, out, *index, row, run, first, last)
    else:
        decode = native.huffman_decode_chunks
        args = (data, lengths, count, *index, symbols, lanes_pay(entry.length, count), first, last)
    _huffman_stream(entry, data, path, lambda _: (None, decode(*args)), ends=last == count)
    if symbols is None:
        return
    if last == count:
        _check_last_symbol(entry, symbols, path)
    codes = (first * group, min(last * group, entry.numel))
    native.dequantize(symbols, entry.bits, group, entry.numel, scale, zero, out, row, run, *codes)


def _huffman_codes(entry: TensorEntry, data: bytes, path) -> np.ndarray:
    symbols = _huffman_symbols(entry, data, path)
    return ungroup_symbols(symbols, entry.bits, entry.group, entry.numel)


TAKE_BLOCK = 1 << 14


def _huffman_values(entry: TensorEntry, data: bytes, path, out: np.ndarray | None) -> np.ndarray:
    """A Huffman-coded tensor with one scale and zero point, decoded by one table lookup
    per symbol: the table holds the float32 values of all of a symbol's codes, computed
    with the spec's operations, so the values are those of ungrouping then dequantizing."""
    symbols = _huffman_symbols(entry, data, path)
    group, numel = entry.group, entry.numel
    whole, rest = divmod(numel, group)
    alphabet = 1 << (group * entry.bits)
    every = np.arange(alphabet, dtype=np.uint8)
    codes = ungroup_symbols(every, entry.bits, group, alphabet * group)
    table = dequantize(codes, entry.scale, entry.zero_point).reshape(alphabet, group)
    if out is None:
        out = np.empty(numel, dtype=np.float32)
    rows, lookup = out[: whole * group].reshape(whole, group), table
    if group <= 2:  # a symbol's values fill one machine word: a faster take
        word = f"<u{4 * group}"
        lookup, rows = table.view(word).reshape(-1), rows.view(word).reshape(-1)
    # np.take widens indices to intp: blocks keep that copy small enough for malloc to
    # reuse (a fresh one page-faults). mode="clip" (symbols are always in range) spares
    # the temporary copy of `out` that mode="raise" makes.
    for start in range(0, whole, TAKE_BLOCK):
        stop = min(start + TAKE_BLOCK, whole)
        np.take(lookup, symbols[start:stop], axis=0, out=rows[start:stop], mode="clip")
    if rest:
        out[whole * group :] = table[symbols[-1], :rest]
    return out.reshape(entry.shape)


def _huffman_row_blocks(
    entry: TensorEntry, data: bytes, path, out: np.ndarray | None
) -> np.ndarray:
    """A Huffman-coded tensor of several codes a symbol and several affine pairs, ungrouped
    and dequantized a block of rows at a time: the codes of the whole tensor (a byte each,
    and an index each while ungrouping) are never held beside its values, which kept a
    Huffman bomb's decoding above the spec's memory bound (section 7)."""
    symbols = _huffman_symbols(entry, data, path)
    numel, group = entry.numel, entry.group
    if out is None:
        out = np.empty(numel, dtype=np.float32)
    row, run = entry.runs
    rows = (numel // row if row else entry.scale.size) if numel else 0
    length = numel // rows if rows else 0  # codes a row (a channel's, or a run's)
    pairs = -(-row // run) if run else 1  # affine pairs a row
    step = -(-max(1, TAKE_BLOCK // max(length, 1)) // group) * group  # whole symbols
    for first in range(0, rows, step):
        last = min(first + step, rows)
        start, stop = first * length, last * length
        codes = ungroup_symbols(
            symbols[start // group : -(-stop // group)], entry.bits, group, stop - start
        )
        dequantize(
            codes,
            entry.scale[first * pairs : last * pairs],
            entry.zero_point[first * pairs : last * pairs],
            out[start:stop],
            row=row,
            run=run,
        )
    return out.reshape(entry.shape)


def _huffman_symbols(entry: TensorEntry, data: bytes, path, out=None) -> np.ndarray:
    """The checked symbols of a Huffman-coded tensor: the stream checks of
    :func:`_huffman_stream`, and the codes padding the last symbol are zero. (``out``:
    where the compiled decoder may put them, as in :func:`decode_symbols`.)"""
    symbols = _huffman_stream(
        entry,
        data,
        path,
        lambda count: decode_symbols(
            data, entry.code_lengths, count, out, entry.chunk, entry.chunk_starts
        ),
    )
    _check_last_symbol(entry, symbols, path)
    return symbols


def _check_last_symbol(entry: TensorEntry, symbols: np.ndarray, path) -> None:
    """Reject a last symbol whose codes past the end of the tensor are not zero."""
    filled = entry.numel % entry.group  # codes of the last symbol that belong to the tensor
    if filled and int(symbols[-1]) >> (filled * entry.bits):
        raise E.DataError(
            "codes padding the last symbol are not zero", path=path, tensor=entry.name
        )


def _huffman_stream(entry: TensorEntry, data: bytes, path, decode, ends: bool = True):
    """``decode(count)`` -> (result, used bits) of a Huffman-coded tensor's symbols, then
    the checks on the stream: it fills its bytes exactly and the padding bits after it
    are zero (not with ``ends`` False: a range of chunks before the stream's end, which
    the kernel checked ends where the next chunk begins). Returns the result; decoding
    errors become DataError."""
    count = -(-entry.numel // entry.group)
    try:
        result, used = decode(count)
    except ValueError as exc:
        raise E.DataError(
            f"Huffman stream {exc} ({count} symbols expected)",
            path=path,
            tensor=entry.name,
        ) from None
    if not ends:
        return result
    if -(-used // 8) != entry.length:
        raise E.DataError(
            f"Huffman stream of {used} bits does not fill its {entry.length} bytes",
            path=path,
            tensor=entry.name,
        )
    if used % 8 and data[-1] >> (used % 8):
        raise E.DataError(
            "padding bits after the last codeword are not zero", path=path, tensor=entry.name
        )
    return result

"""Dense k-bit packing of integer codes (spec/FORMAT.md section 5.1).

Codes are laid out LSB-first: code ``i`` occupies bits ``[i*k, (i+1)*k)`` of the stream,
stream bit ``j`` is bit ``j % 8`` of byte ``j // 8`` (bit 0 = least significant), and the
bits of a code go in from its least significant bit. Only the end of the stream is padded,
with zero bits, to a whole byte.

Kernels: 8 codes of k bits fill exactly k bytes, so the stream is a sequence of k-byte
groups, each handled as one 64-bit word (or, for 2 and 3 bits, by table lookups of four
codes at once); widths 1, 4 and 8 have shorter paths. Nothing loops per element. With the
compiled kernels (:mod:`qpack.kernels`), widths 2 to 7 are packed in C, to the same bytes.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from . import kernels

__all__ = ["packed_size", "pack_codes", "unpack_codes", "padding_is_zero"]


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if type(bits) is not int or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int from 1 to 8, got {bits!r}")


def _unpack_groups(src: np.ndarray, bits: int, dst: np.ndarray) -> None:
    """Unpack whole groups: ``src`` (g, bits) bytes -> ``dst`` (g, 8) codes.

    Widths 2 and 3 look codes up in a table (a byte holds four 2-bit codes; 12 bits hold
    four 3-bit codes), four at a time as one uint32. Other widths widen each group to a
    uint64 and move each code to its own byte with a shift and a mask."""
    groups = src.shape[0]
    quads = dst.reshape(-1).view("<u4").reshape(groups, 2)
    # mode="clip": every index is in range, and mode="raise" would write to a temporary
    # copy of `out` (so that an error leaves it untouched) and copy that back
    if bits == 2:
        np.take(_quad_table(2), src, out=quads, mode="clip")
        return
    if bits == 3:
        word = src[:, 0].astype(np.intp)
        word |= src[:, 1].astype(np.intp) << 8
        word |= src[:, 2].astype(np.intp) << 16
        table = _quad_table(3)
        np.take(table, word & 0xFFF, out=quads[:, 0], mode="clip")
        np.take(table, word >> 12, out=quads[:, 1], mode="clip")
        return
    wide = np.zeros((groups, 8), dtype=np.uint8)
    wide[:, :bits] = src
    word = wide.view("<u8").reshape(-1)
    mask = np.uint64((1 << bits) - 1)
    spread = word & mask
    for j in range(1, 8):
        spread |= ((word >> np.uint64(bits * j)) & mask) << np.uint64(8 * j)
    dst.reshape(-1).view("<u8")[:] = spread


@cache
def _quad_table(bits: int) -> np.ndarray:
    """uint32 whose four bytes are the four ``bits``-bit codes of each 4*bits-bit value."""
    value = np.arange(1 << (4 * bits), dtype=np.uint32)
    mask = (1 << bits) - 1
    quad = np.zeros_like(value)
    for j in range(4):
        quad |= ((value >> (bits * j)) & mask) << (8 * j)
    return quad.astype("<u4")


def _pack_groups(src: np.ndarray, bits: int, dst: np.ndarray) -> None:
    """Pack whole groups: ``src`` (g, 8) codes -> ``dst`` (g, bits) bytes: each group's
    eight code bytes, read as one uint64, are squeezed to ``8 * bits`` bits by shifts."""
    spread = src.reshape(-1).view("<u8")
    mask = np.uint64((1 << bits) - 1)
    word = spread & mask
    for j in range(1, 8):
        word |= ((spread >> np.uint64(8 * j)) & mask) << np.uint64(bits * j)
    dst[:] = word.view(np.uint8).reshape(-1, 8)[:, :bits]


def _by_groups(kernel, src: np.ndarray, src_per: int, dst: np.ndarray, dst_per: int) -> None:
    """Run a group kernel over all whole groups, then over the zero-padded tail."""
    groups = min(src.size // src_per, dst.size // dst_per)
    kernel(
        src[: groups * src_per].reshape(groups, src_per),
        dst[: groups * dst_per].reshape(groups, dst_per),
    )
    rest_src, rest_dst = src[groups * src_per :], dst[groups * dst_per :]
    if rest_dst.size:
        tail_src = np.zeros((1, src_per), dtype=np.uint8)
        tail_src[0, : rest_src.size] = rest_src
        tail_dst = np.empty((1, dst_per), dtype=np.uint8)
        kernel(tail_src, tail_dst)
        rest_dst[:] = tail_dst[0, : rest_dst.size]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes (each < 2**bits) into a uint8 array of packed bytes.

    Example:
        >>> qpack.pack_codes(np.array([1, 2, 3], np.uint8), 2).tobytes()
        b'9'
    """
    _check_bits(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (int(flat.max()) >> bits or (flat.dtype.kind == "i" and flat.min() < 0)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    flat = flat.astype(np.uint8, copy=False)
    n = flat.size
    if bits == 8:
        return flat.copy()
    if bits == 1:
        return np.packbits(flat, bitorder="little")
    out = np.empty(packed_size(n, bits), dtype=np.uint8)
    if kernels.native is not None:  # the same bytes, in one pass
        kernels.native.pack(np.ascontiguousarray(flat), bits, out)
        return out
    if bits == 4:
        pairs = n // 2
        np.left_shift(flat[1 : 2 * pairs : 2], np.uint8(4), out=out[:pairs])
        out[:pairs] |= flat[0 : 2 * pairs : 2]
        if n & 1:
            out[-1] = flat[-1]
        return out
    _by_groups(lambda s, d: _pack_groups(s, bits, d), flat, 8, out, bits)
    return out


def unpack_codes(
    data: bytes | memoryview | np.ndarray, bits: int, count: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits from packed bytes into a uint8 array (``out``
    when given: a writable uint8 array of ``count`` elements).

    Example:
        >>> qpack.unpack_codes(b"9", 2, 3)
        array([1, 2, 3], dtype=uint8)
    """
    _check_bits(bits)
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    need = packed_size(count, bits)
    if buf.size < need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {buf.size}")
    buf = buf[:need]
    if out is None:
        out = np.empty(count, dtype=np.uint8)
    if bits == 8:
        out[:] = buf
    elif bits == 1:
        out[:] = np.unpackbits(buf, count=count, bitorder="little")
    elif bits == 4:
        pairs = count // 2
        np.bitwise_and(buf[:pairs], np.uint8(0x0F), out=out[0 : 2 * pairs : 2])
        np.right_shift(buf[:pairs], np.uint8(4), out=out[1 : 2 * pairs : 2])
        if count & 1:
            out[-1] = buf[-1] & 0x0F
    else:
        _by_groups(lambda s, d: _unpack_groups(s, bits, d), buf, bits, out, 8)
    return out


def padding_is_zero(data: bytes | np.ndarray, bits: int, count: int) -> bool:
    """True when the unused high bits of the last packed byte are all zero (as required)."""
    spare = packed_size(count, bits) * 8 - count * bits
    if spare == 0:
        return True
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return int(buf[packed_size(count, bits) - 1]) >> (8 - spare) == 0

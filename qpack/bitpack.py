"""Dense k-bit packing of integer codes (spec/FORMAT.md section 5).

Codes are laid out LSB-first: code ``i`` occupies bits ``[i*k, (i+1)*k)`` of the stream,
stream bit ``j`` is bit ``j % 8`` of byte ``j // 8`` (bit 0 = least significant), and the
bits of a code go in from its least significant bit. Only the end of the stream is padded,
with zero bits, to a whole byte. Every kernel is vectorized; none loops per element.
"""

from __future__ import annotations

import numpy as np

__all__ = ["packed_size", "pack_codes", "unpack_codes", "padding_is_zero"]

_LE_U64 = np.dtype("<u8")


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if type(bits) is not int or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int from 1 to 8, got {bits!r}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes (each < 2**bits) into a uint8 array of packed bytes."""
    _check_bits(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or int(flat.max()) >> bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    flat = flat.astype(np.uint8, copy=False)
    n = flat.size
    if bits == 8:
        return flat.copy()
    if bits == 1:
        return np.packbits(flat, bitorder="little")
    if bits == 4:
        even = np.zeros(n + (n & 1), dtype=np.uint8)
        even[:n] = flat
        return even[0::2] | (even[1::2] << 4)
    # Generic path: 8 codes of k bits fill exactly k bytes, so build one little-endian
    # 64-bit word per group of 8 codes and keep its low k bytes.
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=_LE_U64)
    padded[:n] = flat
    padded = padded.reshape(groups, 8)
    word = padded[:, 0].copy()
    for j in range(1, 8):
        word |= padded[:, j] << np.uint64(j * bits)
    out = word.view(np.uint8).reshape(groups, 8)[:, :bits].reshape(-1)
    return out[: packed_size(n, bits)].copy()


def unpack_codes(data: bytes | np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits from packed bytes into a uint8 array."""
    _check_bits(bits)
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    need = packed_size(count, bits)
    if buf.size < need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {buf.size}")
    buf = buf[:need]
    if bits == 8:
        return buf.copy()
    if bits == 1:
        return np.unpackbits(buf, count=count, bitorder="little")
    if bits == 4:
        out = np.empty(buf.size * 2, dtype=np.uint8)
        out[0::2] = buf & 0x0F
        out[1::2] = buf >> 4
        return out[:count]
    groups = -(-count // 8)
    words = np.zeros((groups, 8), dtype=np.uint8)
    staged = np.zeros(groups * bits, dtype=np.uint8)
    staged[:need] = buf
    words[:, :bits] = staged.reshape(groups, bits)
    word = words.view(_LE_U64).reshape(groups, 1)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits)).reshape(1, 8)
    codes = (word >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(-1)[:count]


def padding_is_zero(data: bytes | np.ndarray, bits: int, count: int) -> bool:
    """True when the unused high bits of the last packed byte are all zero (as required)."""
    spare = packed_size(count, bits) * 8 - count * bits
    if spare == 0:
        return True
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return int(buf[packed_size(count, bits) - 1]) >> (8 - spare) == 0

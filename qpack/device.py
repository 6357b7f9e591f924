"""Decode one tensor on a torch device, bit-identical to the numpy decoder.

Why: weights are usually wanted where the model runs. Moving the packed codes there and
decoding with torch ops sends 1/4 to 1/32 of the bytes that decoded float32 values would
take, and the unpacking and dequantization run on the device. Huffman streams are decoded
on the CPU (variable-length decoding does not vectorize) and only their one-byte codes move.

Every value follows spec/FORMAT.md section 6.1 exactly: ``fl32(scale * fl32(q - zp))`` as
two separate float32 torch ops, so the result matches :func:`qpack.codec.decode_payload`
bit for bit. (Subnormals are kept unless the caller turned on ``torch.set_flush_denormal``.)

``import qpack`` does not import this module (it needs torch); loaders import it lazily.
"""

from __future__ import annotations

import sys
import warnings
from functools import cache

import numpy as np
import torch

from . import errors as E
from .codec import (
    check_decodes_finite,
    check_packed_padding,
    check_raw,
    decode_codes,
    decode_codes_values,
)
from .container import DTYPE_SIZES, TensorEntry

__all__ = ["decode_on_device", "dequantize_cpu"]


def decode_on_device(
    entry: TensorEntry,
    payload: bytes | memoryview | np.ndarray,
    device: str | int | torch.device,
    *,
    path: object = None,
) -> torch.Tensor:
    """Decode one tensor's CRC-checked ``payload`` on ``device``: a tensor of
    ``entry.shape`` in the tensor's original dtype, with the same bits as the numpy decoder.
    Raises the :mod:`qpack.errors` classes that :func:`qpack.codec.decode_payload` raises."""
    device = torch.device(device)
    buf = _as_bytes(payload)
    if buf.size != entry.length:
        raise E.LayoutError(
            f"payload of {buf.size} bytes, but the header says {entry.length}",
            path=path,
            tensor=entry.name,
        )
    if entry.storage == "raw":
        return _raw(entry, buf, device, path)
    if entry.storage not in ("packed", "huffman"):
        raise E.UnsupportedError(
            f"unsupported storage kind {entry.storage!r}", path=path, tensor=entry.name
        )
    # the same checks, in the same order, as codec.decode_payload
    check_decodes_finite(entry, path)
    if entry.storage == "huffman":
        data = payload if isinstance(payload, (bytes, bytearray)) else buf.tobytes()
        codes = _upload(decode_codes(entry, data, path), device)
    else:
        check_packed_padding(entry, buf, path)
        codes = _unpack(_upload(buf, device), entry.bits, entry.numel)
    dtype = getattr(torch, entry.dtype)
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype, device=device)
    return _dequantize(codes, entry, device).reshape(entry.shape).to(dtype)


def _as_bytes(payload: bytes | memoryview | np.ndarray) -> np.ndarray:
    """The payload as a flat uint8 numpy array (no copy)."""
    if isinstance(payload, np.ndarray):
        return np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
    return np.frombuffer(payload, dtype=np.uint8)


def _upload(buf: np.ndarray, device: torch.device) -> torch.Tensor:
    """Bytes as a uint8 tensor on ``device`` that owns its memory (at most one host copy:
    torch wants writable memory, and a CPU result must not alias the caller's buffer)."""
    if device.type == "cpu" or not buf.flags.writeable:
        buf = buf.copy()
    return torch.from_numpy(buf).to(device)


def _raw(entry: TensorEntry, buf: np.ndarray, device: torch.device, path: object) -> torch.Tensor:
    """Raw little-endian elements: move the bytes, then reinterpret them on the device."""
    check_raw(entry, buf, path)
    dtype = getattr(torch, entry.dtype)  # bfloat16 bits are a binary32's top half: as is
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype, device=device)
    size = DTYPE_SIZES[entry.dtype]
    if sys.byteorder != "little" and size > 1:  # torch views bytes in host order
        buf = buf.view(f"<u{size}").astype(f"=u{size}").view(np.uint8)
    return _upload(buf, device).view(dtype).reshape(entry.shape)


@cache
def _cuts(bits: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Where each of the 8 codes of a ``bits``-byte group lies: its first byte and right
    shift, and the byte holding its high bits and their left shift. A code that fits in
    its first byte takes its "high bits" from index ``bits``, a zero column, shifted by 0."""
    low, shift, high, spill = [], [], [], []
    for j in range(8):
        byte, right = divmod(j * bits, 8)
        crosses = right + bits > 8
        low.append(byte)
        shift.append(right)
        high.append(byte + 1 if crosses else bits)
        spill.append(8 - right if crosses else 0)
    return low, shift, high, spill


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``count`` LSB-first ``bits``-bit codes (spec section 5.1) from uint8 ``packed``, with
    uint8 torch ops on its device; returns them flat, as uint8."""
    if bits == 8:
        return packed
    if bits == 4:  # the first code of each byte is its low nibble
        return torch.stack((packed & 0x0F, packed >> 4), dim=1).reshape(-1)[:count]
    # 8 codes fill exactly ``bits`` bytes: lay the stream out as one group per row, zero
    # padded to whole groups, plus a zero column for the codes that do not cross a byte.
    groups = -(-count // 8)
    whole, rest = divmod(packed.numel(), bits)
    grid = torch.zeros((groups, bits + 1), dtype=torch.uint8, device=packed.device)
    grid[:whole, :bits] = packed[: whole * bits].view(whole, bits)
    if rest:
        grid[whole, :rest] = packed[whole * bits :]
    low, shift, high, spill = torch.tensor(_cuts(bits), dtype=torch.uint8).to(packed.device)
    codes = grid.index_select(1, low.long()) >> shift
    codes |= grid.index_select(1, high.long()) << spill  # bits past 8 fall off
    codes &= (1 << bits) - 1
    return codes.reshape(-1)[:count]


def _dequantize(codes: torch.Tensor, entry: TensorEntry, device: torch.device) -> torch.Tensor:
    """Spec section 6.1 on the device: the flat codes split into one equal run per
    scale/zero_point pair; each code becomes ``fl32(scale * fl32(fl32(q) - zero_point))``,
    two separate float32 ops in that order (eager torch: no fusion, no FMA)."""
    values = torch.empty(codes.shape, dtype=torch.float32, device=device)
    return _dequantize_into(codes, entry, values)


def _dequantize_into(codes: torch.Tensor, entry: TensorEntry, out: torch.Tensor) -> torch.Tensor:
    scale = torch.from_numpy(np.array(entry.scale, dtype=np.float32).reshape(-1, 1))
    zero = torch.from_numpy(np.array(entry.zero_point, dtype=np.float32).reshape(-1, 1))
    rows = out.view(scale.shape[0], -1)
    # uint8 - float32 computes in float32 (q < 256 converts exactly), then one product
    torch.sub(codes.view(rows.shape), zero.to(out.device), out=rows)
    rows.mul_(scale.to(out.device))
    return out


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, which torch will only read. (torch warns about
    read-only arrays, which may not be written; copying one would cost a pass.)"""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


# Below this many codes, starting torch's threads costs more than numpy's single pass.
TORCH_MIN_CODES = 1 << 18


def dequantize_cpu(entry: TensorEntry, codes: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """A :data:`qpack.codec.Dequantizer` running torch's CPU kernels (vectorized and
    multithreaded) on large tensors, with exactly the values of the numpy one."""
    if codes.size < TORCH_MIN_CODES:
        return decode_codes_values(entry, codes, out)
    if out is None:
        out = np.empty(codes.size, dtype=np.float32)
    if codes.size:
        _dequantize_into(_read_only_tensor(codes), entry, torch.from_numpy(out))
    return out.reshape(entry.shape)

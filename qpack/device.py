"""Decode one tensor on a torch device, bit-identical to the numpy decoder.

Why: weights are usually wanted where the model runs. Moving the packed codes there and
decoding with torch ops sends 1/4 to 1/32 of the bytes that decoded float32 values would
take, and the unpacking and dequantization run on the device. Huffman streams are decoded
on the CPU (variable-length decoding does not vectorize) and only their one-byte codes move.

Every value follows spec/FORMAT.md section 6.1 exactly: ``fl32(scale * fl32(q - zp))`` as
two separate float32 torch ops, so the result matches :func:`qpack.decoder.decode_payload`
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
from ._threads import cpu_count
from .container import DTYPE_SIZES, HALF, HUFFMAN, PACKED, QUANTIZED_KINDS, RAW, TensorEntry
from .decoder import (
    check_decodes_finite,
    check_packed_padding,
    check_raw,
    decode_codes,
    decode_codes_values,
)
from .reader import Reader

__all__ = ["decode_on_device", "dequantize_cpu", "finish", "host_workers", "stage"]


def decode_on_device(
    entry: TensorEntry,
    payload: bytes | memoryview | np.ndarray,
    device: str | int | torch.device,
    *,
    path: object = None,
) -> torch.Tensor:
    """Decode one tensor's CRC-checked ``payload`` on ``device``: a tensor of
    ``entry.shape`` in the tensor's original dtype, with the same bits as the numpy decoder.
    Raises the :mod:`qpack.errors` classes that :func:`qpack.decoder.decode_payload` raises."""
    device = torch.device(device)
    return finish(entry, stage(entry, payload, device, path), device)


# Host buffers from this size up go through page-locked (pinned) memory, so the copy to a
# CUDA device runs asynchronously and overlaps the host work on the next tensor. Smaller
# ones are not worth a pinned block.
PINNED_MIN_BYTES = 1 << 16


def stage(
    entry: TensorEntry,
    payload: bytes | memoryview | np.ndarray,
    device: torch.device,
    path: object = None,
) -> torch.Tensor:
    """The host half of :func:`decode_on_device`, safe to run on worker threads: every check
    of the numpy decoder, in its order, then the bytes to send to ``device`` as a CPU uint8
    tensor of its own: raw bytes (in host order), the packed stream, or the codes of a
    Huffman stream (variable-length decoding does not vectorize, so it stays on the host)."""
    buf = _as_bytes(payload)
    if buf.size != entry.length:
        raise E.LayoutError(
            f"payload of {buf.size} bytes, but the header says {entry.length}",
            path=path,
            tensor=entry.name,
        )
    if entry.storage in (RAW, HALF):
        check_raw(entry, buf, path)
        size = DTYPE_SIZES[entry.dtype] if entry.storage == RAW else 2
        if sys.byteorder != "little" and size > 1:  # torch views bytes in host order
            buf = buf.view(f"<u{size}").astype(f"=u{size}").view(np.uint8)
    elif entry.storage not in QUANTIZED_KINDS:
        raise E.UnsupportedError(
            f"unsupported storage kind {entry.storage!r}", path=path, tensor=entry.name
        )
    else:
        check_decodes_finite(entry, path)
        if entry.storage == HUFFMAN:
            data = payload if isinstance(payload, (bytes, bytearray)) else buf.tobytes()
            buf = decode_codes(entry, data, path)
        else:
            check_packed_padding(entry, buf, path)
    return _host_copy(buf, device)


# Host threads pay where tensors are large: each thread's hand-off costs about 0.1 ms per
# tensor (measured on a 16-core H200 host), against about 1 ms per MiB of reading and CRC.
THREADS_MIN_MEAN_BYTES = 1 << 20


def host_workers(reader: Reader) -> int:
    """Threads for the host half of a device load: one per CPU for Huffman streams (as
    :meth:`Reader.default_workers` decides) or for tensors of 1 MiB or more on average."""
    tensors = reader.header.tensors
    if sum(e.length for e in tensors) >= THREADS_MIN_MEAN_BYTES * max(len(tensors), 1):
        return cpu_count()
    return reader.default_workers(decoded=(HUFFMAN,))


def finish(entry: TensorEntry, staged: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The device half of :func:`decode_on_device`: send what :func:`stage` made to
    ``device`` and decode it there with torch ops."""
    dtype = getattr(torch, entry.dtype)  # bfloat16 bits are a binary32's top half: as is
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype, device=device)
    data = staged.to(device, non_blocking=True)
    if entry.storage == RAW:
        return data.view(dtype).reshape(entry.shape)
    if entry.storage == HALF:  # binary16 widened exactly, then converted as quantized values
        return data.view(torch.float16).float().reshape(entry.shape).to(dtype)
    if entry.storage == PACKED:
        data = _unpack(data, entry.bits, entry.numel)
    return _dequantize(data, entry, device).reshape(entry.shape).to(dtype)


def _as_bytes(payload: bytes | memoryview | np.ndarray) -> np.ndarray:
    """The payload as a flat uint8 numpy array (no copy)."""
    if isinstance(payload, np.ndarray):
        return np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
    return np.frombuffer(payload, dtype=np.uint8)


def _host_copy(buf: np.ndarray, device: torch.device) -> torch.Tensor:
    """``buf`` copied into a CPU uint8 tensor that owns its memory (torch wants writable
    memory, and a CPU result must not alias the caller's buffer): page-locked when it
    goes to a CUDA device and is large enough to gain from an asynchronous copy."""
    if device.type == "cuda" and buf.nbytes >= PINNED_MIN_BYTES:
        staged = torch.empty(buf.nbytes, dtype=torch.uint8, pin_memory=True)
        staged.numpy()[:] = buf
        return staged
    return torch.from_numpy(buf.copy())


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
    cuts = torch.tensor(_cuts(bits), dtype=torch.uint8).to(packed.device, non_blocking=True)
    low, shift, high, spill = cuts
    codes = grid.index_select(1, low.long()) >> shift
    codes |= grid.index_select(1, high.long()) << spill  # bits past 8 fall off
    codes &= (1 << bits) - 1
    return codes.reshape(-1)[:count]


def _dequantize(codes: torch.Tensor, entry: TensorEntry, device: torch.device) -> torch.Tensor:
    """Spec section 6.1 on the device: the flat codes split into the runs of
    :attr:`TensorEntry.runs`, one per scale/zero_point pair; each code becomes
    ``fl32(scale * fl32(fl32(q) - zero_point))``, two separate float32 ops in that order
    (eager torch: no fusion, no FMA)."""
    values = torch.empty(codes.shape, dtype=torch.float32, device=device)
    return _dequantize_into(codes, entry, values)


def _dequantize_into(codes: torch.Tensor, entry: TensorEntry, out: torch.Tensor) -> torch.Tensor:
    # scales and zero points travel together, in one small copy that does not wait for the
    # device (a blocking copy would stall the host on every tensor's kernels)
    params = np.stack((np.asarray(entry.scale), np.asarray(entry.zero_point))).astype(np.float32)
    scale, zero = torch.from_numpy(params.reshape(2, -1, 1)).to(out.device, non_blocking=True)
    row, run = entry.runs
    if run and run < row and row % run:  # short last groups: whole groups, then the rest
        rows, per_row, whole = entry.numel // row, -(-row // run), row // run * run
        grid = (rows, per_row - 1, run)
        scale, zero = scale.view(rows, per_row, 1), zero.view(rows, per_row, 1)
        codes, values = codes.view(rows, row), out.view(rows, row)
        head = torch.sub(codes[:, :whole].unflatten(1, grid[1:]), zero[:, :-1])
        values[:, :whole].unflatten(1, grid[1:]).copy_(head.mul_(scale[:, :-1]))
        tail = torch.sub(codes[:, whole:], zero[:, -1])
        values[:, whole:].copy_(tail.mul_(scale[:, -1]))
        return out
    rows = out.view(scale.shape[0], -1)
    # uint8 - float32 computes in float32 (q < 256 converts exactly), then one product
    torch.sub(codes.view(rows.shape), zero, out=rows)
    rows.mul_(scale)
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
    """A :data:`qpack.decoder.Dequantizer` running torch's CPU kernels (vectorized and
    multithreaded) on large tensors, with exactly the values of the numpy one."""
    if codes.size < TORCH_MIN_CODES:
        return decode_codes_values(entry, codes, out)
    if out is None:
        out = np.empty(codes.size, dtype=np.float32)
    if codes.size:
        _dequantize_into(_read_only_tensor(codes), entry, torch.from_numpy(out))
    return out.reshape(entry.shape)

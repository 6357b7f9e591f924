"""The encode and write stages: quantized codes -> payloads -> a .qpk file.

Each tensor becomes raw little-endian bytes, or its codes (from :mod:`qpack.quantize`)
bit-packed or Huffman-coded, whichever is smaller (spec section 5). The header comes first
in the file but is known only once every payload is, so encoded payloads wait in memory
(up to :data:`SPOOL_MEMORY`) or in a spool file, and the file is written atomically by
:mod:`qpack.atomic`. What each tensor becomes is decided beforehand, in a
:class:`~qpack.plan.Plan`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np

from . import errors as E
from ._threads import ordered_map
from ._version import __version__
from ._zlib import crc32
from .atomic import WRITE_CHUNK, write_atomic
from .bitpack import pack_codes, packed_size
from .container import HALF, HUFFMAN, PACKED, RAW, TensorEntry, align, build_header, layout
from .dtypes import NUMPY_DTYPES
from .entropy import best_group, encode_symbols, index_chunk
from .plan import HALF_BITS, Item, Plan, TensorPlan
from .quantize import Rounder, half_values, quantize_tensor
from .schemes import Quantized

__all__ = [
    "SPOOL_MEMORY",
    "SpoolRange",
    "encode_chunks",
    "encode_tensor",
    "quantized_entry",
    "serialize",
    "write_file",
]

SAVE_THREADS_MIN = 1 << 20  # elements from which a fixed-width save uses threads
# Encoded bytes a save keeps in memory before it spools payloads to a temporary file:
# writing them twice (spool, then file) made a 19 MB save 30% slower on tmpfs.
SPOOL_MEMORY = 1 << 26


def quantized_entry(
    name: str, shape: tuple[int, ...], dtype: str, q: Quantized, scheme: str, entropy: bool
) -> tuple[TensorEntry, tuple[np.ndarray, np.ndarray] | None]:
    """The header entry of quantized codes (its length set; no CRC or offset yet), stored
    Huffman-coded when ``entropy`` and that is smaller; then also (symbols, their
    histogram) for the coder. Builds no payload: cheap enough to size many settings."""
    entry = TensorEntry(
        name,
        shape,
        dtype,
        PACKED,
        0,
        packed_size(q.codes.size, q.bits),
        0,
        bits=q.bits,
        scheme=scheme,
        dequant="affine",
        granularity=q.granularity,
        scale=q.scale,
        zero_point=q.zero_point,
        group_size=q.group_size,
        scale_dtype=q.scale_dtype,
        shared_zero=q.shared_zero,
    )
    if entropy:
        group, lengths, stream, symbols, counts = best_group(q.codes, q.bits)
        # the code length table travels in the header: count it against Huffman
        if stream + packed_size(lengths.size, 4) < entry.length:
            entry.storage, entry.group, entry.code_lengths = HUFFMAN, group, lengths
            entry.length = stream
            return entry, (symbols, counts)
    return entry, None


def encode_tensor(
    name: str,
    array: np.ndarray,
    dtype: str,
    plan: TensorPlan,
    entropy: bool = False,
    rounder: Rounder | None = None,
    made: tuple[Any, Quantized] | None = None,
) -> tuple[TensorEntry, np.ndarray]:
    """One tensor's header entry (offset not yet assigned) and its payload bytes.
    ``made``: ((bits, scheme), the tensor quantized so, rounded to nearest), taken where
    the plan says the same instead of quantizing again."""
    shape = tuple(int(d) for d in array.shape)
    if plan.bits is None:
        payload = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype]).reshape(-1)
        payload = payload.view(np.uint8)
        entry = TensorEntry(name, shape, dtype, RAW, 0, payload.size, crc32(payload))
        return entry, payload
    if plan.bits == HALF_BITS:
        payload = half_values(name, array, dtype).reshape(-1).view(np.uint8)
        entry = TensorEntry(name, shape, dtype, HALF, 0, payload.size, crc32(payload))
        return entry, payload
    if made is not None and made[0] == (plan.bits, plan.scheme) and plan.rounding == "nearest":
        q = made[1]
    else:
        q = quantize_tensor(name, array, dtype, plan, rounder)
    entry, huffman = quantized_entry(name, shape, dtype, q, plan.scheme, entropy)
    if huffman is not None:
        symbols, counts = huffman
        # long streams get a chunk index (spec 5.2)
        entry.chunk = index_chunk(symbols.size, entry.length)
        if entry.chunk:
            entry.chunk_starts = np.empty(-(-symbols.size // entry.chunk) - 1, np.int64)
        payload = encode_symbols(
            symbols, entry.code_lengths, counts, entry.chunk or 0, entry.chunk_starts
        )
    else:
        payload = pack_codes(q.codes, entry.bits)
    assert payload.size == entry.length
    entry.crc32 = crc32(payload)
    return entry, payload


def _metadata(items: list[Item], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Check names and metadata before anything is encoded; returns the header metadata."""
    names = [name for name, _, _ in items]
    if len(set(names)) != len(names):
        raise E.EncodeError("duplicate tensor names")
    for name in names:
        if type(name) is not str or not name:
            raise E.EncodeError(f"tensor names must be non-empty strings, got {name!r}")
    meta = {"producer": f"qpack {__version__}"}
    for key, value in (metadata or {}).items():
        if type(key) is not str or type(value) is not str:
            raise E.EncodeError(f"metadata must map strings to strings ({key!r}: {value!r})")
        meta[key] = value
    return meta


def _encoded(
    items: list[Item],
    plan: Plan,
    rounder: Rounder | None = None,
    workers: int | None = None,
    made: Mapping[str, tuple[Any, Quantized]] | None = None,
) -> Iterator[tuple[TensorEntry, np.ndarray]]:
    """Encode the items on worker threads (by default one per CPU, but one in all for a
    small fixed-width save), yielding (entry, payload) in order; ``made`` as
    :func:`encode_tensor` takes it, by name."""
    made = made or {}

    def one(item: Item) -> tuple[TensorEntry, np.ndarray]:
        name, array, dtype = item
        plan_of = plan.tensors[name]
        return encode_tensor(name, array, dtype, plan_of, plan.entropy, rounder, made.get(name))

    small = sum(a.size for _, a, _ in items) < SAVE_THREADS_MIN
    if workers is None and not plan.entropy and small:
        workers = 1  # numpy's short calls on two threads contend for the GIL: slower
    return ordered_map(one, items, workers)


def encode_chunks(
    items: Iterable[Item],
    plan: Plan,
    metadata: Mapping[str, str] | None = None,
    rounder: Rounder | None = None,
) -> Iterator[bytes | np.ndarray]:
    """Encode ``(name, array, dtype)`` items in memory as ``plan`` says; returns the file's
    bytes as chunks in order."""
    items = list(items)
    meta = _metadata(items, metadata)
    return serialize(list(_encoded(items, plan, rounder)), meta)


def write_file(
    path: str | os.PathLike,
    items: Iterable[Item],
    plan: Plan,
    metadata: Mapping[str, str] | None = None,
    *,
    rounder: Rounder | None = None,
    overwrite: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
    workers: int | None = None,
    progress: Callable[[int], object] | None = None,
    quantized: Mapping[str, tuple[Any, Quantized]] | None = None,
) -> None:
    """Encode ``(name, array, dtype)`` items to ``path`` as ``plan`` says, atomically and
    streaming (``overwrite`` and ``inputs`` as in :func:`qpack.atomic.write_atomic`).

    The header comes first in the file but is known last, so the encoded payloads wait:
    in memory up to :data:`SPOOL_MEMORY` bytes in all, the rest in a temporary spool file
    as soon as each is encoded; memory holds the inputs, that much, and a few encoded
    tensors (see :func:`~qpack._threads.ordered_map`). ``progress`` is called with each
    tensor's element count once it is encoded. ``quantized``: tensors the planner already
    quantized (see :func:`encode_tensor`), by name."""
    items = list(items)
    meta = _metadata(items, metadata)
    encoded = _encoded(items, plan, rounder, workers, quantized)
    chunks = _spooled(_spool_folder(path), encoded, meta, progress)
    write_atomic(path, chunks, overwrite=overwrite, inputs=inputs)


def _spool_folder(path: str | os.PathLike) -> str | None:
    """Where a spool file goes: beside the file the output names (through symlinks), on
    the same file system; the default temporary folder for a device or pipe."""
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        return None
    return os.path.dirname(target)


def _spooled(folder, tensors, meta, progress):
    """The chunks of :func:`write_file`: encoded payloads wait in memory while they fit
    in :data:`SPOOL_MEMORY`, the others in a spool file made when first needed; raw ones
    are views of the caller's arrays, so they are written straight from there."""
    with contextlib.ExitStack() as stack:
        spool, held, encoded = None, 0, []
        for entry, payload in tensors:
            if entry.storage != RAW:
                if held + entry.length <= SPOOL_MEMORY:
                    held += entry.length
                else:
                    if spool is None:
                        spool = stack.enter_context(tempfile.TemporaryFile(dir=folder))
                    spool.write(payload)
                    payload = None
            encoded.append((entry, payload))
            if progress is not None:
                progress(entry.numel)
        yield from serialize(encoded, meta, spool)


def serialize(
    encoded: list[tuple[TensorEntry, np.ndarray | bytes | None]],
    metadata: Mapping[str, str],
    spool: BinaryIO | None = None,
) -> Iterator[bytes | np.ndarray]:
    """Lay out encoded tensors canonically; yields the header, padding and payloads in
    order. A payload of None lies in ``spool``, where such payloads lie back to back; it
    is yielded as a :class:`SpoolRange` (``bytes(...)`` of one reads it)."""
    entries = [entry for entry, _ in encoded]
    data_size = layout(entries)
    head = build_header(entries, dict(metadata), data_size)
    yield head
    data_start = align(len(head))
    yield bytes(data_start - len(head))
    position = data_start
    spooled = 0
    for entry, payload in encoded:
        start = data_start + entry.offset
        if start > position:
            yield bytes(start - position)
        if payload is None:
            yield SpoolRange(spool, spooled, entry.length)
            spooled += entry.length
        else:
            view = memoryview(payload).cast("B")
            for done in range(0, entry.length, WRITE_CHUNK):
                yield view[done : done + WRITE_CHUNK]
        position = start + entry.length


class SpoolRange:
    """``length`` bytes at ``offset`` of an open file: a chunk that :func:`write_atomic`
    copies file to file inside the kernel instead of through Python."""

    def __init__(self, file: BinaryIO, offset: int, length: int):
        self.file, self.offset, self.length = file, offset, length

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        self.file.seek(self.offset)
        return self.file.read(self.length)

    def copy_to(self, out: BinaryIO) -> None:
        """Append the range to ``out`` (both plain files; ``out`` is flushed first)."""
        out.flush()
        src, dst = self.file.fileno(), out.fileno()
        offset, left = self.offset, self.length
        while left:
            try:
                done = os.copy_file_range(src, dst, min(left, 1 << 30), offset)
            except (AttributeError, OSError):  # not Linux, or file systems it cannot join
                done = 0
            if not done:
                break
            offset, left = offset + done, left - done
        out.seek(0, os.SEEK_END)
        self.file.seek(offset)
        while left:
            chunk = self.file.read(min(left, WRITE_CHUNK))
            if not chunk:
                raise OSError(f"spool file ended {left} bytes early")
            out.write(chunk)
            left -= len(chunk)

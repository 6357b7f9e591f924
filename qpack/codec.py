"""Arrays <-> .qpk files, with numpy only (spec sections 4-6 put together).

Writing: each tensor becomes either raw little-endian bytes or quantized, bit-packed codes;
the header is built once every payload is known, and the file is written atomically.
Reading: :class:`Reader` validates the header, then reads, checks and decodes tensors on
demand, so one tensor can be fetched without touching the others' bytes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import __version__, kernels
from . import errors as E
from ._zlib import crc32
from .bitpack import pack_codes, packed_size, padding_is_zero, unpack_codes
from .container import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    PREAMBLE_SIZE,
    QUANTIZED_KINDS,
    Header,
    TensorEntry,
    align,
    build_header,
    layout,
    read_header,
)
from .entropy import (
    best_group,
    decode_symbols,
    decode_values,
    encode_symbols,
    entropy_bits,
    index_chunk,
    lanes_pay,
    ungroup_symbols,
)
from .schemes import (
    DEFAULT_SCHEME,
    SCHEMES,
    decodes_finite,
    dequantize,
    dequantize_stream,
    levels_for,
    quantize,
)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on every platform
        return max(1, os.cpu_count() or 1)


Dequantizer = Callable[[TensorEntry, np.ndarray, "np.ndarray | None"], np.ndarray]
BitsOption = float | Mapping[str, "float | None"]
SchemeOption = str | Mapping[str, str]

# numpy dtype of each header dtype's raw bytes; bfloat16 travels as its uint16 bit patterns.
NUMPY_DTYPES = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}
DEFAULT_BITS = 8
SAVE_THREADS_MIN = 1 << 20  # elements from which a fixed-width save uses threads
THREADS_MIN_CODES = 1 << 22  # weights decoded without the GIL from which decoding uses threads
SPARSE_MIN = 1 << 20  # smallest all-zero chunk left as a hole
CHUNK = 1 << 24  # bytes written at a time; an all-zero chunk becomes a hole (sparse file)
# Encoded bytes a save keeps in memory before it spools payloads to a temporary file:
# writing them twice (spool, then file) made a 19 MB save 30% slower on tmpfs.
SPOOL_MEMORY = 1 << 26
# Huffman-code the quantized codes where that is smaller (it never makes a file larger).
DEFAULT_ENTROPY = True


def dtype_name(array: np.ndarray) -> str:
    """The header dtype of a numpy array (bfloat16 arrays come from the torch layer)."""
    native = array.dtype.newbyteorder("=")  # big-endian input is converted on write
    for name, np_dtype in NUMPY_DTYPES.items():
        if name != "bfloat16" and native == np.dtype(np_dtype).newbyteorder("="):
            return name
    raise E.EncodeError(f"dtype {array.dtype} cannot be stored")


def bf16_to_f32(bits16: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns to float32 (exact)."""
    return (bits16.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- writing


def _bits_for(name: str, array: np.ndarray, dtype: str, bits: BitsOption) -> int | None:
    """Bits to quantize this tensor with, or None to keep it raw (spec section 6.1)."""
    if isinstance(bits, Mapping):
        if name in bits:
            chosen = bits[name]
            if chosen is not None and dtype not in FLOAT_DTYPES:
                raise E.EncodeError(
                    f"only floating tensors can be quantized ({dtype})", tensor=name
                )
            return chosen
        default = DEFAULT_BITS
    else:
        default = bits
    return default if dtype in FLOAT_DTYPES and array.ndim >= 2 else None


def _check_options(names: list[str], bits: BitsOption, scheme: SchemeOption) -> None:
    schemes = scheme.values() if isinstance(scheme, Mapping) else [scheme]
    for name in schemes:
        if name not in SCHEMES:
            raise E.EncodeError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")
    for option, what in ((bits, "bits"), (scheme, "scheme")):
        if isinstance(option, Mapping):
            unknown = sorted(set(option) - set(names))
            if unknown:
                raise E.EncodeError(f"{what} given for tensors not in the state_dict: {unknown}")
    values = bits.values() if isinstance(bits, Mapping) else [bits]
    for value in values:
        if value is not None:
            try:
                levels_for(value)
            except ValueError as exc:
                raise E.EncodeError(str(exc)) from None


def _scheme_for(name: str, scheme: SchemeOption) -> str:
    if isinstance(scheme, Mapping):
        return scheme.get(name, DEFAULT_SCHEME)
    return scheme


def encode_tensor(
    name: str,
    array: np.ndarray,
    dtype: str,
    bits: float | None,
    scheme: str,
    entropy: bool = False,
) -> tuple[TensorEntry, np.ndarray]:
    """Build one tensor's header entry (offset not yet assigned) and its payload bytes."""
    if bits is None:
        payload = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype]).reshape(-1)
        payload = payload.view(np.uint8)
        shape = tuple(int(d) for d in array.shape)
        entry = TensorEntry(name, shape, dtype, "raw", 0, payload.size, crc32(payload))
        return entry, payload
    entry, codes, huffman = _quantize(name, array, dtype, bits, scheme, entropy)
    if entry.storage == "huffman":
        symbols, counts = huffman
        # long streams get a chunk index (spec 5.2)
        entry.chunk = index_chunk(symbols.size, entry.length)
        if entry.chunk:
            entry.chunk_starts = np.empty(-(-symbols.size // entry.chunk) - 1, np.int64)
        payload = encode_symbols(
            symbols, entry.code_lengths, counts, entry.chunk or 0, entry.chunk_starts
        )
    else:
        payload = pack_codes(codes, entry.bits)
    assert payload.size == entry.length
    entry.crc32 = crc32(payload)
    return entry, payload


def quantize_tensor(
    name: str, array: np.ndarray, dtype: str, bits: float, scheme: str, entropy: bool
) -> tuple[TensorEntry, np.ndarray]:
    """Quantize one floating tensor and choose its storage: the header entry (with its
    length; no CRC or offset yet) and the flat codes. Builds no payload, so it is cheap
    enough to try many settings (see :mod:`qpack.budget`)."""
    entry, codes, _ = _quantize(name, array, dtype, bits, scheme, entropy)
    return entry, codes


def _quantize(name, array, dtype, bits, scheme, entropy):
    """:func:`quantize_tensor`, plus (symbols, their histogram) when Huffman storage is
    chosen."""
    values = bf16_to_f32(array) if dtype == "bfloat16" else array.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise E.EncodeError(
            "holds NaN or infinite values, which cannot be quantized; "
            "clean the weights or keep this tensor raw",
            tensor=name,
        )
    try:
        q = quantize(values, bits, scheme)
    except ValueError as exc:  # e.g. fractional bits for the origin's symmetric quantizer
        raise E.EncodeError(str(exc), tensor=name) from None
    if q.granularity == "channel" and array.ndim == 0:
        raise E.EncodeError(
            f"{scheme} needs at least one dimension; use a per-layer scheme", tensor=name
        )
    if not decodes_finite(q.bits, q.scale, q.zero_point):
        raise E.EncodeError(
            f"values near the float32 limit (max |w| = {np.abs(values).max():.3g}) overflow "
            f"when quantized to {bits} bits; keep this tensor raw",
            tensor=name,
        )
    entry = TensorEntry(
        name,
        tuple(int(d) for d in array.shape),
        dtype,
        "packed",
        0,
        packed_size(q.codes.size, q.bits),
        0,
        bits=q.bits,
        scheme=scheme,
        dequant="affine",
        granularity=q.granularity,
        scale=q.scale,
        zero_point=q.zero_point,
    )
    if entropy:
        group, lengths, stream, symbols, counts = best_group(q.codes, q.bits)
        # the code length table travels in the header: count it against Huffman
        if stream + packed_size(lengths.size, 4) < entry.length:
            entry.storage, entry.group, entry.code_lengths = "huffman", group, lengths
            entry.length = stream
            return entry, q.codes, (symbols, counts)
    return entry, q.codes, None


def decode_codes_values(
    entry: TensorEntry, codes: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """The float32 values that codes decode to (spec section 6.1), in the tensor's shape
    (written into ``out``, a flat float32 array of ``numel`` elements, when given)."""
    return dequantize(codes, entry.scale, entry.zero_point, out).reshape(entry.shape)


def _prepare(
    items: list[tuple[str, np.ndarray, str]],
    bits: BitsOption,
    scheme: SchemeOption,
    metadata: Mapping[str, str] | None,
) -> dict[str, str]:
    """Check names and options before anything is encoded; returns the header metadata."""
    names = [name for name, _, _ in items]
    if len(set(names)) != len(names):
        raise E.EncodeError("duplicate tensor names")
    for name in names:
        if type(name) is not str or not name:
            raise E.EncodeError(f"tensor names must be non-empty strings, got {name!r}")
    _check_options(names, bits, scheme)
    meta = {"producer": f"qpack {__version__}"}
    for key, value in (metadata or {}).items():
        if type(key) is not str or type(value) is not str:
            raise E.EncodeError(f"metadata must map strings to strings ({key!r}: {value!r})")
        meta[key] = value
    return meta


def _encoded(
    items: list[tuple[str, np.ndarray, str]],
    bits: BitsOption,
    scheme: SchemeOption,
    entropy: bool,
    workers: int | None = None,
) -> Iterator[tuple[TensorEntry, np.ndarray]]:
    """Encode the items on worker threads (by default one per CPU, but one in all for a
    small fixed-width save), yielding (entry, payload) in order."""

    def one(item: tuple[str, np.ndarray, str]) -> tuple[TensorEntry, np.ndarray]:
        name, array, dtype = item
        chosen = _bits_for(name, array, dtype, bits)
        return encode_tensor(name, array, dtype, chosen, _scheme_for(name, scheme), entropy)

    if workers is None and not entropy and sum(a.size for _, a, _ in items) < SAVE_THREADS_MIN:
        workers = 1  # numpy's short calls on two threads contend for the GIL: slower
    return ordered_map(one, items, workers)


def ordered_map(
    fn, items: Iterable, workers: int | None = None, ahead: int | None = None
) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads (default: one per CPU), a few items ahead
    of the consumer, in order. numpy, zlib and file I/O release the GIL, so tensors are
    coded in parallel; an exception surfaces at its item, as in a sequential loop. At most
    ``ahead + 1`` results are held at a time (default ``ahead``: ``2 * workers``)."""
    workers = workers or cpu_count()
    if workers == 1:
        yield from map(fn, items)
        return
    ahead = 2 * workers if ahead is None else ahead
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def encode_chunks(
    items: Iterable[tuple[str, np.ndarray, str]],
    *,
    bits: BitsOption = DEFAULT_BITS,
    scheme: SchemeOption = DEFAULT_SCHEME,
    entropy: bool = DEFAULT_ENTROPY,
    metadata: Mapping[str, str] | None = None,
) -> Iterator[bytes | np.ndarray]:
    """Encode ``(name, array, dtype)`` items in memory; returns the file's bytes as chunks
    in order."""
    items = list(items)
    meta = _prepare(items, bits, scheme, metadata)
    return serialize(list(_encoded(items, bits, scheme, entropy)), meta)


def write_file(
    path: str | os.PathLike,
    items: Iterable[tuple[str, np.ndarray, str]],
    *,
    bits: BitsOption = DEFAULT_BITS,
    scheme: SchemeOption = DEFAULT_SCHEME,
    entropy: bool = DEFAULT_ENTROPY,
    metadata: Mapping[str, str] | None = None,
    workers: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Encode ``(name, array, dtype)`` items to ``path``, atomically and streaming.

    The header comes first in the file but is known last, so the encoded payloads wait:
    in memory up to :data:`SPOOL_MEMORY` bytes in all, the rest in a temporary spool file
    as soon as each is encoded; memory holds the inputs, that much, and a few encoded
    tensors (see :func:`ordered_map`). ``progress`` is called with each tensor's element
    count once it is encoded."""
    items = list(items)
    meta = _prepare(items, bits, scheme, metadata)
    write_atomic(path, _spooled(Path(path).parent, items, bits, scheme, entropy, meta,
                                workers, progress))


def _spooled(folder, items, bits, scheme, entropy, meta, workers, progress):
    """The chunks of :func:`write_file`: encoded payloads wait in memory while they fit
    in :data:`SPOOL_MEMORY`, the others in a spool file made when first needed; raw ones
    are views of the caller's arrays, so they are written straight from there."""
    with contextlib.ExitStack() as stack:
        spool, held, encoded = None, 0, []
        for entry, payload in _encoded(items, bits, scheme, entropy, workers):
            if entry.storage != "raw":
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
            for done in range(0, entry.length, CHUNK):
                yield view[done : done + CHUNK]
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
            chunk = self.file.read(min(left, CHUNK))
            if not chunk:
                raise OSError(f"spool file ended {left} bytes early")
            out.write(chunk)
            left -= len(chunk)


def write_atomic(path: str | os.PathLike, chunks: Iterable[bytes | np.ndarray]) -> None:
    """Write chunks to a temporary file beside ``path``, fsync, then rename over it, so
    ``path`` holds either its previous content or the complete new file, never a mix.
    Large all-zero chunks are skipped over, leaving holes where the file system allows.
    I/O failures raise :class:`~qpack.errors.WriteError` (also an ``OSError``)."""
    target = Path(path)
    folder = target.parent
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                if isinstance(chunk, SpoolRange):
                    chunk.copy_to(out)
                elif len(chunk) >= SPARSE_MIN and not np.frombuffer(chunk, np.uint8).any():
                    out.seek(len(chunk), os.SEEK_CUR)  # reads back as zeros
                else:
                    out.write(chunk)
            out.truncate()  # a trailing hole needs the size set
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, E.QpackError):
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise E.WriteError(f"cannot write ({reason})", path=target) from exc
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; not every platform or file system can open a directory."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def encode(
    arrays: Mapping[str, np.ndarray],
    *,
    bits: BitsOption = DEFAULT_BITS,
    scheme: SchemeOption = DEFAULT_SCHEME,
    entropy: bool = DEFAULT_ENTROPY,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Encode a mapping of numpy arrays to the bytes of a .qpk file (no torch needed)."""
    items = [(name, np.asarray(a), dtype_name(np.asarray(a))) for name, a in arrays.items()]
    chunks = encode_chunks(items, bits=bits, scheme=scheme, entropy=entropy, metadata=metadata)
    return b"".join(bytes(c) if isinstance(c, np.ndarray) else c for c in chunks)


# --------------------------------------------------------------------------- reading


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


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset``; returns the bytes read (0 at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    chunk = os.pread(fd, len(view), offset)  # platforms without preadv
    view[: len(chunk)] = chunk
    return len(chunk)


class Reader:
    """Validated access to a .qpk file or buffer; tensors are read and checked on demand."""

    def __init__(self, source: str | os.PathLike | bytes | bytearray | memoryview):
        self._file = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path = "<bytes>"
            self._buffer = memoryview(source).cast("B")
            self.file_size = len(self._buffer)
        else:
            self.path = os.fspath(source)
            self._buffer = None
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())
                self.file_size = os.fstat(self._file.fileno()).st_size
            except IsADirectoryError:
                raise E.QpackError("is a directory, not a qpack file", path=self.path) from None
            except OSError as exc:
                raise E.QpackError(f"cannot open ({exc.strerror})", path=self.path) from None
        try:
            self.header: Header = read_header(self._read_at, self.file_size, self.path)
        except BaseException:
            self.close()
            raise
        self._by_name = {entry.name: entry for entry in self.header.tensors}

    # -- plumbing
    def _read_at(self, offset: int, size: int, into: np.ndarray | None = None):
        """``size`` bytes at ``offset``: a new bytearray, or a view of ``into`` (a uint8
        array of at least ``size`` bytes, filled in place; reusing it spares fresh pages)."""
        if self._buffer is not None:
            view = self._buffer[offset : offset + size]
            return bytearray(view) if into is None else view
        target = bytearray(size) if into is None else into
        view = memoryview(target)[:size]
        done = 0
        while done < size:
            got = _preadv(self._file.fileno(), view[done:], offset + done)
            if not got:
                raise E.TruncatedError("file ended early while reading", path=self.path)
            done += got
        return target if into is None else view

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- access
    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata)

    def keys(self) -> list[str]:
        return [entry.name for entry in self.header.tensors]

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def payload(self, entry: TensorEntry, into: np.ndarray | None = None):
        """The tensor's bytes, after checking their CRC-32 (read into ``into`` if given)."""
        data = self._read_at(self.header.data_start + entry.offset, entry.length, into)
        if crc32(data) != entry.crc32:
            raise E.DataChecksumError(
                "data checksum mismatch (corrupted tensor bytes)", path=self.path, tensor=entry.name
            )
        return data

    def array(
        self, name: str, out: np.ndarray | None = None, dequant: Dequantizer | None = None
    ) -> np.ndarray:
        """Decode one tensor: float32 for packed tensors, the stored dtype for raw ones
        (bfloat16 as its uint16 bit patterns); ``out`` and ``dequant`` as in
        :meth:`arrays`."""
        entry = self.entry(name)
        with scratch_scope():
            data = self.payload(entry, scratch("payload", entry.length))
            return decode_payload(entry, data, self.path, out, dequant)

    def arrays(
        self,
        workers: int | None = None,
        alloc: Callable[[TensorEntry], np.ndarray] | None = None,
        dequant: Dequantizer | None = None,
        ahead: int | None = None,
    ) -> Iterator[tuple[TensorEntry, np.ndarray]]:
        """Decode every tensor in file order, checking every checksum, padding bit and
        alignment byte on the way.

        Tensors are read and decoded by ``workers`` threads (default: one per CPU when the
        file holds Huffman-coded tensors, else one) a few tensors ahead of the consumer, and
        yielded in order; a bad file raises the error of the first bad tensor in file order,
        as a sequential reader would. ``alloc(entry)``, if given, returns the flat array to
        decode into: float32 for quantized tensors, else the stored dtype (uint16 for
        bfloat16), ``numel`` elements. ``dequant`` replaces the numpy dequantizer (see
        :func:`decode_payload`). ``ahead`` bounds the tensors decoded ahead of the consumer
        (see :func:`ordered_map`); a consumer that keeps every tensor (a whole load) may
        hand all of them out at once, so the workers never wait on it."""

        def decode(entry: TensorEntry, gap: int, out: np.ndarray | None = None) -> np.ndarray:
            return self._decode(entry, gap, out, dequant)

        return self._in_order(decode, workers, alloc, ahead)

    def payloads(
        self, workers: int | None = None, then: Callable[[TensorEntry, bytes], Any] | None = None
    ) -> Iterator[tuple[TensorEntry, Any]]:
        """Every tensor's checked bytes in file order, with the checks of :meth:`arrays`
        but no decoding (for decoders elsewhere, such as on a GPU). ``then(entry, bytes)``,
        if given, runs on the worker threads and its result is yielded instead."""
        if then is None:
            return self._in_order(self._checked, workers)
        return self._in_order(lambda e, gap: then(e, self._checked(e, gap)), workers)

    def _in_order(
        self,
        fn,
        workers: int | None,
        alloc: Callable[[TensorEntry], np.ndarray] | None = None,
        ahead: int | None = None,
    ) -> Iterator[tuple[TensorEntry, object]]:
        """``fn(entry, gap)`` (or ``fn(entry, gap, alloc(entry))``) for every tensor, in
        file order, on ``workers`` threads; ``gap`` is where the bytes before it begin.
        ``alloc`` runs on the calling thread, as the jobs are handed out: memory freed by
        this thread is reused, where each worker's allocator would take fresh pages."""
        header = self.header
        workers = workers or self.default_workers()
        self._check_zero(PREAMBLE_SIZE + header.header_len, header.data_start)
        ends = [0] + [e.offset + e.length for e in header.tensors]
        jobs = zip(header.tensors, ends)  # noqa: B905 (ends has one more: the data's end)
        if alloc is not None:
            jobs = ((entry, gap, alloc(entry)) for entry, gap in jobs)
        with scratch_scope(), self._whole_file():
            done = ordered_map(lambda job: fn(*job), jobs, workers, ahead)
            yield from zip(header.tensors, done)  # noqa: B905

    @contextlib.contextmanager
    def _whole_file(self) -> Iterator[None]:
        """While every tensor is read in turn, read a small file in one call instead of
        two per tensor (its bytes and the alignment gap before them)."""
        if self._buffer is not None or self.file_size > SCRATCH_MAX:
            yield
            return
        whole = self._read_at(0, self.file_size, scratch("file", self.file_size))
        self._buffer = whole
        try:
            yield
        finally:
            self._buffer = None

    def default_workers(self, decoded: tuple[str, ...] | None = None) -> int:
        """Threads that decode this file fastest: one per CPU when there is enough work
        done without the GIL (the compiled kernels' whole tensors, or zlib's inflate of
        Huffman-coded ones), else one; numpy's many short calls run faster on one thread
        than on two contending for the GIL. ``decoded`` names the storage kinds decoded on
        the host (a GPU load decodes only Huffman streams there; reading and checking the
        rest is faster on one thread)."""
        threaded = ("packed", "huffman") if kernels.native is not None else ("huffman",)
        if decoded is not None:
            threaded = tuple(s for s in threaded if s in decoded)
        coded = sum(e.numel for e in self.header.tensors if e.storage in threaded)
        return cpu_count() if coded >= THREADS_MIN_CODES else 1

    def _checked(self, entry: TensorEntry, gap: int, into: np.ndarray | None = None):
        """Check the alignment bytes before a tensor, then read (into ``into`` if given)
        and check its bytes."""
        self._check_zero(self.header.data_start + gap, self.header.data_start + entry.offset)
        return self.payload(entry, into)

    def _decode(self, entry: TensorEntry, gap: int, out=None, dequant=None) -> np.ndarray:
        data = self._checked(entry, gap, scratch("payload", entry.length))
        return decode_payload(entry, data, self.path, out, dequant)

    def verify(self) -> None:
        """Check the whole file; raises a QpackError on the first problem."""
        for _ in self.arrays():
            pass

    def _check_zero(self, start: int, stop: int) -> None:
        if stop > start and any(self._read_at(start, stop - start)):
            raise E.DataError(
                f"alignment padding at bytes [{start}, {stop}) is not zero", path=self.path
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
    if entry.storage == "raw":
        check_raw(entry, data, path)
        stored = np.frombuffer(data, dtype=NUMPY_DTYPES[entry.dtype])
        if out is None:
            out = stored.astype(stored.dtype.newbyteorder("="))
        else:
            out[...] = stored
        return out.reshape(entry.shape)
    check_decodes_finite(entry, path)
    if kernels.native is not None:
        return _native_values(entry, data, path, out)
    # group 1: the symbols are the codes, and the plain dequantizer is faster than a lookup
    if entry.storage == "huffman" and entry.scale.size == 1 and entry.group > 1:
        return _huffman_values(entry, data, path, out)
    # only the fixed-width unpacker writes codes into a buffer of ours
    unpacked = entry.storage == "packed" and entry.bits < 8
    codes = decode_codes(entry, data, path, scratch("codes", entry.numel) if unpacked else None)
    return (dequant or decode_codes_values)(entry, codes, out)


def decode_codes(
    entry: TensorEntry, data: bytes | memoryview, path=None, out: np.ndarray | None = None
) -> np.ndarray:
    """The flat integer codes of a quantized tensor, after checking their padding (into
    ``out``, a uint8 array of ``numel`` elements, where that saves a copy)."""
    if entry.storage == "huffman":
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
    if entry.storage == "packed":
        check_packed_padding(entry, data, path)
        dequantize_stream(data, entry.bits, 0, entry.numel, scale, zero, out)
    elif entry.group == 1 and not (entry.chunk and lanes_pay(entry.length, entry.numel)):
        # a symbol is a code: straight to its value (checking any chunk index on the way)
        lengths, chunk, starts = entry.code_lengths, entry.chunk, entry.chunk_starts
        _huffman_stream(
            entry,
            data,
            path,
            lambda n: (None, decode_values(data, lengths, n, scale, zero, out, chunk, starts)),
        )
    else:
        count = -(-entry.numel // entry.group)
        symbols = _huffman_symbols(entry, data, path, scratch("symbols", count))
        dequantize_stream(symbols, entry.bits, entry.group, entry.numel, scale, zero, out)
    return out.reshape(entry.shape)


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
    filled = entry.numel % entry.group  # codes of the last symbol that belong to the tensor
    if filled and int(symbols[-1]) >> (filled * entry.bits):
        raise E.DataError(
            "codes padding the last symbol are not zero", path=path, tensor=entry.name
        )
    return symbols


def _huffman_stream(entry: TensorEntry, data: bytes, path, decode):
    """``decode(count)`` -> (result, used bits) of a Huffman-coded tensor's symbols, then
    the checks on the stream: it fills its bytes exactly and the padding bits after it
    are zero. Returns the result; decoding errors become DataError."""
    count = -(-entry.numel // entry.group)
    try:
        result, used = decode(count)
    except ValueError as exc:
        raise E.DataError(
            f"Huffman stream {exc} ({count} symbols expected)",
            path=path,
            tensor=entry.name,
        ) from None
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


def decode(data: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Decode the bytes of a .qpk file to numpy arrays, in file order (no torch needed).

    Packed tensors decode to float32; raw tensors keep their dtype, except bfloat16, which
    numpy lacks, and is widened exactly to float32.
    """
    return _numpy_arrays(Reader(data))


def load_numpy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .qpk file into numpy arrays (see :func:`decode` for the dtypes)."""
    with Reader(path) as reader:
        return _numpy_arrays(reader)


def _numpy_arrays(reader: Reader) -> dict[str, np.ndarray]:
    return {
        entry.name: bf16_to_f32(array)
        if entry.storage == "raw" and entry.dtype == "bfloat16"
        else array
        for entry, array in reader.arrays()
    }


def describe(reader: Reader, stats: bool = False) -> dict:
    """The header as plain Python data (what ``qpack inspect`` shows). With ``stats``, the
    codes of quantized tensors are read to add their empirical entropy bound."""
    tensors = []
    for e in reader.header.tensors:
        quantized = e.storage in QUANTIZED_KINDS
        row = {
            "name": e.name,
            "shape": list(e.shape),
            "dtype": e.dtype,
            "storage": e.storage,
            "bits": e.bits if quantized else DTYPE_SIZES[e.dtype] * 8,
            "scheme": e.scheme if quantized else "raw",
            "offset": e.offset,
            "bytes": e.length,
            "crc32": f"{e.crc32:08x}",
            "bits_per_weight": 8 * e.length / e.numel if e.numel else 0.0,
        }
        if quantized:
            row["granularity"] = e.granularity
            row["scale"] = [float(v) for v in e.scale]
            row["zero_point"] = [float(v) for v in e.zero_point]
            if e.storage == "huffman":
                row["group"] = e.group
            if stats:
                codes = decode_codes(e, reader.payload(e), reader.path)
                row["entropy_bytes"] = entropy_bits(codes, 1 << e.bits) / 8
        tensors.append(row)
    return {
        "path": reader.path,
        "version": "{}.{}".format(*reader.header.version),
        "file_size": reader.file_size,
        "metadata": reader.metadata,
        "tensors": tensors,
    }

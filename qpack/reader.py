"""Reading .qpk files: :class:`Reader` validates the header when opened, then reads,
checks and decodes tensors on demand, so one tensor can be fetched without touching the
others' bytes; :func:`decode` and :func:`load_numpy` are the numpy-only whole-file reads.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import errors as E
from . import kernels
from ._threads import cpu_count, ordered_map
from ._zlib import crc32
from .container import (
    DTYPE_SIZES,
    HALF,
    HUFFMAN,
    PACKED,
    PREAMBLE_SIZE,
    QUANTIZED_KINDS,
    RAW,
    SCALE_DTYPES,
    Header,
    TensorEntry,
    read_header,
)
from .decoder import (
    Dequantizer,
    check_decodes_finite,
    decode_codes,
    decode_payload,
    decode_range,
    range_symbols,
    scratch,
    scratch_scope,
    split_ranges,
)
from .dtypes import bf16_to_f32
from .entropy import entropy_bits

__all__ = ["Reader", "decode", "describe", "load_numpy"]

THREADS_MIN_CODES = 1 << 22  # weights decoded without the GIL from which decoding uses threads
# A load splits a Huffman stream into ranges of whole chunks decoded on several threads
# (spec 5.2's chunk index; see Reader._pieces), but into no range of fewer symbols than
# this: each range costs a job and the decoder's tables, about 35 us on 2 threads (8.4M
# 8-bit symbols in 2 ranges: 7.7 ms, in 32: 8.7, in 128: 12.1), and 2^19 symbols take
# about 0.6 ms to decode.
SPLIT_MIN = 1 << 19


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset``; returns the bytes read (0 at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    chunk = os.pread(fd, len(view), offset)  # platforms without preadv
    view[: len(chunk)] = chunk
    return len(chunk)


# Files up to this size are read in one call when every tensor is read. A larger file is
# read a tensor at a time, on the decoding threads, so that decoding overlaps the reading:
# a 16 MB file read whole from a cold page cache loaded in 72-260 ms, a tensor at a time
# in 57-60 ms (and 60 against 66 ms warm).
WHOLE_FILE_MAX = 1 << 22


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
        self._index = {entry.name: i for i, entry in enumerate(self.header.tensors)}

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
        """Decode one tensor: float32 for quantized and half tensors, the stored dtype for raw ones
        (bfloat16 as its uint16 bit patterns); ``out`` and ``dequant`` as in
        :meth:`arrays`. A large Huffman stream decodes in ranges on every thread, as in a
        whole load."""
        entry = self.entry(name)
        gap = self._gap_before(entry)
        workers = self.default_workers() if entry.storage == HUFFMAN else 1
        ranges = split_ranges(entry, self._pieces(workers, (entry,)).get(name, 1))
        with scratch_scope():
            if len(ranges) > 1:  # a large Huffman stream: its ranges of chunks on every thread
                split = _Split(self, entry, gap, out, ranges)
                jobs = [(split.read, ()), *((split.decode, r) for r in ranges)]
                return list(ordered_map(lambda job: job[0](*job[1]), jobs, workers))[-1]
            data = self._checked(entry, gap, scratch("payload", entry.length))
            return decode_payload(entry, data, self.path, out, dequant)

    def checked_payload(self, name: str):
        """One tensor's bytes, with every check a reader of that tensor alone makes (its CRC
        and the alignment bytes before it), for decoders elsewhere (e.g. on a GPU)."""
        entry = self.entry(name)
        return self._checked(entry, self._gap_before(entry))

    def _gap_before(self, entry: TensorEntry) -> int:
        """Where the alignment bytes before a tensor begin, relative to the data section
        (spec section 8: a reader of one tensor checks them, and the header's padding too
        for the first tensor)."""
        tensors = self.header.tensors
        index = self._index[entry.name]
        if index == 0:
            self._check_zero(PREAMBLE_SIZE + self.header.header_len, self.header.data_start)
            return 0
        before = tensors[index - 1]
        return before.offset + before.length

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
        decode into: float32 for quantized and half tensors, else the stored dtype (uint16 for
        bfloat16), ``numel`` elements. ``dequant`` replaces the numpy dequantizer (see
        :func:`decode_payload`). ``ahead`` bounds the tensors decoded ahead of the consumer
        (see :func:`ordered_map`); a consumer that keeps every tensor (a whole load) may
        hand all of them out at once, so the workers never wait on it."""

        def decode(entry: TensorEntry, gap: int, out: np.ndarray | None = None) -> np.ndarray:
            return self._decode(entry, gap, out, dequant)

        workers = workers or self.default_workers()
        return self._in_order(decode, workers, alloc, ahead, self._pieces(workers))

    def payloads(
        self, workers: int | None = None, then: Callable[[TensorEntry, bytes], Any] | None = None
    ) -> Iterator[tuple[TensorEntry, Any]]:
        """Every tensor's checked bytes in file order, with the checks of :meth:`arrays`
        but no decoding (for decoders elsewhere, such as on a GPU). ``then(entry, bytes)``,
        if given, runs on the worker threads and its result is yielded instead."""
        if then is None:
            return self._in_order(self._checked, workers)
        return self._in_order(lambda e, gap: then(e, self._checked(e, gap)), workers)

    def _pieces(self, workers: int, entries: tuple[TensorEntry, ...] | None = None):
        """Into how many ranges each tensor that splits decodes on ``workers`` threads,
        when ``entries`` (default: every tensor) are decoded. A load's work is balanced by
        bytes, not by tensors: a Huffman stream with a chunk index of more than half a
        thread's share of the load splits into ranges of at most that (the threads, each
        taking the next job, largest first, then finish within about half a share of each
        other), of at least :data:`SPLIT_MIN` symbols."""
        entries = self.header.tensors if entries is None else entries
        if workers < 2:
            return {}
        share = sum(map(_work, entries)) / (2 * workers)
        return {
            e.name: min(math.ceil(_work(e) / share), -(-e.numel // e.group) // SPLIT_MIN)
            for e in entries
            if e.storage == HUFFMAN and e.chunk and _work(e) > share
        }

    def _in_order(
        self,
        fn,
        workers: int | None,
        alloc: Callable[[TensorEntry], np.ndarray] | None = None,
        ahead: int | None = None,
        pieces: dict[str, int] | None = None,
    ) -> Iterator[tuple[TensorEntry, object]]:
        """``fn(entry, gap)`` (or ``fn(entry, gap, alloc(entry))``) for every tensor, in
        file order, on ``workers`` threads; ``gap`` is where the bytes before it begin.
        ``alloc`` runs on the calling thread, as the jobs are handed out: memory freed by
        this thread is reused, where each worker's allocator would take fresh pages. A
        tensor named in ``pieces`` (where ``fn`` decodes) decodes instead in up to that
        many ranges, on several threads (:class:`_Split`)."""
        header = self.header
        workers = workers or self.default_workers()
        self._check_zero(PREAMBLE_SIZE + header.header_len, header.data_start)
        ends = [0] + [e.offset + e.length for e in header.tensors]
        pieces = pieces or {}

        def jobs() -> Iterator[tuple[float, Callable, tuple]]:
            """(work, function, arguments) of every tensor in turn: one job, or a split
            tensor's read and then its ranges."""
            for entry, gap in zip(header.tensors, ends):  # noqa: B905 (ends: one more)
                args = (entry, gap) if alloc is None else (entry, gap, alloc(entry))
                ranges = split_ranges(entry, pieces.get(entry.name, 1))
                if len(ranges) == 1:
                    yield _work(entry), fn, args
                    continue
                split = _Split(self, entry, gap, None if alloc is None else args[2], ranges)
                yield math.inf, split.read, ()  # before its ranges, whatever their work
                for first, last in ranges:
                    part = (last - first) / ranges[-1][1]
                    yield part * _work(entry), split.decode, (first, last)

        # a whole load holds every tensor anyway: the largest jobs go first, so that one big
        # job does not keep one thread busy after the others have finished
        whole = ahead is not None and ahead >= len(header.tensors)
        cost = (lambda job: job[0]) if whole else None
        with scratch_scope(), self._whole_file():
            done = ordered_map(lambda job: job[1](*job[2]), jobs(), workers, ahead, cost)
            results = (result for result in done if result is not _PART)
            yield from zip(header.tensors, results)  # noqa: B905

    @contextlib.contextmanager
    def _whole_file(self) -> Iterator[None]:
        """While every tensor is read in turn, read a small file in one call instead of
        two per tensor (its bytes and the alignment gap before them)."""
        if self._buffer is not None or self.file_size > WHOLE_FILE_MAX:
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
        threaded = (PACKED, HUFFMAN) if kernels.native is not None else (HUFFMAN,)
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


def _work(entry: TensorEntry) -> int:
    """A tensor's decoding work, in bytes: those it writes (4 a value) and reads."""
    return 4 * entry.numel + entry.length


_PART = object()  # the result of a split tensor's jobs but its last range


class _Split:
    """A Huffman-coded tensor decoded in ranges of whole chunks on several threads (see
    :func:`~qpack.decoder.split_ranges`): :meth:`read` reads and checks its bytes (the
    alignment bytes before them, their CRC, the scale), then each :meth:`decode` decodes
    one range into its part of the one output array. The pool starts jobs in the order
    they are handed out, the read first, so a range waits only on a read that a thread
    has already started (no deadlock). Results come out in that order too, so do errors:
    the read's, then the first failing range's, which is what a decoder of the whole
    tensor raises (:func:`~qpack.decoder.decode_range`)."""

    def __init__(self, reader: Reader, entry: TensorEntry, gap: int, out, ranges: list):
        self.reader, self.entry, self.gap, self.out = reader, entry, gap, out
        self.data = self.symbols = None
        self.last = ranges[-1]
        self.left = len(ranges)  # ranges not yet decoded: the last one frees the buffers
        self.lock = threading.Lock()
        self.ready = threading.Event()

    def read(self) -> object:
        entry = self.entry
        try:
            # buffers of the tensor's own, not of a thread's scratch: every range reads them
            data = self.reader._checked(entry, self.gap, np.empty(entry.length, np.uint8))
            check_decodes_finite(entry, self.reader.path)
            if self.out is None:
                self.out = np.empty(entry.numel, dtype=np.float32)
            self.symbols = range_symbols(entry)
            self.data = data
        finally:
            self.ready.set()  # even on an error: the ranges must not wait forever
        return _PART

    def decode(self, first: int, last: int) -> object:
        self.ready.wait()
        try:
            if self.data is None:  # the read failed, and its error comes out first
                return _PART
            entry = self.entry
            decode_range(entry, self.data, self.reader.path, self.out, self.symbols, first, last)
            return self.out.reshape(entry.shape) if (first, last) == self.last else _PART
        finally:
            with self.lock:
                self.left -= 1
                if not self.left:
                    self.data = self.symbols = None


def decode(data: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Decode the bytes of a .qpk file to numpy arrays, in file order (no torch needed).

    Quantized and half tensors decode to float32; raw tensors keep their dtype, except
    bfloat16, which numpy lacks, and is widened exactly to float32.

    Example:
        >>> arrays = qpack.decode(open("model.qpk", "rb").read())
    """
    return _numpy_arrays(Reader(data))


def load_numpy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .qpk file into numpy arrays (see :func:`decode` for the dtypes).

    Example:
        >>> arrays = qpack.load_numpy("model.qpk")
    """
    with Reader(path) as reader:
        return _numpy_arrays(reader)


def _numpy_arrays(reader: Reader) -> dict[str, np.ndarray]:
    return {
        entry.name: bf16_to_f32(array)
        if entry.storage == RAW and entry.dtype == "bfloat16"
        else array
        for entry, array in reader.arrays()
    }


def _param_bytes(entry: TensorEntry) -> int:
    """Bytes of the header's ``scale`` and ``zero_point`` of a quantized tensor."""
    size = np.dtype(SCALE_DTYPES[entry.scale_dtype]).itemsize
    return size * (entry.scale.size + (1 if entry.shared_zero else entry.zero_point.size))


def describe(reader: Reader, stats: bool = False) -> dict:
    """The header as plain Python data (what ``qpack inspect`` shows). With ``stats``, the
    codes of quantized tensors are read to add their empirical entropy bound."""
    tensors = []
    for e in reader.header.tensors:
        quantized = e.storage in QUANTIZED_KINDS
        # the header's scale and zero_point bytes: a quantized tensor's cost beside its codes
        params = _param_bytes(e) if quantized else 0
        stored = 16 if e.storage == HALF else DTYPE_SIZES[e.dtype] * 8
        row = {
            "name": e.name,
            "shape": list(e.shape),
            "dtype": e.dtype,
            "storage": e.storage,
            "bits": e.bits if quantized else stored,
            "scheme": (e.scheme or "-") if quantized else e.storage,
            "offset": e.offset,
            "bytes": e.length,
            "crc32": f"{e.crc32:08x}",
            "param_bytes": params,
            "bits_per_weight": 8 * (e.length + params) / e.numel if e.numel else 0.0,
        }
        if quantized:
            row["granularity"] = e.granularity
            if e.granularity == "group":
                row["group_size"] = e.group_size
                row["scale_dtype"] = e.scale_dtype
            row["scale"] = [float(v) for v in e.scale]
            row["zero_point"] = [float(v) for v in e.zero_point]
            if e.storage == HUFFMAN:
                row["group"] = e.group
            if stats:
                try:
                    codes = decode_codes(e, reader.payload(e), reader.path)
                except E.QpackError as exc:  # shown, not fatal: verify is the checker
                    row["problem"] = exc.reason
                else:
                    row["entropy_bytes"] = entropy_bits(codes, 1 << e.bits) / 8
                    # levels used: a fractional width (2.5 bits: 6 levels) shows as such
                    row["levels"] = int(codes.max()) + 1 if codes.size else 0
        tensors.append(row)
    return {
        "path": reader.path,
        "version": "{}.{}".format(*reader.header.version),
        "file_size": reader.file_size,
        "metadata": reader.metadata,
        "tensors": tensors,
    }

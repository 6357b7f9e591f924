"""The byte layout of a .qpk file and the validation of its header (spec sections 2-4, 7):
the reader's checks, the writer's checks against the same rules (:func:`check_limits`),
and helpers that take a file apart and put it back together (:func:`split_file`,
:func:`frame_file`).

A file is a 24-byte preamble, a msgpack header, zero padding to a 64-byte boundary, and a
data section holding each tensor's bytes at a 64-byte aligned offset::

    0   magic         8 bytes  89 51 50 4B 0D 0A 1A 0A
    8   major         u16 LE
    10  minor         u16 LE
    12  header_crc32  u32 LE   CRC-32 of bytes [0, 12) followed by bytes [16, 24 + header_len)
    16  header_len    u64 LE
    24  header        msgpack map, header_len bytes

This module knows nothing of quantization or torch; it only builds and checks the layout.
It is longer than most because every rule a reader enforces is written once, here, and the
writer checks against the same code rather than a copy.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import countOf

import msgpack
import numpy as np

from . import errors as E
from ._zlib import crc32
from .bitpack import packed_size
from .entropy import MAX_CODE_LENGTH, length_stats, pack_lengths, unpack_lengths

MAGIC = b"\x89QPK\r\n\x1a\n"
VERSION = (1, 4)  # the newest version this module reads and writes
PREAMBLE_SIZE = 24
ALIGNMENT = 64

# Reader limits (spec section 7). They bound work and memory before anything is allocated.
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 1 << 20
MAX_RANK = 16
MAX_NAME_BYTES = 4096
MAX_ELEMENTS = 1 << 48
# Limits on the msgpack header itself (spec section 7): with them, parsing a header costs
# time and memory proportional to its length, and at most these counts.
MAX_DEPTH = 32  # maps and arrays nested this deep at most; the header map is at depth 1
MAX_CONTAINER_LEN = 1 << 20  # elements of one array, pairs of one map
MAX_STR_BYTES = 1 << 24  # bytes of one str
MAX_BIN_BYTES = 1 << 24  # bytes of one bin or ext value
MAX_CONTAINERS = 1 << 22  # maps and arrays in all
MAX_OBJECTS = 1 << 25  # msgpack objects in all: the header map, every key, value and element

DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Storage kinds (spec section 4.2): how a tensor's bytes hold its values.
RAW, PACKED, HUFFMAN, HALF = "raw", "packed", "huffman", "half"
STORAGE_KINDS = (RAW, PACKED, HUFFMAN, HALF)
# Every key a tensor entry may carry (spec section 4.2); others are ignored extensions.
TENSOR_KEYS = (
    "name",
    "shape",
    "dtype",
    "storage",
    "offset",
    "length",
    "crc32",
    "bits",
    "dequant",
    "granularity",
    "group_size",
    "scale_dtype",
    "scale",
    "zero_point",
    "scheme",
    "group",
    "code_lengths",
    "chunk",
    "chunk_starts",
)
QUANTIZED_KINDS = (PACKED, HUFFMAN)
# Kinds that decode to float32 values (the loader converts them to ``dtype``): the quantized
# ones and binary16 (version 1.4).
FLOAT32_KINDS = (*QUANTIZED_KINDS, HALF)
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = {"float32": "<f4", "float16": "<f2"}  # how scale and zero_point are stored

_PREAMBLE = struct.Struct("<8sHHIQ")
_F32 = struct.Struct("<f")


class _LimitError(ValueError):
    """A header beyond a limit of spec section 7, found by the reader (inside msgpack's
    hooks) or by the writer's checks."""


def align(n: int) -> int:
    """Round ``n`` up to the next multiple of ALIGNMENT."""
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass
class TensorEntry:
    """One tensor's header record (spec section 4.2)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: str
    offset: int
    length: int
    crc32: int
    bits: int | None = None
    scheme: str | None = None
    dequant: str | None = None
    granularity: str | None = None
    scale: np.ndarray | None = None  # float32, one per group of codes
    zero_point: np.ndarray | None = None  # float32, one per group (shared: stored once)
    group_size: int | None = None  # granularity "group": codes per group of a row
    scale_dtype: str = "float32"  # granularity "group": how scale and zero_point are stored
    shared_zero: bool = False  # granularity "group": every group has zero_point[0]
    group: int | None = None  # huffman: codes per symbol
    code_lengths: np.ndarray | None = None  # huffman: length of each symbol's codeword
    chunk: int | None = None  # huffman, optional: symbols per chunk of the chunk index
    chunk_starts: np.ndarray | None = None  # int64: the stream bit of each later chunk

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def runs(self) -> tuple[int, int]:
        """How the codes split into the affine runs of spec 6.1, as the dequantizers take
        it (``row``, ``run``): (0, 0) for one equal run per scale; for granularity "group",
        rows of one channel's codes split into runs of ``group_size``."""
        if self.granularity != "group":
            return 0, 0
        return math.prod(self.shape[1:]), self.group_size

    def to_header(self) -> dict:
        """The msgpack map written for this tensor, keys in a fixed order."""
        out: dict = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "storage": self.storage,
            "offset": self.offset,
            "length": self.length,
            "crc32": self.crc32,
        }
        if self.storage in QUANTIZED_KINDS:
            out["bits"] = self.bits
            out["dequant"] = self.dequant
            out["granularity"] = self.granularity
            stored = SCALE_DTYPES[self.scale_dtype]
            if self.granularity == "group":
                out["group_size"] = self.group_size
                if self.scale_dtype != "float32":
                    out["scale_dtype"] = self.scale_dtype
            zero = self.zero_point[:1] if self.shared_zero else self.zero_point
            out["scale"] = self.scale.astype(stored).tobytes()
            out["zero_point"] = zero.astype(stored).tobytes()
            if self.scheme is not None:
                out["scheme"] = self.scheme
        if self.storage == HUFFMAN:
            out["group"] = self.group
            out["code_lengths"] = pack_lengths(self.code_lengths)
            if self.chunk is not None:
                out["chunk"] = self.chunk
                out["chunk_starts"] = [int(v) for v in self.chunk_starts]
        return out


@dataclass
class Header:
    """A parsed, validated header plus where its data section starts."""

    version: tuple[int, int]
    tensors: list[TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0
    data_size: int = 0
    header_len: int = 0


def group_count(shape: Sequence[int], group_size: int) -> int:
    """The affine groups of a tensor of ``shape`` with granularity "group" (section 4.2):
    every channel's row of ``inner`` codes splits into ``ceil(inner / group_size)``."""
    return shape[0] * -(-math.prod(shape[1:]) // group_size)


def expected_length(entry: TensorEntry) -> int:
    """Bytes the tensor must occupy given its shape, dtype and storage."""
    if entry.storage == RAW:
        return entry.numel * DTYPE_SIZES[entry.dtype]
    if entry.storage == HALF:
        return entry.numel * 2
    return packed_size(entry.numel, entry.bits)


def build_header(tensors: list[TensorEntry], metadata: dict[str, str], data_size: int) -> bytes:
    """Serialize the preamble and header; the data section starts at align(len(result)).
    Raises EncodeError for a header a reader would reject (see :func:`check_limits`)."""
    body = msgpack.packb(_header_object(tensors, metadata, data_size), use_bin_type=True)
    if len(body) > MAX_HEADER_BYTES:
        raise E.EncodeError(f"header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}")
    # the lowest minor version whose features the file uses (spec section 9)
    minor = max((_minor_version(t) for t in tensors), default=0)
    return frame_header(body, (VERSION[0], minor))


def _minor_version(entry: TensorEntry) -> int:
    if entry.storage == HALF:
        return 4
    if entry.granularity == "group":
        return 3
    if entry.storage != HUFFMAN:
        return 0
    return 1 if entry.chunk is None else 2


def frame_header(body: bytes, version: tuple[int, int] = VERSION) -> bytes:
    """Prefix msgpack header bytes with the preamble (magic, version, CRC, length)."""
    head = _PREAMBLE.pack(MAGIC, *version, 0, len(body))
    return _PREAMBLE.pack(MAGIC, *version, header_crc(head, body), len(body)) + body


def header_crc(preamble: bytes, body: bytes) -> int:
    """CRC-32 of the preamble without its CRC field (bytes [0, 12) and [16, 24)), then the
    header body: every byte before the data section except the CRC and the padding."""
    return crc32(body, crc32(preamble[16:24], crc32(preamble[:12])))


def layout(entries: list[TensorEntry]) -> int:
    """Assign each entry its canonical offset (spec section 3); return the data size."""
    end = 0
    for entry in entries:
        entry.offset = align(end)
        end = entry.offset + entry.length
    return end


def frame_file(header: object, data: bytes = b"", version: tuple[int, int] = VERSION) -> bytes:
    """A file's bytes: preamble (with the header CRC), header, zero padding, ``data``.
    ``header`` is any msgpack-able object, or msgpack bytes taken as they are; nothing is
    validated, so tools and tests can build invalid files. Inverse of :func:`split_file`."""
    if isinstance(header, (bytes, bytearray)):
        body = bytes(header)
    else:
        body = msgpack.packb(header, use_bin_type=True)
    head = frame_header(body, version)
    return b"".join((head, bytes(align(len(head)) - len(head)), data))


def split_file(blob: bytes) -> tuple[object, bytes, tuple[int, int]]:
    """(header object, data section, version) of a file's bytes, for tools and tests that
    edit headers. The header is decoded as a reader decodes it (:func:`unpack_header`) but
    not validated; the magic and checksums are not checked."""
    if len(blob) < PREAMBLE_SIZE:
        raise E.TruncatedError(f"file of {len(blob)} bytes is shorter than the preamble")
    _, major, minor, _, header_len = _PREAMBLE.unpack_from(blob)
    if PREAMBLE_SIZE + header_len > len(blob):
        raise E.TruncatedError(f"header of {header_len} bytes runs past the end of the file")
    header = unpack_header(bytes(blob[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len]))
    return header, bytes(blob[align(PREAMBLE_SIZE + header_len) :]), (major, minor)


# --------------------------------------------------------------------------- writing checks


def check_entry(entry: TensorEntry) -> None:
    """Raise EncodeError, naming the tensor, if a reader would reject this entry's header
    record (spec sections 4 and 7). The offset is not checked: :func:`layout` assigns it."""
    _checked_record(entry)


def check_limits(entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> None:
    """Raise EncodeError unless a reader accepts a header of these entries and metadata:
    every entry (:func:`check_entry`), the tensor count, unique names, the metadata and the
    msgpack limits of spec section 7. :func:`build_header` runs these checks, then checks
    the header's size."""
    _header_object(entries, metadata, 0)


def _header_object(
    entries: Sequence[TensorEntry], metadata: Mapping[str, str], data_size: int
) -> dict:
    """The header map of a file, after the checks of :func:`check_limits`."""
    most = min(MAX_TENSORS, MAX_CONTAINER_LEN)  # the tensors array is one msgpack array
    if len(entries) > most:
        raise E.EncodeError(f"{len(entries)} tensors exceed the limit of {most}")
    if not all(type(k) is str and type(v) is str for k, v in metadata.items()):
        raise E.EncodeError("metadata must map strings to strings")
    header = {"metadata": dict(metadata), "tensors": [], "data_size": data_size}
    try:
        objects, containers = _tally(header, 1, "header")
    except _LimitError as exc:
        raise E.EncodeError(str(exc)) from None
    names: set[str] = set()
    for entry in entries:
        record, entry_objects, entry_containers = _checked_record(entry)
        if entry.name in names:
            raise E.EncodeError("duplicate tensor name", tensor=entry.name)
        names.add(entry.name)
        header["tensors"].append(record)
        objects += entry_objects
        containers += entry_containers
    if objects > MAX_OBJECTS or containers > MAX_CONTAINERS:
        raise E.EncodeError(
            f"the header would hold {objects} msgpack objects and {containers} maps and "
            f"arrays; a reader accepts at most {MAX_OBJECTS} and {MAX_CONTAINERS}"
        )
    return header


def check_name(name: object) -> None:
    """Raise EncodeError unless a file can hold ``name`` as a tensor name (a non-empty str
    of at most MAX_NAME_BYTES bytes of UTF-8)."""
    try:
        _check_name(name)
    except _LimitError as exc:
        raise E.EncodeError(str(exc), tensor=name if type(name) is str else None) from None


def _check_name(name: object) -> None:
    if type(name) is not str or not name:
        raise _LimitError(f"a tensor name must be a non-empty string, got {name!r}")
    size = len(_utf8(name, "the name"))
    if size > MAX_NAME_BYTES:
        raise _LimitError(f"the name is {size} bytes of UTF-8; at most {MAX_NAME_BYTES}")


def _checked_record(entry: TensorEntry) -> tuple[dict, int, int]:
    """The entry's header record and its msgpack (objects, maps and arrays), after the
    checks of :func:`check_entry`."""
    name = entry.name
    try:
        _check_name(name)
        record = entry.to_header()
        objects, containers = _tally(record, 3, "entry")  # header map > tensors > entry
        _validate_tensor(record, 0, None)  # the reader's own checks of the record
    except _LimitError as exc:
        raise E.EncodeError(str(exc), tensor=name if type(name) is str else None) from None
    except E.QpackError as exc:
        raise E.EncodeError(exc.reason, tensor=name) from None
    return record, objects, containers


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # msgpack str is UTF-8; Python str may hold lone surrogates
        raise _LimitError(
            f"{what} cannot be encoded as UTF-8 (it holds a lone surrogate)"
        ) from None


def _check_str(text: str, what: str) -> None:
    size = len(_utf8(text, what))
    if size > MAX_STR_BYTES:
        raise _LimitError(f"{what} is a str of {size} bytes; at most {MAX_STR_BYTES}")


_PLAIN_SCALARS = frozenset((int, float, bool, type(None)))


def _tally(value: object, depth: int, what: str) -> tuple[int, int]:
    """The msgpack (objects, maps and arrays) that ``value``, at nesting ``depth``, packs
    to, after checking it against the limits a reader enforces (spec section 7)."""
    kind = type(value)
    if kind is str:
        _check_str(value, what)
        return 1, 0
    if kind is bytes:
        if len(value) > MAX_BIN_BYTES:
            raise _LimitError(f"{what} is {len(value)} bytes of bin; at most {MAX_BIN_BYTES}")
        return 1, 0
    if kind is not list and kind is not dict:
        return 1, 0  # integers, floats, booleans, nil
    if depth > MAX_DEPTH:
        raise _LimitError(f"{what} nests maps and arrays more than {MAX_DEPTH} deep")
    if len(value) > MAX_CONTAINER_LEN:
        raise _LimitError(f"{what} has {len(value)} entries; at most {MAX_CONTAINER_LEN}")
    if kind is list and countOf(map(type, value), int) == len(value):  # shapes, chunk starts
        return 1 + len(value), 1
    objects = containers = 1
    for key, item in value.items() if kind is dict else enumerate(value):
        if kind is dict:
            objects += 1
            if not (key.isascii() and len(key) <= MAX_STR_BYTES):  # else surely valid
                _check_str(key, f"a key of {what}")
        sub = type(item)
        if (
            sub in _PLAIN_SCALARS
            or (sub is str and item.isascii() and len(item) <= MAX_STR_BYTES)
            or (sub is bytes and len(item) <= MAX_BIN_BYTES)
        ):
            objects += 1  # surely valid: no label built for a message, no call
        else:
            more_objects, more_containers = _tally(item, depth + 1, f"{what}[{key!r}]")
            objects += more_objects
            containers += more_containers
    return objects, containers


# --------------------------------------------------------------------------- reading


def unpack_header(body: bytes, path=None) -> object:
    """Decode msgpack header bytes into plain objects, within the limits of spec section 7
    and with every map key a str, none repeated (section 4); HeaderError otherwise."""
    # msgpack checks each length against its limit before allocating for it; the hooks run
    # as each map or array ends (after its elements), count it and find its height: the
    # heights of the finished containers whose parent is still open lie on a stack, so the
    # container children of the one that ends are the last ones there.
    objects = MAX_OBJECTS - 1  # the budgets left; the header itself is one object
    containers = MAX_CONTAINERS
    heights: list[int] = []

    def finish(children, count: int) -> None:
        nonlocal objects, containers
        objects -= count
        containers -= 1
        if objects < 0:
            raise _LimitError(f"more than {MAX_OBJECTS} msgpack objects")
        if containers < 0:
            raise _LimitError(f"more than {MAX_CONTAINERS} maps and arrays")
        nested = countOf(map(type, children), dict) + countOf(map(type, children), list)
        height = 1
        if nested:
            height += max(heights[-nested:])
            del heights[-nested:]
            if height > MAX_DEPTH:
                raise _LimitError(f"maps and arrays nested more than {MAX_DEPTH} deep")
        heights.append(height)

    def on_map(pairs: list) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("duplicate key in a msgpack map")
        if countOf(map(type, out), str) != len(out):
            raise ValueError("a msgpack map key is not a string")
        finish(out.values(), 2 * len(out))
        return out

    def on_array(items: list) -> list:
        finish(items, len(items))
        return items

    try:
        return msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=on_map,
            list_hook=on_array,
            max_str_len=MAX_STR_BYTES,
            max_bin_len=MAX_BIN_BYTES,
            max_ext_len=MAX_BIN_BYTES,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
        )
    except _LimitError as exc:
        raise E.HeaderError(f"header exceeds a limit: {exc}", path=path) from None
    except msgpack.StackError:  # msgpack's own bound, far above MAX_DEPTH
        raise E.HeaderError(
            f"header exceeds a limit: maps and arrays nested more than {MAX_DEPTH} deep",
            path=path,
        ) from None
    except Exception as exc:  # any decoding failure of untrusted bytes is a bad header
        why = str(exc) or type(exc).__name__
        raise E.HeaderError(f"header is not valid msgpack ({why})", path=path) from None


def read_header(read_at: Callable[[int, int], bytes], file_size: int, path=None) -> Header:
    """Read and validate the preamble and header. ``read_at(offset, n)`` returns bytes."""
    if file_size < PREAMBLE_SIZE:
        if not MAGIC.startswith(read_at(0, min(file_size, len(MAGIC)))):
            raise E.NotQpackError("not a qpack file (bad magic bytes)", path=path)
        raise E.TruncatedError(f"file of {file_size} bytes is shorter than the preamble", path=path)
    head = read_at(0, PREAMBLE_SIZE)
    magic, major, minor, crc, header_len = _PREAMBLE.unpack(head)
    if magic != MAGIC:
        raise E.NotQpackError("not a qpack file (bad magic bytes)", path=path)
    if major != VERSION[0]:
        raise E.VersionError(
            f"format version {major}.{minor} is not supported (this reader reads {VERSION[0]}.x)",
            path=path,
        )
    if header_len > MAX_HEADER_BYTES:
        raise E.HeaderTooLargeError(
            f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit", path=path
        )
    if PREAMBLE_SIZE + header_len > file_size:
        raise E.TruncatedError(
            f"header of {header_len} bytes runs past the end of the {file_size}-byte file",
            path=path,
        )
    body = read_at(PREAMBLE_SIZE, header_len)
    if header_crc(head, body) != crc:
        raise E.HeaderChecksumError("header checksum mismatch (corrupted header)", path=path)
    header = _validate(unpack_header(body, path), (major, minor), path)
    header.header_len = header_len
    header.data_start = align(PREAMBLE_SIZE + header_len)
    end = header.data_start + header.data_size
    if file_size < end:
        raise E.TruncatedError(
            f"file has {file_size} bytes but its header describes {end}", path=path
        )
    if file_size > end:
        raise E.LayoutError(f"{file_size - end} unexpected bytes after the data section", path=path)
    return header


def _fail(path, msg: str, tensor: str | None = None, cls: type = E.HeaderError):
    raise cls(msg, path=path, tensor=tensor)


def _uint(value, what: str, path, tensor=None, limit: int = 1 << 64) -> int:
    if type(value) is not int or not 0 <= value < limit:
        _fail(path, f"{what} must be an integer in [0, {limit}), got {value!r}", tensor)
    return value


def _text(value, what: str, path, tensor=None) -> str:
    if type(value) is not str:
        _fail(path, f"{what} must be a string, got {type(value).__name__}", tensor)
    return value


def _param_array(value, counts: tuple[int, ...], dtype: str, what: str, path, tensor):
    """A ``scale`` or ``zero_point`` bin of one of ``counts`` values stored as ``dtype``
    (section 4.2), as finite float32 values (binary16 widens exactly)."""
    size = np.dtype(SCALE_DTYPES[dtype]).itemsize
    if type(value) is not bytes or len(value) not in [size * c for c in counts]:
        allowed = " or ".join(str(c) for c in counts)
        _fail(
            path,
            f"{what} must be {allowed} {dtype} values in a bin",
            tensor,
        )
    if (
        len(value) == 4 and size == 4
    ):  # the common per-layer case, without numpy's per-call overhead
        (number,) = _F32.unpack(value)
        if not math.isfinite(number):
            _fail(path, f"{what} holds a NaN or infinite value", tensor)
        return np.array([number], dtype=np.float32)
    arr = np.frombuffer(value, dtype=SCALE_DTYPES[dtype]).astype(np.float32)
    if not np.isfinite(arr).all():
        _fail(path, f"{what} holds a NaN or infinite value", tensor)
    return arr


def _validate(obj, version: tuple[int, int], path) -> Header:
    if type(obj) is not dict:
        _fail(path, "header must be a msgpack map")
    for key in ("tensors", "data_size"):
        if key not in obj:
            _fail(path, f"header lacks the required key {key!r}")
    metadata = obj.get("metadata", {})
    if type(metadata) is not dict or not all(
        type(k) is str and type(v) is str for k, v in metadata.items()
    ):
        _fail(path, "metadata must be a map of strings to strings")
    data_size = _uint(obj["data_size"], "data_size", path)
    raw_tensors = obj["tensors"]
    if type(raw_tensors) is not list:
        _fail(path, "tensors must be an array")
    if len(raw_tensors) > MAX_TENSORS:
        _fail(path, f"{len(raw_tensors)} tensors exceed the limit of {MAX_TENSORS}")
    tensors: list[TensorEntry] = []
    seen: set[str] = set()
    end = 0
    for index, raw in enumerate(raw_tensors):
        entry = _validate_tensor(raw, index, path)
        if entry.name in seen:
            _fail(path, "duplicate tensor name", entry.name)
        seen.add(entry.name)
        name = entry.name
        # The layout is canonical: each tensor starts at the first aligned offset after the
        # previous one, so a file's bytes are fully determined by its header and payloads.
        if entry.offset < end:
            _fail(
                path,
                f"bytes at offset {entry.offset} overlap the previous tensor, which ends at {end}",
                name,
                E.LayoutError,
            )
        if entry.offset + entry.length > data_size:
            _fail(
                path,
                f"bytes [{entry.offset}, {entry.offset + entry.length}) lie outside "
                f"the {data_size}-byte data section",
                name,
                E.LayoutError,
            )
        if entry.offset != align(end):
            _fail(
                path,
                f"offset {entry.offset} is not the canonical {align(end)}",
                name,
                E.LayoutError,
            )
        end = entry.offset + entry.length
        tensors.append(entry)
    if end != data_size:
        _fail(path, f"data_size is {data_size} but the tensors end at {end}", cls=E.LayoutError)
    return Header(version=version, tensors=tensors, metadata=metadata, data_size=data_size)


def _validate_tensor(raw, index: int, path) -> TensorEntry:
    if type(raw) is not dict:
        _fail(path, f"tensor #{index} must be a map")
    name = raw.get("name")
    if type(name) is not str or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        _fail(path, f"tensor #{index} needs a non-empty name of at most {MAX_NAME_BYTES} bytes")
    for key in ("shape", "dtype", "storage", "offset", "length", "crc32"):
        if key not in raw:
            _fail(path, f"lacks the required key {key!r}", name)
    shape = raw["shape"]
    if type(shape) is not list or len(shape) > MAX_RANK:
        _fail(path, f"shape must be an array of at most {MAX_RANK} dimensions", name)
    dims = tuple(shape)
    if countOf(map(type, dims), int) != len(dims) or (
        dims and not 0 <= min(dims) <= max(dims) <= MAX_ELEMENTS
    ):
        for d in dims:
            _uint(d, "each dimension", path, name, MAX_ELEMENTS + 1)
    # Zero dimensions count as 1 here: numpy (like any array library) must be able to
    # describe the shape, even when it holds no element.
    if math.prod(filter(None, dims)) > MAX_ELEMENTS:
        _fail(path, f"shape {list(dims)} exceeds {MAX_ELEMENTS} elements", name)
    dtype = _text(raw["dtype"], "dtype", path, name)
    if dtype not in DTYPE_SIZES:
        _fail(path, f"unknown dtype {dtype!r}", name, E.UnsupportedError)
    storage = _text(raw["storage"], "storage", path, name)
    if storage not in STORAGE_KINDS:
        _fail(path, f"unsupported storage kind {storage!r}", name, E.UnsupportedError)
    entry = TensorEntry(
        name=name,
        shape=dims,
        dtype=dtype,
        storage=storage,
        offset=_uint(raw["offset"], "offset", path, name),
        length=_uint(raw["length"], "length", path, name),
        crc32=_uint(raw["crc32"], "crc32", path, name, 1 << 32),
    )
    if storage in FLOAT32_KINDS and dtype not in FLOAT_DTYPES:
        _fail(path, f"{storage} tensors decode to floats; dtype {dtype!r} is invalid", name)
    if storage in QUANTIZED_KINDS:
        _validate_packed(entry, raw, path)
    if storage == HUFFMAN:
        _validate_huffman(entry, raw, path)
    elif entry.length != expected_length(entry):
        _fail(
            path,
            f"length {entry.length} does not match shape {list(dims)} "
            f"({expected_length(entry)} bytes expected)",
            name,
            E.LayoutError,
        )
    return entry


def _validate_packed(entry: TensorEntry, raw: dict, path) -> None:
    name = entry.name
    for key in ("bits", "dequant", "granularity", "scale", "zero_point"):
        if key not in raw:
            _fail(path, f"quantized tensor lacks the required key {key!r}", name)
    bits = raw["bits"]
    if type(bits) is not int or not 1 <= bits <= 8:
        _fail(path, f"bits must be an integer from 1 to 8, got {bits!r}", name)
    dequant = _text(raw["dequant"], "dequant", path, name)
    if dequant != "affine":
        _fail(path, f"unsupported dequantization {dequant!r}", name, E.UnsupportedError)
    granularity = _text(raw["granularity"], "granularity", path, name)
    if granularity not in GRANULARITIES:
        _fail(path, f"unsupported granularity {granularity!r}", name, E.UnsupportedError)
    if granularity != "tensor" and not entry.shape:
        _fail(path, f"{granularity} granularity needs at least one dimension", name)
    count = entry.shape[0] if granularity == "channel" else 1
    scale_dtype, zeros = "float32", (count,)
    if granularity == "group":
        if "group_size" not in raw:
            _fail(path, "group granularity needs the key 'group_size'", name)
        size = raw["group_size"]
        if type(size) is not int or not 1 <= size <= MAX_ELEMENTS:
            _fail(
                path, f"group_size must be an integer from 1 to {MAX_ELEMENTS}, got {size!r}", name
            )
        scale_dtype = _text(raw.get("scale_dtype", "float32"), "scale_dtype", path, name)
        if scale_dtype not in SCALE_DTYPES:
            _fail(path, f"unsupported scale_dtype {scale_dtype!r}", name, E.UnsupportedError)
        entry.group_size, entry.scale_dtype = size, scale_dtype
        count = group_count(entry.shape, size)
        zeros = (count, 1)  # one zero point may serve every group
    else:
        for key in ("group_size", "scale_dtype"):
            if key in raw:
                _fail(path, f"{key} belongs to group granularity, not {granularity!r}", name)
    scheme = raw.get("scheme")
    if "scheme" in raw:  # optional, but a str when present: nil is not a str
        _text(scheme, "scheme", path, name)
    entry.bits = bits
    entry.dequant = dequant
    entry.granularity = granularity
    entry.scheme = scheme
    entry.scale = _param_array(raw["scale"], (count,), scale_dtype, "scale", path, name)
    zero = _param_array(raw["zero_point"], zeros, scale_dtype, "zero_point", path, name)
    if zero.size != count:  # one value for every group
        entry.shared_zero = True
        zero = np.full(count, zero[0], dtype=np.float32)
    entry.zero_point = zero


def _validate_huffman(entry: TensorEntry, raw: dict, path) -> None:
    name = entry.name
    for key in ("group", "code_lengths"):
        if key not in raw:
            _fail(path, f"huffman tensor lacks the required key {key!r}", name)
    group = raw["group"]
    if type(group) is not int or group < 1 or group * entry.bits > 8:
        _fail(path, f"group must be an integer >= 1 with group * bits <= 8, got {group!r}", name)
    alphabet = 1 << (group * entry.bits)
    packed_lengths = raw["code_lengths"]
    if type(packed_lengths) is not bytes or len(packed_lengths) != packed_size(alphabet, 4):
        _fail(path, f"code_lengths must be {packed_size(alphabet, 4)} bytes of 4-bit lengths", name)
    lengths = unpack_lengths(packed_lengths, alphabet)
    shortest, longest, kraft = length_stats(lengths)
    if kraft > 1 << MAX_CODE_LENGTH:
        _fail(path, "code_lengths are over-subscribed (Kraft sum above 1)", name)
    symbols = -(-entry.numel // group)
    if symbols and not longest:
        _fail(path, "code_lengths assign no codeword", name)
    low = packed_size(symbols, shortest) if symbols else 0
    high = packed_size(symbols, longest) if symbols else 0
    if not low <= entry.length <= high:
        _fail(
            path,
            f"length {entry.length} cannot hold {symbols} codewords of "
            f"{shortest if symbols else 0} to {longest if symbols else 0} bits",
            name,
            E.LayoutError,
        )
    entry.group = group
    entry.code_lengths = lengths
    if "chunk" in raw or "chunk_starts" in raw:
        _validate_chunk_index(entry, raw, symbols, shortest, longest, path)


def _validate_chunk_index(
    entry: TensorEntry, raw: dict, symbols: int, shortest: int, longest: int, path
) -> None:
    """Spec 5.2's chunk index: both keys, the right count, each start where ``k * chunk``
    codewords can end."""
    name = entry.name
    for key in ("chunk", "chunk_starts"):
        if key not in raw:
            _fail(path, f"a chunk index lacks the key {key!r}", name)
    chunk, starts = raw["chunk"], raw["chunk_starts"]
    if type(chunk) is not int or chunk < 1:
        _fail(path, f"chunk must be an integer >= 1, got {chunk!r}", name)
    count = max(-(-symbols // chunk) - 1, 0)
    if type(starts) is not list or len(starts) != count:
        _fail(path, f"chunk_starts must be an array of {count} integers", name)
    # one pass in Python: faster than numpy for the usual few dozen starts, and linear in
    # the header's bytes for a hostile list (msgpack has made each item already)
    cap, fits, bad = 8 * entry.length, f"{shortest} to {longest} bits", E.LayoutError
    low = high = 0  # the k-th start follows k * chunk codewords
    low_step, high_step = chunk * shortest, chunk * longest
    for at in starts:
        if type(at) is not int:
            _fail(path, "chunk_starts must hold integers only", name)
        low += low_step
        high += high_step
        if not 0 <= at <= cap:
            _fail(path, f"a chunk start lies past the {entry.length}-byte stream", name, bad)
        if not low <= at <= high:
            _fail(path, f"a chunk start cannot hold the codewords of {fits} before it", name, bad)
    entry.chunk = chunk
    entry.chunk_starts = np.array(starts, dtype=np.int64)

"""The header limits of spec section 7: each is exact, parsing stops at the first one
exceeded, and the writer's checks (container.check_entry and check_limits) refuse exactly
what a reader rejects. Also the split/re-frame helpers (container.split_file/frame_file)."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import numpy as np
import pytest

from qpack import container as C
from qpack import errors as E
from qpack.bitpack import packed_size
from qpack.entropy import pack_lengths

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
# {"tensors": [], "data_size": 0, "x": ...}: a valid header once a value is appended
EMPTY_HEADER = b"\x83\xa7tensors\x90\xa9data_size\x00\xa1x"


def read(header, data: bytes = b"") -> C.Header:
    """read_header on a file of this header (an object, or msgpack bytes) and data."""
    return read_blob(C.frame_file(header, data))


def read_blob(blob: bytes) -> C.Header:
    return C.read_header(lambda offset, n: blob[offset : offset + n], len(blob))


def rejected(header, match: str) -> None:
    with pytest.raises(E.HeaderError, match=match) as info:
        read(header)
    assert info.value.code == "bad-header"


def nested(levels: int, make=lambda inner: [inner]) -> object:
    """Containers nested ``levels`` deep (arrays by default), the innermost empty."""
    value: object = []
    for _ in range(levels - 1):
        value = make(value)
    return value


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("make", [lambda v: [v], lambda v: {"k": v}], ids=["arrays", "maps"])
def test_nesting_depth_is_exact(make):
    # the header map is depth 1, so its value x holds MAX_DEPTH - 1 levels at the limit
    read({"tensors": [], "data_size": 0, "x": nested(C.MAX_DEPTH - 1, make)})
    rejected({"tensors": [], "data_size": 0, "x": nested(C.MAX_DEPTH, make)}, "nested more than")
    # in a tensor entry (depth 3), depth counts from the header map too
    entry = {"name": "t", "shape": [], "dtype": "uint8", "storage": "raw"}
    entry |= {"offset": 0, "length": 1, "crc32": 0, "x": nested(C.MAX_DEPTH - 3, make)}
    read({"tensors": [entry], "data_size": 1}, b"\0")
    entry["x"] = nested(C.MAX_DEPTH - 2, make)
    with pytest.raises(E.HeaderError, match="nested more than"):
        read({"tensors": [entry], "data_size": 1}, b"\0")


def test_nesting_beyond_msgpacks_own_stack_is_the_same_error():
    rejected(EMPTY_HEADER + b"\x91" * 5000 + b"\x90", f"nested more than {C.MAX_DEPTH} deep")


@pytest.mark.parametrize(
    ("prefix", "limit", "filler"),
    [
        (b"\xdd", C.MAX_CONTAINER_LEN, b"\xc0"),  # array 32 of nils
        (b"\xdb", C.MAX_STR_BYTES, b"a"),  # str 32
        (b"\xc6", C.MAX_BIN_BYTES, b"\0"),  # bin 32
    ],
    ids=["array", "str", "bin"],
)
def test_length_limits_are_exact(prefix, limit, filler):
    read(EMPTY_HEADER + prefix + limit.to_bytes(4, "big") + filler * limit)
    over = EMPTY_HEADER + prefix + (limit + 1).to_bytes(4, "big") + filler * (limit + 1)
    rejected(over, f"exceeds max_[a-z]+_len\\({limit}\\)")


def test_ext_and_map_lengths(monkeypatch):
    ext = b"\xc7\x03\x05abc"  # ext 8 of type 5, 3 bytes
    read(EMPTY_HEADER + ext)
    monkeypatch.setattr(C, "MAX_BIN_BYTES", 2)
    rejected(EMPTY_HEADER + ext, "max_ext_len")
    pairs = {str(i): None for i in range(5)}
    monkeypatch.setattr(C, "MAX_CONTAINER_LEN", 5)
    read({"tensors": [], "data_size": 0, "x": pairs})
    rejected({"tensors": [], "data_size": 0, "x": pairs | {"5": None}}, "max_map_len")


def test_counts_are_exact(monkeypatch):
    header = {"tensors": [], "data_size": 0, "x": [{"a": 1}, [2, 3]]}
    # objects: the header map, its 3 keys and 3 values, x's 2 elements, 1 + 1 + 2 inside
    # them; maps and arrays: the header, tensors, x, and the two inside x
    monkeypatch.setattr(C, "MAX_OBJECTS", 1 + 6 + 2 + 2 + 2)
    monkeypatch.setattr(C, "MAX_CONTAINERS", 5)
    read(header)
    header["x"].append(None)
    rejected(header, "more than 13 msgpack objects")
    header["x"][-1] = []
    monkeypatch.setattr(C, "MAX_OBJECTS", 100)
    rejected(header, "more than 5 maps and arrays")


def test_a_header_of_empty_maps_stops_at_the_container_count():
    """A few MiB of empty maps under an unknown key (each a dict in memory, 60+ times the
    byte it takes) stop at MAX_CONTAINERS instead of filling memory."""
    run = C.MAX_CONTAINER_LEN
    block = b"\xdd" + run.to_bytes(4, "big") + b"\x80" * run
    count = C.MAX_CONTAINERS // run + 1
    rejected(EMPTY_HEADER + b"\xdd" + count.to_bytes(4, "big") + block * count, "maps and arrays")


def test_map_keys_must_be_distinct_strings():
    rejected(b"\x82\xa7tensors\x90\xa7tensors\x90", "duplicate key")
    rejected(EMPTY_HEADER[:-2] + b"\xc4\x01x\xc0", "not a string")  # a bin key


# --------------------------------------------------------------------------- writing


def raw_entry(name="t", shape=(2,), dtype="float32") -> C.TensorEntry:
    length = int(np.prod(shape)) * C.DTYPE_SIZES[dtype]
    return C.TensorEntry(name, tuple(shape), dtype, "raw", 0, length, 0)


def packed_entry(name="w", channels=2, **changes) -> C.TensorEntry:
    entry = C.TensorEntry(
        name,
        (channels, 3),
        "float32",
        "packed",
        0,
        packed_size(3 * channels, 4),
        0,
        bits=4,
        scheme="asymmetric-per-channel",
        dequant="affine",
        granularity="channel",
        scale=np.ones(channels, np.float32),
        zero_point=np.zeros(channels, np.float32),
    )
    for key, value in changes.items():
        setattr(entry, key, value)
    return entry


def huffman_entry(starts: int) -> C.TensorEntry:
    """A Huffman tensor of one-bit codewords with a chunk index of ``starts`` entries."""
    symbols = starts + 1
    return C.TensorEntry(
        "h",
        (symbols,),
        "float32",
        "huffman",
        0,
        packed_size(symbols, 1),
        0,
        bits=1,
        dequant="affine",
        granularity="tensor",
        scale=np.ones(1, np.float32),
        zero_point=np.zeros(1, np.float32),
        group=1,
        code_lengths=np.array([1, 1], np.uint8),
        chunk=1,
        chunk_starts=np.arange(1, symbols, dtype=np.int64),
    )


BIG = C.MAX_STR_BYTES + 1
CASES = {  # name -> (entries, metadata, what the message says)
    "name too long": ([raw_entry("é" * 2049)], {}, "4098 bytes of UTF-8"),
    "empty name": ([raw_entry("")], {}, "non-empty"),
    "lone surrogate name": ([raw_entry("w\ud800")], {}, "lone surrogate"),
    "rank 17": ([raw_entry(shape=(1,) * 17)], {}, "at most 16 dimensions"),
    "dimension": ([raw_entry(shape=(C.MAX_ELEMENTS + 1,), dtype="uint8")], {}, "dimension"),
    "elements": ([raw_entry(shape=(1 << 24, 1 << 24, 2), dtype="uint8")], {}, "exceeds"),
    "empty but huge": ([raw_entry(shape=(0, 1 << 40, 1 << 40))], {}, "exceeds"),
    "bits 9": ([packed_entry(bits=9)], {}, "bits must be"),
    "long scheme": ([packed_entry(scheme="s" * BIG)], {}, f"str of {BIG} bytes"),
    "surrogate scheme": ([packed_entry(scheme="\udcff")], {}, "lone surrogate"),
    "wide scale": ([packed_entry(channels=(C.MAX_BIN_BYTES >> 2) + 1)], {}, "bytes of bin"),
    "long chunk index": ([huffman_entry(C.MAX_CONTAINER_LEN + 1)], {}, "entries; at most"),
    "duplicate names": ([raw_entry(), raw_entry()], {}, "duplicate tensor name"),
    "metadata value": ([], {"model": "m" * BIG}, f"str of {BIG} bytes"),
    "metadata surrogate": ([], {"\ud800": ""}, "lone surrogate"),
    "metadata type": ([], {"n": 1}, "strings to strings"),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_writer_refuses_what_a_reader_rejects(case):
    entries, metadata, message = CASES[case]
    with pytest.raises(E.EncodeError, match=message) as info:
        C.check_limits(entries, metadata)
    assert "\n" not in str(info.value)
    if entries:
        assert info.value.tensor in {e.name for e in entries}  # the message names it
    with pytest.raises(E.EncodeError):  # build_header, which every writer calls, too
        C.build_header(entries, metadata, C.layout(entries))
    try:
        header = {"metadata": metadata, "tensors": [e.to_header() for e in entries]}
        body = msgpack.packb(header | {"data_size": C.layout(entries)}, use_bin_type=True)
    except (UnicodeEncodeError, TypeError):  # msgpack cannot even write it
        return
    with pytest.raises(E.QpackError):
        read(body)


def written(entries: list[C.TensorEntry], metadata: dict[str, str]) -> C.Header:
    """The header a reader reads from the writer's header for these entries."""
    data_size = C.layout(entries)
    head = C.build_header(entries, metadata, data_size)
    return read_blob(head + bytes(C.align(len(head)) - len(head) + data_size))


def test_the_writer_accepts_what_a_reader_accepts():
    entries = [raw_entry("é" * 2048), packed_entry(), huffman_entry(10), raw_entry("s", ())]
    metadata = {"producer": "test", "x" * 100: "y" * C.MAX_STR_BYTES}
    for entry in entries:
        C.check_entry(entry)
    C.check_limits(entries, metadata)
    header = written(entries, metadata)
    assert [e.name for e in header.tensors] == [e.name for e in entries]
    assert header.metadata == metadata


def test_the_writer_checks_counts_and_sizes(monkeypatch):
    entries = [raw_entry("a"), raw_entry("b"), raw_entry("c")]
    monkeypatch.setattr(C, "MAX_TENSORS", 2)
    with pytest.raises(E.EncodeError, match="3 tensors exceed"):
        C.check_limits(entries, {})
    monkeypatch.setattr(C, "MAX_TENSORS", 3)
    C.check_limits(entries, {})
    # a raw entry of rank 1 is 16 objects, 2 of them a map and an array
    base = 1 + 6 + 1 + 1  # the header map, its keys and values, metadata's one pair
    monkeypatch.setattr(C, "MAX_OBJECTS", base + 3 * 16)
    monkeypatch.setattr(C, "MAX_CONTAINERS", 3 + 3 * 2)
    C.check_limits(entries, {"k": "v"})
    written(entries, {"k": "v"})  # at the limits, which the reader applies too
    with pytest.raises(E.EncodeError, match="msgpack objects"):
        C.check_limits(entries, {"k": "v", "k2": "v"})
    with pytest.raises(E.EncodeError, match="msgpack objects"):
        C.check_limits([*entries[:2], raw_entry("c", (2, 1))], {"k": "v"})
    monkeypatch.setattr(C, "MAX_CONTAINER_LEN", 3)  # the header map has 3 pairs
    with pytest.raises(E.EncodeError, match="metadata"):
        C.check_limits([], {"k": "v", "k2": "v", "k3": "v", "k4": "v"})
    monkeypatch.setattr(C, "MAX_CONTAINER_LEN", 1 << 20)
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", 100)
    with pytest.raises(E.EncodeError, match="header of"):
        C.build_header(entries, {}, C.layout(entries))


def test_check_entry_names_the_tensor_in_one_line():
    with pytest.raises(E.EncodeError) as info:
        C.check_entry(raw_entry("conv\nweight", shape=(1,) * 17))
    assert info.value.tensor == "conv\nweight" and info.value.code == "bad-input"
    assert "\n" not in str(info.value) and "'conv\\nweight'" in str(info.value)


# --------------------------------------------------------------------------- split / frame


def vector_files() -> list[Path]:
    manifest = json.loads((VECTORS / "manifest.json").read_text())
    return [VECTORS / case["file"] for case in manifest["valid"]]


@pytest.mark.parametrize("path", vector_files(), ids=lambda p: p.stem)
def test_split_then_frame_rebuilds_every_valid_vector(path):
    blob = path.read_bytes()
    header, data, version = C.split_file(blob)
    assert C.frame_file(header, data, version) == blob
    assert C.frame_file(msgpack.packb(header, use_bin_type=True), data, version) == blob


def test_split_file_of_a_short_file_and_of_a_bad_header():
    blob = (VECTORS / "valid" / "bits4_worked_example.qpk").read_bytes()
    with pytest.raises(E.TruncatedError):
        C.split_file(blob[:20])
    with pytest.raises(E.TruncatedError):
        C.split_file(blob[:30])
    with pytest.raises(E.HeaderError):
        C.split_file(C.frame_file(b"\xc1"))
    header, data, version = C.split_file(C.frame_file([1, 2], b"x" * 64, (1, 7)))
    assert (header, data, version) == ([1, 2], b"x" * 64, (1, 7))


def test_an_edited_header_is_read_back():
    blob = (VECTORS / "valid" / "huffman_worked_example.qpk").read_bytes()
    header, data, version = C.split_file(blob)
    read_blob(C.frame_file(header, data, version))
    header["tensors"][0]["code_lengths"] = pack_lengths(np.array([1, 1, 2, 2], np.uint8))
    with pytest.raises(E.HeaderError, match="over-subscribed"):
        read_blob(C.frame_file(header, data, version))

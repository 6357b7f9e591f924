"""Tests of the numpy codec and the reader's defences: round trips, determinism, file size,
and hostile input (truncation, garbage, bit flips, schema violations, check order)."""

from __future__ import annotations

import math
import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qpack
from qpack import errors as E
from qpack.bitpack import packed_size
from qpack.container import TENSOR_KEYS, frame_file, split_file
from qpack.reader import Reader

SYM = "symmetric-per-layer"
ASYM = "asymmetric-per-channel"
SCHEMES = [SYM, ASYM]
MAGIC = bytes.fromhex("8951504b0d0a1a0a")
HYPO = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- layout helpers
# The layout documented at the top of qpack/container.py (and spec/FORMAT.md section 2):
#   0 magic (8) | 8 major u16 | 10 minor u16 | 12 header_crc32 u32 | 16 header_len u64
#   24 msgpack header | zero padding to align(24 + H) | data section
#   header_crc32 = CRC-32 of bytes [0, 12) followed by bytes [16, 24 + H)


def align64(n: int) -> int:
    return -(-n // 64) * 64


def spec_crc(preamble: bytes, body: bytes) -> int:
    """header_crc32 as documented: CRC-32 of bytes [0, 12) followed by [16, 24 + H)."""
    return zlib.crc32(preamble[0:12] + preamble[16:24] + body)


def spec_header_crc(blob: bytes) -> int:
    (header_len,) = struct.unpack_from("<Q", blob, 16)
    return spec_crc(blob[:24], blob[24 : 24 + header_len])


def reframe(blob: bytes, mutate) -> bytes:
    """The file after ``mutate(header)`` edits its header map (header CRC kept valid)."""
    header, data, version = split_file(blob)
    mutate(header)
    return frame_file(header, data, version)


def with_header_len(blob: bytes, header_len: int) -> bytes:
    """``blob`` whose header_len field says ``header_len``, with a header CRC computed as
    documented over that preamble and the same header bytes."""
    (real,) = struct.unpack_from("<Q", blob, 16)
    out = bytearray(blob)
    struct.pack_into("<Q", out, 16, header_len)
    struct.pack_into("<I", out, 12, spec_crc(bytes(out[:24]), blob[24 : 24 + real]))
    return bytes(out)


def small_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "layer.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "layer.bias": rng.standard_normal(3).astype(np.float32),
        "steps": np.array(5, dtype=np.int64),
    }


# fixed-width packed, raw float, raw int scalar: 584 bytes
SMALL = qpack.encode(small_arrays(), bits=3, entropy=False)
SMALL_DECODED = qpack.decode(SMALL)


def identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def all_readers(blob: bytes, tmp_path):
    """Every public way of reading: (name, callable raising on bad input)."""
    path = tmp_path / "f.qpk"
    path.write_bytes(blob)
    return path, [
        ("decode", lambda: qpack.decode(blob)),
        ("load", lambda: qpack.load(path)),
        ("load_numpy", lambda: qpack.load_numpy(path)),
    ]


def test_helpers_rebuild_a_valid_file_exactly():
    assert reframe(SMALL, lambda h: None) == SMALL
    assert len(SMALL) < 1024
    header, _, _ = split_file(SMALL)
    assert [t["storage"] for t in header["tensors"]] == ["packed", "raw", "raw"]
    (header_len,) = struct.unpack_from("<Q", SMALL, 16)
    assert align64(24 + header_len) > 24 + header_len  # there is header padding to test


# --------------------------------------------------------------------------- round trips


float_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=4, min_side=0, max_side=5),
    elements=st.floats(-(2.0**100), 2.0**100, width=32),
)


@HYPO
@given(w=float_arrays, bits=st.integers(1, 8), scheme=st.sampled_from(SCHEMES))
def test_encode_decode_round_trip(within_step, w, bits, scheme):
    bias = np.linspace(-1, 1, 5, dtype=np.float32)
    blob = qpack.encode({"w": w, "b": bias, "n": np.arange(3)}, bits=bits, scheme=scheme)
    out = qpack.decode(blob)
    assert list(out) == ["w", "b", "n"]
    assert out["w"].dtype == np.float32 and out["w"].shape == w.shape
    within_step(w, out["w"], bits, scheme)
    assert out["b"].tobytes() == bias.tobytes()
    assert out["n"].dtype == np.int64 and out["n"].tolist() == [0, 1, 2]
    assert qpack.encode({"w": w, "b": bias, "n": np.arange(3)}, bits=bits, scheme=scheme) == blob


@HYPO
@given(
    w=hnp.arrays(
        st.sampled_from([np.float16, np.float64]),
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=4),
        elements=st.floats(-1000, 1000, width=16),
    ),
    bits=st.integers(1, 8),
    scheme=st.sampled_from(SCHEMES),
)
def test_numpy_float16_float64_decode_to_float32(within_step, w, bits, scheme):
    out = qpack.decode(qpack.encode({"w": w}, bits=bits, scheme=scheme))["w"]
    assert out.dtype == np.float32
    within_step(w.astype(np.float32), out, bits, scheme)
    assert Reader(qpack.encode({"w": w}, bits=bits)).header.tensors[0].dtype == w.dtype.name


def test_names_order_and_unicode(tmp_path):
    names = ["z", "a", "é/ü.weight", "空", "x" * 4096, "with space", "0"]
    arrays = {n: np.full((2, 2), i, dtype=np.float32) for i, n in enumerate(names)}
    blob = qpack.encode(arrays, bits=8)
    assert list(qpack.decode(blob)) == names
    path = tmp_path / "n.qpk"
    path.write_bytes(blob)
    assert list(qpack.load_numpy(path)) == names
    assert list(qpack.load(path)) == names


def test_encode_rejects_bad_names_and_dtypes():
    with pytest.raises(E.QpackError):
        qpack.encode({"": np.ones(2)})
    with pytest.raises(E.QpackError):
        qpack.encode({1: np.ones(2)})
    with pytest.raises(E.QpackError):
        qpack.encode({"c": np.ones(2, dtype=np.complex64)})
    with pytest.raises(E.QpackError):
        qpack.encode({"s": np.array(["a"])})


def test_reader_fetches_one_tensor_and_checks_only_it():
    header, data, _ = split_file(SMALL)
    # corrupt the bias bytes: the weight can still be fetched, the bias cannot
    start = header["tensors"][1]["offset"]
    bad = bytearray(data)
    bad[start] ^= 0x01
    blob = frame_file(header, bytes(bad), (1, 0))
    with Reader(blob) as reader:
        assert reader.keys() == ["layer.weight", "layer.bias", "steps"]
        assert np.array_equal(reader.array("layer.weight"), SMALL_DECODED["layer.weight"])
        assert reader.array("steps") == 5
        with pytest.raises(E.DataChecksumError):
            reader.array("layer.bias")
        with pytest.raises(KeyError):
            reader.entry("missing")
    with pytest.raises(E.DataChecksumError):
        qpack.decode(blob)


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_file_size_is_close_to_payload(tmp_path, bits, scheme):
    gen = torch.Generator().manual_seed(bits)
    state = {}
    for i in range(3):
        state[f"conv{i}.weight"] = torch.randn(192, 192, 3, 3, generator=gen)
        state[f"conv{i}.bias"] = torch.randn(192, generator=gen)
    n_weights = 3 * 192 * 192 * 3 * 3
    n_biases = 3 * 192
    bound = n_weights * bits / 8 + 4 * n_biases
    path = tmp_path / "big.qpk"
    qpack.save(state, path, bits=bits, scheme=scheme, entropy=False)
    size = path.stat().st_size
    assert size >= bound
    assert size <= bound * 1.01 + 8192
    # the packed tensors are exactly ceil(n * bits / 8) bytes
    info = qpack.inspect(path)
    weights = [t for t in info["tensors"] if t["name"].endswith("weight")]
    assert all(t["bytes"] == packed_size(192 * 192 * 9, bits) for t in weights)
    # Huffman coding never makes a file larger, and Gaussian codes leave room to shrink
    qpack.save(state, path, bits=bits, scheme=scheme, entropy=True)
    assert path.stat().st_size < size


# --------------------------------------------------------------------------- truncation, garbage


def test_every_truncation_raises_truncated(tmp_path):
    path = tmp_path / "t.qpk"
    for n in range(len(SMALL)):
        prefix = SMALL[:n]
        with pytest.raises(E.QpackError) as info:
            qpack.decode(prefix)
        # every proper prefix keeps the magic's bytes, so section 8 says "truncated"
        assert type(info.value) is E.TruncatedError, (n, info.value)
        assert info.value.code == "truncated"
        path.write_bytes(prefix)
        with pytest.raises(E.TruncatedError) as info:
            qpack.load(path)
        assert str(path) in str(info.value)
    assert identical(qpack.decode(SMALL[: len(SMALL)]), SMALL_DECODED)


def test_bad_magic_and_short_files():
    for n in range(8):
        with pytest.raises(E.TruncatedError):
            qpack.decode(MAGIC[:n])
    for i in range(8):
        for n in range(i + 1, 30):
            bad = bytearray(SMALL[:n])
            bad[i] ^= 0x20
            with pytest.raises(E.NotQpackError) as info:
                qpack.decode(bytes(bad))
            assert info.value.code == "bad-magic"
    # text-mode damage to the magic (CRLF -> LF) is caught
    with pytest.raises(E.NotQpackError):
        qpack.decode(SMALL.replace(b"\r\n", b"\n", 1))


def test_random_garbage_raises_qpack_error():
    rng = np.random.default_rng(0)
    for n in list(range(0, 64)) + list(range(64, 2048, 37)):
        for prefix in (b"", MAGIC, MAGIC + b"\x01\x00\x00\x00"):
            blob = prefix + rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
            with pytest.raises(E.QpackError):
                qpack.decode(blob)
        # a well-framed header whose body is random bytes (its CRC is right)
        body = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        with pytest.raises(E.QpackError) as info:
            qpack.decode(frame_file(body, b"", (1, 0)))
        assert isinstance(info.value, (E.HeaderError, E.LayoutError, E.TruncatedError))


def test_garbage_files_raise_qpack_error(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "g.qpk"
    for n in (0, 1, 23, 24, 25, 100, 1000):
        path.write_bytes(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
        for reader in (qpack.load, qpack.load_numpy, qpack.inspect):
            with pytest.raises(E.QpackError):
                reader(path)


# --------------------------------------------------------------------------- bit flips


def test_every_single_bit_flip_is_detected_or_harmless():
    detected = 0
    codes = set()
    for byte in range(len(SMALL)):
        for bit in range(8):
            bad = bytearray(SMALL)
            bad[byte] ^= 1 << bit
            try:
                out = qpack.decode(bytes(bad))
            except E.QpackError as exc:
                detected += 1
                codes.add(exc.code)
                continue
            except Exception as exc:  # pragma: no cover - the failure being tested for
                pytest.fail(f"flip of byte {byte} bit {bit} raised {type(exc).__name__}: {exc}")
            assert identical(out, SMALL_DECODED), (byte, bit)
    # every byte is covered by a CRC or is padding that must be zero (spec section 1), so
    # in fact every flip is caught
    assert detected == 8 * len(SMALL)
    assert {"bad-magic", "header-checksum", "data-checksum", "bad-data"} <= codes


def test_bit_flips_through_files(tmp_path):
    path = tmp_path / "f.qpk"
    for position in range(0, 8 * len(SMALL), 13):
        bad = bytearray(SMALL)
        bad[position // 8] ^= 1 << (position % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(E.QpackError) as info:
            qpack.load(path)
        assert str(path) in str(info.value)


# --------------------------------------------------------------------------- schema violations

NAN = struct.pack("<f", float("nan"))
INF = struct.pack("<f", float("inf"))


def _set(index, key, value):
    def mutate(h):
        h["tensors"][index][key] = value

    return mutate


def _drop(index, key):
    def mutate(h):
        del h["tensors"][index][key]

    return mutate


def _top(key, value):
    def mutate(h):
        h[key] = value

    return mutate


def _scalar_channel(h):
    t = h["tensors"][0]
    t["shape"] = []
    t["length"] = 1
    t["scale"] = struct.pack("<f", 1.0)
    t["zero_point"] = struct.pack("<f", 0.0)


def _rename(h):
    h["tensors"][1]["name"] = "layer.weight"


W, B = "layer.weight", "layer.bias"
# (id, mutation, error class, tensor the message must name or None)
SCHEMA_CASES = [
    ("shape_string", _set(0, "shape", "3x4"), E.HeaderError, W),
    ("shape_negative", _set(0, "shape", [3, -4]), E.HeaderError, W),
    ("shape_bool", _set(0, "shape", [3, True]), E.HeaderError, W),
    ("shape_float", _set(0, "shape", [3.0, 4]), E.HeaderError, W),
    ("shape_rank_17", _set(0, "shape", [1] * 17), E.HeaderError, W),
    ("shape_dim_over_2_48", _set(0, "shape", [2**48 + 1, 0]), E.HeaderError, W),
    ("shape_numel_over_2_48", _set(0, "shape", [2**24, 2**24, 2]), E.HeaderError, W),
    ("bits_bool", _set(0, "bits", True), E.HeaderError, W),
    ("bits_0", _set(0, "bits", 0), E.HeaderError, W),
    ("bits_9", _set(0, "bits", 9), E.HeaderError, W),
    ("bits_float", _set(0, "bits", 3.0), E.HeaderError, W),
    ("bits_string", _set(0, "bits", "3"), E.HeaderError, W),
    ("offset_negative", _set(1, "offset", -64), E.HeaderError, B),
    ("offset_float", _set(1, "offset", 64.0), E.HeaderError, B),
    ("length_negative", _set(1, "length", -12), E.HeaderError, B),
    ("crc_too_big", _set(1, "crc32", 2**32), E.HeaderError, B),
    ("crc_string", _set(1, "crc32", "0"), E.HeaderError, B),
    ("crc_negative", _set(1, "crc32", -1), E.HeaderError, B),
    ("scale_nan", _set(0, "scale", NAN * 3), E.HeaderError, W),
    ("scale_inf", _set(0, "scale", INF + struct.pack("<2f", 1, 1)), E.HeaderError, W),
    ("zero_point_nan", _set(0, "zero_point", NAN * 3), E.HeaderError, W),
    ("scale_too_short", _set(0, "scale", struct.pack("<2f", 1, 1)), E.HeaderError, W),
    ("scale_as_list", _set(0, "scale", [1.0, 1.0, 1.0]), E.HeaderError, W),
    ("scale_as_str", _set(0, "scale", "abcdefghijkl"), E.HeaderError, W),
    ("scale_as_ext", _set(0, "scale", msgpack.ExtType(1, b"\0" * 12)), E.HeaderError, W),
    ("dtype_int", _set(1, "dtype", 5), E.HeaderError, B),
    ("dtype_unknown", _set(1, "dtype", "float8"), E.UnsupportedError, B),
    ("storage_unknown", _set(1, "storage", "zstd"), E.UnsupportedError, B),
    ("dequant_unknown", _set(0, "dequant", "lut"), E.UnsupportedError, W),
    ("granularity_unknown", _set(0, "granularity", "block"), E.UnsupportedError, W),
    ("packed_int_dtype", _set(0, "dtype", "int64"), E.HeaderError, W),
    ("channel_on_scalar", _scalar_channel, E.HeaderError, W),
    ("missing_bits", _drop(0, "bits"), E.HeaderError, W),
    ("missing_scale", _drop(0, "scale"), E.HeaderError, W),
    ("missing_crc32", _drop(1, "crc32"), E.HeaderError, B),
    ("missing_shape", _drop(1, "shape"), E.HeaderError, B),
    ("duplicate_name", _rename, E.HeaderError, W),
    ("name_int", _set(1, "name", 5), E.HeaderError, None),
    ("name_empty", _set(1, "name", ""), E.HeaderError, None),
    ("name_too_long", _set(1, "name", "x" * 4097), E.HeaderError, None),
    ("length_mismatch", _set(1, "length", 16), E.LayoutError, B),
    ("offset_not_canonical", _set(1, "offset", 65), E.LayoutError, B),
    ("offset_overlap", _set(1, "offset", 0), E.LayoutError, B),
    ("offset_past_data", _set(1, "offset", 2**64 - 1), E.LayoutError, B),
    ("data_size_too_big", _top("data_size", 136 + 64), E.LayoutError, None),
    ("data_size_string", _top("data_size", "136"), E.HeaderError, None),
    ("data_size_bool", _top("data_size", True), E.HeaderError, None),
    ("metadata_non_string", _top("metadata", {"a": 1}), E.HeaderError, None),
    ("metadata_list", _top("metadata", ["a"]), E.HeaderError, None),
    ("tensors_map", _top("tensors", {}), E.HeaderError, None),
    ("tensor_not_map", lambda h: h["tensors"].__setitem__(2, [1, 2]), E.HeaderError, None),
    ("missing_tensors", lambda h: h.pop("tensors"), E.HeaderError, None),
    ("missing_data_size", lambda h: h.pop("data_size"), E.HeaderError, None),
]


def test_small_file_layout_assumed_by_cases():
    header, data, _ = split_file(SMALL)
    t = header["tensors"]
    assert [x["name"] for x in t] == [W, B, "steps"]
    assert [x["offset"] for x in t] == [0, 64, 128] and header["data_size"] == 136
    assert len(t[0]["scale"]) == 12 and t[0]["granularity"] == "channel"
    assert len(data) == 136


@pytest.mark.parametrize(
    "mutate, cls, tensor", [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_violation(tmp_path, mutate, cls, tensor):
    blob = reframe(SMALL, mutate)
    path, readers = all_readers(blob, tmp_path)
    readers.append(("inspect", lambda: qpack.inspect(path)))
    for how, read in readers:
        with pytest.raises(E.QpackError) as info:
            read()
        exc = info.value
        assert type(exc) is cls, (how, exc)
        assert E.ERROR_CLASSES[exc.code] is cls
        where = "<bytes>" if how == "decode" else str(path)
        assert exc.path == where and str(exc).startswith(where), (how, exc)
        assert exc.tensor == tensor, (how, exc)
        if tensor is not None:
            assert f"tensor {tensor!r}" in str(exc), (how, exc)


def test_data_checksum_names_tensor(tmp_path):
    header, data, _ = split_file(SMALL)
    bad = bytearray(data)
    bad[64] ^= 0x80  # first byte of layer.bias
    blob = frame_file(header, bytes(bad), (1, 0))
    path = every_reader_raises(blob, tmp_path, E.DataChecksumError, "data-checksum", B)
    assert qpack.inspect(path)["tensors"][1]["name"] == B  # the header alone is fine


def every_reader_raises(blob: bytes, tmp_path, cls, code: str, tensor: str):
    """Every way of reading ``blob`` raises ``cls`` with ``code``, naming ``tensor``;
    returns the file path the blob was written to."""
    path, readers = all_readers(blob, tmp_path)
    for _, read in readers:
        with pytest.raises(cls) as info:
            read()
        assert info.value.code == code and info.value.tensor == tensor
    return path


def test_nonzero_padding_bits_are_rejected(tmp_path):
    header, data, _ = split_file(SMALL)
    bad = bytearray(data)
    # 12 codes of 3 bits: 36 bits in 5 bytes, so the top 4 bits of byte 4 are padding
    assert header["tensors"][0]["length"] == 5
    bad[4] |= 0x80
    header["tensors"][0]["crc32"] = zlib.crc32(bytes(bad[:5]))
    blob = frame_file(header, bytes(bad), (1, 0))
    every_reader_raises(blob, tmp_path, E.DataError, "bad-data", W)


@pytest.mark.parametrize("where", ["header_padding", "between_tensors"])
def test_nonzero_alignment_padding_is_rejected(tmp_path, where):
    bad = bytearray(SMALL)
    (header_len,) = struct.unpack_from("<Q", SMALL, 16)
    start = align64(24 + header_len)
    position = 24 + header_len if where == "header_padding" else start + 5
    assert bad[position] == 0
    bad[position] = 0x01
    every_reader_raises(bytes(bad), tmp_path, E.DataError, "bad-data", None)


def test_trailing_bytes_are_rejected():
    with pytest.raises(E.LayoutError) as info:
        qpack.decode(SMALL + b"\x00")
    assert info.value.code == "bad-layout"


def test_header_checksum_mismatch():
    bad = bytearray(SMALL)
    bad[12] ^= 0x01
    with pytest.raises(E.HeaderChecksumError) as info:
        qpack.decode(bytes(bad))
    assert info.value.code == "header-checksum"
    bad = bytearray(SMALL)
    bad[30] ^= 0x01  # inside the header body
    with pytest.raises(E.HeaderChecksumError):
        qpack.decode(bytes(bad))


@pytest.mark.parametrize(
    "body, why",
    [
        (b"\xc1", "reserved byte"),
        (b"", "empty"),
        (msgpack.packb({"tensors": [], "data_size": 0}) + b"\x00", "trailing object"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb(None), "nil"),
        (b"\x82\xa7tensors\x90\xa7tensors\x90", "duplicate key"),
        (b"\x81\xa2\xff\xfe\x00", "invalid utf-8 key"),
        (b"\x82\xa7tensors\x90\xa9data_size\xcb\x00\x00\x00\x00\x00\x00\x00\x00", "float size"),
        (msgpack.packb({1: 2}), "integer key"),
        (b"\x91" * 5000 + b"\x90", "deep nesting"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_header_not_valid_msgpack_or_not_a_map(body, why):
    with pytest.raises(E.HeaderError) as info:
        qpack.decode(frame_file(body, b"", (1, 0)))
    assert type(info.value) is E.HeaderError and info.value.code == "bad-header"


def test_version_and_header_len_checks():
    header, data, _ = split_file(SMALL)
    body = msgpack.packb(header, use_bin_type=True)
    with pytest.raises(E.VersionError) as info:
        qpack.decode(frame_file(body, data, (2, 0)))
    assert info.value.code == "unsupported-version"
    with pytest.raises(E.VersionError):
        qpack.decode(frame_file(body, data, (0, 0)))
    # a newer minor version is read (spec section 9)
    newer = frame_file(body, data, (1, 7))
    assert identical(qpack.decode(newer), SMALL_DECODED)
    assert Reader(newer).header.version == (1, 7)
    # header_len above 64 MiB, in a small file
    with pytest.raises(E.HeaderTooLargeError) as info:
        qpack.decode(with_header_len(frame_file(body, data, (1, 0)), (64 << 20) + 1))
    assert info.value.code == "header-too-large"
    # 64 MiB exactly is allowed but runs past this file's end
    with pytest.raises(E.TruncatedError):
        qpack.decode(with_header_len(frame_file(body, data, (1, 0)), 64 << 20))


def test_check_order():
    header, data, _ = split_file(SMALL)
    body = msgpack.packb(header, use_bin_type=True)
    wrong_crc = bytearray(frame_file(body, data, (2, 0)))
    wrong_crc[12] ^= 0xFF
    with pytest.raises(E.VersionError):  # check 3 before check 6
        qpack.decode(bytes(wrong_crc))
    huge = bytearray(with_header_len(frame_file(body, data, (1, 0)), 1 << 40))
    huge[12] ^= 0xFF
    with pytest.raises(E.HeaderTooLargeError):  # check 4 before 5 and 6
        qpack.decode(bytes(huge))
    bad_magic_short = bytearray(SMALL[:10])
    bad_magic_short[0] = 0
    with pytest.raises(E.NotQpackError):  # check 1 before 2
        qpack.decode(bytes(bad_magic_short))
    # a header defect (check 8) is reported before the file is found short (check 12)
    broken = reframe(SMALL, _set(0, "bits", 0))
    with pytest.raises(E.HeaderError):
        qpack.decode(broken[:-1])
    # the length of a truncated data section is reported before data checksums (12 < 14)
    with pytest.raises(E.TruncatedError):
        qpack.decode(SMALL[:-1])


def test_unknown_keys_are_ignored_and_metadata_is_optional():
    def extend(h):
        h["x-future"] = {"nested": [1, 2, 3]}
        h["tensors"][0]["x-note"] = "hello"
        del h["metadata"]

    blob = reframe(SMALL, extend)
    assert identical(qpack.decode(blob), SMALL_DECODED)
    assert Reader(blob).metadata == {}


def test_empty_file_of_no_tensors():
    blob = frame_file({"tensors": [], "data_size": 0}, b"", (1, 0))
    assert qpack.decode(blob) == {}
    written = qpack.encode({})
    header, data, _ = split_file(written)
    assert header["tensors"] == [] and header["data_size"] == 0 and data == b""
    assert len(written) % 64 == 0 and qpack.decode(written) == {}


def test_zero_length_tensors_have_canonical_offsets():
    arrays = {"a": np.zeros((0, 3), np.float32), "b": np.zeros(0, np.int8), "c": np.ones(2)}
    blob = qpack.encode(arrays)
    header, data, _ = split_file(blob)
    assert [t["offset"] for t in header["tensors"]] == [0, 0, 0]
    assert [t["length"] for t in header["tensors"]] == [0, 0, 16] and len(data) == 16
    out = qpack.decode(blob)
    assert out["a"].shape == (0, 3) and out["b"].shape == (0,) and out["c"].tolist() == [1, 1]


# --------------------------------------------------------------------------- header fuzzing

hostile_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, 3, 5, 8, 9, 12, 64, 128, 136, 2**32, 2**48, 2**48 + 1]),
    st.floats(),
    st.text(max_size=6),
    st.sampled_from(
        ["float32", "bfloat16", "int64", "bool", "raw", "packed", "affine", "tensor", "channel"]
    ),
    st.binary(max_size=16),
    st.lists(st.integers(-2, 2**48 + 2), max_size=5),
    st.lists(st.integers(0, 6), max_size=3),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
KEYS = list(TENSOR_KEYS)  # every key a tensor entry may carry
mutations = st.lists(
    st.tuples(
        st.sampled_from(["top", 0, 1, 2]),
        st.sampled_from([*KEYS, "tensors", "data_size", "metadata", "extra"]),
        st.booleans(),  # delete instead of set
        hostile_values,
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(mutations)
def test_fuzzed_headers_raise_qpack_error_or_decode(ops):
    header, data, _ = split_file(SMALL)
    for target, key, delete, value in ops:
        container = header
        if target != "top":
            tensors = header.get("tensors")
            if not isinstance(tensors, list) or len(tensors) <= target:
                continue
            container = tensors[target]
            if not isinstance(container, dict):
                continue
        if delete:
            container.pop(key, None)
        else:
            container[key] = value
    blob = frame_file(header, data, (1, 0))
    try:
        out = qpack.decode(blob)
    except E.QpackError:
        return
    # accepted: then it must be self-consistent with its own header
    entries = Reader(blob).header.tensors
    assert [e.name for e in entries] == list(out)
    for e in entries:
        assert out[e.name].shape == e.shape


# --------------------------------------------------------------------------- known bugs


def test_header_crc_covers_header_len():
    stored = struct.unpack_from("<I", SMALL, 12)[0]
    assert stored == spec_header_crc(SMALL)
    # and a reader accepts a file framed exactly as documented
    (header_len,) = struct.unpack_from("<Q", SMALL, 16)
    fixed = bytearray(SMALL)
    struct.pack_into("<I", fixed, 12, spec_header_crc(SMALL))
    assert identical(qpack.decode(bytes(fixed)), SMALL_DECODED)


@pytest.mark.parametrize("where", ["top", "tensor"])
def test_non_str_map_keys_are_rejected(where):
    header, data, _ = split_file(SMALL)
    if where == "top":
        header[b"data_size"] = 1  # a bin key next to the str key of the same bytes
    else:
        header["tensors"][0][b"x"] = 1
    blob = frame_file(header, data, (1, 0))
    with pytest.raises(E.HeaderError):
        qpack.decode(blob)


@pytest.mark.parametrize("bits", [1, 2])
def test_huge_finite_weights_either_refused_or_decoded_finitely(within_step, bits):
    w = np.array([[-3e38, 3e38], [1.0, 2.0]], dtype=np.float32)
    try:
        with np.errstate(all="ignore"):
            blob = qpack.encode({"w": w}, bits=bits, scheme=ASYM)
    except E.EncodeError:
        return  # refusing to write is acceptable
    with np.errstate(all="ignore"):
        out = qpack.decode(blob)["w"]
    within_step(w, out, bits, ASYM)


def test_huge_finite_weights_symmetric_are_fine(within_step):
    w = np.array([[-3e38, 3e38], [1.0, 2.0]], dtype=np.float32)
    for bits in range(1, 9):
        out = qpack.decode(qpack.encode({"w": w}, bits=bits, scheme=SYM))["w"]
        within_step(w, out, bits, SYM)
    assert math.isfinite(float(np.abs(out).max()))


@pytest.mark.parametrize("scheme", ["asymmetric-per-channel", "mse-per-channel"])
def test_per_channel_scheme_on_a_scalar_is_refused_when_writing(scheme):
    scalar = {"w": np.array(0.5, dtype=np.float32)}
    with pytest.raises(E.EncodeError, match="at least one dimension"):
        qpack.encode(scalar, bits={"w": 4}, scheme=scheme)
    out = qpack.decode(qpack.encode(scalar, bits={"w": 4}, scheme="asymmetric-per-layer"))
    assert out["w"].shape == () and abs(float(out["w"]) - 0.5) < 0.05


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_per_layer_huffman_lookup_matches_ungroup_then_dequantize(data):
    """codec decodes one-scale Huffman tensors of grouped codes by a table of each symbol's
    values; it must give the values of the reference route (ungroup, then the spec's
    dequantization) for every width, group and length, a partial last symbol included."""
    from qpack import decoder as qdecode
    from qpack import entropy as H
    from qpack.container import TensorEntry

    bits = data.draw(st.integers(1, 4))
    group = data.draw(st.integers(2, 8 // bits))
    numel = data.draw(st.integers(1, 300))
    codes = np.array(
        data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=numel, max_size=numel)),
        dtype=np.uint8,
    )
    symbols = H.group_codes(codes, bits, group)
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=1 << (group * bits)))
    stream = H.encode_symbols(symbols, lengths).tobytes()
    scale = np.array([data.draw(st.floats(0.0009765625, 16.0, width=32))], dtype=np.float32)
    zero = np.array([data.draw(st.integers(0, (1 << bits) - 1))], dtype=np.float32)
    entry = TensorEntry("t", (numel,), "float32", "huffman", 0, len(stream), 0)
    entry.bits, entry.dequant, entry.granularity = bits, "affine", "tensor"
    entry.scale, entry.zero_point, entry.group, entry.code_lengths = scale, zero, group, lengths
    looked_up = qdecode._huffman_values(entry, stream, None, None)
    reference = qdecode.decode_codes_values(entry, qdecode._huffman_codes(entry, stream, None))
    assert looked_up.tobytes() == reference.tobytes()


@pytest.mark.parametrize("ahead", [None, 0, 3, 100])
def test_ordered_map_keeps_order_and_hands_out_at_most_ahead_items(ahead):
    """Results come in input order; an item's error surfaces at that item; at most
    ``ahead`` items beyond the consumer are taken (default twice the workers)."""
    from qpack._threads import ordered_map

    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield i

    def square(i: int) -> int:
        if i == 12:
            raise ValueError("item 12")
        return i * i

    results = ordered_map(square, items(), workers=2, ahead=ahead)
    assert next(results) == 0
    assert len(pulled) == min(20, (4 if ahead is None else ahead) + 1)
    assert [next(results) for _ in range(11)] == [i * i for i in range(1, 12)]
    with pytest.raises(ValueError, match="item 12"):
        next(results)


def test_ordered_map_with_costs_starts_the_costliest_and_keeps_order(monkeypatch):
    """With ``cost``, every item is handed out at once, the costliest first; results and
    errors still come in input order."""
    from concurrent.futures import ThreadPoolExecutor

    import qpack._threads as threads

    submitted = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, item):
            submitted.append(item)
            return super().submit(fn, item)

    monkeypatch.setattr(threads, "ThreadPoolExecutor", Recording)

    def work(i: int) -> int:
        if i in (3, 7):
            raise ValueError(f"item {i}")
        return -i

    costs = {i: (i * 7) % 10 for i in range(10)}
    got = []
    with pytest.raises(ValueError, match="item 3"):
        for value in threads.ordered_map(work, range(10), workers=2, cost=costs.get):
            got.append(value)
    assert got == [0, -1, -2]
    assert submitted == sorted(range(10), key=lambda i: -costs[i])

"""Build the conformance vectors in spec/vectors/ (byte-identically on every run).

    python tools/make_vectors.py            # rewrite spec/vectors/
    python tools/make_vectors.py --check    # exit 1 if the committed files differ

Every valid vector ``valid/NAME.qpk`` has ``valid/NAME.json`` with the expected decoding:
per tensor its shape, dtype, storage and ``data``, the hex of the little-endian bytes a
conforming decoder produces (float32 values for packed tensors, the stored bytes for raw
ones), plus informational ``codes`` and ``values``. ``manifest.json`` lists every vector;
each invalid vector names the error code (spec section 8) a reader must raise and, for a
defect that a check of one tensor finds, that tensor (spec section 10).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qpack  # noqa: E402
from qpack.bitpack import pack_codes  # noqa: E402
from qpack.container import (  # noqa: E402
    MAX_BIN_BYTES,
    MAX_CONTAINER_LEN,
    MAX_DEPTH,
    MAX_STR_BYTES,
    QUANTIZED_KINDS,
    TensorEntry,
    frame_file,
    split_file,
)
from qpack.decoder import decode_codes  # noqa: E402
from qpack.entropy import (  # noqa: E402
    chunk_starts,
    encode_symbols,
    group_codes,
    huffman_lengths,
    pack_lengths,
)
from qpack.reader import Reader  # noqa: E402
from qpack.writer import serialize  # noqa: E402

VECTORS = ROOT / "spec" / "vectors"
META = {"producer": "qpack conformance vectors"}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _file(items, *, bits=8, scheme="asymmetric-per-channel", entropy=False, metadata=None) -> bytes:
    """A file made by the real encoder from (name, array) pairs."""
    meta = dict(META, **(metadata or {}))
    arrays = dict(items)
    return qpack.encode(arrays, bits=bits, scheme=scheme, entropy=entropy, metadata=meta)


def _handmade(shape, bits, codes, scale, zero_point, granularity, name="w", **group) -> bytes:
    """A file whose codes and affine parameters are chosen by hand, not by a quantizer
    (``group``: group_size, scale_dtype and shared_zero of granularity "group")."""
    payload = pack_codes(np.asarray(codes, dtype=np.uint8), bits)
    entry = TensorEntry(
        name,
        tuple(shape),
        "float32",
        "packed",
        0,
        payload.size,
        zlib.crc32(payload),
        bits=bits,
        scheme="handmade",
        dequant="affine",
        granularity=granularity,
        scale=np.asarray(scale, dtype=np.float32),
        zero_point=np.asarray(zero_point, dtype=np.float32),
        **group,
    )
    return _single(entry, payload)


def _huffman(
    codes, bits, group, lengths, *, stream=None, scale=(0.5,), zero_point=(1.0,), chunk=None
):
    """A hand-made Huffman tensor; ``stream`` overrides the encoded bytes (CRC kept valid);
    ``chunk`` adds a chunk index (spec 5.2)."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    codes = np.asarray(codes, dtype=np.uint8)
    symbols = group_codes(codes, bits, group)
    if stream is None:
        stream = encode_symbols(symbols, lengths).tobytes()
    entry = TensorEntry(
        "w",
        (codes.size,),
        "float32",
        "huffman",
        0,
        len(stream),
        zlib.crc32(stream),
        bits=bits,
        scheme="handmade",
        dequant="affine",
        granularity="tensor",
        scale=np.asarray(scale, dtype=np.float32),
        zero_point=np.asarray(zero_point, dtype=np.float32),
        group=group,
        code_lengths=lengths,
    )
    if chunk is not None:
        entry.chunk, entry.chunk_starts = chunk, chunk_starts(symbols, lengths, chunk)
    return _single(entry, stream)


def _chunked() -> bytes:
    """8-bit codes averaging 7 bits, in 13 chunks of 16 symbols (the last one of 8): long
    enough that a decoder which runs four chunks side by side does so."""
    codes = _rng(12).integers(0, 128, size=200).astype(np.uint8)
    lengths = huffman_lengths(np.bincount(codes, minlength=256))
    return _huffman(codes, 8, 1, lengths, scale=(0.25,), zero_point=(64.0,), chunk=16)


def _drop_chunk_start(header, data):
    header["tensors"][0]["chunk_starts"].pop()


def _set_chunk_start(index, delta):
    def fn(header, data):
        header["tensors"][0]["chunk_starts"][index] += delta

    return fn


# The spec's Huffman worked example: 2-bit codes, one per symbol, lengths 1, 2, 3, 3.
WORKED_CODES = [0, 0, 1, 2, 0, 3]
WORKED_LENGTHS = [1, 2, 3, 3]


def _single(entry: TensorEntry, payload) -> bytes:
    """The file of one tensor, written by the writer."""
    return b"".join(bytes(c) for c in serialize([(entry, payload)], META))


def valid_vectors() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, description)."""
    v: dict[str, tuple[bytes, str]] = {}
    r = _rng(1)
    v["bits1_per_tensor_15codes"] = (
        _file(
            [("w", r.normal(size=(3, 5)).astype(np.float32))], bits=1, scheme="symmetric-per-layer"
        ),
        "1-bit, per tensor (symmetric-per-layer), 15 codes: the last byte has 1 padding bit",
    )
    v["bits2_per_channel_odd"] = (
        _file([("w", r.normal(size=(4, 3)).astype(np.float32))], bits=2),
        "2-bit, per channel (4 channels of 3), 12 codes",
    )
    v["bits3_worked_example"] = (
        _handmade((2, 4), 3, [1, 2, 3, 4, 5, 6, 7, 0], [0.5], [3.0], "tensor"),
        "the spec's 3-bit worked example: codes 1..7,0 -> bytes D1 58 1F",
    )
    v["bits3_per_channel_13codes"] = (
        _file([("w", r.normal(size=(1, 13)).astype(np.float32))], bits=3),
        "3-bit, one channel, 13 codes (39 bits, 1 padding bit)",
    )
    v["bits4_worked_example"] = (
        _handmade((3,), 4, [1, 2, 3], [0.25], [8.0], "tensor"),
        "the spec's 4-bit worked example: codes 1,2,3 -> bytes 21 03",
    )
    v["bits4_per_channel_conv"] = (
        _file([("conv.weight", (0.1 * r.normal(size=(4, 2, 3, 3))).astype(np.float32))], bits=4),
        "4-bit per-channel conv weight (4, 2, 3, 3)",
    )
    v["bits5_per_tensor"] = (
        _file(
            [("w", r.normal(size=(3, 7)).astype(np.float32))], bits=5, scheme="symmetric-per-layer"
        ),
        "5-bit per tensor, 21 codes",
    )
    v["bits6_per_channel"] = (
        _file([("w", r.uniform(-3, 1, size=(5, 5)).astype(np.float32))], bits=6),
        "6-bit per channel, asymmetric ranges",
    )
    v["bits7_per_channel"] = (
        _file([("w", r.normal(size=(2, 11)).astype(np.float32))], bits=7),
        "7-bit per channel, 22 codes",
    )
    v["bits8_symmetric_origin"] = (
        _file(
            [("w", r.normal(size=(6, 6)).astype(np.float32))], bits=8, scheme="symmetric-per-layer"
        ),
        "8-bit, the origin's symmetric per-layer quantizer (zero point 128)",
    )
    v["affine_fractional_zero_point"] = (
        _handmade((2, 3), 2, [0, 1, 2, 3, 2, 1], [0.1, -2.0], [1.5, 0.25], "channel"),
        "hand-made affine parameters: fractional zero points and a negative scale",
    )
    v["raw_passthrough"] = (
        _file(
            [
                ("bias32", r.normal(size=(5,)).astype(np.float32)),
                ("half", r.normal(size=(2, 3)).astype(np.float16)),
                ("double", r.normal(size=(2,)).astype(np.float64)),
                ("steps", np.array([1, -2, 3], dtype=np.int64)),
                ("int32", np.array([[7, -8]], dtype=np.int32)),
                ("int16", np.array([-300], dtype=np.int16)),
                ("int8", np.array([-5, 5], dtype=np.int8)),
                ("mask", np.array([True, False, True])),
                ("bytes", np.array([0, 255], dtype=np.uint8)),
            ],
            bits={"half": None, "double": None},
        ),
        "raw float32/float16/float64/int64/int32/int16/int8/bool/uint8 stored exactly",
    )
    v["raw_bfloat16"] = (_bfloat16_raw(), "a raw bfloat16 tensor (stored as bit patterns)")
    v["scalar_and_empty"] = (
        _file(
            [
                ("scalar", np.array(3.5, dtype=np.float32)),
                ("count", np.array(42, dtype=np.int64)),
                ("empty_raw", np.zeros((0, 4), dtype=np.float32)),
                ("empty_packed", np.zeros((0, 3, 3), dtype=np.float32)),
                ("after", np.ones((2, 2), dtype=np.float32)),
            ],
            bits=4,
        ),
        "raw scalar tensors and two empty float tensors, both stored packed (length 0), "
        "the one named empty_raw included",
    )
    v["empty_raw"] = (
        _file(
            [
                ("empty_f32", np.zeros((0, 4), dtype=np.float32)),
                ("empty_i64", np.zeros((3, 0), dtype=np.int64)),
                ("empty_bool", np.zeros((0,), dtype=bool)),
                ("after", np.arange(3, dtype=np.int16)),
            ],
            bits={"empty_f32": None},
        ),
        "empty raw tensors (length 0, each at the canonical offset) before a non-empty one",
    )
    v["metadata_only"] = (
        _file([], metadata={"model": "UNet576k", "note": "naïve ünïcode ✓", "empty": ""}),
        "no tensors; metadata with non-ASCII text",
    )
    v["mini_unet_block"] = (
        _file(
            [
                ("conv.weight", (0.2 * r.normal(size=(8, 4, 3, 3))).astype(np.float32)),
                ("conv.bias", (0.01 * r.normal(size=(8,))).astype(np.float32)),
                ("num_batches_tracked", np.array(7, dtype=np.int64)),
                ("fc.weight", r.normal(size=(3, 8)).astype(np.float32)),
            ],
            bits={"conv.weight": 3, "fc.weight": 8},
            metadata={"model": "mini"},
        ),
        "a small model: 3-bit conv weight, 8-bit linear weight, raw bias and counter",
    )
    v["scheme_asymmetric_per_layer"] = (
        _file(
            [("w", (0.3 * r.standard_t(3, size=(6, 10))).astype(np.float32))],
            bits=5,
            scheme="asymmetric-per-layer",
        ),
        "5-bit asymmetric-per-layer: one scale and zero point for the tensor",
    )
    v["scheme_mse_per_channel"] = (
        _file(
            [("w", (0.3 * r.standard_t(2, size=(5, 12))).astype(np.float32))],
            bits=3,
            scheme="mse-per-channel",
        ),
        "3-bit mse-per-channel: clipped per-channel ranges",
    )
    v["fractional_width_23_levels"] = (
        _file([("w", r.normal(size=(4, 9)).astype(np.float32))], bits=4.5),
        "bits=4.5 in the writer: 23 levels, stored as 5-bit codes",
    )
    v["huffman_worked_example"] = (
        _huffman(WORKED_CODES, 2, 1, WORKED_LENGTHS),
        "the spec's Huffman worked example: codes 0,0,1,2,0,3 -> bytes 34 07",
    )
    v["huffman_group2_bits4"] = (
        _file(
            [("conv.weight", (0.1 * r.standard_t(3, size=(32, 16, 3, 3))).astype(np.float32))],
            bits=4,
            entropy=True,
        ),
        "4-bit per-channel codes, Huffman-coded two codes per symbol",
    )
    sparse = (r.random(61) < 0.1).astype(np.uint8)
    v["huffman_group8_bits1"] = (
        _huffman(
            sparse, 1, 8, huffman_lengths(np.bincount(group_codes(sparse, 1, 8), minlength=256))
        ),
        "1-bit codes, eight per symbol; 61 codes, so the last symbol has 3 zero padding codes",
    )
    v["huffman_bits8_mixed"] = (
        _file(
            [
                ("a.weight", (0.05 * r.standard_t(4, size=(64, 64))).astype(np.float32)),
                ("a.bias", r.normal(size=(16,)).astype(np.float32)),
                ("b.weight", r.uniform(-1, 1, size=(4, 4)).astype(np.float32)),
            ],
            bits=8,
            entropy=True,
        ),
        "8-bit: a Huffman-coded tensor beside one that stays fixed-width (smaller) and a raw bias",
    )
    v["huffman_single_symbol"] = (
        _huffman([1] * 20, 2, 4, [0] * 85 + [1] + [0] * 170),
        "every symbol the same: one codeword of length 1, one bit per symbol",
    )
    v["huffman_chunk_index"] = (
        _chunked(),
        "version 1.2: a chunk index of 16 symbols per chunk (12 starts) on an 8-bit stream",
    )
    v["huffman_empty_chunk_index"] = (
        _huffman([], 2, 1, [0, 0, 0, 0], chunk=1),
        "an empty Huffman tensor (S = 0): no codeword, no bytes, a chunk index of no entries",
    )
    v["future_minor_version"] = (
        _future_minor(v["mini_unet_block"][0]),
        "version 1.99 with unknown optional keys: a 1.x reader ignores them and decodes",
    )
    v["nesting_at_limit"] = (
        _mutate(v["bits4_worked_example"][0], _add_key("x-deep", _nested(MAX_DEPTH - 1))),
        f"an unknown key holding arrays nested to depth {MAX_DEPTH} (the header map is depth 1)",
    )
    v.update(_group_vectors())
    v.update(_half_vectors())
    return v


def _half_vectors() -> dict[str, tuple[bytes, str]]:
    """Version 1.4: tensors stored as binary16 values (spec section 6.4)."""
    example = np.array([1.0, -0.0, 65504.0], dtype="<f2").view(np.uint8)
    entry = TensorEntry("w", (3,), "float32", "half", 0, 6, zlib.crc32(example.tobytes()))
    special = np.array(
        [[0.1, 2.0**-24, 1e-9, -1.5], [np.inf, -np.inf, -65504.0, 3.0e-5]], dtype=np.float32
    )
    r = _rng(14)
    mixed = {
        "w": special,
        "x": r.normal(size=(3, 5)),  # float64: decodes to binary32, restored exactly
        "b": r.normal(size=4).astype(np.float32),
    }
    return {
        "half_float32": (
            _single(entry, example),
            "the worked example of section 6.4: 1.0, -0.0 and 65504.0 as binary16",
        ),
        "half_mixed": (
            qpack.encode(mixed, bits={"w": 16, "x": 16, "b": None}, metadata=META),
            "half storage of a float32 tensor (0.1, the least subnormal, a value that "
            "rounds to zero, infinities, a subnormal) and of a float64 one, beside a raw bias",
        ),
    }


def _group_vectors() -> dict[str, tuple[bytes, str]]:
    """Version 1.3: per-group affine parameters (spec sections 4.2 and 6.1)."""
    r = _rng(13)
    return {
        "group_asymmetric_short_last": (
            _handmade(
                (2, 5),
                3,
                [0, 7, 3, 4, 5, 1, 2, 6, 7, 0],
                [0.5, 0.25, 2.0, 0.125, 1.5, -0.75],
                [3.0, 4.0, 0.0, 7.0, 2.0, 5.0],
                "group",
                group_size=2,
            ),
            "3-bit, shape [2, 5] in groups of 2: three groups a row (2, 2, 1 codes), six "
            "float32 scale and zero point pairs",
        ),
        "group_symmetric_float16": (
            _file(
                [("w", (0.05 * r.standard_t(3, size=(4, 24))).astype(np.float32))],
                bits=4,
                scheme="symmetric-per-group-8",
            ),
            "4-bit symmetric-per-group in groups of 8: float16 scales and one shared zero point",
        ),
        "group_huffman": (
            _file(
                [("w", (0.05 * r.standard_t(3, size=(16, 80))).astype(np.float32))],
                bits=4,
                scheme="asymmetric-per-group-32",
                entropy=True,
            ),
            "4-bit asymmetric-per-group in groups of 32 (rows of 80: a short last group), "
            "float16 parameters, Huffman-coded",
        ),
    }


def _future_minor(base: bytes) -> bytes:
    header, data, _ = split_file(base)
    header["added_in_1_99"] = {"anything": [1, 2.5, None]}
    header["tensors"][0]["hint"] = "ignored by 1.0 readers"
    return frame_file(header, data, (1, 99))


def _nested(levels: int) -> list:
    """Arrays nested ``levels`` deep, the innermost empty."""
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _add_key(key, value):
    def fn(header, data):
        header[key] = value

    return fn


def _bfloat16_raw() -> bytes:
    bits16 = np.array([0x3F80, 0xC000, 0x7F7F, 0x0001], dtype="<u2")  # 1, -2, max, tiny
    entry = TensorEntry("bf16", (4,), "bfloat16", "raw", 0, 8, zlib.crc32(bits16.tobytes()))
    return _single(entry, bits16.view(np.uint8))


# --------------------------------------------------------------------------- invalid


def _mutate(blob: bytes, fn, version=(1, 0)) -> bytes:
    """The file re-framed (header CRC kept valid) after ``fn(header, data)`` edits its
    header in place; ``fn`` may return new data bytes."""
    header, data, _ = split_file(blob)
    changed = fn(header, data)
    return frame_file(header, data if changed is None else changed, version)


def invalid_vectors(base: bytes) -> dict[str, tuple[bytes, str, str, str | None]]:
    """name -> (file bytes, expected error code, description, the tensor whose decoding
    fails, if a per-tensor check fails); ``base`` is a valid file."""
    header_len = int.from_bytes(base[16:24], "little")
    inv: dict[str, tuple[bytes, str, str, str | None]] = {}

    def add(name, blob, code, text, tensor=None):
        inv[name] = (blob, code, text, tensor)

    def set_key(index, key, value):
        def fn(header, data):
            header["tensors"][index][key] = value

        return fn

    add("bad_magic", b"GGUF" + base[4:], "bad-magic", "the first bytes are not the magic")
    add("empty_file", b"", "truncated", "a zero-byte file")
    add("truncated_preamble", base[:20], "truncated", "cut inside the 24-byte preamble")
    add("truncated_header", base[: 24 + header_len // 2], "truncated", "cut inside the header")
    add("truncated_data", base[:-3], "truncated", "the last 3 data bytes are missing")
    add("trailing_bytes", base + b"\x00", "bad-layout", "one byte after the data section")
    flipped = bytearray(base)
    flipped[24 + header_len // 2] ^= 0x10
    add("header_checksum", bytes(flipped), "header-checksum", "one header bit flipped")
    flipped = bytearray(base)
    flipped[-1] ^= 0x01
    add("data_checksum", bytes(flipped), "data-checksum", "one data bit flipped", "fc.weight")
    header, data, _ = split_file(base)
    add(
        "major_version_2",
        frame_file(header, data, (2, 0)),
        "unsupported-version",
        "major version 2",
    )
    huge = bytearray(base)
    huge[16:24] = (1 << 40).to_bytes(8, "little")
    add("oversized_header", bytes(huge), "header-too-large", "header_len of 1 TiB")
    add("not_msgpack", _rebody(b"\xc1" * 16), "bad-header", "the header is not msgpack")
    add(
        "header_not_a_map",
        _rebody([1, 2, 3]),
        "bad-header",
        "the header is an array, not a map",
    )
    add(
        "duplicate_map_key",
        _rebody(b"\x82\xa4data\x00\xa4data\x00"),
        "bad-header",
        "a map with the same key twice",
    )
    add(
        "offset_out_of_range",
        _mutate(base, _grow_offset),
        "bad-layout",
        "the last tensor's bytes run past data_size",
    )
    add(
        "overlapping_data",
        _mutate(base, set_key(1, "offset", 0)),
        "bad-layout",
        "the second tensor's offset points into the first",
    )
    add("bits_0", _mutate(base, set_key(0, "bits", 0)), "bad-header", "bits = 0")
    add("bits_9", _mutate(base, set_key(0, "bits", 9)), "bad-header", "bits = 9")
    add(
        "bits_bool",
        _mutate(base, set_key(0, "bits", True)),
        "bad-header",
        "bits is a msgpack boolean, not an integer",
    )
    add(
        "shape_length_mismatch",
        _mutate(base, set_key(0, "shape", [8, 4, 3, 2])),
        "bad-layout",
        "the shape needs more bytes than length says",
    )
    add(
        "negative_dimension",
        _mutate(base, set_key(0, "shape", [-8, 4, 3, 3])),
        "bad-header",
        "a negative dimension",
    )
    add(
        "empty_shape_too_large",
        _mutate(base, _huge_empty),
        "bad-header",
        "a shape holding no element whose other dimensions multiply past 2^48 (fuzz finding)",
    )
    add("nan_scale", _mutate(base, _nan_scale), "bad-header", "a NaN scale")
    add(
        "scale_count_mismatch",
        _mutate(base, set_key(0, "scale", b"\0\0\x80\x3f")),
        "bad-header",
        "per-channel tensor with one scale",
    )
    add(
        "duplicate_names",
        _mutate(base, set_key(1, "name", "conv.weight")),
        "bad-header",
        "two tensors with the same name",
    )
    add(
        "unknown_storage",
        _mutate(base, set_key(0, "storage", "huffman9")),
        "unsupported-feature",
        "a storage kind this reader does not know",
    )
    add(
        "unknown_dequant",
        _mutate(base, set_key(0, "dequant", "codebook9")),
        "unsupported-feature",
        "a dequantization this reader does not know",
    )
    add(
        "missing_crc32",
        _mutate(base, _drop_key(0, "crc32")),
        "bad-header",
        "a tensor without its crc32",
    )
    add(
        "nonzero_padding_bits",
        _padding_bits(),
        "bad-data",
        "a set bit after the last code, with a CRC that covers it",
        "w",
    )
    add(
        "nonzero_alignment_padding",
        _alignment_padding(base),
        "bad-data",
        "a nonzero byte between the header and the data section",
        "conv.weight",
    )
    add("bool_byte_2", _bad_bool(), "bad-data", "a raw bool byte of 0x02", "mask")
    add(
        "huffman_oversubscribed",
        _mutate(
            _huffman(WORKED_CODES, 2, 1, WORKED_LENGTHS, stream=b"\x00\x00"),
            set_key(0, "code_lengths", pack_lengths(np.array([1, 1, 2, 2], np.uint8))),
            (1, 1),
        ),
        "bad-header",
        "code lengths whose Kraft sum exceeds 1",
    )
    add(
        "huffman_group_too_wide",
        _mutate(_huffman(WORKED_CODES, 2, 1, WORKED_LENGTHS), _set_group(5)),
        "bad-header",
        "group * bits = 10 > 8",
    )
    add(
        "huffman_stream_ends_early",
        _huffman(WORKED_CODES, 2, 1, WORKED_LENGTHS, stream=b"\x34"),
        "bad-data",
        "6 symbols expected, the stream holds 8 bits",
        "w",
    )
    add(
        "huffman_invalid_codeword",
        _huffman(WORKED_CODES, 2, 1, [1, 2, 3, 0], stream=b"\xff\x00"),
        "bad-data",
        "an incomplete code and a stream using the pattern no symbol owns",
        "w",
    )
    add(
        "huffman_padding_bits",
        _huffman(WORKED_CODES, 2, 1, WORKED_LENGTHS, stream=b"\x34\x87"),
        "bad-data",
        "a set bit after the last codeword",
        "w",
    )
    add(
        "huffman_trailing_byte",
        _huffman(WORKED_CODES, 2, 1, WORKED_LENGTHS, stream=b"\x34\x07\x00"),
        "bad-data",
        "a whole unused byte after the last codeword",
        "w",
    )
    add(
        "huffman_spare_codes",
        _huffman([1] * 5, 1, 8, [0] * 31 + [1] + [0] * 223 + [1], stream=b"\x01"),
        "bad-data",
        "the last symbol's padding codes are not zero",
        "w",
    )
    chunked = _chunked()
    add(
        "chunk_start_wrong",
        _mutate(chunked, _set_chunk_start(5, -1), (1, 2)),
        "bad-data",
        "a chunk index entry one bit before where its chunk begins",
        "w",
    )
    add(
        "chunk_starts_count",
        _mutate(chunked, _drop_chunk_start, (1, 2)),
        "bad-header",
        "a chunk index of 11 entries where 13 chunks need 12",
    )
    add(
        "chunk_start_out_of_range",
        _mutate(chunked, _set_chunk_start(0, 1000), (1, 2)),
        "bad-layout",
        "a chunk index entry past where 16 codewords of at most 9 bits can end",
    )
    add(
        "overflowing_table",
        _handmade((4,), 2, [0, 1, 2, 3], [3e38], [0.0], "tensor"),
        "bad-header",
        "finite scale and zero point whose product with a code overflows binary32",
        "w",
    )
    add(
        "negative_offset",
        _mutate(base, set_key(0, "offset", -1)),
        "bad-header",
        "a negative offset",
    )
    add(
        "negative_length",
        _mutate(base, set_key(0, "length", -1)),
        "bad-header",
        "a negative length",
    )
    add(
        "scheme_nil",
        _mutate(base, set_key(0, "scheme", None)),
        "bad-header",
        "a packed tensor whose optional scheme is nil, not a str",
    )
    add(
        "chunk_starts_empty_tensor",
        _mutate(_huffman([], 2, 1, [0, 0, 0, 0], chunk=1), set_key(0, "chunk_starts", [0]), (1, 2)),
        "bad-header",
        "an empty Huffman tensor (S = 0, so no chunk) whose chunk index has an entry",
    )
    add(
        "nonzero_gap_between_tensors",
        _gap_byte(base, 1),
        "bad-data",
        "a nonzero alignment byte between the first and the second tensor",
        "conv.bias",
    )
    add(
        "nesting_too_deep",
        _mutate(base, _add_key("x-deep", _nested(MAX_DEPTH))),
        "bad-header",
        f"an unknown key holding arrays nested to depth {MAX_DEPTH + 1}",
    )
    for name, prefix, what in (
        ("array_too_long", b"\xdd" + (MAX_CONTAINER_LEN + 1).to_bytes(4, "big"), "an array"),
        ("map_too_long", b"\xdf" + (MAX_CONTAINER_LEN + 1).to_bytes(4, "big"), "a map"),
        ("str_too_long", b"\xdb" + (MAX_STR_BYTES + 1).to_bytes(4, "big"), "a str"),
        ("bin_too_long", b"\xc6" + (MAX_BIN_BYTES + 1).to_bytes(4, "big"), "a bin"),
        ("ext_too_long", b"\xc9" + (MAX_BIN_BYTES + 1).to_bytes(4, "big") + b"\x01", "an ext"),
    ):
        add(
            name,
            _rebody(_EMPTY_HEADER + prefix),
            "bad-header",
            f"an unknown key holding {what} whose length prefix exceeds the limit by one "
            "(what the prefix announces is absent: a reader rejects the prefix)",
        )
    return inv


def _group_invalid(base: bytes) -> dict[str, tuple[bytes, str, str, str | None]]:
    """Defects of version 1.3's group keys, each in a copy of the valid ``base``."""

    def edit(fn):
        return _mutate(base, fn, (1, 3))

    def set_key(key, value):
        def fn(header, data):
            header["tensors"][0][key] = value

        return fn

    def on_channel(header, data):
        tensor = header["tensors"][0]
        tensor["granularity"] = "channel"
        tensor.pop("scale_dtype")
        tensor["scale"] = tensor["scale"][: 2 * 16] * 2
        tensor["zero_point"] = tensor["zero_point"][: 2 * 16] * 2

    def short_scale(header, data):
        header["tensors"][0]["scale"] = header["tensors"][0]["scale"][:-2]

    def inf_scale(header, data):
        header["tensors"][0]["scale"] = b"\x00\x7c" + header["tensors"][0]["scale"][2:]

    scalar = _handmade((1,), 4, [3], [0.5], [8.0], "group", group_size=1)

    def on_scalar(header, data):
        header["tensors"][0]["shape"] = []

    return {
        "group_size_zero": (
            edit(set_key("group_size", 0)),
            "bad-header",
            "a group_size of 0",
            None,
        ),
        "group_size_on_channel": (
            edit(on_channel),
            "bad-header",
            "group_size on a channel-granularity tensor (whose scales fit the channels)",
            None,
        ),
        "group_scale_count": (
            edit(short_scale),
            "bad-header",
            "one float16 scale fewer than the groups",
            None,
        ),
        "group_scale_dtype_unknown": (
            edit(set_key("scale_dtype", "bfloat16")),
            "unsupported-feature",
            "a scale_dtype this reader does not know",
            None,
        ),
        "group_float16_inf_scale": (
            edit(inf_scale),
            "bad-header",
            "a float16 scale of infinity (0x7C00)",
            None,
        ),
        "group_on_scalar": (
            _mutate(scalar, on_scalar, (1, 3)),
            "bad-header",
            "group granularity on a scalar tensor",
            None,
        ),
    }


def _half_invalid(base: bytes) -> dict[str, tuple[bytes, str, str, str | None]]:
    """Defects of version 1.4's half storage, each in a copy of the valid ``base``."""

    def short(header, data):
        header["tensors"][0]["length"] -= 2
        header["tensors"][0]["crc32"] = zlib.crc32(data[: header["tensors"][0]["length"]])

    def integer(header, data):
        header["tensors"][0]["dtype"] = "int16"

    return {
        "half_length": (
            _mutate(base, short, (1, 4)),
            "bad-layout",
            "a half tensor one value shorter than its shape",
            None,
        ),
        "half_int_dtype": (
            _mutate(base, integer, (1, 4)),
            "bad-header",
            "half storage with dtype int16 (the same length as its binary16 values)",
            None,
        ),
    }


# {"tensors": [], "data_size": 0, "x": ...}, the value of "x" to be appended
_EMPTY_HEADER = b"\x83\xa7tensors\x90\xa9data_size\x00\xa1x"


def _gap_byte(base: bytes, index: int) -> bytes:
    """``base`` with the first alignment byte before tensor ``index`` set."""
    header, data, _ = split_file(base)
    before = header["tensors"][index - 1]
    gap = len(base) - len(data) + before["offset"] + before["length"]
    assert gap % 64, "the tensor must be followed by alignment padding"
    blob = bytearray(base)
    blob[gap] = 0x5A
    return bytes(blob)


def _bad_bool() -> bytes:
    payload = np.array([1, 2, 0], dtype=np.uint8)
    entry = TensorEntry("mask", (3,), "bool", "raw", 0, 3, zlib.crc32(payload.tobytes()))
    return _single(entry, payload)


def _set_group(group):
    def fn(header, data):
        header["tensors"][0]["group"] = group

    return fn


def _rebody(header) -> bytes:
    """A file of this header (an object, or msgpack bytes) and no data."""
    return frame_file(header, b"", (1, 1))  # as first written, when 1.1 was the newest version


def _grow_offset(header, data):
    last = header["tensors"][-1]  # an 8-bit tensor: one byte per element
    last["shape"][1] += 64
    last["length"] += 64 * last["shape"][0]  # keep shape and length consistent


def _huge_empty(header, data):
    header["tensors"][1]["shape"] = [0, 2**40, 2**40]
    header["tensors"][1]["length"] = 0


def _nan_scale(header, data):
    header["tensors"][0]["scale"] = np.full(8, np.nan, dtype="<f4").tobytes()


def _drop_key(index, key):
    def fn(header, data):
        del header["tensors"][index][key]

    return fn


def _padding_bits() -> bytes:
    payload = bytearray(pack_codes(np.array([1, 2, 3], dtype=np.uint8), 3))  # 9 bits
    payload[-1] |= 0x80
    entry = TensorEntry(
        "w",
        (3,),
        "float32",
        "packed",
        0,
        len(payload),
        zlib.crc32(payload),
        bits=3,
        dequant="affine",
        granularity="tensor",
        scale=np.ones(1, np.float32),
        zero_point=np.zeros(1, np.float32),
    )
    return _single(entry, bytes(payload))


def _alignment_padding(base: bytes) -> bytes:
    header_len = int.from_bytes(base[16:24], "little")
    blob = bytearray(base)
    gap = 24 + header_len
    assert gap % 64, "the base vector must have alignment padding after its header"
    blob[gap] = 0xAA
    return bytes(blob)


# --------------------------------------------------------------------------- expectations


def expectation(blob: bytes) -> dict:
    """The expected decoding of a valid vector, computed by the reference decoder."""
    reader = Reader(blob)
    tensors = []
    for entry, array in reader.arrays():
        row = {
            "name": entry.name,
            "shape": list(entry.shape),
            "dtype": entry.dtype,
            "storage": entry.storage,
        }
        small = entry.numel <= 256  # informational lists only where they stay readable
        if entry.storage == "half":
            row["decoded_dtype"] = "float32"
            le = array.astype("<f4")
        elif entry.storage in QUANTIZED_KINDS:
            row["bits"] = entry.bits
            row["granularity"] = entry.granularity
            if entry.granularity == "group":
                row["group_size"] = entry.group_size
                row["scale_dtype"] = entry.scale_dtype
            if entry.storage == "huffman":
                row["group"] = entry.group
            row["decoded_dtype"] = "float32"
            if small:
                codes = decode_codes(entry, reader.payload(entry))
                row["codes"] = codes.tolist()
            le = array.astype("<f4")
        else:
            row["decoded_dtype"] = entry.dtype
            le = array.astype(array.dtype.newbyteorder("<"))
        row["data"] = le.tobytes().hex()
        # strict JSON has no infinities: data alone gives those tensors' values
        finite = array.dtype.kind != "f" or bool(np.isfinite(array).all())
        if small and finite and (entry.dtype != "bfloat16" or entry.storage != "raw"):
            row["values"] = array.reshape(-1).tolist()
        tensors.append(row)
    return {"metadata": reader.metadata, "tensors": tensors}


def build() -> dict[str, bytes]:
    """Every file under spec/vectors/, relative path -> bytes."""
    files: dict[str, bytes] = {}
    manifest = {"valid": [], "invalid": []}
    valid = valid_vectors()
    for name, (blob, text) in valid.items():
        files[f"valid/{name}.qpk"] = blob
        files[f"valid/{name}.json"] = _dump(expectation(blob))
        manifest["valid"].append(
            {"file": f"valid/{name}.qpk", "expected": f"valid/{name}.json", "description": text}
        )
    invalid = invalid_vectors(valid["mini_unet_block"][0])
    invalid.update(_group_invalid(valid["group_huffman"][0]))
    invalid.update(_half_invalid(valid["half_mixed"][0]))
    for name, (blob, code, text, tensor) in invalid.items():
        files[f"invalid/{name}.qpk"] = blob
        case = {"file": f"invalid/{name}.qpk", "error": code, "description": text}
        if tensor is not None:
            case["tensor"] = tensor
        manifest["invalid"].append(case)
    files["manifest.json"] = _dump(manifest)
    return files


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--out", type=Path, default=VECTORS)
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        present = {p.relative_to(args.out).as_posix() for p in args.out.rglob("*") if p.is_file()}
        drift = sorted(
            name
            for name in files.keys() | present
            if name not in files
            or name not in present
            or (args.out / name).read_bytes() != files[name]
        )
        for name in drift:
            print(f"differs: {name}")
        return 1 if drift else 0
    for name, blob in files.items():
        path = args.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

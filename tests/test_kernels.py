"""The compiled kernels (qpack/_ckernels.c) against the numpy code they replace.

Every kernel must give exactly what the numpy route gives: the same float32 bit patterns
(dequantize), the same bytes (huffman_encode), the same symbols, used bits and accepted
streams (huffman_decode), the same codes (quantize), the same counts (histogram); and the
library must write the same files and decode every file, good or bad, the same way with
and without them. Hostile arguments must raise, never crash or touch memory outside the
buffers given.

The numpy reference runs with ``qpack.kernels.native`` set to None (see :func:`backend`);
the kernels are called through :data:`NATIVE`, the module as imported. Without a built
extension (or with QPACK_PURE=1) every test here skips, except
:func:`test_native_kernels_are_present_when_required`, which fails when the environment
variable QPACK_REQUIRE_NATIVE=1 says they must be there (as on CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qpack
from qpack import bitpack, decoder, kernels, schemes, weighterror
from qpack import entropy as H
from qpack import errors as E
from qpack import reader as qreader
from qpack.container import TensorEntry

NATIVE = kernels.native
KERNELS = (
    "pack",
    "dequantize",
    "huffman_decode",
    "huffman_dequantize",
    "huffman_encode",
    "histogram",
    "quantize",
    "quantize_errors",
    "origin_errors",
    "row_errors",
    "unit_ranges",
)
native_only = pytest.mark.skipif(
    NATIVE is None, reason="qpack._ckernels is not built (or QPACK_PURE is set)"
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())

SENTINEL = 0xA5  # fills the bytes after every output buffer: a kernel must not touch them


def test_native_kernels_are_present_when_required():
    """With QPACK_REQUIRE_NATIVE=1 (CI), the extension must be built and loaded, so the
    rest of this file runs instead of skipping."""
    if os.environ.get("QPACK_REQUIRE_NATIVE", "") in ("", "0"):
        pytest.skip("QPACK_REQUIRE_NATIVE is not set")
    assert NATIVE is not None, (
        "qpack._ckernels did not load (not built: python setup.py build_ext --inplace; "
        "or QPACK_PURE is set)"
    )
    assert kernels.BACKEND == "c"
    for name in KERNELS:
        assert callable(getattr(NATIVE, name)), name


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def backend(native):
    """Run the library with the compiled kernels (``NATIVE``) or numpy only (None)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "native", native)
        yield


def numpy_only():
    return backend(None)


def with_native():
    return backend(NATIVE)


def guarded(dtype, count: int) -> tuple[np.ndarray, np.ndarray]:
    """An output array of ``count`` elements followed by sentinel bytes: (out, whole)."""
    size = np.dtype(dtype).itemsize
    whole = np.full(count * size + 16, SENTINEL, dtype=np.uint8)
    return whole[: count * size].view(dtype), whole


def untouched_after(whole: np.ndarray, nbytes: int) -> bool:
    return bool((whole[nbytes:] == SENTINEL).all())


def bits_of(a: np.ndarray) -> np.ndarray:
    """The float32 bit patterns (so -0.0 != 0.0 and every NaN payload counts)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def misaligned(nbytes: int) -> np.ndarray:
    """A writable, C-contiguous uint8 buffer whose address is 1 mod 4 (and mod 8)."""
    return np.zeros(nbytes + 16, dtype=np.uint8)[1 : 1 + nbytes]


def outcome(fn, *args, **kwargs):
    """fn(...), or the error's class (and code) when it raises a qpack or value error."""
    try:
        return ("ok", fn(*args, **kwargs))
    except (E.QpackError, ValueError) as exc:
        return ("error", type(exc), getattr(exc, "code", None))


def same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), name


# Float32 values from everywhere: hypothesis's own (subnormals, the largest finite,
# signed zeros) and hand-picked edges.
EDGES = [
    0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, -1e-45, 1e-40, -3e-39, 1.1754944e-38, 3.4028235e38,
    -3.4028235e38, 1.7e38, 65504.0, 2.0**24, -(2.0**24), 2.0**-126, 1e-3, 255.0, 256.0,
]  # fmt: skip
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
scale_st = st.one_of(
    finite_f32,
    st.sampled_from(EDGES),
    st.floats(2.0**-20, 1e3, width=32),
    st.floats(-1e3, -(2.0**-20), width=32),
)
zero_st = st.one_of(
    finite_f32,
    st.sampled_from(EDGES),
    st.integers(0, 255).map(float),
    st.integers(-(2**31), 2**31).map(float),
)


def allowed_groups(bits: int) -> list[int]:
    """0 (a packed stream) and every Huffman group size with symbols of at most 8 bits."""
    return [0, *H.group_choices(bits)]


def kernel_source(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
    """What dequantize reads: the packed stream (group 0) or the symbol bytes."""
    return bitpack.pack_codes(codes, bits) if group == 0 else H.group_codes(codes, bits, group)


def native_dequantize(src, bits, group, count, scale, zero) -> np.ndarray:
    out, whole = guarded(np.float32, count)
    NATIVE.dequantize(src, bits, group, count, scale, zero, out)
    assert untouched_after(whole, 4 * count), "dequantize wrote past `out`"
    return out


# --------------------------------------------------------------------------- dequantize


@native_only
class TestDequantize:
    @settings(max_examples=400, deadline=None)
    @given(st.data())
    def test_every_width_group_and_run_layout_matches_numpy_bit_for_bit(self, data):
        """For every width 1-8, packed streams and every allowed group, any count (0, not
        a multiple of 8 or of the group, short and long runs) split into 1-5 runs with
        scales and zero points of any finite float32 (negative, subnormal, huge), the
        kernel's floats are numpy's ``schemes.dequantize`` bit for bit."""
        bits = data.draw(st.integers(1, 8), label="bits")
        group = data.draw(st.sampled_from(allowed_groups(bits)), label="group")
        runs = data.draw(st.integers(1, 5), label="runs")
        per_run = data.draw(st.one_of(st.integers(0, 24), st.integers(25, 300)), label="run")
        count = runs * per_run
        scale = np.array(data.draw(st.lists(scale_st, min_size=runs, max_size=runs)), np.float32)
        zero = np.array(data.draw(st.lists(zero_st, min_size=runs, max_size=runs)), np.float32)
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        codes = rng.integers(0, 1 << bits, count, dtype=np.uint8)
        if data.draw(st.booleans(), label="extremes"):  # the lowest and highest codes
            codes[rng.random(count) < 0.5] = (1 << bits) - 1
            codes[rng.random(count) < 0.3] = 0
        with numpy_only():
            expected = schemes.dequantize(codes, scale, zero)
        got = native_dequantize(kernel_source(codes, bits, group), bits, group, count, scale, zero)
        np.testing.assert_array_equal(bits_of(got), bits_of(expected))
        with with_native():  # the library's own call (a byte is a code) agrees too
            np.testing.assert_array_equal(
                bits_of(schemes.dequantize(codes, scale, zero)), bits_of(expected)
            )

    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def test_symbol_bytes_decode_like_ungrouping_them(self, data):
        """Any symbol byte, including bits above ``group * bits`` (which a Huffman code
        over a smaller alphabet never yields), decodes as numpy's ``ungroup_symbols`` then
        ``dequantize`` would; with group 1, codes of 2**bits and above decode as numpy
        decodes those byte values."""
        bits = data.draw(st.integers(1, 8))
        group = data.draw(st.sampled_from(list(H.group_choices(bits))))
        count = data.draw(st.integers(0, 200))
        runs = data.draw(st.sampled_from([r for r in (1, 2, 3, 4, 5) if count % r == 0]))
        scale = np.array(data.draw(st.lists(scale_st, min_size=runs, max_size=runs)), np.float32)
        zero = np.array(data.draw(st.lists(zero_st, min_size=runs, max_size=runs)), np.float32)
        n = -(-count // group)
        symbols = np.array(
            data.draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)), np.uint8
        )
        codes = H.ungroup_symbols(symbols, bits, group, count)
        with numpy_only():
            expected = schemes.dequantize(np.ascontiguousarray(codes), scale, zero)
        got = native_dequantize(symbols, bits, group, count, scale, zero)
        np.testing.assert_array_equal(bits_of(got), bits_of(expected))

    @pytest.mark.parametrize("bits", range(1, 9))
    def test_long_streams_with_run_edges_off_the_eight_code_boundary(self, bits):
        """Long runs whose edges fall at every offset within an 8-code (packed) or
        ``group``-code word: the kernel's unrolled middle loops and its edge loops must
        stitch together."""
        rng = np.random.default_rng(bits)
        for group in allowed_groups(bits):
            for runs in (1, 3, 7):
                count = runs * (1001 + 2 * bits)
                codes = rng.integers(0, 1 << bits, count, dtype=np.uint8)
                scale = rng.normal(size=runs).astype(np.float32)
                zero = rng.integers(0, 1 << bits, runs).astype(np.float32) + np.float32(0.25)
                with numpy_only():
                    expected = schemes.dequantize(codes, scale, zero)
                src = kernel_source(codes, bits, group)
                got = native_dequantize(src, bits, group, count, scale, zero)
                np.testing.assert_array_equal(bits_of(got), bits_of(expected))

    def test_no_codes_need_no_runs(self):
        """Zero codes decode to nothing, with any number of runs, even none."""
        empty = np.zeros(0, np.float32)
        for bits in range(1, 9):
            for group in allowed_groups(bits):
                assert native_dequantize(b"", bits, group, 0, empty, empty).size == 0
                one = np.ones(3, np.float32)
                assert native_dequantize(b"", bits, group, 0, one, one).size == 0

    def test_overflow_and_signed_zero_are_numpys(self):
        """Products that overflow to +-inf and differences that are -0.0 keep numpy's
        exact bit patterns."""
        codes = np.arange(256, dtype=np.uint8)
        scale = np.array([3.4028235e38, -3.4028235e38, 1e-45, -0.0], np.float32)
        zero = np.array([0.5, 255.0, 3e-39, 128.0], np.float32)
        with numpy_only(), np.errstate(all="ignore"):
            expected = schemes.dequantize(codes, scale, zero)
        assert np.isinf(expected).any() and (bits_of(expected) == 0x80000000).any()
        got = native_dequantize(codes, 8, 0, 256, scale, zero)
        np.testing.assert_array_equal(bits_of(got), bits_of(expected))

    @pytest.mark.parametrize(("bits", "group"), [(8, 0), (8, 1), (4, 0), (4, 2)])
    def test_streamed_stores_of_large_outputs(self, bits, group):
        """From 2**18 values the 8- and 4-bit loops write with non-temporal stores, from
        the first 16-byte aligned value: with the output at each offset from alignment,
        runs that do not end on a whole vector, and an odd count, the values are still
        numpy's, and nothing past ``out`` is touched."""
        rng = np.random.default_rng(bits + group)
        for runs in (1, 3, 7):
            count = runs * ((1 << 18) // runs + 1)
            count += runs if count % 2 == 0 else 0  # odd: a half byte at the end at 4 bits
            codes = rng.integers(0, 1 << bits, count, dtype=np.uint8)
            scale = rng.normal(size=runs).astype(np.float32)
            zero = rng.integers(0, 1 << bits, runs).astype(np.float32) - np.float32(0.5)
            with numpy_only():
                expected = bits_of(schemes.dequantize(codes, scale, zero))
            src = kernel_source(codes, bits, group)
            for offset in range(4):  # floats from a 16-byte boundary
                whole = np.full(4 * (count + offset) + 16, SENTINEL, np.uint8)
                start = -whole.ctypes.data % 16 + 4 * offset
                if start + 4 * count + 16 > whole.size:
                    whole = np.full(whole.size + 16, SENTINEL, np.uint8)
                    start = -whole.ctypes.data % 16 + 4 * offset
                out = whole[start : start + 4 * count].view(np.float32)
                NATIVE.dequantize(src, bits, group, count, scale, zero, out)
                np.testing.assert_array_equal(bits_of(out), expected)
                assert untouched_after(whole[start:], 4 * count)

    def test_threads_decode_side_by_side(self):
        """The kernel releases the GIL: four threads decoding at once give the values
        one thread gives."""
        from concurrent.futures import ThreadPoolExecutor

        rng = np.random.default_rng(0)
        count = 1 << 18
        codes = rng.integers(0, 16, count, dtype=np.uint8)
        src = bitpack.pack_codes(codes, 4)
        scale, zero = np.float32([0.01, -0.02]), np.float32([7.5, 8.0])
        with numpy_only():
            expected = bits_of(schemes.dequantize(codes, scale, zero))

        def one(_):
            return bits_of(native_dequantize(src, 4, 0, count, scale, zero))

        with ThreadPoolExecutor(4) as pool:
            for got in pool.map(one, range(8)):
                np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- Huffman


def is_prefix_code(lengths: np.ndarray) -> bool:
    """Lengths of at most 15 bits whose Kraft sum is at most 1 (exact integer sum)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths > H.MAX_CODE_LENGTH).any():
        return False
    used = lengths[lengths > 0]
    return int(np.left_shift(1, 15 - used).sum()) <= 1 << 15


def used_bits(lengths: np.ndarray, symbols) -> int:
    return int(np.asarray(lengths, dtype=np.int64)[np.asarray(symbols, dtype=np.intp)].sum())


def native_decode(stream: bytes, lengths: np.ndarray, count: int):
    """The kernel's (symbols, used bits), or None when it raises ValueError."""
    out, whole = guarded(np.uint8, count)
    try:
        used = NATIVE.huffman_decode(stream, np.ascontiguousarray(lengths, np.uint8), count, out)
    except ValueError:
        result = None
    else:
        result = (out.tolist(), used)
    assert untouched_after(whole, count), "huffman_decode wrote past `out`"
    return result


def bitarray_decode(stream: bytes, lengths: np.ndarray, count: int):
    """The bit-by-bit reference (bitarray's canonical decoder): (symbols, used bits), or
    None when it fails or the codewords run past the stream's last byte."""
    try:
        symbols = H._bitarray_decode(stream, lengths, count)
    except ValueError:
        return None
    used = used_bits(lengths, symbols)
    return None if used > 8 * len(stream) else (symbols.tolist(), used)


def reference_accepts(stream: bytes, lengths: np.ndarray, count: int):
    """What a spec decoder accepts (as in tests/test_entropy.py): ``count`` codewords that
    end in the last byte, then zero padding. (symbols, used bits), or None."""
    decoded = bitarray_decode(stream, lengths, count)
    if decoded is None:
        return None
    symbols, used = decoded
    if -(-used // 8) != len(stream) or (used % 8 and stream[-1] >> (used % 8)):
        return None
    return decoded


def codec_accepts(stream: bytes, lengths: np.ndarray, count: int):
    """The codec's own checked route (``decoder._huffman_symbols``) on the current backend:
    the symbols, or None when it raises DataError."""
    entry = SimpleNamespace(
        name="t",
        numel=count,
        group=1,
        bits=8,
        code_lengths=lengths,
        length=len(stream),
        chunk=None,
        chunk_starts=None,
    )
    with decoder.scratch_scope():
        try:
            return decoder._huffman_symbols(entry, stream, None).tolist()
        except E.DataError:
            return None


def numpy_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    with numpy_only():
        return H.encode_symbols(symbols, lengths).tobytes()


def native_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    total = used_bits(lengths, symbols)
    out, whole = guarded(np.uint8, -(-total // 8))
    written = NATIVE.huffman_encode(symbols, np.ascontiguousarray(lengths, np.uint8), out)
    assert written == total
    assert untouched_after(whole, out.size), "huffman_encode wrote past `out`"
    return out.tobytes()


count_st = st.one_of(
    st.just(0), st.integers(1, 10**6), st.integers(0, 50).map(lambda k: 2**k)
)  # powers of two make deep trees: codes up to the 15-bit limit


@st.composite
def histogram_lengths(draw) -> np.ndarray:
    """``huffman_lengths`` of a random histogram (what qpack writes: a spare codeword)."""
    alphabet = draw(st.sampled_from([1, 2, 3, 4, 16, 64, 256]))
    counts = draw(st.lists(count_st, min_size=alphabet, max_size=alphabet))
    counts[draw(st.integers(0, alphabet - 1))] += 1  # at least one symbol
    return H.huffman_lengths(np.array(counts, dtype=np.int64))


@st.composite
def prefix_lengths(draw) -> np.ndarray:
    """Lengths of any prefix code of lengths 1-15: as qpack writes them, complete (the
    spare codeword given away), incomplete (codewords dropped or lengthened), or random
    lengths thinned until their Kraft sum is at most 1."""
    kind = draw(st.sampled_from(["qpack", "complete", "incomplete", "random"]))
    if kind == "random":
        alphabet = draw(st.sampled_from([1, 2, 3, 5, 16, 64, 256]))
        lengths = np.array(
            draw(st.lists(st.integers(0, 15), min_size=alphabet, max_size=alphabet)), np.uint8
        )
        order = draw(st.permutations(range(alphabet)))
        for s in order:  # drop codewords until the lengths are a prefix code
            if is_prefix_code(lengths):
                break
            lengths[s] = 0
        return lengths
    lengths = draw(histogram_lengths()).copy()
    if kind == "complete" and lengths.max() > 1:
        lengths[np.flatnonzero(lengths == lengths.max())[-1]] -= 1  # take the spare one
    elif kind == "incomplete":
        for s in np.flatnonzero(lengths).tolist():
            action = draw(st.sampled_from(["keep", "keep", "drop", "longer"]))
            if action == "drop":
                lengths[s] = 0
            elif action == "longer":
                lengths[s] = min(15, lengths[s] + draw(st.integers(1, 6)))
    assert is_prefix_code(lengths)
    return lengths


@st.composite
def borderline_lengths(draw) -> np.ndarray:
    """Tables at the Kraft limit: a complete code (sum exactly 1), or a complete code plus
    one or two codewords (over by as little as 2**-15), in a shuffled symbol order."""
    alphabet = draw(st.sampled_from([1, 2, 3, 16, 64]))
    counts = draw(st.lists(count_st, min_size=alphabet, max_size=alphabet))
    counts[0] += 1
    lengths = H.huffman_lengths(np.array(counts, dtype=np.int64)).tolist()
    lengths.append(max(lengths))  # the spare codeword: now complete
    extra = draw(st.lists(st.integers(1, 15), max_size=2))
    lengths = draw(st.permutations(lengths + extra + [0] * draw(st.integers(0, 3))))
    return np.array(lengths, dtype=np.uint8)


def edited_stream(data, lengths: np.ndarray) -> tuple[bytes, int]:
    """A stream for ``lengths`` and a symbol count to decode: an encoded stream, then
    maybe cut short, extended, given set padding bits or a flipped bit, and a count a
    little off; or random bytes."""
    used = np.flatnonzero(lengths)
    if used.size == 0 or data.draw(st.integers(0, 5)) == 0:
        stream = bytes(data.draw(st.lists(st.integers(0, 255), max_size=12)))
        return stream, data.draw(st.integers(0, 8 * len(stream) + 2))
    picks = data.draw(st.lists(st.integers(0, used.size - 1), max_size=200))
    symbols = used[picks].astype(np.uint8)
    stream = bytearray(numpy_encode(symbols, lengths))
    count = max(0, symbols.size + data.draw(st.sampled_from([0, 0, 0, -1, 1, 2])))
    edit = data.draw(st.sampled_from(["none", "append", "cut", "pad", "flip"]))
    if edit == "append":
        stream += bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=3)))
    elif edit == "cut" and stream:
        del stream[-data.draw(st.integers(1, len(stream))) :]
    elif edit == "pad" and stream:
        stream[-1] |= 1 << data.draw(st.integers(0, 7))
    elif edit == "flip" and stream:
        stream[data.draw(st.integers(0, len(stream) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(stream), count


@native_only
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.data())
def test_pack_writes_the_numpy_bytes(bits, data):
    """pack: for every width and count (whole groups of eight codes or not), the bytes of
    numpy's ``pack_codes``, and nothing written past them."""
    count = data.draw(st.integers(0, 300))
    codes = np.array(
        data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count, max_size=count)),
        np.uint8,
    )
    with numpy_only():
        expected = bitpack.pack_codes(codes, bits)
    size = bitpack.packed_size(count, bits)
    out, whole = guarded(np.uint8, size)
    NATIVE.pack(codes, bits, out)
    assert out.tobytes() == expected.tobytes()
    assert untouched_after(whole, size)
    with with_native():
        assert bitpack.pack_codes(codes, bits).tobytes() == expected.tobytes()


@native_only
class TestHuffman:
    @settings(max_examples=150, deadline=None)
    @given(histogram_lengths(), st.data())
    def test_round_trip_matches_every_numpy_route(self, lengths, data):
        """Random histograms -> ``huffman_lengths`` -> symbols: the kernel encoder writes
        the numpy encoder's bytes and bit count; the kernel decoder gives the symbols and
        used bits of bitarray's decoder, of the inflate route and of ``decode_symbols``
        without kernels."""
        used = np.flatnonzero(lengths)
        picks = data.draw(st.lists(st.integers(0, used.size - 1), max_size=3000))
        symbols = used[picks].astype(np.uint8)
        stream = numpy_encode(symbols, lengths)
        assert native_encode(symbols, lengths) == stream
        with with_native():
            assert H.encode_symbols(symbols, lengths).tobytes() == stream
        expected = (symbols.tolist(), used_bits(lengths, symbols))
        assert native_decode(stream, lengths, symbols.size) == expected
        assert bitarray_decode(stream, lengths, symbols.size) == expected
        if symbols.size:
            decoded, bits = H._inflate(stream, lengths, symbols.size)
            assert (decoded.tolist(), bits) == expected
            with numpy_only():
                decoded, bits = H.decode_symbols(stream, lengths, symbols.size)
            assert (decoded.tolist(), bits) == expected
        with with_native():
            decoded, bits = H.decode_symbols(stream, lengths, symbols.size)
        assert (decoded.tolist(), bits) == expected

    @settings(max_examples=200, deadline=None)
    @given(prefix_lengths(), st.data())
    def test_decoder_accepts_exactly_what_the_bit_by_bit_decoder_accepts(self, lengths, data):
        """On complete and incomplete codes alike, for valid streams, streams cut short or
        extended, with set padding bits, flipped bits or random bytes, and counts a little
        off: the kernel decodes (symbols and used bits) exactly when bitarray's decoder
        does, and the codec's checked route accepts on both backends exactly what the
        reference accepts (whole bytes, zero padding)."""
        stream, count = edited_stream(data, lengths)
        assert native_decode(stream, lengths, count) == bitarray_decode(stream, lengths, count)
        expected = reference_accepts(stream, lengths, count)
        expected_symbols = None if expected is None else expected[0]
        with with_native():
            assert codec_accepts(stream, lengths, count) == expected_symbols
        with numpy_only():
            assert codec_accepts(stream, lengths, count) == expected_symbols

    @settings(max_examples=200, deadline=None)
    @given(prefix_lengths(), st.data())
    def test_dequantize_is_decode_then_dequantize(self, lengths, data):
        """huffman_dequantize (a symbol is one code) has, on any stream and prefix code, the
        outcome of huffman_decode then numpy's dequantize: the same rejection, or the same
        used bits and the float32 values of the symbols, run by run, nothing written past
        ``out``."""
        stream, count = edited_stream(data, lengths)
        runs = data.draw(st.sampled_from([r for r in (1, 2, 3, 5) if count % r == 0]))
        finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
        scale = np.array(data.draw(st.lists(finite, min_size=runs, max_size=runs)), np.float32)
        zero = np.array(data.draw(st.lists(finite, min_size=runs, max_size=runs)), np.float32)
        out, whole = guarded(np.float32, count)
        lengths8 = np.ascontiguousarray(lengths, np.uint8)
        try:
            used = NATIVE.huffman_dequantize(stream, lengths8, count, scale, zero, out)
        except ValueError:
            got = None
        else:
            got = (bits_of(out).tolist(), used)
        assert untouched_after(whole, 4 * count), "huffman_dequantize wrote past `out`"
        decoded = native_decode(stream, lengths, count)
        if decoded is None:
            assert got is None
            return
        symbols, used = decoded
        with numpy_only(), np.errstate(over="ignore", invalid="ignore"):
            values = schemes.dequantize(np.array(symbols, np.uint8), scale, zero)
        assert got == (bits_of(values).tolist(), used)

    @settings(max_examples=100, deadline=None)
    @given(prefix_lengths(), st.data())
    def test_encoder_matches_numpy_on_any_prefix_code(self, lengths, data):
        """Complete, incomplete and qpack-style codes alike: the kernel writes the numpy
        encoder's bytes."""
        used = np.flatnonzero(lengths)
        if used.size == 0:
            assert native_encode(np.zeros(0, np.uint8), lengths) == b""
            return
        picks = data.draw(st.lists(st.integers(0, used.size - 1), max_size=500))
        symbols = used[picks].astype(np.uint8)
        assert native_encode(symbols, lengths) == numpy_encode(symbols, lengths)

    @pytest.mark.parametrize(
        "lengths",
        [[2, 2, 0, 0], [1, 3], [1, 0, 3], [2, 3, 0, 3], [3, 3, 3], [1, 2, 3, 0, 5], [1],
         [15], [0, 0, 0, 1], [1, 1], [1, 2, 3, 3], [1, 2, 3, 4], [2, 2, 2, 3]],
        ids=str,
    )  # fmt: skip
    def test_hand_written_codes_on_every_one_and_two_byte_stream(self, lengths):
        """Small codes written by hand, incomplete ones above all (a stream can hold a
        pattern that is no codeword): on every 1-byte stream and a sample of 2-byte
        streams, with every count up to 16, the kernel decodes exactly when the bit-by-bit
        decoder does, to the same symbols and used bits."""
        lengths = np.array(lengths, dtype=np.uint8)
        streams = [b"", *(bytes([b]) for b in range(256))]
        streams += [bytes([a, b]) for a in range(0, 256, 29) for b in range(0, 256, 23)]
        for stream in streams:
            for count in range(0, min(17, 8 * len(stream) + 2)):
                got = native_decode(stream, lengths, count)
                assert got == bitarray_decode(stream, lengths, count), (stream, count)

    @pytest.mark.parametrize("longest", [4, 8, 10, 11, 12, 13, 15])
    def test_codes_around_the_lookup_table_width(self, longest):
        """Codewords well under, just under, at and over the width of the kernel's lookup
        tables (12 bits, or the longest codeword for short streams), in qpack's codes (one
        spare codeword), complete codes and codes with a hole among the short codewords,
        over streams short and long (20,000 symbols) and random bytes."""
        rng = np.random.default_rng(longest)
        counts = np.array([2**k for k in range(longest)], dtype=np.int64)[::-1]
        spare = H.huffman_lengths(counts)  # 1, 2, ..., longest - 1, longest
        assert spare.max() == longest and H.has_spare_codeword(spare)
        complete = spare.copy()
        complete[-1] -= 1
        incomplete = spare.copy()
        incomplete[np.argmax(spare == 3)] = 0
        for lengths in (spare, complete, incomplete):
            used = np.flatnonzero(lengths)
            symbols = rng.choice(used, 20000).astype(np.uint8)
            stream = numpy_encode(symbols, lengths)
            assert native_encode(symbols, lengths) == stream
            expected = (symbols.tolist(), used_bits(lengths, symbols))
            assert native_decode(stream, lengths, symbols.size) == expected
            for count in (5, 9, 10, 300):
                head = symbols[:count]
                part = numpy_encode(head, lengths)
                assert native_decode(part, lengths, count) == (
                    head.tolist(),
                    used_bits(lengths, head),
                )
            noise = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
            for count in (1, 10, 300, 4800, 17000, 24000):
                assert native_decode(noise, lengths, count) == bitarray_decode(
                    noise, lengths, count
                )

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.lists(st.integers(0, 17), max_size=40).map(np.array), borderline_lengths()))
    def test_lengths_are_accepted_exactly_when_they_form_a_prefix_code(self, lengths):
        """Both kernels reject lengths over 15 or with a Kraft sum over 1 (by as little as
        2**-15), even with no symbols to code, and accept every other table (a Kraft sum
        of exactly 1 too)."""
        lengths = np.array(lengths, dtype=np.uint8)
        out = np.zeros(1, np.uint8)
        if is_prefix_code(lengths):
            assert NATIVE.huffman_decode(b"", lengths, 0, out) == 0
            assert NATIVE.huffman_encode(b"", lengths, out) == 0
        else:
            with pytest.raises(ValueError):
                NATIVE.huffman_decode(b"\0" * 8, lengths, 1, out)
            with pytest.raises(ValueError):
                NATIVE.huffman_decode(b"", lengths, 0, out)
            with pytest.raises(ValueError):
                NATIVE.huffman_encode(b"", lengths, out)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300), st.integers(0, 7), st.integers(0, 2**32 - 1))
    def test_histogram_adds_numpys_byte_counts(self, data, offset, seed):
        """``histogram`` adds each byte value's count to the 256 int64 counts it is given
        (from any start address), as ``np.bincount`` counts; ``entropy._histogram`` gives
        the same counts with and without kernels, also over its long-input pair path."""
        base = np.random.default_rng(seed).integers(0, 1000, 256)
        counts = base.copy()
        raw = np.frombuffer(bytes(offset) + data, dtype=np.uint8)[offset:]
        NATIVE.histogram(raw, counts)
        assert (counts - base).tolist() == np.bincount(raw, minlength=256).tolist()
        long = np.tile(raw, (1 << 18) // max(1, raw.size) + 1)[: (1 << 18) + 1]
        for symbols in (raw, long):
            with with_native():
                fast = H._histogram(symbols)
            with numpy_only():
                slow = H._histogram(symbols)
            assert fast.tolist() == slow.tolist()

    def test_spec_worked_example(self):
        """Spec 5.2's example: lengths 1,2,3,3 and symbols 0,0,1,2,0,3 are bytes 34 07."""
        lengths = np.array([1, 2, 3, 3], dtype=np.uint8)
        symbols = np.array([0, 0, 1, 2, 0, 3], dtype=np.uint8)
        assert native_encode(symbols, lengths) == bytes([0x34, 0x07])
        assert native_decode(bytes([0x34, 0x07]), lengths, 6) == (symbols.tolist(), 11)


# --------------------------------------------------------------------------- quantize


def numpy_codes(rows: np.ndarray, scale, zero, top: int) -> np.ndarray:
    out = np.empty(rows.shape, dtype=np.uint8)
    with np.errstate(all="ignore"):
        schemes._codes_into(rows, scale, zero, top, out)
    return out.reshape(-1)


def native_codes(rows: np.ndarray, scale, zero, top: int) -> np.ndarray:
    out, whole = guarded(np.uint8, rows.size)
    NATIVE.quantize(np.ascontiguousarray(rows), scale, zero, top, out)
    assert untouched_after(whole, rows.size), "quantize wrote past `out`"
    return out


@st.composite
def weight_matrices(draw, max_rows: int = 5, max_cols: int = 80) -> np.ndarray:
    """Float32 matrices: hypothesis's floats (any finite value), or random weights with
    per-row magnitudes from 1e-30 to 1e30, zero rows and repeated values."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(0, max_cols))
    if draw(st.booleans()):
        values = draw(st.lists(finite_f32, min_size=rows * cols, max_size=rows * cols))
        return np.array(values, dtype=np.float32).reshape(rows, cols)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-30, 31, (rows, 1))
    w[rng.random(rows) < 0.2] = 0
    if cols:
        w[:, rng.integers(0, cols)] = w.max(initial=0)  # ties at the top of the range
    return w.astype(np.float32)


@native_only
class TestQuantize:
    @settings(max_examples=200, deadline=None)
    @given(weight_matrices(), st.integers(1, 255))
    def test_codes_match_numpy_on_the_affine_grid(self, w, top):
        """With the grid qpack computes (``_grid`` over each row's range), for any number
        of levels, the kernel's codes are ``_codes_into``'s."""
        scale, zero = schemes._grid(*schemes._range_of(*schemes.unit_ranges(w)), top)
        scale, zero = scale.reshape(-1), zero.reshape(-1)
        assert (native_codes(w, scale, zero, top) == numpy_codes(w, scale, zero, top)).all()

    @settings(max_examples=150, deadline=None)
    @given(weight_matrices(), st.integers(0, 255), st.data())
    def test_codes_match_numpy_for_any_finite_grid(self, w, top, data):
        """Scales of any sign and size (subnormal, huge), zero points of any finite value
        (fractional, negative, far out of range) and top 0-255: still the same codes."""
        rows = w.shape[0]
        scale = np.array(
            data.draw(st.lists(scale_st.filter(bool), min_size=rows, max_size=rows)), np.float32
        )
        zero = np.array(
            data.draw(
                st.lists(st.one_of(zero_st, st.floats(-1e300, 1e300)), min_size=rows, max_size=rows)
            ),
            np.float64,
        )
        assert (native_codes(w, scale, zero, top) == numpy_codes(w, scale, zero, top)).all()

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(st.integers(-(2**22), 2**22), min_size=1, max_size=60),
        st.integers(-148, 100),
        st.sampled_from([1.0, -1.0]),
        st.integers(0, 255),
        st.integers(1, 255),
    )
    def test_exact_halfway_values_round_half_to_even(self, halves, exponent, sign, zero, top):
        """Weights exactly halfway between two grid steps (w / scale = k + 1/2, exact in
        float32 for power-of-two scales, subnormal ones too) round to the even step, as
        numpy's ``rint`` does: no round-half-away or truncation."""
        step = np.float32(sign * 2.0**exponent)
        w = ((np.array(halves, dtype=np.float64) + 0.5) * abs(float(step))).astype(np.float32)
        assert ((w.astype(np.float64) / float(step)) % 1 == 0.5).all()  # exact halves
        rows, scale, zeros = w.reshape(1, -1), np.array([step]), np.array([float(zero)])
        assert (native_codes(rows, scale, zeros, top) == numpy_codes(rows, scale, zeros, top)).all()

    @settings(max_examples=60, deadline=None)
    @given(
        st.one_of(st.integers(1, 8), st.floats(1, 8)),
        st.sampled_from(["asymmetric-per-channel", "asymmetric-per-layer"]),
        st.lists(st.integers(1, 6), min_size=0, max_size=4),
        st.integers(0, 2**32 - 1),
        st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
    )
    def test_schemes_quantize_is_identical_with_and_without_kernels(
        self, bits, scheme, shape, seed, magnitude
    ):
        """``schemes.quantize`` (which calls the kernel) gives the same codes, scales,
        zero points, granularity and width as with numpy alone, for whole and fractional
        widths, tensors of any rank (a scalar too) and magnitude."""
        rng = np.random.default_rng(seed)
        w = (rng.standard_normal(shape) * magnitude).astype(np.float32)
        if w.ndim and w.shape[0] > 1:
            w[0] = 0  # a constant-zero channel
        with with_native():
            fast = schemes.quantize(w, bits, scheme)
        with numpy_only():
            slow = schemes.quantize(w, bits, scheme)
        assert fast.codes.tobytes() == slow.codes.tobytes()
        assert fast.scale.dtype == slow.scale.dtype == np.float32
        assert bits_of(fast.scale).tolist() == bits_of(slow.scale).tolist()
        assert bits_of(fast.zero_point).tolist() == bits_of(slow.zero_point).tolist()
        assert (fast.granularity, fast.bits) == (slow.granularity, slow.bits)

    def test_block_sized_tensors(self):
        """Tensors larger than numpy's quantization block (a long row, and many rows)
        give the same codes: the kernel does in one pass what numpy does in blocks."""
        rng = np.random.default_rng(1)
        for shape in [(2, schemes.QUANT_BLOCK + 77), (3000, 50)]:
            w = rng.laplace(size=shape).astype(np.float32)
            for scheme in ("asymmetric-per-channel", "asymmetric-per-layer"):
                with with_native():
                    fast = schemes.quantize(w, 3, scheme)
                with numpy_only():
                    slow = schemes.quantize(w, 3, scheme)
                assert fast.codes.tobytes() == slow.codes.tobytes()
                assert fast.scale.tobytes() == slow.scale.tobytes()
                assert fast.zero_point.tobytes() == slow.zero_point.tobytes()


SEARCH_SCHEMES = (
    "asymmetric-per-layer",
    "asymmetric-per-channel",
    "asymmetric-per-group-7",
    "symmetric-per-group-32",
    "symmetric-per-group-64",
)


@native_only
class TestWeightErrors:
    """The width search's kernels: value ranges, and squared errors summed in the fixed
    lane order (``qpack.weighterror``), the same bits as numpy's."""

    @settings(max_examples=150, deadline=None)
    @given(weight_matrices(max_cols=300), st.sampled_from([None, 1, 5, 32, 64, 400]))
    def test_unit_ranges_match_numpy(self, w, size):
        with with_native():
            fast = schemes.unit_ranges(w, size)
        with numpy_only():
            slow = schemes.unit_ranges(w, size)
        for a, b in zip(fast, slow, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == np.float32
            assert (a == b).all()

    @settings(max_examples=150, deadline=None)
    @given(weight_matrices(max_cols=300), st.integers(0, 2**32 - 1))
    def test_row_errors_match_numpy_and_the_lane_order(self, w, seed):
        """Sums of squared differences (and of squares alone) per row, compiled and numpy,
        equal a plain loop that adds element k of a row to lane k % 8 and then the lanes
        as ((0+1)+(2+3))+((4+5)+(6+7))."""
        rng = np.random.default_rng(seed)
        with np.errstate(over="ignore"):  # values near the float32 limit may overflow
            other = (w * rng.uniform(0.9, 1.1, w.shape)).astype(np.float32)
        for values in (other, None):
            with with_native():
                fast = weighterror.row_errors(w, values)
            with numpy_only():
                slow = weighterror.row_errors(w, values)
            diff = w.astype(np.float64) if values is None else (values - w).astype(np.float64)
            lanes = np.zeros((w.shape[0], 8))
            for k in range(w.shape[1]):
                lanes[:, k % 8] += diff[:, k] * diff[:, k]
            loop = ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + (
                (lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7])
            )
            assert fast.tobytes() == slow.tobytes() == loop.tobytes()

    @settings(max_examples=200, deadline=None)
    @given(
        weight_matrices(max_rows=6, max_cols=200),
        st.sampled_from(SEARCH_SCHEMES),
        st.sampled_from([1, 2, 3, 3.5, 4, 5, 6.5, 8]),
    )
    def test_grid_errors_are_those_of_the_quantized_tensor(self, w, scheme, bits):
        """Quantizing on a scheme's grid and measuring in one pass gives the codes
        ``schemes.quantize`` gives and the errors of their decoded values, with the
        compiled kernels and with numpy."""
        if not np.isfinite(w).all() or (w.shape[1] < 2 and "group" in scheme):
            return
        with np.errstate(over="ignore"):
            q = schemes.quantize(w, bits, scheme)
        if not schemes.decodes_finite(q.bits, q.scale, q.zero_point):
            return
        g = schemes.grid(w, bits, scheme)
        want = weighterror.row_errors(w, q.values())
        for context in (with_native, numpy_only):
            codes = np.empty(w.size, np.uint8)
            with context():
                got = weighterror.grid_errors(w, g, codes)
                assert weighterror.grid_errors(w, g).tobytes() == got.tobytes()
            assert got.tobytes() == want.tobytes(), context
            assert codes.tobytes() == q.codes.tobytes(), context

    @settings(max_examples=150, deadline=None)
    @given(weight_matrices(max_rows=6, max_cols=300), st.integers(1, 8))
    def test_origin_errors_are_those_of_the_origins_quantizer(self, w, bits):
        """The origin's per-layer int8 quantizer (float32 arithmetic, its own rounding),
        measured in one pass, gives the errors of ``symmetric-per-layer``'s values."""
        peak = np.float32(np.abs(w).max(initial=0))
        if not np.isfinite(w).all() or not peak > 0:
            return
        want = weighterror.row_errors(w, schemes.quantize(w, bits, "symmetric-per-layer").values())
        for context in (with_native, numpy_only):
            with context():
                got = weighterror.origin_errors(w, bits, peak)
            assert got.tobytes() == want.tobytes(), context

    def test_the_plain_loop_matches_the_avx2_one(self):
        """With ``QPACK_NO_AVX2=1`` (as on a machine without AVX2) ``quantize_errors`` runs
        its plain loop: the same sums and codes as numpy's, in a child process."""
        script = textwrap.dedent(
            """
            import numpy as np
            from qpack import kernels, schemes, weighterror
            rng = np.random.default_rng(9)
            for shape in [(3, 1), (5, 37), (2, 1000), (40, 129)]:
                w = rng.laplace(size=shape).astype(np.float32)
                for scheme in ("asymmetric-per-layer", "asymmetric-per-channel",
                               "symmetric-per-group-32", "asymmetric-per-group-7"):
                    if shape[1] < 2 and "group" in scheme:
                        continue
                    for bits in (1, 3.5, 8):
                        g = schemes.grid(w, bits, scheme)
                        codes = np.empty(w.size, np.uint8)
                        fast = weighterror.grid_errors(w, g, codes)
                        native, kernels.native = kernels.native, None
                        slow = weighterror.grid_errors(w, g)
                        kernels.native = native
                        assert fast.tobytes() == slow.tobytes(), (shape, scheme, bits)
                        assert codes.tobytes() == schemes.quantize(w, bits, scheme).codes.tobytes()
            print("ok")
            """
        )
        env = {**os.environ, "QPACK_NO_AVX2": "1"}
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

    def test_long_rows_and_runs_across_rows(self):
        """Rows longer than the kernels' blocks, a per-layer grid whose one run spans all
        rows, and groups that start mid-lane: the same errors either way."""
        rng = np.random.default_rng(5)
        for shape in [(2, 70001), (33, 517)]:
            w = rng.laplace(size=shape).astype(np.float32)
            for scheme in SEARCH_SCHEMES:
                g = schemes.grid(w, 4.5, scheme)
                with with_native():
                    fast = weighterror.grid_errors(w, g)
                with numpy_only():
                    slow = weighterror.grid_errors(w, g)
                assert fast.tobytes() == slow.tobytes(), (shape, scheme)


# --------------------------------------------------------------------------- end to end


def encode_both(arrays, **options):
    """qpack.encode with and without kernels: (bytes or error, bytes or error)."""
    with with_native():
        fast = outcome(qpack.encode, arrays, **options)
    with numpy_only():
        slow = outcome(qpack.encode, arrays, **options)
    return fast, slow


def decode_both(blob: bytes):
    with with_native():
        fast = outcome(qpack.decode, blob)
    with numpy_only():
        slow = outcome(qpack.decode, blob)
    return fast, slow


def assert_same_outcome(fast, slow) -> None:
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "ok":
        if isinstance(fast[1], dict):
            same_arrays(fast[1], slow[1])
        else:
            assert fast[1] == slow[1]
    else:
        assert fast == slow


@st.composite
def state_dicts(draw) -> dict[str, np.ndarray]:
    """A few tensors: conv and linear weights (heavy-tailed, per-channel magnitudes,
    a zero channel), biases, a float16 weight, an integer buffer."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = {}
    for i in range(draw(st.integers(1, 4))):
        shape = draw(st.sampled_from([(4, 3, 3, 3), (16, 8), (3, 50), (7, 1, 5), (1, 130), (0, 4)]))
        w = rng.laplace(size=shape) * 10.0 ** rng.integers(
            -3, 3, (shape[0],) + (1,) * (len(shape) - 1)
        )
        if shape[0] > 2:
            w[1] = 0
        arrays[f"layer{i}.weight"] = w.astype(np.float32)
        arrays[f"layer{i}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
    if draw(st.booleans()):
        arrays["half.weight"] = rng.standard_normal((6, 20)).astype(np.float16)
    arrays["steps"] = np.array([3, 1, 4], dtype=np.int64)
    return arrays


@native_only
class TestEndToEnd:
    @settings(max_examples=60, deadline=None)
    @given(
        state_dicts(),
        st.one_of(st.integers(1, 8), st.floats(1, 8)),
        st.sampled_from(sorted(schemes.SCHEMES)),
        st.booleans(),
    )
    def test_encode_writes_the_same_file_and_both_decode_it_alike(
        self, arrays, bits, scheme, entropy
    ):
        """``qpack.encode`` writes byte-identical files (or raises the same error) with and
        without kernels, for every scheme, whole and fractional widths, packed and
        Huffman; the file decodes to bit-identical arrays on both backends."""
        fast, slow = encode_both(arrays, bits=bits, scheme=scheme, entropy=entropy)
        assert_same_outcome(fast, slow)
        if fast[0] == "ok":
            decoded = decode_both(fast[1])
            assert decoded[0][0] == "ok"
            assert_same_outcome(*decoded)

    @pytest.mark.parametrize("entropy", [False, True])
    def test_every_width_over_block_sized_tensors(self, entropy):
        """Widths 1-8 on tensors over a quantization block, per-tensor widths from a
        mapping: same files, same decoded values, and the Huffman run really stores
        Huffman tensors."""
        rng = np.random.default_rng(7)
        arrays = {f"w{b}": rng.laplace(size=(64, 2100)).astype(np.float32) for b in range(1, 9)}
        bits = {f"w{b}": b for b in range(1, 9)}
        fast, slow = encode_both(arrays, bits=bits, entropy=entropy)
        assert fast[0] == "ok"
        assert_same_outcome(fast, slow)
        with qreader.Reader(fast[1]) as reader:
            storages = {e.storage for e in reader.header.tensors}
        assert "huffman" in storages if entropy else storages == {"packed"}
        assert_same_outcome(*decode_both(fast[1]))

    @pytest.mark.parametrize("case", MANIFEST["valid"], ids=lambda c: c["file"])
    def test_valid_vectors_decode_bit_exactly_on_both_backends(self, case):
        """Each conformance vector decodes to its expected values, bit for bit, with the
        kernels and without."""
        blob = (VECTORS / case["file"]).read_bytes()
        expected = json.loads((VECTORS / case["expected"]).read_text())
        results = {}
        for name, native in (("c", NATIVE), ("numpy", None)):
            with backend(native):
                arrays = qpack.decode(blob)
                loaded = qpack.load_numpy(VECTORS / case["file"])
            same_arrays(arrays, loaded)
            assert list(arrays) == [t["name"] for t in expected["tensors"]]
            for want in expected["tensors"]:
                array = arrays[want["name"]]
                if want["dtype"] == "bfloat16":  # decode widens it exactly to float32
                    array = (array.view(np.uint32) >> 16).astype(np.uint16)
                le = array.astype(array.dtype.newbyteorder("<"))
                assert le.tobytes().hex() == want["data"], (name, want["name"])
            results[name] = arrays
        same_arrays(results["c"], results["numpy"])

    @pytest.mark.parametrize("case", MANIFEST["invalid"], ids=lambda c: c["file"])
    def test_invalid_vectors_fail_alike_on_both_backends(self, case):
        """Each invalid vector raises its manifest error class and code with the kernels
        and without."""
        path = VECTORS / case["file"]
        cls = E.ERROR_CLASSES[case["error"]]
        for native in (NATIVE, None):
            with backend(native):
                for load in (
                    lambda: qpack.decode(path.read_bytes()),
                    lambda: qpack.load_numpy(path),
                ):
                    with pytest.raises(E.QpackError) as info:
                        load()
                    assert type(info.value) is cls
                    assert info.value.code == case["error"]


@cache
def payload_corpus() -> list[tuple[TensorEntry, bytes]]:
    """Tensor entries with their payloads: every width, packed and every Huffman group,
    one scale and three, counts that do and do not fill the last byte or symbol."""
    rng = np.random.default_rng(11)
    corpus = []
    for bits in range(1, 9):
        for group in allowed_groups(bits):
            for runs, per_run in ((1, 61), (3, 13), (1, 8), (3, 0)):
                count = runs * per_run
                codes = np.minimum(rng.geometric(0.35, count) - 1, (1 << bits) - 1)
                codes = codes.astype(np.uint8)
                scale = rng.uniform(0.01, 2, runs).astype(np.float32)
                zero = rng.integers(0, 1 << bits, runs).astype(np.float32)
                fields = dict(
                    name=f"b{bits}g{group}r{runs}", shape=(runs, per_run), dtype="float32",
                    offset=0, crc32=0, bits=bits, dequant="affine",
                    granularity="channel" if runs > 1 else "tensor", scale=scale,
                    zero_point=zero,
                )  # fmt: skip
                if group == 0:
                    payload = bitpack.pack_codes(codes, bits).tobytes()
                    entry = TensorEntry(storage="packed", length=len(payload), **fields)
                else:
                    symbols = H.group_codes(codes, bits, group)
                    hist = np.bincount(symbols, minlength=1 << (group * bits))
                    hist[0] += 1  # never an empty alphabet
                    lengths = H.huffman_lengths(hist)
                    payload = numpy_encode(symbols, lengths)
                    entry = TensorEntry(
                        storage="huffman", length=len(payload), group=group,
                        code_lengths=lengths, **fields,
                    )  # fmt: skip
                corpus.append((entry, payload))
    return corpus


@native_only
class TestDecodePayload:
    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_damaged_payloads_decode_or_fail_alike(self, data):
        """Tensor payloads as the reader hands them over (CRC already checked), intact or
        damaged: a flipped bit, set padding bits, a nonzero code padding the last symbol,
        a Huffman stream cut short or extended: ``decode_payload`` returns the same float32
        bits or raises the same error class and code on both backends."""
        entry, payload = data.draw(st.sampled_from(payload_corpus()))
        payload = bytearray(payload)
        edit = data.draw(st.sampled_from(["none", "flip", "pad", "cut", "append", "last"]))
        if edit == "flip" and payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] ^= 1 << data.draw(
                st.integers(0, 7)
            )
        elif edit == "pad" and payload:
            payload[-1] |= 0x80 >> data.draw(st.integers(0, 7))
        elif entry.storage == "huffman" and edit == "cut" and payload:
            del payload[-data.draw(st.integers(1, len(payload))) :]
        elif entry.storage == "huffman" and edit == "append":
            payload += bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=3)))
        elif entry.storage == "huffman" and edit == "last" and entry.numel % entry.group:
            symbols = H._bitarray_decode(
                bytes(payload), entry.code_lengths, -(-entry.numel // entry.group)
            )
            alphabet = entry.code_lengths.size
            symbols[-1] = data.draw(
                st.integers(0, alphabet - 1).filter(lambda s: entry.code_lengths[s] > 0)
            )
            payload = bytearray(numpy_encode(symbols, entry.code_lengths))
        entry = replace(entry, length=len(payload))
        results = []
        for native in (NATIVE, None):
            with backend(native), decoder.scratch_scope():
                got = outcome(decoder.decode_payload, entry, bytes(payload))
            if got[0] == "ok":
                got = ("ok", got[1].shape, bits_of(got[1]).tobytes())
            results.append(got)
        assert results[0] == results[1]
        if edit == "none":
            assert results[0][0] == "ok"


# --------------------------------------------------------------------------- hostile calls


F1, F0, F2 = np.ones(1, np.float32), np.zeros(1, np.float32), np.zeros(2, np.float32)
W4, Z64 = np.ones(4, np.float32), np.zeros(1, np.float64)
S64 = np.zeros(2, np.float64)  # sums of two rows
RO_S64 = np.zeros(2, np.float64)
RO_S64.flags.writeable = False
S16 = bytes(16)
LEN4 = np.array([1, 2, 3, 3], np.uint8)
OF, OU = np.zeros(16, np.float32), np.zeros(16, np.uint8)  # outputs (every call raises)
RO_F = np.zeros(16, np.float32)
RO_F.flags.writeable = False
RO_U = np.zeros(16, np.uint8)
RO_U.flags.writeable = False
RO_I64 = np.zeros(256, np.int64)
RO_I64.flags.writeable = False
STRIDED_F, STRIDED_U = np.zeros(32, np.float32)[::2], np.zeros(32, np.uint8)[::2]


def u8(*values: int) -> np.ndarray:
    return np.array(values, np.uint8)


# name: (kernel, *arguments); every call must raise ValueError or TypeError
HOSTILE = {
    # dequantize(src, bits, group, count, scale, zero, out)
    "dq bits 0": ("dequantize", S16, 0, 0, 4, F1, F0, OF),
    "dq bits 9": ("dequantize", S16, 9, 0, 4, F1, F0, OF),
    "dq bits -1": ("dequantize", S16, -1, 0, 4, F1, F0, OF),
    "dq group -1": ("dequantize", S16, 4, -1, 4, F1, F0, OF),
    "dq group 3 of 3 bits": ("dequantize", S16, 3, 3, 4, F1, F0, OF),
    "dq group 2 of 8 bits": ("dequantize", S16, 8, 2, 4, F1, F0, OF),
    "dq group 9 of 1 bit": ("dequantize", S16, 1, 9, 4, F1, F0, OF),
    "dq count -1": ("dequantize", S16, 8, 0, -1, F1, F0, OF),
    "dq count -2**63": ("dequantize", S16, 8, 0, -(2**63), F1, F0, OF),
    "dq count 2**62": ("dequantize", S16, 8, 0, 2**62, F1, F0, OF),
    "dq count 2**63-1": ("dequantize", S16, 3, 0, 2**63 - 1, F1, F0, OF),
    "dq count 2**61 packed": ("dequantize", S16, 5, 0, 2**61, F1, F0, OF),
    "dq count 2**62 symbols": ("dequantize", S16, 2, 3, 2**62, F1, F0, OF),
    "dq short packed src": ("dequantize", bytes(4), 3, 0, 11, F1, F0, OF),
    "dq short symbol src": ("dequantize", bytes(3), 2, 3, 10, F1, F0, OF),
    "dq short byte src": ("dequantize", bytes(9), 8, 1, 10, F1, F0, OF),
    "dq short out": ("dequantize", S16, 8, 0, 16, F1, F0, np.zeros(15, np.float32)),
    "dq out not whole floats": ("dequantize", S16, 8, 0, 4, F1, F0, np.zeros(17, np.uint8)),
    "dq misaligned out": ("dequantize", S16, 8, 0, 4, F1, F0, misaligned(64)),
    "dq misaligned scale": ("dequantize", S16, 8, 0, 4, misaligned(4), F0, OF),
    "dq misaligned zero": ("dequantize", S16, 8, 0, 4, F1, misaligned(4), OF),
    "dq scale of 3 bytes": ("dequantize", S16, 8, 0, 4, bytes(3), bytes(3), OF),
    "dq scale/zero lengths": ("dequantize", S16, 8, 0, 4, F1, F2, OF),
    "dq no runs": ("dequantize", S16, 8, 0, 4, b"", b"", OF),
    "dq uneven runs": ("dequantize", S16, 8, 0, 5, F2, F2, OF),
    "dq src str": ("dequantize", "0123456789abcdef", 8, 0, 4, F1, F0, OF),
    "dq src None": ("dequantize", None, 8, 0, 4, F1, F0, OF),
    "dq src list": ("dequantize", [0] * 16, 8, 0, 4, F1, F0, OF),
    "dq src strided": ("dequantize", STRIDED_U, 8, 0, 4, F1, F0, OF),
    "dq scale list": ("dequantize", S16, 8, 0, 4, [1.0], F0, OF),
    "dq scale float": ("dequantize", S16, 8, 0, 4, 1.0, F0, OF),
    "dq bits float": ("dequantize", S16, 8.0, 0, 4, F1, F0, OF),
    "dq count str": ("dequantize", S16, 8, 0, "4", F1, F0, OF),
    "dq out bytes": ("dequantize", S16, 8, 0, 4, F1, F0, bytes(16)),
    "dq out read-only": ("dequantize", S16, 8, 0, 4, F1, F0, RO_F),
    "dq out strided": ("dequantize", S16, 8, 0, 4, F1, F0, STRIDED_F),
    "dq too few args": ("dequantize", S16, 8, 0, 4, F1, F0),
    # pack(codes, bits, out)
    "pk bits 0": ("pack", S16, 0, OU),
    "pk bits 9": ("pack", S16, 9, OU),
    "pk short out": ("pack", S16, 3, np.zeros(5, np.uint8)),
    "pk out read-only": ("pack", S16, 3, RO_U),
    "pk out strided": ("pack", S16, 3, STRIDED_U),
    "pk codes None": ("pack", None, 3, OU),
    # huffman_decode(data, lengths, count, out)
    "hd count -1": ("huffman_decode", S16, LEN4, -1, OU),
    "hd count 2**62": ("huffman_decode", S16, LEN4, 2**62, OU),
    "hd count 2**63-1": ("huffman_decode", S16, LEN4, 2**63 - 1, OU),
    "hd short out": ("huffman_decode", S16, LEN4, 17, OU),
    "hd more symbols than bits": ("huffman_decode", bytes(2), LEN4, 17, np.zeros(64, np.uint8)),
    "hd ends early": ("huffman_decode", b"\xff", LEN4, 3, OU),
    "hd 257 lengths": ("huffman_decode", S16, np.full(257, 9, np.uint8), 1, OU),
    "hd length 16": ("huffman_decode", S16, u8(1, 16), 1, OU),
    "hd length 255": ("huffman_decode", S16, u8(255, 1), 1, OU),
    "hd oversubscribed": ("huffman_decode", S16, u8(1, 1, 1), 1, OU),
    "hd no codewords": ("huffman_decode", S16, u8(0, 0, 0, 0), 1, OU),
    "hd empty lengths": ("huffman_decode", S16, b"", 1, OU),
    "hd invalid codeword": ("huffman_decode", b"\xff", u8(2, 2, 0, 0), 2, OU),
    "hd data str": ("huffman_decode", "abcd", LEN4, 1, OU),
    "hd lengths None": ("huffman_decode", S16, None, 1, OU),
    "hd count float": ("huffman_decode", S16, LEN4, 1.0, OU),
    "hd out bytes": ("huffman_decode", S16, LEN4, 1, bytes(16)),
    "hd out read-only": ("huffman_decode", S16, LEN4, 1, RO_U),
    "hd out strided": ("huffman_decode", S16, LEN4, 1, STRIDED_U),
    # huffman_dequantize(data, lengths, count, scale, zero, out)
    "hq count -1": ("huffman_dequantize", S16, LEN4, -1, F1, F0, OF),
    "hq short out": ("huffman_dequantize", S16, LEN4, 17, F1, F0, OF),
    "hq ends early": ("huffman_dequantize", b"\xff", LEN4, 3, F1, F0, OF),
    "hq oversubscribed": ("huffman_dequantize", S16, u8(1, 1, 1), 1, F1, F0, OF),
    "hq length 16": ("huffman_dequantize", S16, u8(1, 16), 1, F1, F0, OF),
    "hq invalid codeword": ("huffman_dequantize", b"\xff", u8(2, 2, 0, 0), 2, F1, F0, OF),
    "hq uneven runs": ("huffman_dequantize", S16, LEN4, 3, np.ones(2, np.float32),
                       np.zeros(2, np.float32), OF),
    "hq scale and zero differ": ("huffman_dequantize", S16, LEN4, 2, np.ones(2, np.float32),
                                 F0, OF),
    "hq no runs": ("huffman_dequantize", S16, LEN4, 2, np.zeros(0, np.float32),
                   np.zeros(0, np.float32), OF),
    "hq misaligned out": ("huffman_dequantize", S16, LEN4, 2, F1, F0, misaligned(16)),
    "hq out read-only": ("huffman_dequantize", S16, LEN4, 1, F1, F0, RO_F),
    "hq out strided": ("huffman_dequantize", S16, LEN4, 1, F1, F0, STRIDED_F),
    "hq scale None": ("huffman_dequantize", S16, LEN4, 1, None, F0, OF),
    # huffman_encode(symbols, lengths, out)
    "he symbol without codeword": ("huffman_encode", u8(0, 2), u8(1, 1, 0), OU),
    "he symbol past the lengths": ("huffman_encode", u8(0, 200), LEN4, OU),
    "he no lengths": ("huffman_encode", u8(0), b"", OU),
    "he out empty": ("huffman_encode", u8(0), LEN4, np.zeros(0, np.uint8)),
    "he out short": ("huffman_encode", bytes([3] * 40), LEN4, np.zeros(14, np.uint8)),
    "he out short by 4": ("huffman_encode", bytes([3] * 40), LEN4, np.zeros(11, np.uint8)),
    "he 257 lengths": ("huffman_encode", u8(0), np.full(257, 9, np.uint8), OU),
    "he length 16": ("huffman_encode", u8(0), u8(1, 16), OU),
    "he oversubscribed": ("huffman_encode", u8(0), u8(1, 1, 1), OU),
    "he symbols str": ("huffman_encode", "ab", LEN4, OU),
    "he symbols list": ("huffman_encode", [0, 1], LEN4, OU),
    "he out bytes": ("huffman_encode", u8(0), LEN4, bytes(16)),
    "he out read-only": ("huffman_encode", u8(0), LEN4, RO_U),
    "he too many args": ("huffman_encode", u8(0), LEN4, OU, 1),
    # histogram(data, counts)
    "hg counts of 255": ("histogram", S16, np.zeros(255, np.int64)),
    "hg counts of 257": ("histogram", S16, np.zeros(257, np.int64)),
    "hg counts int32": ("histogram", S16, np.zeros(256, np.int32)),
    "hg misaligned counts": ("histogram", S16, misaligned(256 * 8)),
    "hg counts read-only": ("histogram", S16, RO_I64),
    "hg counts bytes": ("histogram", S16, bytes(256 * 8)),
    "hg data str": ("histogram", "abc", np.zeros(256, np.int64)),
    "hg data None": ("histogram", None, np.zeros(256, np.int64)),
    # quantize(w, scale, zero, top, out)
    "q top -1": ("quantize", W4, F1, Z64, -1, OU),
    "q top 256": ("quantize", W4, F1, Z64, 256, OU),
    "q short out": ("quantize", np.ones(17, np.float32), F1, Z64, 15, OU),
    "q no scales": ("quantize", W4, b"", b"", 15, OU),
    "q uneven runs": ("quantize", np.ones(5, np.float32), F2, np.zeros(2), 15, OU),
    "q zero float32": ("quantize", W4, F1, np.zeros(1, np.float32), 15, OU),
    "q zero count": ("quantize", W4, F1, np.zeros(2), 15, OU),
    "q w not whole floats": ("quantize", bytes(15), F1, Z64, 15, OU),
    "q misaligned w": ("quantize", misaligned(16), F1, Z64, 15, OU),
    "q misaligned scale": ("quantize", W4, misaligned(4), Z64, 15, OU),
    "q misaligned zero": ("quantize", W4, F1, misaligned(8), 15, OU),
    "q w str": ("quantize", "abcd", F1, Z64, 15, OU),
    "q w list": ("quantize", [1.0, 2.0], F1, Z64, 15, OU),
    "q w strided": ("quantize", STRIDED_F, F1, Z64, 15, OU),
    "q top float": ("quantize", W4, F1, Z64, 15.0, OU),
    "q out bytes": ("quantize", W4, F1, Z64, 15, bytes(16)),
    "q out read-only": ("quantize", W4, F1, Z64, 15, RO_U),
    # quantize_errors(w, scale, zero, top, sums, row=0, run=0[, codes])
    "qe top 256": ("quantize_errors", W4, F1, Z64, 256, S64),
    "qe no sums": ("quantize_errors", W4, F1, Z64, 15, np.zeros(0)),
    "qe sums not dividing w": ("quantize_errors", W4, F1, Z64, 15, np.zeros(3)),
    "qe sums of 12 bytes": ("quantize_errors", W4, F1, Z64, 15, np.zeros(3, np.float32)),
    "qe misaligned sums": ("quantize_errors", W4, F1, Z64, 15, misaligned(8)),
    "qe sums read-only": ("quantize_errors", W4, F1, Z64, 15, RO_S64),
    "qe uneven runs": ("quantize_errors", np.ones(5, np.float32), F2, np.zeros(2), 15, S64[:1]),
    "qe zero count": ("quantize_errors", W4, F1, np.zeros(2), 15, S64),
    "qe row not dividing w": ("quantize_errors", W4, F2, np.zeros(2), 15, S64, 3, 2),
    "qe runs not fitting": ("quantize_errors", W4, F1, Z64, 15, S64, 2, 1),
    "qe negative run": ("quantize_errors", W4, F1, Z64, 15, S64, 0, -1),
    "qe short codes": ("quantize_errors", W4, F1, Z64, 15, S64, 0, 0, np.zeros(3, np.uint8)),
    "qe long codes": ("quantize_errors", W4, F1, Z64, 15, S64, 0, 0, np.zeros(5, np.uint8)),
    "qe codes read-only": ("quantize_errors", W4, F1, Z64, 15, S64, 0, 0, RO_U),
    "qe w str": ("quantize_errors", "abcd", F1, Z64, 15, S64),
    # origin_errors(w, peak, bits, sums)
    "oe bits 0": ("origin_errors", W4, 1.0, 0, S64),
    "oe bits 9": ("origin_errors", W4, 1.0, 9, S64),
    "oe peak 0": ("origin_errors", W4, 0.0, 8, S64),
    "oe peak negative": ("origin_errors", W4, -1.0, 8, S64),
    "oe peak inf": ("origin_errors", W4, float("inf"), 8, S64),
    "oe peak nan": ("origin_errors", W4, float("nan"), 8, S64),
    "oe sums not dividing": ("origin_errors", W4, 1.0, 8, np.zeros(3)),
    "oe sums read-only": ("origin_errors", W4, 1.0, 8, RO_S64),
    "oe w str": ("origin_errors", "abcd", 1.0, 8, S64),
    # row_errors(a, b, sums)
    "re lengths differ": ("row_errors", W4, np.ones(3, np.float32), S64),
    "re sums not dividing": ("row_errors", W4, W4, np.zeros(3)),
    "re no sums": ("row_errors", W4, W4, np.zeros(0)),
    "re sums read-only": ("row_errors", W4, W4, RO_S64),
    "re misaligned a": ("row_errors", misaligned(16), W4, S64),
    "re b None": ("row_errors", W4, None, S64),
    # unit_ranges(w, row, run, high, low)
    "ur row 0": ("unit_ranges", W4, 0, 1, F1, F1.copy()),
    "ur run 0": ("unit_ranges", W4, 4, 0, F1, F1.copy()),
    "ur row not dividing": ("unit_ranges", W4, 3, 1, F1, F1.copy()),
    "ur short high": ("unit_ranges", W4, 4, 2, F1, F2),
    "ur short low": ("unit_ranges", W4, 2, 2, F2, F1),
    "ur high read-only": ("unit_ranges", W4, 4, 4, RO_F[:1], F1),
}


@native_only
class TestHostileArguments:
    @pytest.mark.parametrize("call", list(HOSTILE.values()), ids=list(HOSTILE))
    def test_bad_arguments_raise_value_or_type_error(self, call):
        """Every bad argument (widths, groups and counts out of range, buffers short or
        misaligned, not buffers, read-only or strided outputs, invalid codes) raises
        ValueError or TypeError."""
        kernel, *args = call
        with pytest.raises((ValueError, TypeError)):
            getattr(NATIVE, kernel)(*args)

    @pytest.mark.parametrize(
        "call",
        [
            ("dequantize", S16, 8, 0, 2**64, F1, F0, OF),
            ("dequantize", S16, 8, 0, -(2**64), F1, F0, OF),
            ("huffman_decode", S16, LEN4, 2**64, OU),
            ("dequantize", S16, 2**40, 0, 4, F1, F0, OF),
            ("dequantize", S16, 1, 2**40, 4, F1, F0, OF),
            ("quantize", W4, F1, Z64, 2**40, OU),
        ],
        ids=["dq count 2**64", "dq count -2**64", "hd count 2**64", "dq bits 2**40",
             "dq group 2**40", "q top 2**40"],
    )  # fmt: skip
    def test_integers_beyond_c_types_raise_overflow_error(self, call):
        """Counts that do not fit a Py_ssize_t, and widths, groups or tops that do not fit
        a C int, are refused by Python's argument parsing (OverflowError), not wrapped
        around."""
        kernel, *args = call
        with pytest.raises(OverflowError):
            getattr(NATIVE, kernel)(*args)

    def test_failed_encode_writes_nothing_past_out(self):
        """The encoder stops at the end of a short ``out``: the bytes after it (part of
        the same allocation) stay untouched, whatever the shortfall."""
        symbols = np.array([3] * 40, np.uint8)  # 120 bits: 15 bytes
        for room in range(15):
            out, whole = guarded(np.uint8, room)
            with pytest.raises(ValueError):
                NATIVE.huffman_encode(symbols, LEN4, out)
            assert untouched_after(whole, room), room

    def test_failed_calls_write_nothing_past_out(self):
        """Calls refused for a short output leave the memory after it untouched."""
        out, whole = guarded(np.float32, 15)
        with pytest.raises(ValueError):
            NATIVE.dequantize(S16, 8, 0, 16, F1, F0, out)
        assert untouched_after(whole, 60)
        out, whole = guarded(np.uint8, 16)
        with pytest.raises(ValueError):
            NATIVE.huffman_decode(S16, LEN4, 17, out)
        assert untouched_after(whole, 16)
        out, whole = guarded(np.uint8, 16)
        with pytest.raises(ValueError):
            NATIVE.quantize(np.ones(17, np.float32), F1, Z64, 15, out)
        assert untouched_after(whole, 16)

    def test_exact_size_buffers_against_a_guard_page(self):
        """Every kernel, over every width, group and count up to 70, reads and writes only
        the bytes it is given: each input and output ends exactly at a page made
        inaccessible with mprotect, so a read or write past it crashes. Run in a child
        process so that a crash fails this test instead of the whole test run."""
        if not sys.platform.startswith("linux"):
            pytest.skip("needs mmap and mprotect")
        result = subprocess.run(
            [sys.executable, "-c", GUARD_PAGE_SCRIPT],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])
        assert result.stdout.strip().startswith("ok"), result.stdout

    @pytest.mark.parametrize(
        "bits, group",
        [(8, 1 << 30), (4, 1 << 30), (2, 2**31 - 1), (3, 0x55555556), (8, 2**31 - 1),
         (1, 2**31 - 1), (7, 2**31 - 1)],
        ids=lambda v: hex(v) if v > 8 else str(v),
    )  # fmt: skip
    def test_groups_whose_symbol_width_overflows_an_int_are_refused(self, bits, group):
        """``group * bits`` must be checked without overflow: a group of 2**30 8-bit codes
        is no more allowed than a group of 2. Run in a child process, the 1-byte source
        against a guard page, so that a kernel that accepts the group and reads 4096
        codes from it fails this test (by crashing the child) instead of the test run."""
        if not sys.platform.startswith("linux"):
            pytest.skip("needs mmap and mprotect")
        script = GUARD_PAGE_SETUP + textwrap.dedent(
            f"""
            src = Guarded().end(b"\\x00")
            out = np.zeros(4096, np.float32)
            one = np.ones(1, np.float32)
            try:
                N.dequantize(src, {bits}, {group}, 4096, one, one, out)
            except (ValueError, TypeError) as exc:
                print("raised", type(exc).__name__, exc)
            else:
                print("accepted the group and read 4096 codes from a 1-byte source")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert result.returncode == 0, (
            f"dequantize(b'\\0', bits={bits}, group={group:#x}, count=4096, ...) crashed "
            f"the process (return code {result.returncode}): {result.stderr[-2000:]}"
        )
        assert result.stdout.startswith("raised"), result.stdout


GUARD_PAGE_SETUP = textwrap.dedent(
    """
    import ctypes, mmap
    import numpy as np
    from qpack import bitpack, kernels, schemes, weighterror
    from qpack import entropy as H

    N = kernels.native
    assert N is not None
    PAGE = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    class Guarded:
        # USABLE bytes, then a page that may not be read or written
        USABLE = 16 * PAGE

        def __init__(self):
            self.map = mmap.mmap(-1, self.USABLE + PAGE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
            assert libc.mprotect(address + self.USABLE, PAGE, 0) == 0, ctypes.get_errno()
            self.view = memoryview(self.map)

        def end(self, data=b"", size=None):
            # a writable view of the last bytes before the guard page, holding `data`
            size = len(data) if size is None else size
            assert 0 <= size <= self.USABLE
            view = self.view[self.USABLE - size : self.USABLE]
            view[: len(data)] = data
            return view
    """
)

GUARD_PAGE_SCRIPT = GUARD_PAGE_SETUP + textwrap.dedent(
    """
    src, out, sc, zp = Guarded(), Guarded(), Guarded(), Guarded()
    rng = np.random.default_rng(3)
    checks = 0
    for bits in range(1, 9):
        for group in [0, *range(1, 8 // bits + 1)]:
            for count in [*range(0, 71), 333, 1000]:
                for runs in (1, 2, 5):
                    if count % runs:
                        continue
                    codes = rng.integers(0, 1 << bits, count, dtype=np.uint8)
                    data = (bitpack.pack_codes(codes, bits) if group == 0
                            else H.group_codes(codes, bits, group)).tobytes()
                    scale = rng.normal(size=runs).astype(np.float32)
                    zero = rng.integers(0, 1 << bits, runs).astype(np.float32)
                    o = out.end(size=4 * count)
                    N.dequantize(src.end(data), bits, group, count, sc.end(scale.tobytes()),
                                 zp.end(zero.tobytes()), o)
                    got = np.frombuffer(o, np.float32, count)
                    kernels.native = None
                    want = schemes.dequantize(codes, scale, zero)
                    kernels.native = N
                    assert got.tobytes() == want.tobytes(), (bits, group, count, runs)
                    del got, o
                    checks += 1
    for alphabet in (2, 16, 256):
        for count in [*range(1, 40), 500, 3000]:
            symbols = (np.minimum(rng.geometric(0.3, count) - 1, alphabet - 1)).astype(np.uint8)
            hist = np.bincount(symbols, minlength=alphabet)
            deep = hist + 2 ** (np.arange(alphabet) % 40)  # codewords up to 15 bits
            for lengths in (H.huffman_lengths(hist), H.huffman_lengths(deep)):
                total = int(lengths[symbols].astype(np.int64).sum())
                table = lengths.tobytes()
                o = out.end(size=-(-total // 8))
                assert N.huffman_encode(src.end(symbols.tobytes()), sc.end(table), o) == total
                stream = bytes(o)
                del o
                o = out.end(size=count)
                assert N.huffman_decode(src.end(stream), sc.end(table), count, o) == total
                assert bytes(o) == symbols.tobytes()
                del o
                for cut in (1, 2):  # streams that end early: refused, no read past them
                    if len(stream) >= cut:
                        o = out.end(size=count)
                        try:
                            N.huffman_decode(src.end(stream[:-cut]), sc.end(table), count, o)
                        except ValueError:
                            pass
                        del o
                checks += 1
    for top in (1, 7, 255):
        for count in range(0, 70):
            for runs in (1, 2, 5):
                if count % runs or (count == 0 and runs > 1):
                    continue
                w = rng.normal(size=count).astype(np.float32)
                scale = rng.uniform(0.01, 1, runs).astype(np.float32)
                zero = rng.integers(0, top + 1, runs).astype(np.float64)
                o = out.end(size=count)
                s, z = sc.end(scale.tobytes()), zp.end(zero.tobytes())
                N.quantize(src.end(w.tobytes()), s, z, top, o)
                want = np.empty((runs, count // runs), np.uint8)
                schemes._codes_into(w.reshape(runs, -1), scale, zero, top, want)
                assert bytes(o) == want.tobytes(), (top, count, runs)
                del o
                checks += 1
    codes_at = Guarded()
    for top in (1, 255):
        for count in range(1, 70):
            for rows in (1, 2, 5):
                if count % rows:
                    continue
                row = count // rows
                for run in (0, 1, 3, 32):
                    w = rng.normal(size=count).astype(np.float32)
                    units = rows * -(-row // run) if run else rows
                    scale = rng.uniform(0.01, 1, units).astype(np.float32)
                    zero = rng.integers(0, top + 1, units).astype(np.float64)
                    sums = np.frombuffer(out.end(size=8 * rows), np.float64)
                    codes = codes_at.end(size=count)
                    N.quantize_errors(src.end(w.tobytes()), sc.end(scale.tobytes()),
                                      zp.end(zero.tobytes()), top, sums, row if run else 0,
                                      run, codes)
                    kernels.native = None
                    g = schemes.Grid(scale, zero, top + 1, "group" if run else "channel",
                                     run or None, row if run else 0)
                    want = weighterror.grid_errors(w.reshape(rows, row), g)
                    kernels.native = N
                    assert sums.tobytes() == want.tobytes(), (top, count, rows, run)
                    del sums, codes
                    sums = np.frombuffer(out.end(size=8 * rows), np.float64)
                    N.row_errors(src.end(w.tobytes()), sc.end(w[::-1].tobytes()), sums)
                    N.origin_errors(src.end(w.tobytes()), 2.5, 8, sums)
                    del sums
                    if run:
                        high = np.frombuffer(out.end(size=4 * units), np.float32)
                        low = np.frombuffer(zp.end(size=4 * units), np.float32)
                        N.unit_ranges(src.end(w.tobytes()), row, run, high, low)
                        del high, low
                    checks += 1
    for count in [*range(0, 40), 1001]:
        data = rng.integers(0, 256, count, dtype=np.uint8)
        counts = np.frombuffer(out.end(bytes(256 * 8)), np.int64)
        N.histogram(src.end(data.tobytes()), counts)
        assert counts.tolist() == np.bincount(data, minlength=256).tolist()
        del counts
        checks += 1
    print("ok", checks)
    """
)

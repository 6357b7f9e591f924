"""Format 1.2's chunk index of Huffman streams (spec/FORMAT.md 5.2, checks 8, 10, 16; 9).

A Huffman tensor may carry ``chunk`` (symbols per chunk) and ``chunk_starts`` (the stream
bit where each chunk after the first begins). The stream bytes do not change, so a reader
that ignores the index decodes the same values; a reader that uses it must reject an
index that does not match the stream.

Covered here:

* the compiled kernels (``huffman_decode_chunks``, ``huffman_encode`` with a chunk) against
  the plain decoder, the numpy routes and an independent pure-Python canonical encoder;
* every wrong start is caught by every route (lanes on and off, numpy);
* hostile kernel arguments raise, never crash or write;
* the writer (both backends), the header version, an old reader's view, header validation
  of re-framed files, and the torch device decoder.

The numpy route runs with ``qpack.kernels.native`` set to None; the kernels are called
through :data:`NATIVE`, the module as imported (tests of them skip where it did not build).
"""

from __future__ import annotations

import contextlib
import zlib
from functools import cache

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import qpack
from qpack import entropy as H
from qpack import errors as E
from qpack import kernels
from qpack import reader as qreader
from qpack import writer as qwriter
from qpack.container import frame_file, split_file

NATIVE = kernels.native
native_only = pytest.mark.skipif(NATIVE is None, reason="qpack._ckernels is not built")
SENTINEL = 0xA5
MAX_LEN = 15


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def backend(native):
    """Run the library with the compiled kernels (NATIVE) or with numpy only (None)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "native", native)
        yield


BACKENDS = [
    pytest.param(None, id="numpy"),
    pytest.param(NATIVE, id="native", marks=native_only),
]


def canonical_codewords(lengths) -> list[tuple[int, ...]]:
    """Each symbol's codeword as a tuple of bits, MSB first, computed exactly as spec 5.2
    writes the canonical assignment (independent of qpack's code)."""
    lengths = [int(n) for n in lengths]
    count = [0] * (MAX_LEN + 1)
    for n in lengths:
        if n:
            count[n] += 1
    nxt = [0] * (MAX_LEN + 1)
    code = 0
    for n in range(2, MAX_LEN + 1):
        code = (code + count[n - 1]) << 1
        nxt[n] = code
    words: list[tuple[int, ...]] = []
    for n in lengths:
        if n:
            value = nxt[n]
            nxt[n] += 1
            words.append(tuple((value >> (n - 1 - i)) & 1 for i in range(n)))
        else:
            words.append(())
    return words


def reference_stream(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """The stream of spec 5.2 by a plain bit-by-bit encoder: (bytes, total bits)."""
    words = canonical_codewords(lengths)
    bits = [b for s in symbols.tolist() for b in words[s]]
    packed = np.packbits(np.array(bits, dtype=np.uint8), bitorder="little")
    return packed.tobytes(), len(bits)


def reference_starts(symbols: np.ndarray, lengths: np.ndarray, chunk: int) -> np.ndarray:
    """The chunk index by definition: bit where symbol k*chunk begins, k = 1 .. K-1."""
    ends = np.concatenate(([0], np.cumsum(lengths.astype(np.int64)[symbols])))
    return np.ascontiguousarray(ends[chunk : symbols.size : chunk], dtype=np.int64)


def guarded(count: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 output of ``count`` bytes followed by sentinel bytes: (out, whole)."""
    whole = np.full(count + 32, SENTINEL, dtype=np.uint8)
    return whole[:count], whole


def bits_of(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def native_encode(symbols, lengths, chunk=None):
    """huffman_encode into an exact-size buffer: (bytes, bits, starts or None)."""
    total = int(lengths.astype(np.int64)[symbols].sum())
    out = np.zeros(-(-total // 8), dtype=np.uint8)
    if chunk is None:
        written = NATIVE.huffman_encode(symbols, lengths, out)
        return out.tobytes(), written, None
    starts = np.full(max(-(-symbols.size // chunk) - 1, 0), -1, dtype=np.int64)
    written = NATIVE.huffman_encode(symbols, lengths, out, chunk, starts)
    return out.tobytes(), written, starts


# ------------------------------------------------------------------ random codes and streams


def _complete_depths(rng: np.random.Generator, leaves: int, deep: bool) -> list[int]:
    """Leaf depths of a random full binary tree (a complete code: Kraft sum exactly 1)
    with at most ``leaves`` leaves; ``deep`` starts from the chain 1, 2, ..., 15, 15."""
    depths = list(range(1, MAX_LEN + 1)) + [MAX_LEN] if deep else [1, 1]
    target = int(rng.integers(len(depths), max(leaves, len(depths)) + 1))
    while len(depths) < target:
        open_ = [i for i, d in enumerate(depths) if d < MAX_LEN]
        if not open_:
            break
        d = depths.pop(open_[int(rng.integers(len(open_)))])
        depths += [d + 1, d + 1]
    return depths


def random_lengths(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Valid code lengths (Kraft sum <= 1, at least one codeword) of one of several kinds."""
    alphabet = int(rng.choice([2, 3, 16, 100, 200, 256]))
    if kind == "huffman":  # the writer's lengths: one spare codeword of the greatest length
        counts = rng.integers(0, 1000, alphabet) * (rng.random(alphabet) < rng.random())
        if rng.random() < 0.5:  # steeply skewed counts: long codes, length-limited at 15
            counts = (2.0 ** -np.arange(alphabet) * 2.0**40).astype(np.int64) + (counts > 0)
            counts = counts[rng.permutation(alphabet)]
        counts[int(rng.integers(alphabet))] += 1
        return H.huffman_lengths(counts)
    if kind == "single":  # an incomplete code of one codeword
        lengths = np.zeros(alphabet, dtype=np.uint8)
        lengths[int(rng.integers(alphabet))] = int(rng.integers(1, MAX_LEN + 1))
        return lengths
    deep = kind in ("deep", "deep-spare")
    alphabet = max(alphabet, 17) if deep else alphabet
    depths = _complete_depths(rng, min(alphabet, int(rng.integers(2, 257))), deep)
    if kind == "deep-spare":  # 1 .. 15 plus a spare codeword of 15 bits
        depths.remove(MAX_LEN)
    if kind == "incomplete":
        keep = rng.random(len(depths)) < rng.uniform(0.2, 0.9)
        keep[int(rng.integers(len(depths)))] = True
        depths = [d for d, k in zip(depths, keep, strict=True) if k]
    lengths = np.zeros(max(alphabet, len(depths)), dtype=np.uint8)
    lengths[rng.permutation(lengths.size)[: len(depths)]] = depths
    return lengths


def random_symbols(rng: np.random.Generator, lengths: np.ndarray, count: int) -> np.ndarray:
    used = np.flatnonzero(lengths)
    # uniform over the used symbols (long codewords), or matched to the code
    uniform = rng.random() < 0.5
    p = np.ones(used.size) if uniform else 2.0 ** -lengths[used].astype(np.float64)
    return rng.choice(used, size=count, p=p / p.sum()).astype(np.uint8)


KINDS = ["huffman", "complete", "incomplete", "single", "deep", "deep-spare"]


@st.composite
def streams(draw, min_count: int = 0, max_count: int = 6000):
    """(symbols, lengths) of a random valid code."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = random_lengths(rng, draw(st.sampled_from(KINDS)))
    count = draw(
        st.one_of(st.integers(min_count, max(min_count, 80)), st.integers(min_count, max_count))
    )
    return random_symbols(rng, lengths, count), lengths


@st.composite
def indexed_streams(draw, min_chunks: int = 1, max_count: int = 6000):
    """(symbols, lengths, chunk): chunk from 1 to count + 5, often small enough for at
    least four whole chunks (the decoder's four-lane path); at least ``min_chunks`` chunks."""
    symbols, lengths = draw(streams(min_count=min_chunks, max_count=max_count))
    count = symbols.size
    top = count + 5 if min_chunks <= 1 else max(1, (count - 1) // (min_chunks - 1))
    low = min(3, top)
    chunk = draw(
        st.one_of(
            st.integers(1, top),
            st.integers(low, max(low, min(top, count // 4))),
            st.sampled_from([1, 2, 3, 4, 8, 16, 1000]).filter(lambda c: c <= top),
        )
    )
    return symbols, lengths, chunk


# --------------------------------------------------------------- 1. the kernels agree


def test_reference_encoder_matches_spec_worked_example():
    """The independent encoder above reproduces spec 5.2's worked example (0x34 0x07)."""
    symbols = np.array([0, 0, 1, 2, 0, 3], dtype=np.uint8)
    lengths = np.array([1, 2, 3, 3], dtype=np.uint8)
    assert reference_stream(symbols, lengths) == (b"\x34\x07", 11)
    # symbols 2 and 4 begin at bits 0+0+1... : 1+1 = 2 and 1+1+2+3 = 7
    assert reference_starts(symbols, lengths, 2).tolist() == [2, 7]
    assert H.chunk_starts(symbols, lengths, 2).tolist() == [2, 7]
    assert H.chunk_starts(symbols, lengths, 6).tolist() == []
    assert H.chunk_starts(symbols, lengths, 1).tolist() == [1, 2, 4, 7, 8]


@native_only
@settings(max_examples=160, deadline=None)
@given(case=indexed_streams())
def test_chunked_decode_matches_plain_decode(case):
    symbols, lengths, chunk = case
    data, total = reference_stream(symbols, lengths)
    starts = reference_starts(symbols, lengths, chunk)
    n = symbols.size
    plain, whole = guarded(n)
    assert NATIVE.huffman_decode(data, lengths, n, plain) == total
    assert np.array_equal(plain, symbols)
    for lanes in (False, True):
        out, whole = guarded(n)
        used = NATIVE.huffman_decode_chunks(data, lengths, n, chunk, starts, out, lanes)
        assert used == total, lanes
        assert np.array_equal(out, symbols), lanes
        assert (whole[n:] == SENTINEL).all(), "wrote past the output"


def check_encoders(symbols, lengths, chunk):
    """The index changes nothing in the stream, and holds the bit of every k*chunk-th
    symbol; the numpy encoder writes the same bytes and the same index."""
    data, total = reference_stream(symbols, lengths)
    expected = reference_starts(symbols, lengths, chunk)
    assert np.array_equal(H.chunk_starts(symbols, lengths, chunk), expected)
    plain, plain_bits, _ = native_encode(symbols, lengths)
    assert (plain, plain_bits) == (data, total)
    indexed, indexed_bits, starts = native_encode(symbols, lengths, chunk)
    assert indexed_bits == total
    assert indexed == data
    assert np.array_equal(starts, expected)
    with backend(None):
        numpy_starts = np.full(expected.size, -1, dtype=np.int64)
        stream = H.encode_symbols(symbols, lengths, chunk=chunk, starts=numpy_starts)
    assert stream.tobytes() == data
    assert np.array_equal(numpy_starts, expected)


@native_only
@settings(max_examples=160, deadline=None)
@given(case=indexed_streams())
def test_encode_with_chunk_index_matches_plain_encode(case):
    """Chunks of 1 to count + 5 symbols (see also the test below, and
    test_encode_with_a_chunk_longer_than_the_stream_stays_inside_the_symbols)."""
    check_encoders(*case)


@native_only
@settings(max_examples=160, deadline=None)
@given(case=indexed_streams())
def test_encode_with_chunk_index_matches_plain_encode_within_the_stream(case):
    """The same, with chunk <= count (so at least one whole chunk)."""
    symbols, lengths, chunk = case
    check_encoders(symbols, lengths, min(chunk, max(symbols.size, 1)))


@settings(max_examples=80, deadline=None)
@given(case=indexed_streams())
def test_decode_symbols_with_index_on_every_backend(case):
    """decode_symbols with the index gives the symbols and used bits on each backend."""
    symbols, lengths, chunk = case
    data, total = reference_stream(symbols, lengths)
    starts = reference_starts(symbols, lengths, chunk)
    for native in (None, NATIVE) if NATIVE is not None else (None,):
        with backend(native):
            got, used = H.decode_symbols(data, lengths, symbols.size, None, chunk, starts)
            assert np.array_equal(got[: symbols.size], symbols)
            if symbols.size:
                assert used == total
            # a list index (as the header holds it) works the same
            got, _ = H.decode_symbols(data, lengths, symbols.size, None, chunk, starts.tolist())
            assert np.array_equal(got[: symbols.size], symbols)


def _wide_stream(count: int, values: int = 200, seed: int = 5):
    """8-bit symbols spread over ``values`` values: codewords averaging over 7 bits, so
    the decoder takes its four-lane path."""
    rng = np.random.default_rng(seed)
    symbols = rng.integers(0, values, size=count).astype(np.uint8)
    lengths = H.huffman_lengths(np.bincount(symbols, minlength=256))
    return symbols, lengths


@native_only
@pytest.mark.parametrize(
    "chunk", [1, 2, 3, 4, 5, 7, 64, 1000, 4095, 4096, 4097, 5000, 9999, 10000, 40_000]
)
def test_long_streams_decode_four_chunks_side_by_side(chunk):
    symbols, lengths = _wide_stream(40_000)
    data, total = native_encode(symbols, lengths)[:2]
    assert total / symbols.size >= H.LANES_MIN_BITS  # the library picks lanes for this
    starts = reference_starts(symbols, lengths, chunk)
    for lanes in (True, False):
        out, whole = guarded(symbols.size)
        used = NATIVE.huffman_decode_chunks(data, lengths, symbols.size, chunk, starts, out, lanes)
        assert used == total
        assert np.array_equal(out, symbols)
        assert (whole[symbols.size :] == SENTINEL).all()
    got, used = H.decode_symbols(data, lengths, symbols.size, None, chunk, starts)
    assert used == total and np.array_equal(got, symbols)


@native_only
@pytest.mark.parametrize("uniform", [True, False])
def test_long_streams_with_15_bit_codewords(uniform):
    """Lengths 1, 2, ..., 15, 15 (every symbol of the deep chain used) over a long
    stream, chunked decoding with and without lanes."""
    rng = np.random.default_rng(9)
    lengths = np.zeros(256, dtype=np.uint8)
    chosen = rng.permutation(256)[:16]
    lengths[chosen] = [*range(1, 16), 15]
    p = np.ones(16) if uniform else 2.0 ** -lengths[chosen].astype(np.float64)
    symbols = rng.choice(chosen, size=30_000, p=p / p.sum()).astype(np.uint8)
    data, total = reference_stream(symbols, lengths)
    assert int(lengths[symbols].max()) == 15
    for chunk in (3, 100, 1024, 7777):
        starts = reference_starts(symbols, lengths, chunk)
        for lanes in (True, False):
            out = np.empty(symbols.size, dtype=np.uint8)
            used = NATIVE.huffman_decode_chunks(
                data, lengths, symbols.size, chunk, starts, out, lanes
            )
            assert used == total and np.array_equal(out, symbols)
        encoded, bits, got_starts = native_encode(symbols, lengths, chunk)
        assert (encoded, bits) == (data, total)
        assert np.array_equal(got_starts, starts)


@native_only
@pytest.mark.parametrize("count", [32_768, 40_001, 40_002, 131_073 + 7])
def test_numpy_encoder_fills_the_index_on_its_paired_path(count):
    """encode_symbols without the kernels (runs of four symbols from 2^15 symbols on)
    fills the same index and bytes as the kernel."""
    symbols, lengths = _wide_stream(count, values=150, seed=count)
    chunk = 1000
    data, total, starts = native_encode(symbols, lengths, chunk)
    with backend(None):
        numpy_starts = np.empty(starts.size, dtype=np.int64)
        stream = H.encode_symbols(symbols, lengths, chunk=chunk, starts=numpy_starts)
    assert stream.tobytes() == data
    assert np.array_equal(numpy_starts, starts)
    assert np.array_equal(starts, reference_starts(symbols, lengths, chunk))


@native_only
@pytest.mark.parametrize("extra", [1, 2])
def test_encode_with_a_chunk_longer_than_the_stream_stays_inside_the_symbols(extra):
    """chunk > len(symbols): one chunk, an empty index, and the same stream as without
    the index. The symbols here are a view of a larger buffer whose next bytes are a
    symbol with a long codeword, so an encoder reading past its input shows up."""
    lengths = np.array([1, 2, 3, 3], dtype=np.uint8)
    buffer = np.array([0, 1, 2, 3, 1, 3, 3, 2, 3, 3, 3, 3], dtype=np.uint8)
    for n in (4, 5, 7):  # not multiples of three (the encoder takes three at a time)
        symbols = buffer[:n]
        data, total = reference_stream(symbols, lengths)
        for chunk in (n + extra, n + 100):
            out = np.zeros(8, dtype=np.uint8)
            starts = np.zeros(0, dtype=np.int64)
            written = NATIVE.huffman_encode(symbols, lengths, out, chunk, starts)
            assert written == total, (n, chunk)
            assert out.tobytes()[: len(data)] == data, (n, chunk)
            assert not out[len(data) :].any(), (n, chunk)
            stream = H.encode_symbols(symbols, lengths, chunk=chunk, starts=starts)
            assert stream.tobytes() == data, (n, chunk)


@native_only
def test_decode_with_a_chunk_near_the_largest_ssize_t():
    """A chunk of 2^63 - 1 symbols (one chunk, an empty index) decodes the whole stream,
    as any chunk >= count does."""
    symbols, lengths = _wide_stream(1000)
    data, total = native_encode(symbols, lengths)[:2]
    for chunk in (1000, 1001, 2**40, 2**62, 2**63 - 1):
        for lanes in (False, True):
            out = np.zeros(symbols.size, dtype=np.uint8)
            empty = np.zeros(0, dtype=np.int64)
            used = NATIVE.huffman_decode_chunks(
                data, lengths, symbols.size, chunk, empty, out, lanes
            )
            assert (used, np.array_equal(out, symbols)) == (total, True), chunk


# ------------------------------------------------------------- 2. wrong starts are caught


@settings(max_examples=150, deadline=None)
@given(
    case=indexed_streams(min_chunks=2),
    which=st.integers(0, 10**6),
    delta=st.integers(1, 7),
    sign=st.sampled_from([-1, 1]),
)
def test_a_moved_start_is_rejected_by_every_route(case, which, delta, sign):
    symbols, lengths, chunk = case
    data, _ = reference_stream(symbols, lengths)
    starts = reference_starts(symbols, lengths, chunk)
    assume(starts.size >= 1)
    k = which % starts.size
    moved = starts.copy()
    moved[k] = min(max(moved[k] + sign * delta, 0), 8 * len(data))
    assume(moved[k] != starts[k])
    if NATIVE is not None:
        for lanes in (False, True):
            out = np.zeros(symbols.size, dtype=np.uint8)
            with pytest.raises(ValueError):
                NATIVE.huffman_decode_chunks(data, lengths, symbols.size, chunk, moved, out, lanes)
        with pytest.raises(ValueError):
            H.decode_symbols(data, lengths, symbols.size, None, chunk, moved)
    with backend(None), pytest.raises(ValueError):
        H.decode_symbols(data, lengths, symbols.size, None, chunk, moved)


@native_only
@settings(max_examples=150, deadline=None)
@given(case=indexed_streams(), runs=st.integers(1, 7), data=st.data())
def test_fused_dequantize_checks_the_index_across_runs(case, runs, data):
    """huffman_dequantize with a chunk index (the route of streams too short-coded for the
    lanes) gives the values it gives without one, whatever the runs (per-channel scales)
    and chunks, and rejects any moved start."""
    symbols, lengths, chunk = case
    n = symbols.size - symbols.size % runs
    symbols = symbols[:n]
    assume(n > 0)
    stream, total = reference_stream(symbols, lengths)
    starts = reference_starts(symbols, lengths, chunk)
    scale = np.linspace(0.5, 2.0, runs, dtype=np.float32)
    zero = np.linspace(-3.0, 7.0, runs, dtype=np.float32)
    want = np.empty(n, np.float32)
    assert NATIVE.huffman_dequantize(stream, lengths, n, scale, zero, want) == total
    got = np.empty(n, np.float32)
    assert NATIVE.huffman_dequantize(stream, lengths, n, scale, zero, got, chunk, starts) == total
    assert np.array_equal(bits_of(got), bits_of(want))
    assume(starts.size >= 1)
    moved = starts.copy()
    k = data.draw(st.integers(0, starts.size - 1))
    shift = data.draw(st.sampled_from([-3, -1, 1, 2, 7]))
    moved[k] = min(max(moved[k] + shift, 0), 8 * len(stream))
    assume(moved[k] != starts[k])
    with pytest.raises(ValueError, match="chunk_starts"):
        NATIVE.huffman_dequantize(stream, lengths, n, scale, zero, got, chunk, moved)


@native_only
def test_fused_dequantize_rejects_a_bad_index_buffer():
    symbols, lengths = _wide_stream(100)
    stream, _ = reference_stream(symbols, lengths)
    one, out = np.ones(1, np.float32), np.empty(100, np.float32)
    starts = reference_starts(symbols, lengths, 30)
    for chunk, bad in ((30, starts[:-1]), (30, _misaligned_copy(starts)), (-1, starts)):
        with pytest.raises(ValueError, match="bad chunk"):
            NATIVE.huffman_dequantize(stream, lengths, 100, one, one, out, chunk, bad)


@native_only
def test_every_moved_start_of_a_long_stream_is_rejected_in_the_lanes():
    """Each start of a 40-chunk stream, moved by -7..+7 bits: rejected by the four-lane
    decoder (whichever lane or tail holds it) and by the one-chunk-at-a-time decoder."""
    symbols, lengths = _wide_stream(40 * 256 + 77, seed=11)
    chunk = 256
    data, _ = native_encode(symbols, lengths)[:2]
    starts = reference_starts(symbols, lengths, chunk)
    out = np.empty(symbols.size, dtype=np.uint8)
    for k in range(starts.size):
        for delta in (-7, -3, -1, 1, 2, 7):
            moved = starts.copy()
            moved[k] += delta
            for lanes in (True, False):
                with pytest.raises(ValueError, match="chunk|codeword|early"):
                    NATIVE.huffman_decode_chunks(
                        data, lengths, symbols.size, chunk, moved, out, lanes
                    )
    # two starts swapped, and every start equal: also wrong
    swapped = starts.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    for bad in (swapped, np.full_like(starts, starts[5])):
        for lanes in (True, False):
            with pytest.raises(ValueError):
                NATIVE.huffman_decode_chunks(data, lengths, symbols.size, chunk, bad, out, lanes)


def _corrupt(rng: np.random.Generator, data: bytes) -> bytes:
    blob = bytearray(data)
    how = rng.integers(4)
    if how == 0 or len(blob) < 2:  # flip one to three bits
        for _ in range(int(rng.integers(1, 4))):
            if blob:
                blob[int(rng.integers(len(blob)))] ^= 1 << int(rng.integers(8))
    elif how == 1:  # one random byte
        blob[int(rng.integers(len(blob)))] = int(rng.integers(256))
    elif how == 2:  # the last byte dropped
        del blob[-1]
    else:  # a byte added
        blob.append(int(rng.integers(256)))
    return bytes(blob)


@native_only
@settings(max_examples=200, deadline=None)
@given(case=indexed_streams(min_chunks=1, max_count=3000), seed=st.integers(0, 2**32 - 1))
def test_corrupt_streams_chunked_decode_agrees_with_plain_decode(case, seed):
    """With a correct index and damaged bytes: the chunked decoder (lanes on and off)
    accepts exactly when the plain decoder accepts and the index matches what it decoded,
    with the same symbols and used bits."""
    symbols, lengths, chunk = case
    assume(symbols.size > 0)
    data, _ = reference_stream(symbols, lengths)
    starts = reference_starts(symbols, lengths, chunk)
    bad = _corrupt(np.random.default_rng(seed), data)
    n = symbols.size
    plain = np.zeros(n, dtype=np.uint8)
    try:
        used = NATIVE.huffman_decode(bad, lengths, n, plain)
        expected = ("ok", used, plain.tobytes())
        if not np.array_equal(reference_starts(plain, lengths, chunk), starts):
            expected = ("error",)
    except ValueError:
        expected = ("error",)
    for lanes in (False, True):
        out = np.zeros(n, dtype=np.uint8)
        try:
            used = NATIVE.huffman_decode_chunks(bad, lengths, n, chunk, starts, out, lanes)
            got = ("ok", used, out.tobytes())
        except ValueError:
            got = ("error",)
        assert got == expected, lanes


# ------------------------------------------------------------- 3. hostile kernel arguments


def _hostile_base():
    symbols, lengths = _wide_stream(1000, seed=3)
    data, total = native_encode(symbols, lengths)[:2]
    chunk = 64
    starts = reference_starts(symbols, lengths, chunk)
    return symbols, lengths, data, total, chunk, starts


def _misaligned_copy(starts: np.ndarray) -> np.ndarray:
    raw = np.zeros(starts.nbytes + 16, dtype=np.uint8)
    view = raw[1 : 1 + starts.nbytes]
    view[:] = starts.view(np.uint8)
    assert view.ctypes.data % 8 != 0
    return view


def _hostile_cases():
    """name -> function(base) returning the argument tuple of huffman_decode_chunks
    (with ``out`` replaced by its size), and the errors allowed."""

    def args(base, **kw):
        symbols, lengths, data, _, chunk, starts = base
        a = dict(
            data=data, lengths=lengths, count=symbols.size, chunk=chunk, starts=starts,
            out=symbols.size, lanes=True,
        )  # fmt: skip
        a.update(kw)
        return a

    value = (ValueError,)
    return {
        "chunk 0": (lambda b: args(b, chunk=0), value),
        "chunk -1": (lambda b: args(b, chunk=-1), value),
        "chunk -2**63": (lambda b: args(b, chunk=-(2**63)), value),
        "chunk 2**64": (lambda b: args(b, chunk=2**64), (ValueError, OverflowError)),
        "chunk 1.5": (lambda b: args(b, chunk=1.5), (TypeError,)),
        "starts one short": (lambda b: args(b, starts=b[5][:-1].copy()), value),
        "starts one long": (lambda b: args(b, starts=np.append(b[5], b[5][-1])), value),
        "starts empty": (lambda b: args(b, starts=np.zeros(0, np.int64)), value),
        "starts one byte long": (
            lambda b: args(b, starts=np.append(b[5].view(np.uint8), np.uint8(0))),
            value,
        ),
        "starts int32": (lambda b: args(b, starts=b[5].astype(np.int32)), value),
        "starts misaligned": (lambda b: args(b, starts=_misaligned_copy(b[5])), value),
        "starts strided": (
            lambda b: args(b, starts=np.repeat(b[5], 2)[::2]),
            (ValueError, TypeError, BufferError),
        ),
        "starts a list": (lambda b: args(b, starts=b[5].tolist()), (TypeError,)),
        "start negative": (
            lambda b: args(b, starts=np.where(np.arange(b[5].size) == 3, -1, b[5])),
            value,
        ),
        "start -2**63": (lambda b: args(b, starts=np.concatenate(([-(2**63)], b[5][1:]))), value),
        "start past the data": (
            lambda b: args(b, starts=np.concatenate((b[5][:-1], [8 * len(b[2]) + 1]))),
            value,
        ),
        "start 2**63-1": (lambda b: args(b, starts=np.concatenate(([2**63 - 1], b[5][1:]))), value),
        "starts all at the end": (
            lambda b: args(b, starts=np.full_like(b[5], 8 * len(b[2]))),
            value,
        ),
        "starts all zero": (lambda b: args(b, starts=np.zeros_like(b[5])), value),
        "starts decreasing": (lambda b: args(b, starts=b[5][::-1].copy()), value),
        "out one short": (lambda b: args(b, out=b[0].size - 1), value),
        "out empty": (lambda b: args(b, out=0), value),
        "count negative": (lambda b: args(b, count=-1), value),
        "count -2**63": (lambda b: args(b, count=-(2**63)), value),
        "count too large": (
            lambda b: args(b, count=8 * len(b[2]) + 1, out=8 * len(b[2]) + 1),
            value,
        ),
        "count huge": (lambda b: args(b, count=2**62), value),
        "data truncated": (lambda b: args(b, data=b[2][:-40]), value),
        "data empty": (lambda b: args(b, data=b""), value),
        "data a str": (lambda b: args(b, data="abc"), (TypeError,)),
        "lengths 257 entries": (lambda b: args(b, lengths=np.ones(257, np.uint8)), value),
        "lengths not a prefix code": (lambda b: args(b, lengths=np.ones(4, np.uint8)), value),
        "lengths of 16": (lambda b: args(b, lengths=np.full(2, 16, np.uint8)), value),
        "lengths all zero": (lambda b: args(b, lengths=np.zeros(256, np.uint8)), value),
    }


HOSTILE = _hostile_cases()


@native_only
@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("lanes", [True, False])
def test_hostile_chunked_decode_arguments_raise(name, lanes):
    make, errors = HOSTILE[name]
    base = _hostile_base()
    a = make(base)
    before = None if isinstance(a["starts"], list) else np.array(a["starts"], copy=True)
    out, whole = guarded(a["out"])
    with pytest.raises(errors):
        NATIVE.huffman_decode_chunks(
            a["data"], a["lengths"], a["count"], a["chunk"], a["starts"], out, lanes
        )
    if before is not None:
        assert np.array_equal(np.asarray(a["starts"]), before), "starts changed"
    assert (whole[a["out"] :] == SENTINEL).all(), "wrote past the output"


@native_only
def test_chunked_decode_rejects_a_read_only_output():
    symbols, lengths, data, _, chunk, starts = _hostile_base()
    with pytest.raises(TypeError):
        NATIVE.huffman_decode_chunks(data, lengths, symbols.size, chunk, starts, bytes(1000), True)


@native_only
def test_chunked_decode_error_messages():
    symbols, lengths, data, _, chunk, starts = _hostile_base()
    out = np.empty(symbols.size, dtype=np.uint8)
    n = symbols.size
    with pytest.raises(ValueError, match="bad chunk or chunk_starts"):
        NATIVE.huffman_decode_chunks(data, lengths, n, 0, starts, out, True)
    with pytest.raises(ValueError, match="bad chunk or chunk_starts"):
        NATIVE.huffman_decode_chunks(data, lengths, n, chunk, starts[:-1].copy(), out, True)
    moved = starts.copy()
    moved[2] += 1
    with pytest.raises(ValueError, match="does not begin a chunk where chunk_starts says"):
        NATIVE.huffman_decode_chunks(data, lengths, n, chunk, moved, out, False)
    with pytest.raises(ValueError, match="ends early"):
        NATIVE.huffman_decode_chunks(data[:-1], lengths, n, chunk, starts, out, False)
    # an incomplete code: the pattern of all ones is no codeword
    lengths2 = np.array([1, 2], dtype=np.uint8)  # codewords 0 and 10; 11 is none
    with pytest.raises(ValueError, match="invalid codeword"):
        NATIVE.huffman_decode_chunks(b"\xff", lengths2, 4, 2, np.array([2]), out, False)


@native_only
@pytest.mark.parametrize(
    "name, make, errors",
    [
        ("chunk -1", lambda s: (-1, np.zeros(0, np.int64)), (ValueError,)),
        ("chunk without starts", lambda s: (64,), (ValueError,)),
        ("starts one short", lambda s: (64, s[:-1].copy()), (ValueError,)),
        ("starts one long", lambda s: (64, np.zeros(s.size + 1, np.int64)), (ValueError,)),
        ("starts misaligned", lambda s: (64, _misaligned_copy(s)), (ValueError,)),
        ("starts read-only", lambda s: (64, s.tobytes()), (TypeError,)),
        ("starts a list", lambda s: (64, s.tolist()), (TypeError,)),
        ("chunk 1.5", lambda s: (1.5, s), (TypeError,)),
    ],
)
def test_hostile_encode_arguments_raise(name, make, errors):
    symbols, lengths, data, _, _, starts = _hostile_base()
    out, whole = guarded(len(data))
    extra = make(np.zeros_like(starts))
    with pytest.raises(errors):
        NATIVE.huffman_encode(symbols, lengths, out, *extra)
    assert (whole[len(data) :] == SENTINEL).all()


@native_only
def test_encode_with_chunk_into_a_short_output_raises():
    symbols, lengths, data, _, chunk, starts = _hostile_base()
    out, whole = guarded(len(data) - 1)
    got = np.zeros_like(starts)
    with pytest.raises(ValueError, match="too short"):
        NATIVE.huffman_encode(symbols, lengths, out, chunk, got)
    assert (whole[len(data) - 1 :] == SENTINEL).all()


# --------------------------------------------------------------------- 4. the writer


INDEX_MIN = 1500  # symbols from which the patched writer adds an index
CHUNK = 97  # symbols per chunk in the patched writer (divides no stream here)
BITS = {"w8": 8, "w4": 4, "w2": 2, "small": 8}


@cache
def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    return {
        "w8": rng.laplace(size=(5, 1801)).astype(np.float32),  # group 1: 9005 symbols
        "w4": rng.standard_normal((4, 2000)).astype(np.float32),
        "w2": rng.standard_normal((3, 3001)).astype(np.float32),  # groups of 2-4 codes
        "small": rng.laplace(size=(2, 700)).astype(np.float32),  # under INDEX_MIN
        "bias": rng.standard_normal(50).astype(np.float32),  # 1-D: raw
    }


@contextlib.contextmanager
def index_writer(chunk: int = CHUNK, index_min: int = INDEX_MIN):
    """The writer, indexing streams of ``index_min`` symbols or more in chunks of exactly
    ``chunk`` (the library's own policy is tested on its own)."""

    def fixed(count: int, *_) -> int | None:
        return chunk if count >= index_min else None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwriter, "index_chunk", fixed)
        yield


@cache
def indexed_file(
    native_writer: bool = False,
    scheme: str = "asymmetric-per-channel",
    chunk: int = CHUNK,
    index_min: int = INDEX_MIN,
) -> bytes:
    with backend(NATIVE if native_writer else None), index_writer(chunk, index_min):
        return qpack.encode(_weights(), bits=BITS, scheme=scheme, entropy=True)


@cache
def packed_file(scheme: str = "asymmetric-per-channel") -> bytes:
    with backend(None):
        return qpack.encode(_weights(), bits=BITS, scheme=scheme, entropy=False)


def _symbols_of(entry, payload) -> np.ndarray:
    """The stream's symbols, decoded without the index."""
    count = -(-entry.numel // entry.group)
    with backend(None):
        symbols, _ = H.decode_symbols(bytes(payload), entry.code_lengths, count)
    return np.asarray(symbols)


def decode_all(blob: bytes, native) -> dict[str, np.ndarray]:
    with backend(native):
        return qreader.decode(blob)


def test_patched_writer_indexes_long_streams_only():
    reader = qreader.Reader(indexed_file())
    assert reader.header.version == (1, 2)
    storage = {e.name: e.storage for e in reader.header.tensors}
    assert storage == {"w8": "huffman", "w4": "huffman", "w2": "huffman", "small": "huffman",
                       "bias": "raw"}  # fmt: skip
    indexed = set()
    for entry in reader.header.tensors:
        if entry.storage != "huffman":
            continue
        count = -(-entry.numel // entry.group)
        if count < INDEX_MIN:
            assert entry.chunk is None and entry.chunk_starts is None, entry.name
            continue
        indexed.add(entry.name)
        assert entry.chunk == CHUNK
        assert len(entry.chunk_starts) == -(-count // CHUNK) - 1
        symbols = _symbols_of(entry, reader.payload(entry))
        expected = reference_starts(symbols, entry.code_lengths, CHUNK)
        assert np.array_equal(np.asarray(entry.chunk_starts), expected), entry.name
    assert indexed >= {"w8", "w4", "w2"}
    assert any(e.group > 1 for e in reader.header.tensors if e.name in indexed)


@native_only
@pytest.mark.parametrize("scheme", ["asymmetric-per-channel", "symmetric-per-layer"])
def test_both_backends_write_the_same_indexed_file(scheme):
    assert indexed_file(True, scheme) == indexed_file(False, scheme)


@pytest.mark.parametrize("scheme", ["asymmetric-per-channel", "symmetric-per-layer"])
@pytest.mark.parametrize("native", BACKENDS)
def test_indexed_files_decode_to_the_fixed_width_values(scheme, native):
    expected = decode_all(packed_file(scheme), None)
    got = decode_all(indexed_file(False, scheme), native)
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        if value.dtype == np.float32:
            assert np.array_equal(bits_of(got[name]), bits_of(value)), name
        else:
            assert np.array_equal(got[name], value), name
    with backend(native):
        reader = qreader.Reader(indexed_file(False, scheme))
        for name in ("w8", "w2"):
            assert np.array_equal(bits_of(reader.array(name)), bits_of(expected[name]))


CHUNK_SIZES = [1, 2, 3, 50, 1000, 3000, 3001, 3002, 4000, 8000, 8001, 9004, 9005, 9006, 10**6]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_chunk_sizes_round_trip(chunk):
    """Chunks of one symbol, and just below, at and above a stream's length (w8: 9005
    symbols, w4 8000, w2 3001 with the default scheme): the numpy writer's file holds the
    right index and reads back the same on both backends."""
    expected = decode_all(packed_file(), None)
    blob = indexed_file(False, chunk=chunk)
    reader = qreader.Reader(blob)
    indexed = 0
    for entry in reader.header.tensors:
        if entry.chunk is not None:
            indexed += 1
            count = -(-entry.numel // entry.group)
            assert len(entry.chunk_starts) == max(-(-count // chunk) - 1, 0)
            symbols = _symbols_of(entry, reader.payload(entry))
            expected_starts = reference_starts(symbols, entry.code_lengths, chunk)
            assert np.array_equal(np.asarray(entry.chunk_starts), expected_starts)
    assert indexed == 3
    for native in (None, NATIVE) if NATIVE is not None else (None,):
        got = decode_all(blob, native)
        for name in ("w8", "w4", "w2", "small"):
            assert np.array_equal(bits_of(got[name]), bits_of(expected[name])), name


@native_only
@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_native_writer_matches_numpy_writer_for_every_chunk_size(chunk):
    assert indexed_file(True, chunk=chunk) == indexed_file(False, chunk=chunk)


def test_header_version_follows_the_index():
    assert qreader.Reader(indexed_file()).header.version == (1, 2)
    unindexed = indexed_file(index_min=1 << 40)  # nothing long enough: Huffman only
    reader = qreader.Reader(unindexed)
    assert reader.header.version == (1, 1)
    assert all(e.chunk is None for e in reader.header.tensors)
    assert any(e.storage == "huffman" for e in reader.header.tensors)
    assert qreader.Reader(packed_file()).header.version == (1, 0)
    # the same tensors, with and without the index, hold the same stream bytes
    a, b = qreader.Reader(indexed_file()), qreader.Reader(unindexed)
    for entry in a.header.tensors:
        assert bytes(a.payload(entry)) == bytes(b.payload(b.entry(entry.name))), entry.name
    # the default writer (index from 2^14 symbols) leaves these small tensors unindexed
    assert H.CHUNK_INDEX_MIN == H.CHUNK_SYMBOLS == 1 << 14
    plain = qpack.encode(_weights(), bits=BITS, entropy=True)
    assert qreader.Reader(plain).header.version == (1, 1)


def test_one_indexed_tensor_makes_the_file_1_2():
    weights = {"small": _weights()["small"], "w8": _weights()["w8"]}
    with index_writer():
        blob = qpack.encode(weights, bits=8, entropy=True)
    reader = qreader.Reader(blob)
    assert [e.chunk is not None for e in reader.header.tensors] == [False, True]
    assert reader.header.version == (1, 2)
    with index_writer():
        blob = qpack.encode({"small": _weights()["small"]}, bits=8, entropy=True)
    assert qreader.Reader(blob).header.version == (1, 1)


# ------------------------------------------------------------ re-framed headers (5, 6)


DELETE = object()


def _edited(blob: bytes, name: str, version=None, **changes) -> bytes:
    """The file with tensor ``name``'s header keys changed (DELETE removes one)."""
    header, data, old = split_file(blob)
    (raw,) = [t for t in header["tensors"] if t["name"] == name]
    for key, value in changes.items():
        if value is DELETE:
            raw.pop(key, None)
        else:
            raw[key] = value
    return frame_file(header, data, version or old)


def _starts(blob: bytes, name: str) -> list[int]:
    header, _, _ = split_file(blob)
    (raw,) = [t for t in header["tensors"] if t["name"] == name]
    return list(raw["chunk_starts"])


def test_reframing_keeps_a_file_intact():
    blob = indexed_file()
    header, data, version = split_file(blob)
    assert frame_file(header, data, version) == blob


@pytest.mark.parametrize("native", BACKENDS)
def test_an_old_readers_view_decodes_the_same(native):
    """Without chunk and chunk_starts (and as version 1.1), every tensor decodes to the
    same values: the index does not change the stream."""
    blob = indexed_file()
    header, data, _ = split_file(blob)
    for raw in header["tensors"]:
        raw.pop("chunk", None)
        raw.pop("chunk_starts", None)
    stripped = frame_file(header, data, (1, 1))
    reader = qreader.Reader(stripped)
    assert reader.header.version == (1, 1)
    assert all(e.chunk is None and e.chunk_starts is None for e in reader.header.tensors)
    expected = decode_all(blob, None)
    got = decode_all(stripped, native)
    for name, value in expected.items():
        assert np.array_equal(got[name].view(np.uint8), value.view(np.uint8)), name


@pytest.mark.parametrize("native", BACKENDS)
def test_a_1_1_file_with_unknown_minor_keys_still_decodes(native):
    """A 1.1 file carrying the index (e.g. copied by an old tool) is read as 1.2 data."""
    blob = indexed_file()
    header, data, _ = split_file(blob)
    again = frame_file(header, data, (1, 1))
    expected = decode_all(blob, None)
    got = decode_all(again, native)
    assert np.array_equal(bits_of(got["w8"]), bits_of(expected["w8"]))


BAD_HEADERS = {
    "chunk missing": {"chunk": DELETE},
    "chunk_starts missing": {"chunk_starts": DELETE},
    "chunk 0": {"chunk": 0},
    "chunk -1": {"chunk": -1},
    "chunk True": {"chunk": True},
    "chunk 1.5": {"chunk": 1.5},
    "chunk 97.0": {"chunk": 97.0},
    "chunk a string": {"chunk": "97"},
    "chunk None": {"chunk": None},
    "starts not an array": {"chunk_starts": 5},
    "starts bytes": {"chunk_starts": b"\x00" * 8},
    "starts a map": {"chunk_starts": {"0": 1}},
    "starts None": {"chunk_starts": None},
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_index_headers_are_bad_header(case):
    blob = _edited(indexed_file(), "w8", **BAD_HEADERS[case])
    with pytest.raises(E.HeaderError) as info:
        qreader.Reader(blob)
    assert info.value.code == "bad-header"
    assert type(info.value) is E.HeaderError
    assert info.value.tensor == "w8"


@pytest.mark.parametrize(
    "edit",
    [
        "bool entry",
        "true entry",
        "float entry",
        "string entry",
        "nested entry",
        "one too many",
        "one too few",
        "empty",
        "none entry",
    ],
)
def test_bad_chunk_starts_are_bad_header(edit):
    blob = indexed_file()
    starts = _starts(blob, "w8")
    changed = {
        "bool entry": lambda s: [False, *s[1:]],
        "true entry": lambda s: [*s[:-1], True],
        "float entry": lambda s: [float(s[0]), *s[1:]],
        "string entry": lambda s: [str(s[0]), *s[1:]],
        "nested entry": lambda s: [[s[0]], *s[1:]],
        "one too many": lambda s: [*s, s[-1]],
        "one too few": lambda s: s[:-1],
        "empty": lambda s: [],
        "none entry": lambda s: [None, *s[1:]],
    }[edit](starts)
    with pytest.raises(E.HeaderError) as info:
        qreader.Reader(_edited(blob, "w8", chunk_starts=changed))
    assert info.value.code == "bad-header"
    assert info.value.tensor == "w8"


def _bounds(blob: bytes, name: str) -> tuple[list[int], list[int], list[int]]:
    """Each start's true value and its bounds of spec 5.2."""
    entry = qreader.Reader(blob).entry(name)
    lengths = entry.code_lengths[entry.code_lengths > 0]
    lmin, lmax = int(lengths.min()), int(lengths.max())
    true = [int(v) for v in entry.chunk_starts]
    low = [(k + 1) * entry.chunk * lmin for k in range(len(true))]
    high = [min((k + 1) * entry.chunk * lmax, 8 * entry.length) for k in range(len(true))]
    return true, low, high


@pytest.mark.parametrize("name", ["w8", "w2"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("side", ["below", "above", "negative", "huge"])
def test_a_start_out_of_bounds_is_bad_layout(name, where, side):
    blob = indexed_file()
    true, low, high = _bounds(blob, name)
    k = {"first": 0, "middle": len(true) // 2, "last": len(true) - 1}[where]
    value = {
        "below": low[k] - 1,
        "above": high[k] + 1,
        "negative": -1,
        "huge": 2**64 - 1,
    }[side]
    starts = list(true)
    starts[k] = value
    with pytest.raises(E.LayoutError) as info:
        qreader.Reader(_edited(blob, name, chunk_starts=starts))
    assert info.value.code == "bad-layout"
    assert info.value.tensor == name


def test_bounds_of_the_test_file_leave_room():
    """The moved-start tests below need starts strictly inside their bounds."""
    for name in ("w8", "w4", "w2"):
        true, low, high = _bounds(indexed_file(), name)
        assert all(lo < t < hi for t, lo, hi in zip(true, low, high, strict=True)), name


def _moved(blob: bytes, name: str, k: int, value: int) -> bytes:
    starts = _starts(blob, name)
    starts[k] = value
    return _edited(blob, name, chunk_starts=starts)


def _wrong_starts(blob: bytes, name: str):
    """(k, value) pairs of wrong starts that lie within the bounds."""
    true, low, high = _bounds(blob, name)
    last = len(true) - 1
    mid = last // 2
    cases = [(0, true[0] + 1), (0, true[0] - 7), (mid, true[mid] + 3), (last, true[last] - 1)]
    cases += [(0, low[0]), (last, high[last]), (mid, true[min(mid + 1, last)])]
    return [(k, v) for k, v in cases if low[k] <= v <= high[k] and v != true[k]]


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("name", ["w8", "w4", "w2"])
def test_a_wrong_start_within_bounds_is_bad_data(native, name):
    blob = indexed_file()
    cases = _wrong_starts(blob, name)
    assert len(cases) >= 5
    expected = decode_all(blob, None)
    for k, value in cases:
        bad = _moved(blob, name, k, value)
        with backend(native):
            reader = qreader.Reader(bad)  # the header is valid
            assert reader.entry(name).chunk_starts[k] == value
            for other in ("small", "bias", *(n for n in ("w8", "w4", "w2") if n != name)):
                assert np.array_equal(
                    reader.array(other).view(np.uint8), expected[other].view(np.uint8)
                ), other
            with pytest.raises(E.DataError) as info:
                reader.array(name)
            assert info.value.code == "bad-data"
            assert info.value.tensor == name
            with pytest.raises(E.DataError) as info:
                qreader.decode(bad)
            assert info.value.tensor == name
            with pytest.raises(E.DataError):
                reader.verify()


def _with_payload(blob: bytes, name: str, payload: bytes) -> bytes:
    """The file with tensor ``name``'s bytes replaced (same length, CRC kept valid)."""
    header, data, version = split_file(blob)
    (raw,) = [t for t in header["tensors"] if t["name"] == name]
    assert len(payload) == raw["length"]
    data = data[: raw["offset"]] + payload + data[raw["offset"] + raw["length"] :]
    raw["crc32"] = zlib.crc32(payload)
    return frame_file(header, data, version)


def _outcome(blob: bytes, native):
    try:
        with backend(native):
            values = qreader.Reader(blob).array("w8")
        return ("ok", bits_of(values).tobytes())
    except E.QpackError as exc:
        return (exc.code, exc.tensor)


@native_only
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 3))
def test_damaged_indexed_streams_are_judged_alike_by_both_backends(seed, flips):
    """Bit flips in an indexed stream (CRC kept valid): both backends raise bad-data, or
    both decode the same values."""
    blob = indexed_file()
    entry = qreader.Reader(blob).entry("w8")
    payload = bytearray(qreader.Reader(blob).payload(entry))
    rng = np.random.default_rng(seed)
    for _ in range(flips):
        payload[int(rng.integers(len(payload)))] ^= 1 << int(rng.integers(8))
    bad = _with_payload(blob, "w8", bytes(payload))
    numpy_result, native_result = _outcome(bad, None), _outcome(bad, NATIVE)
    assert numpy_result == native_result
    assert numpy_result[0] in ("ok", "bad-data")
    if numpy_result[0] != "ok":
        assert numpy_result[1] == "w8"


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("chunk", [9005, 9006, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1])
def test_a_chunk_of_at_least_the_stream_with_no_starts_decodes(native, chunk):
    """chunk >= S symbols: K = 1 chunk and chunk_starts = [] (spec 5.2); msgpack allows
    any chunk up to 2^64 - 1 and the spec sets no upper limit, so the file is valid and
    decodes to the values of the unindexed stream (w8 has 9005 symbols)."""
    blob = indexed_file()
    assert qreader.Reader(blob).entry("w8").numel == 9005
    bad = _edited(blob, "w8", chunk=chunk, chunk_starts=[])
    expected = decode_all(blob, None)
    try:
        reader = qreader.Reader(bad)
        with backend(native):
            got = reader.array("w8")
    except E.QpackError as exc:  # pragma: no cover - a failure, reported below
        pytest.fail(f"a valid file was rejected: {exc.code}: {exc}")
    assert reader.entry("w8").chunk == chunk
    assert np.array_equal(bits_of(got), bits_of(expected["w8"]))


def test_every_start_wrong_in_the_header_is_caught_by_both_backends():
    """All starts shifted by one bit, but each still in its bounds: bad-data, not a
    wrong decode, on both backends."""
    blob = indexed_file()
    true, low, high = _bounds(blob, "w4")
    shifted = [t + 1 if t + 1 <= hi else t - 1 for t, hi in zip(true, high, strict=True)]
    assert all(lo <= s <= hi for s, lo, hi in zip(shifted, low, high, strict=True))
    bad = _edited(blob, "w4", chunk_starts=shifted)
    for native in (None, NATIVE) if NATIVE is not None else (None,):
        with backend(native), pytest.raises(E.DataError) as info:
            qreader.Reader(bad).array("w4")
        assert (info.value.code, info.value.tensor) == ("bad-data", "w4")


# --------------------------------------------------------------------- 7. torch device


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("scheme", ["asymmetric-per-channel", "symmetric-per-layer"])
def test_device_decoder_matches_numpy_on_indexed_files(native, scheme):
    pytest.importorskip("torch")
    from qpack.device import decode_on_device

    blob = indexed_file(False, scheme)
    expected = decode_all(blob, None)
    with backend(native):
        reader = qreader.Reader(blob)
        for entry in reader.header.tensors:
            if entry.storage == "raw":
                continue
            got = decode_on_device(entry, reader.payload(entry), "cpu")
            assert tuple(got.shape) == entry.shape
            assert np.array_equal(bits_of(got.numpy()), bits_of(expected[entry.name]))
        assert reader.entry("w8").chunk is not None


@pytest.mark.parametrize("native", BACKENDS)
def test_device_decoder_rejects_a_wrong_start(native):
    pytest.importorskip("torch")
    from qpack.device import decode_on_device

    blob = indexed_file()
    k, value = _wrong_starts(blob, "w8")[0]
    bad = _moved(blob, "w8", k, value)
    with backend(native):
        reader = qreader.Reader(bad)
        entry = reader.entry("w8")
        with pytest.raises(E.DataError) as info:
            decode_on_device(entry, reader.payload(entry), "cpu")
    assert (info.value.code, info.value.tensor) == ("bad-data", "w8")


@pytest.mark.parametrize(
    "count", [1, 3, 4, 16383, 16384, 16385, 20_000, 65_535, 65_536, 65_537, 331_776, 10**7]
)
def test_index_chunk_policy(count):
    """The writer's chunks: none under 2^14 symbols; else at most 16384 symbols, a multiple
    of four whole chunks, and fewer symbols left over than there are chunks."""
    chunk = H.index_chunk(count, count)  # 8-bit codewords: four lanes pay
    if count < H.CHUNK_INDEX_MIN:
        assert chunk is None
        return
    whole = count // chunk
    assert 1 <= chunk <= H.CHUNK_SYMBOLS
    assert whole % H.LANES == 0
    assert count - whole * chunk < whole  # under one leftover symbol per chunk
    # no larger chunk keeps the same number of four-chunk steps
    assert count // (chunk + 1) < whole or (chunk + 1) > H.CHUNK_SYMBOLS


def test_default_writer_indexes_streams_from_2_14_symbols_for_four_lanes():
    """A 20000-symbol 8-bit stream gets four chunks of 5000 (three starts); it decodes the
    same as without the index, through every route."""
    rng = np.random.default_rng(7)
    weights = {"w": rng.laplace(size=(8, 2500)).astype(np.float32)}
    blob = qpack.encode(weights, bits=8, scheme="asymmetric-per-layer", entropy=True)
    entry = qreader.Reader(blob).entry("w")
    assert entry.storage == "huffman" and entry.group == 1
    assert entry.chunk == 5000 and len(entry.chunk_starts) == 3
    with index_writer(index_min=1 << 40):
        plain = qpack.encode(weights, bits=8, scheme="asymmetric-per-layer", entropy=True)
    assert qreader.Reader(plain).entry("w").chunk is None
    for native in (None, NATIVE) if NATIVE is not None else (None,):
        got, want = decode_all(blob, native), decode_all(plain, native)
        assert np.array_equal(bits_of(got["w"]), bits_of(want["w"]))


def test_short_codewords_get_an_index_only_on_long_streams():
    """Four-lane decoding pays from 4 bits per codeword: shorter ones get no index under
    2^18 symbols (it would only cost bytes), and one from 2^18 (for parallel decoders)."""
    for count in (1 << 14, 100_000, (1 << 18) - 1):
        assert H.index_chunk(count, -(-count // 2)) is not None  # 4 bits a codeword
        assert H.index_chunk(count, count * 3 // 8) is None  # 3 bits
    assert H.index_chunk(1 << 18, (1 << 18) // 8) == 1 << 14  # 1 bit: long, indexed

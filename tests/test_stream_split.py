"""One Huffman stream decoded in ranges of whole chunks on several threads (spec 5.2's
chunk index; ``reader._Split``, ``decoder.split_ranges`` and ``decode_range``, the
kernels' ``first`` and ``last``).

Covered here:

* a split decode gives the bits of the whole decode and of the numpy route, over shapes,
  widths (fractional ones too), granularities, Huffman groups, chunk sizes, ranges and
  threads, through every reader path that splits;
* the kernels write only their range and refuse ranges that are not whole chunks;
* a damaged stream (a later chunk's bytes, a later chunk start, the stream's end, the
  last symbol's padding codes) raises the error a sequential reader raises, for the first
  bad tensor in file order;
* which tensors a load splits, and the peak memory of a split Huffman bomb.

Splits are forced by patching ``Reader._pieces`` (the policy is tested on its own). The
numpy route never splits: its tests here check that it decodes as before.
"""

from __future__ import annotations

import contextlib
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import qpack
import qpack.numpy
from qpack import decoder as D
from qpack import entropy as H
from qpack import errors as E
from qpack import kernels
from qpack import reader as qreader
from qpack import writer as qwriter
from qpack.bitpack import pack_codes
from qpack.container import TensorEntry, frame_file, split_file

NATIVE = kernels.native
native_only = pytest.mark.skipif(NATIVE is None, reason="qpack._ckernels is not built")
SCHEMES = {
    "tensor": ["asymmetric-per-layer"],
    "channel": ["asymmetric-per-channel", "mse-per-channel"],
    "group": ["asymmetric-per-group-7", "symmetric-per-group-32", "mse-per-group-64"],
}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def backend(native):
    """Run the library with the compiled kernels (NATIVE) or with numpy only (None)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "native", native)
        yield


@contextlib.contextmanager
def split_into(pieces: int | None):
    """Readers that split every tensor they can into ``pieces`` ranges (None: the
    library's own policy)."""
    with pytest.MonkeyPatch.context() as mp:
        if pieces is not None:
            mp.setattr(
                qreader.Reader,
                "_pieces",
                lambda self, workers, entries=None: {
                    e.name: pieces for e in (entries or self.header.tensors)
                },
            )
        yield


def forced_group(group: int, pad_last: bool = False):
    """The writer's ``best_group`` with ``group`` codes a symbol (at most what the width
    allows); ``pad_last`` sets a code past the tensor's end in the last symbol (a stream
    a reader must reject)."""

    def best(codes, bits):
        g = min(group, 8 // bits)
        symbols = H.group_codes(codes, bits, g)
        if pad_last and codes.size % g:
            symbols[-1] |= 1 << (codes.size % g * bits)
        counts = np.bincount(symbols, minlength=1 << (g * bits))
        lengths = H.huffman_lengths(counts)
        return g, lengths, -(-int(counts @ lengths.astype(np.int64)) // 8), symbols, counts

    return best


def encode(arrays, bits, scheme, chunk: int, group: int, pad_last: bool = False) -> bytes:
    """A file of ``arrays`` whose Huffman streams have ``group`` codes a symbol and a chunk
    index of ``chunk`` symbols a chunk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwriter, "index_chunk", lambda count, nbytes: chunk)
        mp.setattr(qwriter, "best_group", forced_group(group, pad_last))
        return qpack.numpy.encode(arrays, bits=bits, scheme=scheme, uniform=True)


def weights(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Heavy-tailed weights: skewed codes, so Huffman coding wins over fixed width."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)


def bits_of(array) -> bytes:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()


def decoded(blob: bytes, native, pieces: int | None = None, workers: int = 1, whole=False):
    """name -> value bits of every tensor, by ``Reader.arrays`` (``whole``: as a load
    does, into arrays allocated for it, every tensor handed out at once)."""
    with backend(native), split_into(pieces), qreader.Reader(blob) as reader:
        if not whole:
            return {e.name: bits_of(a) for e, a in reader.arrays(workers)}

        def alloc(entry):  # the files here hold float32 tensors only
            return np.full(entry.numel, np.nan, np.float32)

        got = reader.arrays(workers, alloc=alloc, ahead=len(reader.header.tensors))
        return {e.name: bits_of(a) for e, a in got}


def outcome(blob: bytes, native, pieces: int | None = None, workers: int = 1):
    """What reading every tensor gives: ("ok", bits) or (error code, tensor)."""
    try:
        return "ok", decoded(blob, native, pieces, workers)
    except E.QpackError as exc:
        return exc.code, exc.tensor


def ranges_of(blob: bytes, name: str, pieces: int) -> list[tuple[int, int]]:
    with backend(NATIVE):
        return D.split_ranges(qreader.Reader(blob).entry(name), pieces)


def edited(blob: bytes, name: str, payload=None, **changes) -> bytes:
    """The file with tensor ``name``'s bytes replaced (same length, its CRC kept valid
    unless ``crc32`` is given) and header keys changed."""
    header, data, version = split_file(blob)
    (raw,) = [t for t in header["tensors"] if t["name"] == name]
    if payload is not None:
        assert len(payload) == raw["length"]
        start = raw["offset"]
        data = data[:start] + bytes(payload) + data[start + raw["length"] :]
        raw["crc32"] = zlib.crc32(payload)
    raw.update(changes)
    return frame_file(header, data, version)


def payload_of(blob: bytes, name: str) -> bytearray:
    reader = qreader.Reader(blob)
    return bytearray(reader.payload(reader.entry(name)))


# --------------------------------------------------------- 1. split decodes are exact


@st.composite
def cases(draw):
    """A file of one Huffman-coded tensor (and a bias) of a random shape, width,
    granularity, group and chunk, and how to split it: (blob, pieces, workers)."""
    rows = draw(st.integers(1, 24))
    shape = draw(
        st.sampled_from(
            [(rows, draw(st.integers(40, 700))), (rows, draw(st.integers(2, 40)), 3, 3)]
        )
    )
    bits = draw(st.sampled_from([1, 1.5, 2, 2.5, 3, 3.3, 4, 4.5, 5, 6, 7, 8]))
    granularity = draw(st.sampled_from(sorted(SCHEMES)))
    scheme = draw(st.sampled_from(SCHEMES[granularity]))
    group, chunk = draw(st.integers(1, 8)), draw(st.integers(1, 900))
    arrays = {"w": weights(draw(st.integers(0, 2**16)), shape), "b": weights(1, (rows,))}
    blob = encode(arrays, bits, scheme, chunk, group)
    entry = qreader.Reader(blob).entry("w")
    assume(entry.storage == "huffman" and entry.granularity == granularity)
    return blob, draw(st.integers(2, 12)), draw(st.integers(1, 4))


@native_only
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), whole=st.booleans())
def test_split_decode_equals_the_whole_decode(case, whole):
    """Every range decoded by its own thread into its part of the output: the bits of the
    unsplit compiled decode and of the numpy route, streamed or as a whole load."""
    blob, pieces, workers = case
    assert len(ranges_of(blob, "w", pieces)) == min(pieces, _chunks(blob, "w"))
    reference = decoded(blob, None)
    assert decoded(blob, NATIVE) == reference
    assert decoded(blob, NATIVE, pieces, workers, whole) == reference


def _chunks(blob: bytes, name: str) -> int:
    entry = qreader.Reader(blob).entry(name)
    return -(-entry.numel // entry.group // entry.chunk)


@native_only
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), order=st.randoms(use_true_random=False))
def test_ranges_decode_independently_in_any_order(case, order):
    """decode_range on each range, in a random order, fills exactly the whole decode."""
    blob, pieces, _ = case
    reader = qreader.Reader(blob)
    entry = reader.entry("w")
    data = reader.payload(entry)
    want = decoded(blob, None)["w"]
    with backend(NATIVE):
        out = np.full(entry.numel, np.nan, np.float32)
        symbols = D.range_symbols(entry)
        ranges = D.split_ranges(entry, pieces)
        order.shuffle(ranges)
        for first, last in ranges:
            D.decode_range(entry, data, None, out, symbols, first, last)
    assert bits_of(out) == want


@pytest.mark.parametrize("native", [None, pytest.param(NATIVE, marks=native_only)])
def test_torch_load_splits_and_decodes_the_same(native, tmp_path):
    """qpack.load (the torch path: a whole load into tensors torch allocated, float64 ones
    included) with a split tensor; the numpy route does not split."""
    torch = pytest.importorskip("torch")
    arrays = {"w": weights(3, (64, 300)), "d": weights(4, (40, 200)).astype(np.float64)}
    blob = encode(arrays, 4.5, "asymmetric-per-group-32", 97, 1)
    path = tmp_path / "split.qpk"
    path.write_bytes(blob)
    want = decoded(blob, None)
    with backend(native), split_into(5), pytest.MonkeyPatch.context() as mp:
        mp.setattr(qreader.Reader, "default_workers", lambda self, decoded=None: 3)
        with qreader.Reader(path) as reader:
            split = {e.name for e in reader.header.tensors if len(D.split_ranges(e, 5)) > 1}
        assert split == ({"w", "d"} if native else set())
        state = qpack.load(path)
    assert state["d"].dtype == torch.float64
    for name, tensor in state.items():
        assert bits_of(tensor.to(torch.float32).numpy()) == want[name], name


@pytest.mark.parametrize("native", [None, pytest.param(NATIVE, marks=native_only)])
def test_reading_one_tensor_splits_and_decodes_the_same(native, tmp_path):
    """Reader.array and qpack.open(...).get_tensor, one tensor alone: split on several
    threads with the compiled kernels, decoded whole by numpy, the same bits either way,
    into an array of their own or into the tensor torch allocated."""
    torch = pytest.importorskip("torch")
    arrays = {"w": weights(6, (48, 320)), "b": weights(7, (48,))}
    blob = encode(arrays, 3.5, "symmetric-per-group-32", 61, 2)
    path = tmp_path / "one.qpk"
    path.write_bytes(blob)
    want = decoded(blob, None)
    calls = []
    with backend(native), split_into(4), pytest.MonkeyPatch.context() as mp:
        mp.setattr(qreader.Reader, "default_workers", lambda self, decoded=None: 3)
        split = qreader._Split.decode
        mp.setattr(qreader._Split, "decode", lambda *a: calls.append(a[1:]) or split(*a))
        with qreader.Reader(path) as reader:
            assert bits_of(reader.array("w")) == want["w"]
        with qpack.open(path) as f:
            tensor = f.get_tensor("w")
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (48, 320)
    assert bits_of(tensor.numpy()) == want["w"]
    assert len(calls) == (8 if native else 0)  # four ranges, in each of the two reads


def test_numpy_route_never_splits():
    blob = encode({"w": weights(5, (30, 400))}, 3, "asymmetric-per-channel", 50, 2)
    entry = qreader.Reader(blob).entry("w")
    with backend(None):
        assert D.split_ranges(entry, 8) == [(0, -(-entry.numel // entry.group))]
    with backend(NATIVE):
        assert len(D.split_ranges(entry, 8)) == (8 if NATIVE else 1)


# --------------------------------------------------------------- 2. the kernels' ranges


def _stream(chunk: int = 100, count: int = 1000, seed: int = 0):
    """(stream, lengths, symbols, chunk starts) of ``count`` random symbols."""
    rng = np.random.default_rng(seed)
    lengths = H.huffman_lengths(rng.integers(1, 1000, 40))
    symbols = rng.choice(40, size=count).astype(np.uint8)
    starts = np.empty(-(-count // chunk) - 1, np.int64)
    data = H.encode_symbols(symbols, lengths, None, chunk, starts)
    return data, lengths, symbols, starts


@native_only
@pytest.mark.parametrize("lanes", [False, True])
def test_kernel_ranges_write_only_their_part(lanes):
    """Symbols (or values) [first, last) land in their places, nothing else is written,
    and the used bits are where the range ends."""
    data, lengths, symbols, starts = _stream()
    scale, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    ends = [0, *starts.tolist(), int(lengths.astype(np.int64)[symbols].sum())]
    for first, last in [(0, 100), (100, 500), (400, 1000), (900, 1000), (300, 300)]:
        out = np.full(1016, 0xA5, np.uint8)
        used = NATIVE.huffman_decode_chunks(
            data, lengths, 1000, 100, starts, out[:1000], lanes, first, last
        )
        assert used == ends[last // 100]
        assert np.array_equal(out[first:last], symbols[first:last])
        assert (out[:first] == 0xA5).all() and (out[last:] == 0xA5).all()
        values = np.full(1004, np.nan, np.float32)
        got = NATIVE.huffman_dequantize(
            data, lengths, 1000, scale, zero, values[:1000], 100, starts, 0, 0, first, last
        )
        assert got == used
        assert np.array_equal(values[first:last], symbols[first:last].astype(np.float32))
        assert np.isnan(values[:first]).all() and np.isnan(values[last:]).all()


@native_only
def test_dequantize_range_writes_only_its_codes():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 8, 6 * 50, dtype=np.uint8)
    packed = pack_codes(codes, 3)
    scale = rng.random(6 * 4, dtype=np.float32) + 0.5
    zero = rng.integers(0, 8, 6 * 4).astype(np.float32)
    want = np.empty(300, np.float32)
    NATIVE.dequantize(packed, 3, 0, 300, scale, zero, want, 50, 13)
    for first, last in [(0, 300), (7, 200), (13, 26), (149, 151), (299, 300), (5, 5)]:
        out = np.full(300, np.nan, np.float32)
        NATIVE.dequantize(packed, 3, 0, 300, scale, zero, out, 50, 13, first, last)
        assert bits_of(out[first:last]) == bits_of(want[first:last])
        assert np.isnan(out[:first]).all() and np.isnan(out[last:]).all()


@native_only
@pytest.mark.parametrize(
    "first,last", [(50, 1000), (0, 150), (-100, 1000), (200, 100), (0, 1100), (1000, 1001)]
)
def test_kernels_refuse_ranges_that_are_not_whole_chunks(first, last):
    data, lengths, _, starts = _stream()
    one = np.ones(1, np.float32)
    out, values = np.empty(1000, np.uint8), np.empty(1000, np.float32)
    with pytest.raises(ValueError, match="bad range"):
        NATIVE.huffman_decode_chunks(data, lengths, 1000, 100, starts, out, True, first, last)
    with pytest.raises(ValueError, match="bad range"):
        NATIVE.huffman_dequantize(
            data, lengths, 1000, one, one, values, 100, starts, 0, 0, first, last
        )
    if not 0 <= first <= last <= 1000:
        with pytest.raises(ValueError, match="bad range"):
            NATIVE.dequantize(out, 8, 1, 1000, one, one, values, 0, 0, first, last)


@native_only
def test_a_range_without_an_index_is_refused():
    data, lengths, _, _ = _stream()
    one, values, none = np.ones(1, np.float32), np.empty(1000, np.float32), np.zeros(0, np.int64)
    with pytest.raises(ValueError, match="bad range"):
        NATIVE.huffman_dequantize(data, lengths, 1000, one, one, values, 0, none, 0, 0, 0, 500)
    whole = NATIVE.huffman_dequantize(data, lengths, 1000, one, one, values, 0, none, 0, 0, 0, -1)
    assert whole == NATIVE.huffman_dequantize(data, lengths, 1000, one, one, values)


# ------------------------------------------------------ 3. errors, as a sequential reader


def _two_tensor_file(group: int = 1, pad_last: bool = False, flip: bool = False) -> bytes:
    """ "a" (split into ranges), then "b" (small; first with ``flip``), both Huffman-coded
    with an index, 3-bit codes ``group`` a symbol; ``pad_last`` as in :func:`forced_group`."""
    arrays = {"a": weights(7, (49, 401)), "b": weights(8, (10, 33))}
    if flip:
        arrays = {"b": arrays["b"], "a": arrays["a"]}
    return encode(arrays, 3, "asymmetric-per-channel", 211, group, pad_last)


def _all_outcomes(blob: bytes, pieces: int = 6, workers: int = 3) -> set:
    """The outcome of every reader: numpy, compiled whole, compiled split."""
    results = {repr(outcome(blob, None))}
    if NATIVE is not None:
        results.add(repr(outcome(blob, NATIVE)))
        results.add(repr(outcome(blob, NATIVE, pieces, workers)))
        results.add(repr(outcome(blob, NATIVE, pieces, 1)))
    return results


def _spare_run(blob: bytes, name: str, k: int) -> bytes:
    """The file with a run of one bits inside chunk ``k`` of ``name``'s stream: the writer's
    codes leave the all-ones codeword of the greatest length unused, so the run holds no
    valid codeword and the stream is bad-data there."""
    starts = qreader.Reader(blob).entry(name).chunk_starts
    payload = payload_of(blob, name)
    at = (int(starts[k - 1]) + int(starts[k])) // 16
    payload[at : at + 4] = b"\xff" * 4
    return edited(blob, name, payload)


@pytest.mark.parametrize("group", [1, 2])
def test_a_bad_later_chunk_is_bad_data_for_that_tensor(group):
    blob = _two_tensor_file(group)
    assert len(ranges_of(blob, "a", 6)) == 6 or NATIVE is None
    chunks = _chunks(blob, "a")
    for k in (chunks // 2, chunks - 2):
        bad = _spare_run(blob, "a", k)
        assert _all_outcomes(bad) == {repr(("bad-data", "a"))}


def test_a_moved_later_chunk_start_is_bad_data():
    blob = _two_tensor_file()
    starts = qreader.Reader(blob).entry("a").chunk_starts.tolist()
    for k in (len(starts) // 2, len(starts) - 1):
        for delta in (-1, 1):
            moved = list(starts)
            moved[k] += delta
            bad = edited(blob, "a", chunk_starts=moved)
            assert _all_outcomes(bad) == {repr(("bad-data", "a"))}, (k, delta)


@pytest.mark.parametrize("group", [1, 2])
def test_nonzero_padding_after_the_last_codeword_is_bad_data(group):
    blob = _two_tensor_file(group)
    payload = payload_of(blob, "a")
    entry = qreader.Reader(blob).entry("a")
    with backend(None):
        _, used = H.decode_symbols(bytes(payload), entry.code_lengths, -(-entry.numel // group))
    assert used % 8, "this file's stream fills its last byte: no padding to spoil"
    payload[-1] |= 0x80  # the last bit of the byte is padding
    assert _all_outcomes(edited(blob, "a", payload)) == {repr(("bad-data", "a"))}


def test_nonzero_codes_padding_the_last_symbol_are_bad_data():
    blob = _two_tensor_file(group=2, pad_last=True)
    entry = qreader.Reader(blob).entry("a")
    assert entry.group == 2 and entry.numel % 2
    assert _all_outcomes(blob) == {repr(("bad-data", "a"))}


def test_the_first_bad_tensor_in_file_order_is_named():
    blob = _two_tensor_file()
    bad_a = _spare_run(blob, "a", _chunks(blob, "a") - 2)
    bad_b_crc = edited(blob, "b", crc32=(qreader.Reader(blob).entry("b").crc32 ^ 1))
    bad_a_crc = edited(blob, "a", crc32=(qreader.Reader(blob).entry("a").crc32 ^ 1))
    both = edited(bad_a, "b", crc32=(qreader.Reader(blob).entry("b").crc32 ^ 1))
    assert _all_outcomes(bad_b_crc) == {repr(("data-checksum", "b"))}
    assert _all_outcomes(bad_a_crc) == {repr(("data-checksum", "a"))}
    assert _all_outcomes(both) == {repr(("bad-data", "a"))}
    # "b" before a bad, split "a"
    flipped = _two_tensor_file(flip=True)
    flipped_both = edited(
        _spare_run(flipped, "a", 3), "b", crc32=qreader.Reader(flipped).entry("b").crc32 ^ 1
    )
    assert _all_outcomes(flipped_both) == {repr(("data-checksum", "b"))}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 4), later=st.booleans())
def test_bit_flips_are_judged_as_a_sequential_reader_judges_them(seed, flips, later):
    """Bits flipped in the split tensor's stream (its CRC kept valid), anywhere or in its
    later half only: every reader gives the same values or the same error."""
    blob = _two_tensor_file()
    payload = payload_of(blob, "a")
    rng = np.random.default_rng(seed)
    low = len(payload) // 2 if later else 0
    for _ in range(flips):
        payload[int(rng.integers(low, len(payload)))] ^= 1 << int(rng.integers(8))
    results = _all_outcomes(edited(blob, "a", payload))
    assert len(results) == 1, results


def test_a_bad_scale_stops_the_split_tensor_before_its_ranges():
    blob = _two_tensor_file()
    header, _, _ = split_file(blob)
    (raw,) = [t for t in header["tensors"] if t["name"] == "a"]
    huge = np.full(len(raw["scale"]) // 4, 3e38, "<f4").tobytes()
    bad = edited(blob, "a", scale=huge, zero_point=bytes(len(raw["zero_point"])))
    results = _all_outcomes(bad)
    assert len(results) == 1 and "'a'" in next(iter(results)), results


# ------------------------------------------------------------- 4. policy and memory


def _audio_header():
    """A stand-in reader for :meth:`Reader._pieces`: the header of tools/bench_fresh.py's
    audio22m weights, 4 bits a weight, one code a symbol (no payloads: none is read)."""
    shapes = [(1024, 512), (128, 65536), (128, 8192), (128, 8192), (256, 8192), (512, 16384)]
    shapes.append((360, 2048))
    entries = []
    for i, shape in enumerate(shapes):
        numel = shape[0] * shape[1]
        entry = TensorEntry(f"w{i}", shape, "float32", "huffman", 0, numel // 2, 0)
        entry.group, entry.chunk = 1, 16384
        entries.append(entry)
    return SimpleNamespace(header=SimpleNamespace(tensors=entries))


def test_policy_splits_only_tensors_over_half_a_threads_share():
    reader = _audio_header()

    def pieces(workers):
        return qreader.Reader._pieces(reader, workers)

    assert pieces(1) == {}
    assert pieces(2) == {"w1": 2, "w5": 2}  # the two 8.4M-weight tensors
    # read alone, one of them splits in twice as many ranges as threads
    one = next(e for e in reader.header.tensors if e.name == "w1")
    assert qreader.Reader._pieces(reader, 2, (one,)) == {"w1": 4}
    work = {e.name: 4 * e.numel + e.length for e in reader.header.tensors}
    for workers in (4, 16, 64):
        share = sum(work.values()) / (2 * workers)
        many = pieces(workers)
        assert many["w1"] >= min(workers, 8) and many["w5"] >= min(workers, 8)
        for e in reader.header.tensors:
            count = many.get(e.name, 1)
            smallest = e.numel // qreader.SPLIT_MIN  # the most ranges of SPLIT_MIN symbols
            # no piece over half a thread's share, unless that would make them too small
            assert work[e.name] / count <= share or count == max(smallest, 1), e.name
            assert count == 1 or e.numel // count >= qreader.SPLIT_MIN, e.name

"""Tests of the quantization schemes: bit-exactness of symmetric-per-layer against the
origin's formula, the half-step bound of asymmetric-per-channel, and the decode rule."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qpack
from qpack import container
from qpack.reader import Reader
from qpack.schemes import dequantize, dequantize_table, quantize

SYM = "symmetric-per-layer"
ASYM = "asymmetric-per-channel"
SHAPES = [(64, 33), (16, 3, 3, 3), (7, 5), (1, 1), (3, 1, 2, 2), (200,), ()]


def origin(w: np.ndarray, bits: int) -> np.ndarray:
    """The origin's quantize/dequantize, every step a float32 operation:
    q = clip(round(w / max|w| * 2^(b-1)), -2^(b-1), 2^(b-1)-1); w' = q * max|w| / 2^(b-1)."""
    w = w.astype(np.float32)
    half = np.float32(2 ** (bits - 1))
    peak = np.float32(np.max(np.abs(w)))
    ratio = np.divide(w, peak, dtype=np.float32)
    scaled = np.multiply(ratio, half, dtype=np.float32)
    q = np.clip(np.rint(scaled), -half, half - np.float32(1)).astype(np.float32)
    product = np.multiply(q, peak, dtype=np.float32)
    return np.asarray(np.divide(product, half, dtype=np.float32))


def roundtrip(w: np.ndarray, bits: int, scheme: str) -> np.ndarray:
    data = qpack.encode({"w": w}, bits={"w": bits}, scheme=scheme)
    return qpack.decode(data)["w"]


def header_entry(w: np.ndarray, bits: int, scheme: str) -> container.TensorEntry:
    data = qpack.encode({"w": w}, bits={"w": bits}, scheme=scheme)
    return Reader(data).header.tensors[0]


def u32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# --------------------------------------------------------------------------- symmetric


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_symmetric_bit_exact_against_origin(bits, shape):
    rng = np.random.default_rng(zlib.crc32(repr((bits, shape)).encode()))
    w = np.asarray(rng.standard_normal(shape) * 0.05, dtype=np.float32)
    out = roundtrip(w, bits, SYM)
    ref = origin(w, bits)
    assert out.dtype == np.float32 and out.shape == w.shape
    out, ref = out.reshape(-1), ref.reshape(-1)  # a 0-d tensor too
    # The file cannot hold a signed zero: a weight the origin rounds to q = -0.0 gives
    # w' = -0.0 there, while scale * (code - zero_point) is +0.0. Canonicalize zeros
    # (x + 0.0 turns -0.0 into +0.0) and demand bit-exact equality of everything else.
    assert np.array_equal(u32(out + np.float32(0)), u32(ref + np.float32(0)))
    differ = u32(out) != u32(ref)
    assert np.all(ref[differ] == 0) and np.all(np.signbit(ref[differ]))
    assert not np.any((out == 0) & np.signbit(out))  # the decoder never yields -0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_bit_exact_over_magnitudes(bits):
    rng = np.random.default_rng(bits)
    for exponent in (-30, -12, -3, 0, 3, 12, 30):
        w = (rng.standard_normal((32, 17)) * 10.0**exponent).astype(np.float32)
        out = roundtrip(w, bits, SYM)
        assert np.array_equal(u32(out + np.float32(0)), u32(origin(w, bits) + np.float32(0)))


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_bit_exact_through_torch(bits, tmp_path):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 8, 3, 3, generator=gen)
    path = tmp_path / "w.qpk"
    qpack.save({"w": w}, path, bits=bits, scheme=SYM)
    out = qpack.load(path)["w"].numpy()
    ref = origin(w.numpy(), bits)
    assert np.array_equal(u32(out + np.float32(0)), u32(ref + np.float32(0)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_symmetric_header_parameters(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((10, 6)).astype(np.float32)
    entry = header_entry(w, bits, SYM)
    peak = np.float32(np.abs(w).max())
    half = np.float32(2 ** (bits - 1))
    assert entry.granularity == "tensor"
    assert entry.scheme == SYM
    assert entry.scale.tolist() == [np.float32(peak / half)]
    assert entry.zero_point.tolist() == [half]
    # the tensor's peak (if it is the most negative weight) decodes exactly; the top code
    # is 2^(b-1)-1 steps above zero
    q = quantize(w, bits, SYM)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_symmetric_clips_the_top(bits):
    # +max|w| is clipped to code 2^(b-1)-1, i.e. (2^(b-1)-1)/2^(b-1) * max|w|; -max|w| is exact
    w = np.array([[-2.0, 2.0, 0.0, 1.0]], dtype=np.float32)
    out = roundtrip(w, bits, SYM)
    half = 2 ** (bits - 1)
    assert out[0, 0] == np.float32(-2.0)
    assert out[0, 1] == np.float32((half - 1) * 2.0 / half)
    assert out[0, 2] == 0.0
    assert np.array_equal(out, origin(w, bits) + np.float32(0))


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_rounds_ties_to_even(bits):
    # with max|w| = 1, w * 2^(b-1) = k + 1/2 exactly for w = (k + 1/2) / 2^(b-1)
    half = 2 ** (bits - 1)
    ks = np.arange(-half, half - 1)
    w = np.concatenate([[1.0], (ks + 0.5) / half]).astype(np.float32).reshape(1, -1)
    out = roundtrip(w, bits, SYM)
    expected_q = 2 * np.round((ks + 0.5) / 2)  # the even neighbour of k + 1/2
    assert np.array_equal(out[0, 1:], (expected_q / half).astype(np.float32))
    assert np.array_equal(out + np.float32(0), origin(w, bits) + np.float32(0))


def test_asymmetric_rounds_ties_to_even():
    # 2 bits, channel range [0, 3]: scale 1, zero point 0; w = k + 1/2 rounds to even
    w = np.array([[0.0, 0.5, 1.5, 2.5, 3.0]], dtype=np.float32)
    q = quantize(w, 2, ASYM)
    assert q.scale.tolist() == [1.0] and q.zero_point.tolist() == [0.0]
    assert q.codes.tolist() == [0, 0, 2, 2, 3]
    # range [-1.5, 1.5]: scale 1, zero point round(1.5) = 2; -1.5 -> -2 + 2 = 0,
    # 1.5 -> 2 + 2 = 4, clipped to 3
    w = np.array([[-1.5, -0.5, 0.5, 1.5]], dtype=np.float32)
    q = quantize(w, 2, ASYM)
    assert q.scale.tolist() == [1.0] and q.zero_point.tolist() == [2.0]
    assert q.codes.tolist() == [0, 2, 2, 3]
    assert roundtrip(w, 2, ASYM).tolist() == [[-2.0, 0.0, 0.0, 1.0]]


# --------------------------------------------------------------------------- asymmetric


def _channel_rows(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1).astype(np.float64)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(64, 33), (16, 3, 3, 3), (5, 7), (3, 1, 2, 2)])
def test_asymmetric_codes_span_range_and_half_step(bits, shape):
    rng = np.random.default_rng(zlib.crc32(repr((bits, shape, "a")).encode()))
    w = rng.standard_normal(shape).astype(np.float32)
    # give some channels a single sign and different magnitudes
    w[0] = np.abs(w[0]) + 0.5
    if shape[0] > 1:
        w[1] = -np.abs(w[1]) * 3.0
    w *= (10.0 ** rng.uniform(-2, 2, size=(shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
    top = 2**bits - 1
    q = quantize(w, bits, ASYM)
    assert q.granularity == "channel"
    assert q.scale.shape == q.zero_point.shape == (shape[0],)
    assert q.scale.dtype == q.zero_point.dtype == np.float32
    codes = q.codes.reshape(shape[0], -1)
    rows = _channel_rows(w)
    for c in range(shape[0]):
        if rows[c].max() > 0:
            assert codes[c].max() == top, c
        if rows[c].min() < 0:
            assert codes[c].min() == 0, c
        assert float(q.zero_point[c]).is_integer() and 0 <= q.zero_point[c] <= top

    entry = header_entry(w, bits, ASYM)
    assert entry.scale.shape == (shape[0],)
    assert np.array_equal(u32(entry.scale), u32(q.scale))
    assert np.array_equal(u32(entry.zero_point), u32(q.zero_point))

    out = roundtrip(w, bits, ASYM)
    err = np.abs(_channel_rows(out) - rows)
    scale = entry.scale.astype(np.float64)[:, None]
    tol = 0.5 * scale * (1 + 2**-20) + 2**-22 * np.abs(rows)
    assert np.all(err <= tol)
    # and the step is the channel's widened range over 2^b - 1 (in float32)
    lo = np.minimum(rows.min(axis=1), 0)
    hi = np.maximum(rows.max(axis=1), 0)
    assert np.allclose(entry.scale, (hi - lo) / top, rtol=2**-22, atol=0)


@pytest.mark.parametrize("scheme", [SYM, ASYM])
@pytest.mark.parametrize("bits", range(1, 9))
def test_all_zero_tensor_decodes_to_exact_zeros(bits, scheme):
    w = np.zeros((6, 4, 3), dtype=np.float32)
    out = roundtrip(w, bits, scheme)
    assert np.array_equal(u32(out), np.zeros(w.shape, dtype=np.uint32))  # +0.0 bits
    entry = header_entry(w, bits, scheme)
    assert np.isfinite(entry.scale).all() and np.isfinite(entry.zero_point).all()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("value", [3.25, -3.25, 1e-20, -7e20])
def test_constant_tensors(bits, value):
    w = np.full((4, 5), value, dtype=np.float32)
    # symmetric: equals the origin (a positive constant is clipped to (half-1)/half of it)
    sym = roundtrip(w, bits, SYM)
    assert np.isfinite(sym).all()
    assert np.array_equal(sym, origin(w, bits))
    if value < 0:
        assert np.all(sym == np.float32(value))
    # asymmetric: one code per channel, within half a step of the constant
    asym = roundtrip(w, bits, ASYM)
    assert np.isfinite(asym).all()
    assert np.all(asym == asym[0, 0])
    step = abs(value) / (2**bits - 1)
    assert abs(float(asym[0, 0]) - value) <= 0.5 * step + 2**-22 * abs(value)
    # the constant is an end of the widened range [min(c, 0), max(c, 0)], so it is hit
    # up to float32 rounding of scale * (code - zero_point)
    assert abs(float(asym[0, 0]) - value) <= 2**-21 * abs(value)


def test_channel_with_only_zeros_beside_nonzero_channels():
    w = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=np.float32)
    for bits in range(1, 9):
        out = roundtrip(w, bits, ASYM)
        assert np.array_equal(u32(out[0]), np.zeros(3, np.uint32))
        assert np.array_equal(u32(out[2]), np.zeros(3, np.uint32))


def test_quantize_rejects_bad_options():
    w = np.ones((2, 2), dtype=np.float32)
    with pytest.raises(ValueError):
        quantize(w, 4, "no-such-scheme")
    for bad in (0, 9, True, 0.5, 8.5, "4"):
        with pytest.raises(ValueError):
            quantize(w, bad, ASYM)
    with pytest.raises(ValueError):
        quantize(w, 4.5, SYM)  # the origin's quantizer needs whole bits
    assert set(qpack.SCHEMES) == {
        SYM,
        ASYM,
        "asymmetric-per-layer",
        "mse-per-channel",
        "asymmetric-per-group",
        "symmetric-per-group",
        "mse-per-group",
    }
    assert qpack.DEFAULT_SCHEME == ASYM


# --------------------------------------------------------------------------- decode rule


def independent_table(bits: int, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """float32(q) - zero_point rounded to float32, then times scale rounded to float32,
    one scalar at a time."""
    out = np.empty((scale.size, 2**bits), dtype=np.float32)
    for g in range(scale.size):
        for q in range(2**bits):
            diff = np.float32(np.float32(q) - np.float32(zero[g]))
            out[g, q] = np.float32(np.float32(scale[g]) * diff)
    return out


def awkward_params(rng: np.random.Generator, groups: int) -> tuple[np.ndarray, np.ndarray]:
    scale = (rng.uniform(0.5, 2.0, groups) * 10.0 ** rng.integers(-8, 8, groups)).astype(np.float32)
    # non-integer zero points far from q make the subtraction round
    zero = (rng.uniform(-300.0, 300.0, groups) + rng.uniform(0, 1, groups) * 1e-5).astype(
        np.float32
    )
    zero[0] = np.float32(16777217.0)  # 2^24 + 1 rounds; q - zero rounds too
    return scale, zero


@pytest.mark.parametrize("bits", range(1, 9))
def test_dequantize_table_two_float32_roundings(bits):
    rng = np.random.default_rng(bits)
    scale, zero = awkward_params(rng, 9)
    table = dequantize_table(bits, scale, zero)
    assert table.dtype == np.float32 and table.shape == (9, 2**bits)
    assert np.array_equal(u32(table), u32(independent_table(bits, scale, zero)))


def test_rounding_order_is_observable():
    # Guard the test above: the two-rounding result differs from an exactly computed
    # product rounded once for these parameters, so a wrong order would be caught.
    rng = np.random.default_rng(0)
    scale, zero = awkward_params(rng, 64)
    table = independent_table(8, scale, zero)
    once = (
        scale.astype(np.float64)[:, None]
        * (np.arange(256, dtype=np.float64)[None, :] - zero.astype(np.float64)[:, None])
    ).astype(np.float32)
    assert np.count_nonzero(u32(table) != u32(once)) > 0


def _packed_file(codes: np.ndarray, shape, bits, scale, zero, granularity) -> bytes:
    """A one-tensor file built from container helpers with arbitrary affine parameters."""
    payload = qpack.pack_codes(codes, bits).tobytes()
    entry = container.TensorEntry(
        name="t",
        shape=tuple(shape),
        dtype="float32",
        storage="packed",
        offset=0,
        length=len(payload),
        crc32=zlib.crc32(payload),
        bits=bits,
        scheme="test",
        dequant="affine",
        granularity=granularity,
        scale=scale,
        zero_point=zero,
    )
    head = container.build_header([entry], {}, len(payload))  # one tensor at offset 0
    return head + bytes(container.align(len(head)) - len(head)) + payload


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_decoder_applies_the_rule_to_arbitrary_parameters(bits):
    rng = np.random.default_rng(bits + 50)
    groups, inner = 9, 13
    scale, zero = awkward_params(rng, groups)
    codes = rng.integers(0, 2**bits, size=groups * inner)
    data = _packed_file(codes, (groups, inner), bits, scale, zero, "channel")
    out = qpack.decode(data)["t"]
    table = independent_table(bits, scale, zero)
    expected = table[np.repeat(np.arange(groups), inner), codes].reshape(groups, inner)
    assert np.array_equal(u32(out), u32(expected))
    # per-tensor granularity uses the single pair for every element
    data = _packed_file(codes, (groups, inner), bits, scale[:1], zero[:1], "tensor")
    out = qpack.decode(data)["t"]
    assert np.array_equal(u32(out), u32(table[0][codes].reshape(groups, inner)))
    # and the library's own dequantize agrees
    assert np.array_equal(u32(dequantize(codes, scale[:1], zero[:1])), u32(table[0][codes]))


def test_scale_and_zero_point_are_little_endian_float32_in_header():
    w = np.array([[1.0, -3.0], [0.5, 2.0]], dtype=np.float32)
    data = qpack.encode({"w": w}, bits=4, scheme=ASYM)
    entry = Reader(data).header.tensors[0]
    raw = entry.to_header()
    assert raw["scale"] == struct.pack("<2f", *entry.scale)
    assert raw["zero_point"] == struct.pack("<2f", *entry.zero_point)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(
        st.tuples(
            st.floats(width=32, allow_nan=False, allow_infinity=False),
            st.floats(width=32, allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_overflow_check_of_the_extreme_codes_matches_the_full_table(bits, pairs):
    from qpack.schemes import decodes_finite

    scale = np.array([p[0] for p in pairs], dtype=np.float32)
    zero = np.array([p[1] for p in pairs], dtype=np.float32)
    table = dequantize_table(bits, scale, zero)
    assert decodes_finite(bits, scale, zero) == bool(np.isfinite(table).all())

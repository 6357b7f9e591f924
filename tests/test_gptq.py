"""Tests of qpack.gptq: GPTQ codes are valid codes in the layout of schemes.quantize, equal
round-to-nearest when inputs are uncorrelated, follow the closed form on two columns, and
cut the output error well below round-to-nearest's on correlated inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qpack.calibrate import layer_statistics
from qpack.gptq import gptq_codes, gptq_quantize, output_error, row_output_errors
from qpack.schemes import dequantize, levels_for, quantize

AFFINE = ["asymmetric-per-channel", "asymmetric-per-layer", "mse-per-channel"]


def correlated(n: int, cols: int, seed: int) -> np.ndarray:
    """Inputs (n, cols) whose columns are strongly correlated, as neighbouring pixels are."""
    rng = np.random.default_rng(seed)
    mix = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols))
    return rng.standard_normal((n, cols)) @ mix + 0.2


def second_moment(x: np.ndarray) -> np.ndarray:
    return x.T @ x / len(x)


def codes_for(w, h, q, bits, **options) -> np.ndarray:
    return gptq_codes(
        w, h, q.scale, q.zero_point, levels_for(bits), granularity=q.granularity, **options
    )


def decoded(q, codes, shape) -> np.ndarray:
    return dequantize(codes, q.scale, q.zero_point).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(5, 7), (16, 3, 3, 3), (1, 1), (9,), (3, 40), (4, 2, 5)]),
    bits=st.sampled_from([1, 2, 3, 4, 4.5, 6, 8]),
    scheme=st.sampled_from(AFFINE),
    act_order=st.booleans(),
    block=st.sampled_from([1, 3, 128]),
    seed=st.integers(0, 2**32 - 1),
    spread=st.floats(1e-3, 1e3),
)
def test_uncorrelated_inputs_give_round_to_nearest(
    shape, bits, scheme, act_order, block, seed, spread
):
    """A diagonal Hessian (inputs uncorrelated, of different strengths) leaves nothing to
    compensate: the codes are round-to-nearest's, in its layout, whatever the act order."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * spread).astype(np.float32)
    q = quantize(w, bits, scheme)
    cols = w[0].size if w.ndim > 1 else 1
    h = np.diag(rng.uniform(0.1, 10.0, cols))
    codes = codes_for(w, h, q, bits, act_order=act_order, block=block)
    assert codes.dtype == np.uint8 and codes.shape == (w.size,)
    np.testing.assert_array_equal(codes, q.codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scheme", ["asymmetric-per-layer", "asymmetric-per-channel"])
@pytest.mark.parametrize("act_order", [True, False])
def test_beats_round_to_nearest_on_correlated_inputs(bits, scheme, act_order):
    x = correlated(4000, 48, seed=bits)
    h = second_moment(x)
    w = np.random.default_rng(7).standard_normal((24, 48)).astype(np.float32)
    q = quantize(w, bits, scheme)
    codes = codes_for(w, h, q, bits, act_order=act_order)
    assert codes.max() < levels_for(bits)
    gptq = output_error(decoded(q, codes, w.shape) - w, h)
    rtn = output_error(decoded(q, q.codes, w.shape) - w, h)
    assert gptq < 0.85 * rtn, gptq / rtn


def test_two_columns_follow_the_closed_form():
    """Column 0 rounds to nearest; its error e moves column 1 by -e * H10 / H11 (the
    output-optimal correction), which then rounds to nearest: here to 3, not RTN's 2."""
    scale, zero = np.array([1.0], np.float32), np.array([0.0], np.float32)
    w = np.array([[0.4, 2.3], [1.2, 0.3]], np.float32)
    for rho, expected in ((0.9, [0, 3, 1, 0]), (-0.9, [0, 2, 1, 0])):
        h = np.array([[1.0, rho], [rho, 1.0]])
        codes = gptq_codes(w, h, scale, zero, 16, granularity="tensor", damp=0.0, act_order=False)
        # row 0: e = 0.4 and 2.3 + rho * 0.4 -> 2.66 or 1.94; row 1: e = 0.2 and 0.3 +- 0.18
        assert codes.tolist() == expected


def test_blocks_and_repeats_give_the_same_codes():
    """Lazy block updates are the same arithmetic in another order; results repeat."""
    h = second_moment(correlated(2000, 40, seed=3))
    w = np.random.default_rng(4).standard_normal((12, 40)).astype(np.float32)
    q = quantize(w, 3, "asymmetric-per-channel")
    first = codes_for(w, h, q, 3, block=128)
    for block in (1, 7, 40, 128):
        np.testing.assert_array_equal(codes_for(w, h, q, 3, block=block), first)


def test_groups_use_their_own_hessian():
    """A grouped conv weight (8, 2, 3, 3) with 4 groups: rows 2g, 2g + 1 use hessian[g]."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    h = np.stack([second_moment(correlated(500, 18, seed=g)) for g in range(4)])
    q = quantize(w, 3, "asymmetric-per-channel")
    codes = codes_for(w, h, q, 3).reshape(8, -1)
    for g in range(4):
        rows = slice(2 * g, 2 * g + 2)
        alone = gptq_codes(
            w[rows], h[g], q.scale[rows], q.zero_point[rows], 8, granularity="channel"
        )
        np.testing.assert_array_equal(codes[rows].reshape(-1), alone)
    gptq = output_error(decoded(q, codes.reshape(-1), w.shape) - w, h)
    assert gptq < 0.85 * output_error(decoded(q, q.codes, w.shape) - w, h)


def test_dead_inputs_round_to_nearest():
    """Inputs that were always zero (zero rows and columns of H) keep their weights and
    round to nearest; the others are still compensated. All dead: round-to-nearest."""
    x = correlated(3000, 30, seed=6)
    dead = np.array([0, 7, 8, 29])
    x[:, dead] = 0
    h = second_moment(x)
    w = np.random.default_rng(8).standard_normal((10, 30)).astype(np.float32)
    q = quantize(w, 3, "asymmetric-per-channel")
    for act_order in (True, False):
        codes = codes_for(w, h, q, 3, act_order=act_order).reshape(w.shape)
        np.testing.assert_array_equal(codes[:, dead], q.codes.reshape(w.shape)[:, dead])
        gptq = output_error(decoded(q, codes.reshape(-1), w.shape) - w, h)
        assert gptq < 0.85 * output_error(decoded(q, q.codes, w.shape) - w, h)
    np.testing.assert_array_equal(codes_for(w, np.zeros((30, 30)), q, 3), q.codes)


def test_singular_hessian_without_damping():
    """Fewer samples than inputs: H is singular; a little damping is added to factor it."""
    x = correlated(10, 30, seed=9)
    h = second_moment(x)
    w = np.random.default_rng(9).standard_normal((6, 30)).astype(np.float32)
    q = quantize(w, 4, "asymmetric-per-layer")
    codes = codes_for(w, h, q, 4, damp=0.0)
    assert codes.max() < 16
    assert output_error(decoded(q, codes, w.shape) - w, h) < output_error(
        decoded(q, q.codes, w.shape) - w, h
    )


def test_gptq_quantize_keeps_the_grid():
    h = second_moment(correlated(1000, 27, seed=10))
    w = np.random.default_rng(10).standard_normal((5, 3, 3, 3)).astype(np.float32)
    for scheme in AFFINE:
        q = quantize(w, 3.5, scheme)
        g = gptq_quantize(w, h, 3.5, scheme, act_order=False)
        np.testing.assert_array_equal(g.scale, q.scale)
        np.testing.assert_array_equal(g.zero_point, q.zero_point)
        assert (g.granularity, g.bits) == (q.granularity, q.bits)
        np.testing.assert_array_equal(g.codes, codes_for(w, h, q, 3.5, act_order=False))


def test_output_error_is_the_mean_squared_output_change():
    """output_error(dW, mean(x x^T)) * n == sum |dW x|^2, group by group; per output
    channel with row_output_errors."""
    rng = np.random.default_rng(11)
    xs = [correlated(300, 12, seed=s) for s in (1, 2)]
    h = np.stack([second_moment(x) for x in xs])
    delta = rng.standard_normal((6, 3, 2, 2))
    rows = delta.reshape(2, 3, 12)
    direct = sum(float(((x @ rows[g].T) ** 2).sum()) for g, x in enumerate(xs))
    assert output_error(delta, h) * 300 == pytest.approx(direct, rel=1e-10)
    assert output_error(delta[:3], h[0]) * 300 == pytest.approx(
        float(((xs[0] @ rows[0].T) ** 2).sum()), rel=1e-10
    )
    per_row = row_output_errors(delta, h) * 300
    direct = [((x @ rows[g].T) ** 2).sum(axis=0) for g, x in enumerate(xs)]
    np.testing.assert_allclose(per_row, np.concatenate(direct), rtol=1e-10)


def test_with_calibration_statistics_the_real_output_error_drops():
    """End to end: statistics of a conv on smooth (correlated) images, GPTQ codes, and the
    layer's actual output error against round-to-nearest's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, padding_mode="replicate")
    smooth = nn.AvgPool2d(3, stride=1, padding=1)
    images = [smooth(torch.randn(4, 8, 16, 16)) for _ in range(2)]
    stats = layer_statistics(conv, images)["weight"]
    w = conv.weight.detach().numpy()
    q = quantize(w, 3, "asymmetric-per-channel")

    def output_change(codes) -> float:
        moved = nn.Conv2d(8, 16, 3, padding=1, padding_mode="replicate")
        moved.load_state_dict(
            {"weight": torch.from_numpy(decoded(q, codes, w.shape)), "bias": conv.bias}
        )
        with torch.no_grad():
            return sum(float(((moved(x) - conv(x)) ** 2).sum()) for x in images)

    codes = codes_for(w, stats.hessian, q, 3)
    assert output_change(codes) < 0.6 * output_change(q.codes)
    # and output_error predicts it
    predicted = output_error(decoded(q, codes, w.shape) - w, stats.hessian) * stats.count
    assert predicted == pytest.approx(output_change(codes), rel=1e-3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hessian": np.eye(5)}, "columns"),
        ({"hessian": np.zeros((3, 6, 6))}, "groups"),
        ({"hessian": np.full((6, 6), np.nan)}, "finite"),
        ({"scale": np.ones(3, np.float32)}, "channel granularity needs 4"),
        ({"granularity": "tensor"}, "tensor granularity needs 1"),
        ({"granularity": "block"}, "granularity must be"),
        ({"granularity": "group"}, "needs a group_size"),
        ({"levels": 1}, "levels"),
        ({"levels": 300}, "levels"),
        ({"scale": np.zeros(4, np.float32)}, "nonzero"),
        ({"damp": -1.0}, "damp"),
        ({"block": 0}, "block"),
        ({"weight": np.full((4, 6), np.inf, np.float32)}, "weight must be finite"),
    ],
)
def test_mismatched_inputs_raise(change, message):
    args = {
        "weight": np.ones((4, 6), np.float32),
        "hessian": np.eye(6),
        "scale": np.ones(4, np.float32),
        "zero_point": np.zeros(4, np.float32),
        "levels": 8,
        "granularity": "channel",
        "damp": 0.01,
        "block": 128,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        gptq_codes(
            args.pop("weight"),
            args.pop("hessian"),
            args.pop("scale"),
            args.pop("zero_point"),
            args.pop("levels"),
            **args,
        )
    with pytest.raises(ValueError, match="columns"):
        output_error(np.ones((4, 6)), np.eye(5))

"""Shared helper for the round-trip tests: the quantization error bound of each scheme."""

from __future__ import annotations

import numpy as np
import pytest

# Slack for float32 rounding in scale = fl32(range / L) and in fl32(scale * (q - zp)), plus an
# absolute floor for subnormal steps, where float32 cannot hold the scale exactly.
REL = 2.0**-20
ABS = 1e-37


def check_within_step(orig: np.ndarray, out: np.ndarray, bits: int, scheme: str) -> None:
    """Assert that decoded float32 ``out`` is within the scheme's error bound of ``orig``
    (the float32 values that were quantized), computed independently from ``orig``."""
    w = np.asarray(orig, dtype=np.float32).astype(np.float64)
    got = np.asarray(out, dtype=np.float64)
    assert got.shape == w.shape
    assert np.isfinite(got).all()
    if w.size == 0:
        return
    err = np.abs(got - w)
    if scheme == "asymmetric-per-channel":
        # per channel (axis 0): step = (max(0, max w) - min(0, min w)) / (2^b - 1); every
        # weight is within half a step
        rows = w.reshape(w.shape[0], -1) if w.ndim else w.reshape(1, 1)
        lo = np.minimum(rows.min(axis=1), 0.0)
        hi = np.maximum(rows.max(axis=1), 0.0)
        step = ((hi - lo) / (2**bits - 1))[:, None]
        bound = 0.5 * step * (1 + REL) + REL * np.abs(rows) + ABS
        excess = err.reshape(rows.shape) - bound
        assert np.all(excess <= 0), float(excess.max())
    elif scheme == "symmetric-per-layer":
        # step = max|w| / 2^(b-1); codes reach -2^(b-1) .. 2^(b-1)-1 steps, so weights above
        # (2^(b-1) - 1/2) steps are clipped to the top code: there the error is up to one step
        # (the weight equal to +max|w| is exactly one step away); elsewhere half a step.
        half = 2.0 ** (bits - 1)
        peak = float(np.max(np.abs(w)))
        step = peak / half
        top = (half - 1) * step
        bound = np.where(w > top, step, 0.5 * step) * (1 + REL) + REL * np.abs(w) + ABS
        assert np.all(err <= bound), float(np.max(err - bound))
        clipped = w > (half - 0.5) * step * (1 + REL) + ABS
        top32 = np.float32(np.float32(np.float32(peak) / np.float32(half)) * np.float32(half - 1))
        assert np.all(got[clipped] == np.float64(top32))
    else:  # pragma: no cover
        raise AssertionError(scheme)


@pytest.fixture
def within_step():
    return check_within_step

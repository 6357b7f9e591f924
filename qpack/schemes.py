"""Quantization schemes (spec/FORMAT.md section 6).

A scheme turns a float tensor into unsigned ``bits``-bit codes plus float32 ``scale`` and
``zero_point`` arrays (one entry per tensor, or one per output channel along axis 0).
Every scheme is decoded by the same affine rule, evaluated in IEEE float32::

    w = scale * (float32(q) - zero_point)

so the decoder does not need to know which scheme produced a file: the scheme name in the
header is informational. Quantizing runs in numpy; only decoding must be bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "SCHEMES",
    "DEFAULT_SCHEME",
    "Quantized",
    "quantize",
    "levels_for",
    "code_bits",
    "dequantize",
    "dequantize_table",
    "apply_table",
]

Granularity = Literal["tensor", "channel"]


@dataclass(frozen=True)
class Quantized:
    """Codes (uint8, C order, flattened) and the affine parameters that decode them."""

    codes: np.ndarray
    scale: np.ndarray  # float32, one per group
    zero_point: np.ndarray  # float32, one per group
    granularity: Granularity
    bits: int  # width of the codes: every code is below 2**bits


def levels_for(bits: float) -> int:
    """Number of quantization levels for a (possibly fractional) bit width: round(2**bits).

    Fractional widths (e.g. 4.5 -> 23 levels) pay off with entropy coding, which spends
    about log2(levels) bits per code rather than a whole number of bits.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be a number from 1 to 8, got {bits!r}")
    return int(min(256, max(2, round(2.0**bits))))


def code_bits(levels: int) -> int:
    """Bits needed to store codes 0 .. levels-1."""
    return max(1, (levels - 1).bit_length())


def _symmetric_per_layer(w: np.ndarray, levels: int) -> Quantized:
    """The origin's quantizer: q = clip(round(w / max|w| * 2^(b-1)), -2^(b-1), 2^(b-1) - 1).

    Evaluated in float32 exactly as the origin did, then stored as unsigned codes
    ``q + 2^(b-1)`` with zero point ``2^(b-1)`` and scale ``max|w| / 2^(b-1)``, so the
    decoded values equal the origin's ``q * max|w| / 2^(b-1)`` in float32.
    """
    bits = code_bits(levels)
    if levels != 1 << bits:
        raise ValueError("symmetric-per-layer needs a whole number of bits")
    half = np.float32(1 << (bits - 1))
    peak = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    if not peak > 0:
        peak = np.float32(1)  # all-zero tensor: every code decodes to 0
    q = np.clip(np.round(w / peak * half), -half, half - 1)
    codes = (q + half).astype(np.uint8)
    return Quantized(
        codes=codes.reshape(-1),
        scale=np.array([peak / half], dtype=np.float32),
        zero_point=np.array([half], dtype=np.float32),
        granularity="tensor",
        bits=bits,
    )


def _rows(w: np.ndarray) -> np.ndarray:
    """The tensor as (channels along axis 0, everything else), in float64."""
    channels = w.shape[0] if w.ndim else 1
    inner = int(np.prod(w.shape[1:], dtype=np.int64))
    return w.reshape(channels, inner).astype(np.float64)


def _affine(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, top: int):
    """Per-row min/max affine grid over [lo, hi] (which holds 0): scale, zero point, codes."""
    scale = ((hi - lo) / top).astype(np.float32)
    scale[~(scale > 0)] = np.float32(1)  # constant-zero channel: any scale decodes to 0
    step = scale.astype(np.float64)[:, None]
    zero = np.clip(np.round(-lo / step[:, 0]), 0, top)
    q = np.clip(np.round(rows / step) + zero[:, None], 0, top)
    return scale, zero, q


def _range(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0]), np.zeros(rows.shape[0])
    return np.minimum(rows.min(axis=1), 0.0), np.maximum(rows.max(axis=1), 0.0)


def _pack_result(q, scale, zero, levels, granularity: Granularity = "channel") -> Quantized:
    return Quantized(
        codes=q.astype(np.uint8).reshape(-1),
        scale=scale,
        zero_point=zero.astype(np.float32),
        granularity=granularity,
        bits=code_bits(levels),
    )


def _asymmetric_per_channel(w: np.ndarray, levels: int) -> Quantized:
    """Min/max affine quantization per output channel (axis 0), range widened to hold 0.

    Holding 0 keeps the integer zero point inside the code range, so every weight lies
    within half a step of the grid.
    """
    rows = _rows(w)
    lo, hi = _range(rows)
    scale, zero, q = _affine(rows, lo, hi, levels - 1)
    return _pack_result(q, scale, zero, levels)


def _asymmetric_per_layer(w: np.ndarray, levels: int) -> Quantized:
    """Min/max affine quantization with one step for the whole tensor (range holds 0).

    With entropy coding this is usually the better grid: a uniform step spends bits where
    the weights are, whereas per-channel steps refine wide channels for nothing.
    """
    rows = _rows(w).reshape(1, -1)
    lo, hi = _range(rows)
    scale, zero, q = _affine(rows, lo, hi, levels - 1)
    return _pack_result(q, scale, zero, levels, "tensor")


# Fractions of each channel's [min, max] range tried by the clipping search.
CLIP_RATIOS = np.linspace(1.0, 0.3, 29)


def _mse_per_channel(w: np.ndarray, levels: int) -> Quantized:
    """Like asymmetric-per-channel, but each channel's range is shrunk by the ratio (from
    1.0 down to 0.3) that minimizes its squared reconstruction error: clipping a few outliers
    buys a finer step for all the other weights. Never worse than min/max per channel."""
    rows = _rows(w)
    lo, hi = _range(rows)
    top = levels - 1
    best = None
    for ratio in CLIP_RATIOS:
        scale, zero, q = _affine(rows, lo * ratio, hi * ratio, top)
        err = ((scale.astype(np.float64)[:, None] * (q - zero[:, None]) - rows) ** 2).sum(axis=1)
        if best is None:
            best = [err, scale, zero, q]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better, scale, best[1])
        best[2] = np.where(better, zero, best[2])
        best[3] = np.where(better[:, None], q, best[3])
    return _pack_result(best[3], best[1].astype(np.float32), best[2], levels)


SCHEMES = {
    "symmetric-per-layer": _symmetric_per_layer,
    "asymmetric-per-channel": _asymmetric_per_channel,
    "asymmetric-per-layer": _asymmetric_per_layer,
    "mse-per-channel": _mse_per_channel,
}
DEFAULT_SCHEME = "asymmetric-per-channel"


def quantize(w: np.ndarray, bits: float, scheme: str = DEFAULT_SCHEME) -> Quantized:
    """Quantize a finite float array to ``levels_for(bits)`` levels with the named scheme."""
    try:
        fn = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}") from None
    return fn(np.asarray(w, dtype=np.float32), levels_for(bits))


def dequantize_table(bits: int, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """The decoded float32 value of every code for every group: shape (groups, 2**bits).

    Two separate float32 operations, each rounded to nearest-even, in this order: the
    subtraction ``float32(q) - zero_point`` and then the product with ``scale``. A hostile
    file can make the product overflow to infinity; callers check with ``np.isfinite``.
    """
    levels = np.arange(1 << bits, dtype=np.float32)[None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        diff = levels - zero_point.astype(np.float32)[:, None]
        return (scale.astype(np.float32)[:, None] * diff).astype(np.float32)


def apply_table(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Look flat codes up in a (groups, 2**bits) table; groups split the codes into equal
    runs, in order. Returns a flat float32 array."""
    groups = table.shape[0]
    if groups == 1:
        return table[0][codes]
    per_group = codes.size // groups if groups else 0
    rows = codes.reshape(groups, per_group)
    return table[np.arange(groups)[:, None], rows].reshape(-1)


def dequantize(
    codes: np.ndarray, bits: int, scale: np.ndarray, zero_point: np.ndarray
) -> np.ndarray:
    """Decode flat codes to a flat float32 array (spec section 6.1)."""
    return apply_table(dequantize_table(bits, scale, zero_point), codes)

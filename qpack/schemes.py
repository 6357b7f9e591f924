"""Quantization schemes (spec/FORMAT.md section 6).

A scheme turns a float tensor into unsigned ``bits``-bit codes plus float32 ``scale`` and
``zero_point`` arrays: one entry per tensor, one per output channel along axis 0, or one per
group of ``group_size`` codes along each channel's row (its last group possibly short).
A per-group scheme is named with its group size, ``"asymmetric-per-group-64"``; without
one it uses :data:`DEFAULT_GROUP_SIZE`.
Every scheme is decoded by the same affine rule, evaluated in IEEE float32::

    w = scale * (float32(q) - zero_point)

so the decoder does not need to know which scheme produced a file: the scheme name in the
header is informational. Quantizing runs in numpy; only decoding must be bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import kernels

# Elements per block in quantization and dequantization: the float64 temporaries (1 MiB)
# stay in cache, and each numpy call is long enough that two threads rarely wait for the
# GIL (smaller blocks made two threads barely faster than one).
QUANT_BLOCK = 1 << 17

__all__ = [
    "SCHEMES",
    "DEFAULT_SCHEME",
    "DEFAULT_GROUP_SIZE",
    "GROUP_SCHEMES",
    "Quantized",
    "Grid",
    "grid",
    "grid_codes",
    "on_grid",
    "unit_ranges",
    "check_scheme",
    "parse_scheme",
    "quantize",
    "levels_for",
    "code_bits",
    "dequantize",
    "dequantize_table",
    "decodes_finite",
]

Granularity = Literal["tensor", "channel", "group"]

# Codes per group of a per-group scheme named without a size: GGUF's block of 32 weights.
DEFAULT_GROUP_SIZE = 32
# binary16's range of normal numbers: a per-group scale outside it is stored as binary32
# (a subnormal scale would lose the relative precision the grid was chosen with)
HALF_MIN, HALF_MAX = 2.0**-14, 65504.0


@dataclass(frozen=True)
class Quantized:
    """Codes (uint8, C order, flattened) and the affine parameters that decode them."""

    codes: np.ndarray
    scale: np.ndarray  # float32, one per group
    zero_point: np.ndarray  # float32, one per group
    granularity: Granularity
    bits: int  # width of the codes: every code is below 2**bits
    # granularity "group": codes per group, and codes per row (the row a channel's codes)
    group_size: int | None = None
    row: int = 0
    # how the file stores scale and zero point ("float16": every value is a binary16)
    scale_dtype: str = "float32"
    shared_zero: bool = False  # every group has the same zero point: the file stores one

    def values(self, out: np.ndarray | None = None) -> np.ndarray:
        """The flat float32 values the codes decode to (spec section 6.1), into ``out``
        (flat float32) if given."""
        return dequantize(
            self.codes, self.scale, self.zero_point, out, row=self.row, run=self.group_size or 0
        )


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
    # in place (into an array even for a 0-d w): a large tensor is several passes anyway
    q = np.divide(w, peak, out=np.empty_like(w))
    q *= half
    np.rint(q, out=q)
    np.clip(q, -half, half - 1, out=q)
    q += half
    codes = q.astype(np.uint8)
    return Quantized(
        codes=codes.reshape(-1),
        scale=np.array([peak / half], dtype=np.float32),
        zero_point=np.array([half], dtype=np.float32),
        granularity="tensor",
        bits=bits,
    )


def as_rows(w: np.ndarray) -> np.ndarray:
    """The tensor as (channels along axis 0, everything else); no copy."""
    channels = w.shape[0] if w.ndim else 1
    inner = math.prod(w.shape[1:])
    return w.reshape(channels, inner)


def blocks(rows: int, cols: int, whole_rows: bool = False) -> Iterator[tuple[slice, slice]]:
    """(row, column) slices cutting a (rows, cols) array into pieces of about QUANT_BLOCK
    elements: several rows when rows are short, pieces of a row when they are long (unless
    ``whole_rows``)."""
    if cols > QUANT_BLOCK and not whole_rows:
        for r in range(rows):
            for c in range(0, cols, QUANT_BLOCK):
                yield slice(r, r + 1), slice(c, c + QUANT_BLOCK)
    else:
        step = max(1, QUANT_BLOCK // max(cols, 1))
        for r in range(0, rows, step):
            yield slice(r, r + step), slice(None)


# (high, low): the largest and smallest value of each unit (a row, or a group of a row's
# values), float32 arrays of shape (rows, units).
Ranges = tuple[np.ndarray, np.ndarray]


def unit_ranges(rows: np.ndarray, size: int | None = None) -> Ranges:
    """:data:`Ranges` of float32 ``rows``: one unit per row (``size`` None), or each group
    of ``size`` values along it, the last possibly short. A row with no values has one
    unit of range [0, 0] (and no groups)."""
    channels, inner = rows.shape
    run = inner if size is None else size
    units = -(-inner // run) if inner else int(size is None)
    if not rows.size:
        return np.zeros((channels, units), np.float32), np.zeros((channels, units), np.float32)
    if kernels.native is not None and rows.dtype == np.float32:
        high = np.empty((channels, units), dtype=np.float32)
        low = np.empty((channels, units), dtype=np.float32)
        kernels.native.unit_ranges(np.ascontiguousarray(rows), inner, run, high, low)
        return high, low
    whole = inner // run * run
    parts = []
    if whole:
        groups = rows[:, :whole].reshape(channels, -1, run)
        parts.append((groups.max(axis=2), groups.min(axis=2)))
    if whole < inner:
        tail = rows[:, whole:]
        parts.append((tail.max(axis=1, keepdims=True), tail.min(axis=1, keepdims=True)))
    high = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32, copy=False)
    return high, np.concatenate([p[1] for p in parts], axis=1).astype(np.float32, copy=False)


def _range_of(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's [min, max], widened to hold 0, in float64."""
    return np.minimum(low, 0).astype(np.float64), np.maximum(high, 0).astype(np.float64)


def _grid(
    lo: np.ndarray, hi: np.ndarray, top: int, half: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit affine grid over [lo, hi] (which holds 0): float32 scale (rounded to binary16
    first when ``half``, so that codes are chosen on the grid the file stores), float64
    zero point."""
    with np.errstate(over="ignore"):  # huge ranges overflow; the caller rejects them
        scale = ((hi - lo) / top).astype(np.float32)
        if half:
            scale = scale.astype(np.float16).astype(np.float32)
    scale[~(scale > 0)] = np.float32(1)  # constant-zero channel: any scale decodes to 0
    return scale, np.clip(np.round(-lo / scale.astype(np.float64)), 0, top)


def _codes_into(rows, scale, zero, top, out) -> np.ndarray:
    """``out = clip(round(w / scale) + zero, 0, top)`` for one block, evaluated in float64;
    returns the codes as float64. (Adding the integer zero point before clipping keeps the
    clip's bounds scalar, which numpy does several times faster than per-row bounds.)"""
    t = np.divide(rows, scale.astype(np.float64)[:, None])
    np.rint(t, out=t)
    np.add(t, zero[:, None], out=t)
    np.clip(t, 0, top, out=t)
    np.copyto(out, t, casting="unsafe")
    return t


def _affine_codes(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int) -> np.ndarray:
    """:func:`_codes_into` for every row (one grid each), block by block (the rows are never
    widened to float64 as a whole), or by the compiled kernel in one pass."""
    codes = np.empty(rows.shape, dtype=np.uint8)
    if kernels.native is not None and rows.size:  # the same codes in one pass
        kernels.native.quantize(
            np.ascontiguousarray(rows),
            np.ascontiguousarray(scale, dtype=np.float32),
            np.ascontiguousarray(zero, dtype=np.float64),
            top,
            codes,
        )
        return codes
    for r, c in blocks(*rows.shape):
        _codes_into(rows[r, c], scale[r], zero[r], top, codes[r, c])
    return codes


# A grid rule: (rows, group size or None, levels, binary16 scales?, their Ranges) -> float32
# scale and float64 zero point of every unit, shaped as the ranges. Rules see only each
# unit's range, and the rows where a range alone does not decide.
GridRule = Callable[
    [np.ndarray, "int | None", int, bool, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]
]


def _affine_grid(rows, size, levels, half, high, low):
    """Min/max affine grid of each unit, range widened to hold 0."""
    lo, hi = _range_of(high, low)
    return _grid(lo, hi, levels - 1, half)


def _symmetric_grid(rows, size, levels, half, high, low):
    """One zero point ``h = levels // 2`` for every unit, and per unit the scale ``-v / h``,
    ``v`` its weight of largest magnitude: ``v`` is code 0 exactly, so the full range
    ``[-h, levels - 1 - h]`` is used on the side of the largest weight (GGUF's Q4_0 grid at
    4 bits)."""
    h = levels // 2
    peak = _signed_peaks(rows, size, high, low)
    with np.errstate(over="ignore"):
        scale = (peak.astype(np.float64) / -h).astype(np.float32)
        if half:
            scale = scale.astype(np.float16).astype(np.float32)
    scale[~(scale != 0)] = np.float32(1)  # all-zero unit: any scale decodes to 0
    return scale, np.full(scale.shape, float(h))


def _signed_peaks(rows: np.ndarray, size: int | None, high, low) -> np.ndarray:
    """Each unit's value of largest magnitude (its range decides, but for a unit holding
    both v and -v as its extremes: then the first of them along the row)."""
    peak = np.where(high >= -low, high, low).astype(np.float32)
    tied = np.nonzero((high == -low) & (high != 0))
    if tied[0].size:
        channels, inner = rows.shape
        run = inner if size is None else size
        cols = tied[1][:, None] * run + np.arange(run)
        inside = cols < inner
        values = np.where(inside, rows[tied[0][:, None], np.minimum(cols, inner - 1)], 0)
        first = np.abs(values).argmax(axis=1)
        peak[tied] = values[np.arange(first.size), first]
    return peak


@dataclass(frozen=True)
class Grid:
    """A scheme's affine parameters for one tensor, before any code is chosen: run ``g``
    of the codes (runs as :func:`dequantize` lays them out) has ``scale[g]`` (float32) and
    zero point ``zero[g]`` (an integer, float64)."""

    scale: np.ndarray
    zero: np.ndarray
    levels: int
    granularity: Granularity
    group_size: int | None = None
    row: int = 0
    scale_dtype: str = "float32"
    shared_zero: bool = False


def _half_scales(scale: np.ndarray) -> bool:
    """Whether every scale is a normal binary16 number (the file may store them so)."""
    magnitude = np.abs(scale)
    return bool(((magnitude >= HALF_MIN) & (magnitude <= HALF_MAX)).all())


# closed-form schemes: base name -> (granularity, rule, one zero point for all groups)
_GRIDS: dict[str, tuple[Granularity, GridRule, bool]] = {
    "asymmetric-per-layer": ("tensor", _affine_grid, False),
    "asymmetric-per-channel": ("channel", _affine_grid, False),
    "asymmetric-per-group": ("group", _affine_grid, False),
    "symmetric-per-group": ("group", _symmetric_grid, True),
}


def grid(
    w: np.ndarray,
    bits: float,
    scheme: str,
    ranges: Callable[[int | None], Ranges] | None = None,
) -> Grid | None:
    """The grid that :func:`quantize` puts ``w`` (finite float32) on with ``scheme``, without
    choosing codes; None for a scheme whose grid depends on the codes (the MSE-clipped
    ones, the origin's per-layer int8). ``ranges``: :func:`unit_ranges` of ``as_rows(w)``
    by group size, where the caller keeps them."""
    base, size = parse_scheme(scheme)
    return _grid_for(w, levels_for(bits), base, size, ranges) if base in _GRIDS else None


def _grid_for(w, levels: int, base: str, size: int | None, ranges=None) -> Grid:
    granularity, rule, shared = _GRIDS[base]
    if granularity == "group" and w.ndim == 0:
        raise ValueError("per-group schemes need at least one dimension")
    rows = as_rows(w)
    high, low = (ranges or (lambda s: unit_ranges(rows, s)))(size)
    if granularity == "tensor":
        high, low = high.max(initial=0, keepdims=True), low.min(initial=0, keepdims=True)
        high, low = high.reshape(1, 1), low.reshape(1, 1)
    if granularity != "group":
        scale, zero = rule(rows, None, levels, False, high, low)
        return Grid(scale.reshape(-1), zero.reshape(-1), levels, granularity)
    for half in (True, False):  # binary16 scales where every one is a normal number
        scale, zero = rule(rows, size, levels, half, high, low)
        if not half or _half_scales(scale):
            break
    return Grid(
        scale.reshape(-1),
        zero.reshape(-1),
        levels,
        "group",
        group_size=size,
        row=rows.shape[1],
        scale_dtype="float16" if half else "float32",
        shared_zero=shared,
    )


def grid_codes(w: np.ndarray, g: Grid) -> np.ndarray:
    """The codes of finite float32 ``w`` on grid ``g`` (flat, C order), rounding to
    nearest: clip(round(w / scale) + zero, 0, levels - 1)."""
    top = g.levels - 1
    if g.granularity == "tensor":
        return _affine_codes(w.reshape(1, -1), g.scale, g.zero, top).reshape(-1)
    rows = as_rows(w)
    if g.granularity == "channel":
        return _affine_codes(rows, g.scale, g.zero, top).reshape(-1)
    channels, inner = rows.shape
    per = -(-inner // g.group_size)  # groups a row
    scale, zero = g.scale.reshape(channels, per), g.zero.reshape(channels, per)
    codes = np.empty(rows.shape, dtype=np.uint8)
    for cols, part, units in _group_parts(rows, g.group_size):
        s, z = scale[:, units].reshape(-1), zero[:, units].reshape(-1)
        codes[:, cols] = _affine_codes(part, s, z, top).reshape(channels, -1)
    return codes.reshape(-1)


def _group_parts(rows: np.ndarray, size: int) -> Iterator[tuple[slice, np.ndarray, slice]]:
    """(columns, their values as one group a row, the groups' units) of the whole groups
    of ``size`` values of every row, then of the rows' short last groups, if any: each
    part is quantized as one set of rows, one grid each."""
    channels, inner = rows.shape
    whole = inner // size * size
    if whole and channels:
        part = np.ascontiguousarray(rows[:, :whole]).reshape(-1, size)
        yield slice(0, whole), part, slice(0, whole // size)
    if whole < inner and channels:
        yield slice(whole, inner), np.ascontiguousarray(rows[:, whole:]), slice(whole // size, None)


def on_grid(g: Grid, codes: np.ndarray) -> Quantized:
    """The quantized tensor of ``codes`` (flat uint8) on grid ``g``."""
    return Quantized(
        codes=codes,
        scale=g.scale,
        zero_point=g.zero.astype(np.float32),
        granularity=g.granularity,
        bits=code_bits(g.levels),
        group_size=g.group_size,
        row=g.row,
        scale_dtype=g.scale_dtype,
        shared_zero=g.shared_zero,
    )


# Fractions of each channel's [min, max] range tried by the clipping search.
CLIP_RATIOS = np.linspace(1.0, 0.3, 29)


def _mse_rows(rows: np.ndarray, levels: int, half: bool, high, low):
    """Min/max affine quantization of each row (``high``, ``low``: its range), but with the
    range shrunk by the ratio (from 1.0 down to 0.3) that minimizes the row's squared
    reconstruction error: clipping a few outliers buys a finer step for all the other
    weights. Never worse than min/max per row. (codes, float32 scale, float64 zero point.)"""
    lo, hi = _range_of(high.reshape(-1), low.reshape(-1))
    top = levels - 1
    scale = np.empty(rows.shape[0], dtype=np.float32)
    zero = np.empty(rows.shape[0])
    codes = np.empty(rows.shape, dtype=np.uint8)
    for r, _ in blocks(*rows.shape, whole_rows=True):
        block = rows[r].astype(np.float64)
        trial = np.empty(block.shape, dtype=np.uint8)
        best_err = None
        for ratio in CLIP_RATIOS:
            s, z = _grid(lo[r] * ratio, hi[r] * ratio, top, half)
            q = _codes_into(block, s, z, top, trial)
            q -= z[:, None]
            # a grid over a range near the float limit overflows (its error NaN or inf):
            # the caller refuses such a grid (decodes_finite), so no warning here
            with np.errstate(over="ignore", invalid="ignore"):
                q *= s.astype(np.float64)[:, None]
                q -= block
                err = np.einsum("ij,ij->i", q, q)
            better = slice(None) if best_err is None else err < best_err
            best_err = err if best_err is None else np.where(better, err, best_err)
            scale[r][better], zero[r][better] = s[better], z[better]
            codes[r][better] = trial[better]
    return codes, scale, zero


def _mse_per_channel(w: np.ndarray, levels: int) -> Quantized:
    """Like asymmetric-per-channel, but each channel's range is shrunk by the ratio (from
    1.0 down to 0.3) that minimizes its squared reconstruction error."""
    rows = as_rows(w)
    codes, scale, zero = _mse_rows(rows, levels, False, *unit_ranges(rows))
    zero = zero.astype(np.float32)
    return Quantized(codes.reshape(-1), scale, zero, "channel", code_bits(levels))


def _mse_per_group(w: np.ndarray, levels: int, size: int = DEFAULT_GROUP_SIZE) -> Quantized:
    """Like asymmetric-per-group, with each group's range shrunk as mse-per-channel's rows'
    are: the whole groups of all rows as one set of rows, the short last groups (if any)
    as another. Scales are binary16 where every one is a normal binary16 number."""
    if w.ndim == 0:
        raise ValueError("per-group schemes need at least one dimension")
    rows = as_rows(w)
    channels, inner = rows.shape
    high, low = unit_ranges(rows, size)
    parts = list(_group_parts(rows, size))
    for half in (True, False):
        codes = np.empty(rows.shape, dtype=np.uint8)
        scale = np.empty(high.shape, dtype=np.float32)
        zero = np.empty(high.shape)
        for cols, part, units in parts:
            c, s, z = _mse_rows(part, levels, half, high[:, units], low[:, units])
            codes[:, cols] = c.reshape(channels, -1)
            scale[:, units] = s.reshape(channels, -1)
            zero[:, units] = z.reshape(channels, -1)
        if not half or _half_scales(scale):
            break
    return Quantized(
        codes.reshape(-1),
        scale.reshape(-1),
        zero.reshape(-1).astype(np.float32),
        "group",
        code_bits(levels),
        group_size=size,
        row=inner,
        scale_dtype="float16" if half else "float32",
    )


def _closed_form(base: str, doc: str):
    """The quantizer of a scheme in :data:`_GRIDS`: its :func:`grid`, then the nearest
    codes on it."""

    def scheme(w: np.ndarray, levels: int, size: int | None = None) -> Quantized:
        g = _grid_for(w, levels, base, size)
        return on_grid(g, grid_codes(w, g))

    scheme.__doc__ = doc
    return scheme


SCHEMES = {
    "symmetric-per-layer": _symmetric_per_layer,
    "asymmetric-per-channel": _closed_form(
        "asymmetric-per-channel",
        "Min/max affine quantization per output channel (axis 0), range widened to hold 0.\n\n"
        "Holding 0 keeps the integer zero point inside the code range, so every weight lies\n"
        "within half a step of the grid.",
    ),
    "asymmetric-per-layer": _closed_form(
        "asymmetric-per-layer",
        "Min/max affine quantization with one step for the whole tensor (range holds 0).\n\n"
        "With entropy coding this is usually the better grid: a uniform step spends bits\n"
        "where the weights are, whereas per-channel steps refine wide channels for nothing.",
    ),
    "mse-per-channel": _mse_per_channel,
    "asymmetric-per-group": _closed_form(
        "asymmetric-per-group", "Min/max affine quantization of each group of codes."
    ),
    "symmetric-per-group": _closed_form(
        "symmetric-per-group", "Symmetric quantization of each group of codes (Q4_0's grid)."
    ),
    "mse-per-group": _mse_per_group,
}
GROUP_SCHEMES = ("asymmetric-per-group", "symmetric-per-group", "mse-per-group")
DEFAULT_SCHEME = "asymmetric-per-channel"


def parse_scheme(scheme: str) -> tuple[str, int | None]:
    """(base scheme name, group size or None) of a scheme name such as
    ``"symmetric-per-group-64"``; raises ValueError for a name no scheme has."""
    if isinstance(scheme, str):
        if scheme in GROUP_SCHEMES:
            return scheme, DEFAULT_GROUP_SIZE
        if scheme in SCHEMES:
            return scheme, None
        base, _, size = scheme.rpartition("-")
        if base in GROUP_SCHEMES and size.isdigit() and size[0] != "0" and len(size) < 15:
            return base, int(size)
    raise ValueError(
        f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)} (a per-group scheme may "
        f"end in its group size, e.g. symmetric-per-group-64)"
    )


def check_scheme(scheme: str) -> str:
    """``scheme`` when it names a scheme (see :func:`parse_scheme`), else ValueError."""
    parse_scheme(scheme)
    return scheme


def quantize(w: np.ndarray, bits: float, scheme: str = DEFAULT_SCHEME) -> Quantized:
    """Quantize a finite float array to ``levels_for(bits)`` levels with the named scheme."""
    base, size = parse_scheme(scheme)
    w, levels = np.asarray(w, dtype=np.float32), levels_for(bits)
    return SCHEMES[base](w, levels) if size is None else SCHEMES[base](w, levels, size)


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


def decodes_finite(bits: int, scale: np.ndarray, zero_point: np.ndarray) -> bool:
    """Whether every code decodes to a finite float32 (a hostile file can make the product
    overflow). Both operations are monotone in the code, so the extreme codes 0 and
    ``2**bits - 1`` of each group decide: no table of every code is built."""
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero_point, dtype=np.float32)
    # every group far from FLT_MAX (the usual case): |scale| * (|zero| + 2**bits) bounds
    # every value, so the exact check below is not needed
    if scale.size == 1:  # no array calls
        bound = abs(float(scale.flat[0])) * (abs(float(zero.flat[0])) + (1 << bits))
    else:  # a looser bound, in float64 (no overflow): four array calls (none if empty)
        top = float(np.abs(scale).max()) if scale.size else 0.0
        bound = top * (float(np.abs(zero).max()) + (1 << bits)) if top else 0.0
    if bound < 1e38:
        return True
    ends = np.array([0, (1 << bits) - 1], dtype=np.float32)[None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        values = scale[:, None] * (ends - zero[:, None])
    return bool(np.isfinite(values).all())


def dequantize(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    out: np.ndarray | None = None,
    *,
    row: int = 0,
    run: int = 0,
) -> np.ndarray:
    """Decode flat uint8 codes to a flat float32 array (spec section 6.1): run ``g`` of the
    codes decodes as ``scale[g] * (float32(q) - zero_point[g])``, two float32 operations in
    that order (the same values as :func:`dequantize_table`). The runs: ``scale.size``
    equal runs in order, or with ``run`` (granularity "group"), rows of ``row`` codes each
    split into runs of ``run``, the last of a row possibly short. Works block by block,
    into ``out`` if given."""
    if out is None:
        out = np.empty(codes.size, dtype=np.float32)
    if codes.size == 0:
        return out
    native = kernels.native is not None and codes.dtype == np.uint8
    if native and out.dtype == np.float32 and out.flags.c_contiguous:
        # a byte is a code: 8-bit codes, one to a symbol
        codes = np.ascontiguousarray(codes)
        dequantize_stream(codes, 8, 1, codes.size, scale, zero_point, out, row=row, run=run)
        return out
    scale = scale.astype(np.float32, copy=False).reshape(-1)
    zero = zero_point.astype(np.float32, copy=False).reshape(-1)
    if run and row % run and run < row:  # short last runs: whole runs, then the rest
        rows, per_row, whole = codes.size // row, -(-row // run), row // run * run
        codes, dest = codes.reshape(rows, row), out.reshape(rows, row)
        scale, zero = scale.reshape(rows, per_row), zero.reshape(rows, per_row)
        shape = (rows, per_row - 1, run)
        _affine_into(
            codes[:, :whole].reshape(shape),
            dest[:, :whole].reshape(shape),
            scale[:, :-1, None],
            zero[:, :-1, None],
        )
        _affine_into(codes[:, whole:], dest[:, whole:], scale[:, -1:], zero[:, -1:])
        return out
    groups = scale.size
    rows = codes.reshape(groups, -1)
    dest = out.reshape(groups, -1)
    scale, zero = scale.reshape(groups, 1), zero.reshape(groups, 1)
    for r, c in blocks(*rows.shape):
        _affine_into(rows[r, c], dest[r, c], scale[r], zero[r])
    return out


def _affine_into(codes, dest, scale, zero) -> None:
    """``dest = scale * (float32(codes) - zero)``, two float32 operations (broadcasting)."""
    with np.errstate(over="ignore", invalid="ignore"):
        np.subtract(codes, zero, out=dest, dtype=np.float32)
        np.multiply(dest, scale, out=dest, dtype=np.float32)


def dequantize_stream(
    src,
    bits: int,
    group: int,
    count: int,
    scale: np.ndarray,
    zero_point: np.ndarray,
    out,
    *,
    row: int = 0,
    run: int = 0,
) -> None:
    """:func:`dequantize` by the compiled kernel, reading the ``count`` codes straight
    from a packed stream (``group`` 0, spec 5.1) or from Huffman symbols of ``group``
    codes each (spec 5.2) into float32 ``out``: no array of codes is made."""
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    zero = np.ascontiguousarray(zero_point, dtype=np.float32)
    kernels.native.dequantize(src, bits, group, count, scale, zero, out, row, run)

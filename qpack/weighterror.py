"""The weight error that the width search measures: each output channel's sum of squared
differences between a tensor's decoded values and its own.

The sums are taken in one fixed order, so that the compiled kernels and numpy give the
same bits and a plan never depends on which of them ran: along each row, element ``k``'s
difference (float32, or float64 for a float64 tensor) is squared in float64 and added to
lane ``k % 8`` in order; the eight lanes are then added as ``((0+1)+(2+3))+((4+5)+(6+7))``.
The compiled kernels also measure a grid's error without writing its codes, which is most
of the width search's work.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .schemes import Grid, as_rows, blocks, dequantize, grid_codes, quantize

__all__ = ["ORIGIN_SCHEME", "grid_errors", "origin_errors", "row_errors", "row_squares"]

LANES = 8
# the scheme of the origin's per-layer quantizer, which origin_errors measures
ORIGIN_SCHEME = "symmetric-per-layer"


def row_squares(diff: np.ndarray) -> np.ndarray:
    """Each row's sum of squares of a 2-D float array, in float64, in the order above."""
    rows, cols = diff.shape
    out = np.zeros(rows)
    pad = -cols % LANES
    for r, _ in blocks(rows, cols + pad, whole_rows=True):  # bounded float64 temporaries
        part = np.zeros((diff[r].shape[0], cols + pad))
        part[:, :cols] = diff[r]
        np.square(part, out=part)
        # a reduction along a strided axis adds in order: lane by lane, element by element
        lanes = part.reshape(part.shape[0], -1, LANES).sum(axis=1)
        out[r] = ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + (
            (lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7])
        )
    return out


def row_errors(reference: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """Per output channel of ``reference`` (its :func:`~qpack.schemes.as_rows`), the sum of
    squared differences of ``values`` (the same number of elements) from it, or of
    ``reference`` alone (its energy) when ``values`` is None."""
    rows = as_rows(reference)
    native = kernels.native is not None and rows.size and rows.dtype == np.float32
    if native and (values is None or values.dtype == np.float32):
        sums = np.empty(rows.shape[0])
        other = np.zeros(0, np.float32) if values is None else np.ascontiguousarray(values)
        kernels.native.row_errors(np.ascontiguousarray(rows), other, sums)
        return sums
    if values is None:
        return row_squares(rows)
    return row_squares(np.subtract(as_rows(values.reshape(reference.shape)), rows))


def grid_errors(reference: np.ndarray, g: Grid, codes: np.ndarray | None = None) -> np.ndarray:
    """:func:`row_errors` of float32 ``reference`` rounded to nearest on grid ``g`` and
    decoded (spec 6.1); its codes go into ``codes`` (uint8, one per value) if given. The
    compiled kernels take one pass and make no values."""
    rows = as_rows(reference)
    if kernels.native is not None and rows.size:
        sums = np.empty(rows.shape[0])
        kernels.native.quantize_errors(
            np.ascontiguousarray(rows),
            np.ascontiguousarray(g.scale, dtype=np.float32),
            np.ascontiguousarray(g.zero, dtype=np.float64),
            g.levels - 1,
            sums,
            g.row,
            g.group_size or 0,
            *(() if codes is None else (codes,)),
        )
        return sums
    found = grid_codes(reference, g)
    if codes is not None:
        codes[...] = found
    values = dequantize(found, g.scale, g.zero.astype(np.float32), row=g.row, run=g.group_size or 0)
    return row_errors(reference, values)


def origin_errors(reference: np.ndarray, bits: int, peak: np.float32) -> np.ndarray:
    """:func:`row_errors` of float32 ``reference`` quantized by the origin's per-layer
    quantizer (:data:`ORIGIN_SCHEME`) at whole ``bits``, whose largest magnitude is
    ``peak``: with the compiled kernels in one pass."""
    rows = as_rows(reference)
    if kernels.native is not None and rows.size and peak > 0:
        sums = np.empty(rows.shape[0])
        kernels.native.origin_errors(np.ascontiguousarray(rows), float(peak), bits, sums)
        return sums
    return row_errors(reference, quantize(reference, bits, ORIGIN_SCHEME).values())

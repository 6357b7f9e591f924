"""Error-compensating (GPTQ-style) rounding onto a fixed quantization grid.

Round-to-nearest picks each code on its own. GPTQ keeps the same grid (scale and zero
point) but picks the codes of a row one column (input) at a time and moves the columns not
yet quantized to cancel, as far as the inputs' correlations allow, the output error of those
already quantized; the statistic is the layer's input second moment ``H`` (see
:mod:`qpack.calibrate`), and the output error of a weight change ``dW`` is
``trace(dW H dW^T)`` per input row. Only the codes change, never the file format.

The work is in float64. The loop over columns, each step a few operations on vectors of one
value per output channel, is in numpy, whose per-call cost is below torch's; the matrix
work (factoring the Hessian, the updates of a block of columns) is in torch, on the same
memory: on the UNet's 1728-column layers (one thread), MKL's Cholesky factorization and
triangular inverse took about 1/4 and 1/6 of the time of numpy's OpenBLAS, and the block
updates kept their speed on a loaded machine where numpy's two BLAS threads took 10 times
longer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .schemes import DEFAULT_SCHEME, Quantized, as_rows, levels_for, quantize

__all__ = ["gptq_codes", "gptq_quantize", "output_error", "row_output_errors"]


def gptq_codes(
    weight: np.ndarray,
    hessian: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    levels: int,
    *,
    granularity: str,
    group_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = 128,
) -> np.ndarray:
    """Codes for ``weight`` on the grid ``scale``/``zero_point`` (float32, one value for
    ``granularity="tensor"``, one per output channel for ``"channel"``, one per group of
    ``group_size`` columns of each channel for ``"group"``: the grid is fixed before any
    code is chosen, whatever the column order), chosen by GPTQ with
    ``hessian`` (groups, cols, cols) (or (cols, cols) for one group), where cols is the
    width of ``weight.reshape(out_channels, -1)`` and the rows of group g use
    ``hessian[g]``.

    Returns flat uint8 codes in C order of ``weight``, each below ``levels``: the layout of
    :func:`qpack.schemes.quantize`. Each code rounds its (compensated) weight as
    ``clip(rint(w / scale) + zero_point, 0, levels - 1)`` (with an identity Hessian: the
    codes of round-to-nearest). ``damp`` times the mean of the nonzero diagonal entries of
    ``hessian`` is added to its diagonal; inputs whose entry is 0 (never nonzero in
    calibration) keep their weights, rounded to nearest. ``act_order`` quantizes the inputs
    of largest second moment first; ``block`` columns are updated at a time.
    """
    w = np.asarray(weight, dtype=np.float32)
    rows = as_rows(w)
    groups, h = _grouped(rows.shape, hessian)
    if not isinstance(levels, (int, np.integer)) or not 2 <= levels <= 256:
        raise ValueError(f"levels must be an integer from 2 to 256, got {levels!r}")
    if not (np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be finite and >= 0, got {damp!r}")
    if not (isinstance(block, (int, np.integer)) and block >= 1):
        raise ValueError(f"block must be a positive integer, got {block!r}")
    if not np.isfinite(rows).all():
        raise ValueError("weight must be finite")
    scale, zero = _grid_per_cell(rows.shape, scale, zero_point, granularity, group_size)
    codes = np.empty(rows.shape, dtype=np.uint8)
    per_group = rows.shape[0] // groups
    for g in range(groups):
        r = slice(g * per_group, (g + 1) * per_group)
        codes[r] = _gptq(
            rows[r],
            _factored(hessian, h, g, damp, act_order),
            scale[r],
            zero[r],
            levels - 1,
            block=block,
        )
    return codes.reshape(-1)


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: float,
    scheme: str = DEFAULT_SCHEME,
    **options,
) -> Quantized:
    """:func:`qpack.schemes.quantize` with the codes chosen by :func:`gptq_codes` on the
    grid the scheme picked (``options``: damp, act_order, block)."""
    q = quantize(weight, bits, scheme)
    codes = gptq_codes(
        weight,
        hessian,
        q.scale,
        q.zero_point,
        levels_for(bits),
        granularity=q.granularity,
        group_size=q.group_size,
        **options,
    )
    return replace(q, codes=codes)


def output_error(delta: np.ndarray, hessian: np.ndarray) -> float:
    """The mean squared output change per input row that weight change ``delta`` (the
    weight's shape) makes: ``sum over rows r of dW_r^T H dW_r``, each row with the Hessian
    of its group."""
    return float(row_output_errors(delta, hessian).sum())


def row_output_errors(delta: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """:func:`output_error` of each output channel: ``dW_r^T H dW_r`` for every row of
    ``delta.reshape(out_channels, -1)`` (float64)."""
    d = as_rows(np.asarray(delta, dtype=np.float64))
    groups, h = _grouped(d.shape, hessian)
    d = d.reshape(groups, -1, d.shape[1])
    return (np.matmul(d, h) * d).sum(axis=2).reshape(-1)


def _grouped(shape: tuple[int, int], hessian: np.ndarray) -> tuple[int, np.ndarray]:
    """The number of groups and the float64 Hessian as (groups, cols, cols), checked against
    a weight of ``shape`` (rows, cols)."""
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim == 2:
        h = h[None]
    rows, cols = shape
    if h.ndim != 3 or h.shape[1:] != (cols, cols):
        raise ValueError(
            f"hessian of shape {np.shape(hessian)} does not fit a weight with {cols} columns "
            f"per output channel: expected (groups, {cols}, {cols})"
        )
    if h.shape[0] == 0 or rows % h.shape[0]:
        raise ValueError(f"{rows} output channels do not split into {h.shape[0]} groups")
    if not np.isfinite(h).all():
        raise ValueError("hessian must be finite")
    return h.shape[0], h


def _grid_per_cell(
    shape: tuple[int, int],
    scale: np.ndarray,
    zero_point: np.ndarray,
    granularity: str,
    group_size: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 scale and zero point of every (row, column) of a weight of ``shape``, checked
    (views where the grid is one per row)."""
    rows, cols = shape
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    zero = np.asarray(zero_point, dtype=np.float32).reshape(-1)
    if granularity == "group":
        if not (isinstance(group_size, (int, np.integer)) and group_size >= 1):
            raise ValueError(f"group granularity needs a group_size >= 1, got {group_size!r}")
        per_row = -(-cols // group_size)
        expected = rows * per_row
    else:
        expected = {"tensor": 1, "channel": rows}.get(granularity)
        if expected is None:
            raise ValueError(
                f"granularity must be 'tensor', 'channel' or 'group', got {granularity!r}"
            )
    if scale.size != expected or zero.size != expected:
        raise ValueError(
            f"{granularity} granularity needs {expected} scale and zero point values, got "
            f"{scale.size} and {zero.size}"
        )
    if not (np.isfinite(scale).all() and np.isfinite(zero).all() and (scale != 0).all()):
        raise ValueError("scale must be finite and nonzero, zero_point finite")
    if granularity == "group":
        column_group = np.arange(cols) // group_size
        return (
            scale.reshape(rows, per_row)[:, column_group],
            zero.reshape(rows, per_row)[:, column_group],
        )
    per_row_scale = np.broadcast_to(scale, (rows,))[:, None]
    per_row_zero = np.broadcast_to(zero, (rows,))[:, None]
    return np.broadcast_to(per_row_scale, shape), np.broadcast_to(per_row_zero, shape)


# A layer's Hessian factored for GPTQ, the same for every grid and width its weight is
# tried with: (the Hessian as given, group, damp, act_order) -> (column order,
# upper-triangular U as a torch tensor). The allocator tries a layer on many grids; the
# factorization took a sixth of packing a UNet. Kept for the most recent layers, while the
# Hessian is the same object (callers do not change one in place).
_FACTORED: dict[tuple, tuple] = {}
FACTORED_BYTES = 1 << 28


@dataclass(frozen=True)
class _Factored:
    order: np.ndarray  # the order columns are quantized in
    u_t: torch.Tensor  # upper-triangular U with U^T U = (damped H)^-1, in that order


def _factored(hessian, h: np.ndarray, g: int, damp: float, act_order: bool) -> _Factored:
    """The factorization of group ``g`` of ``h`` (the float64 form of ``hessian``), cached
    while ``hessian`` is the same object (kept alive by the cache, so its id stays its)."""
    key = (id(hessian), g, float(damp), bool(act_order))
    hit = _FACTORED.get(key)
    if hit is not None and hit[0] is hessian:
        _FACTORED[key] = _FACTORED.pop(key)  # most recently used last
        return hit[1]
    factored = _factor(h[g], damp, act_order)
    _FACTORED[key] = (hessian, factored)
    total = 0
    for k in reversed(list(_FACTORED)):  # drop the least recent beyond the budget
        total += _FACTORED[k][1].u_t.numel() * 8
        if total > FACTORED_BYTES and k != key:
            del _FACTORED[k]
    return factored


def _factor(h: np.ndarray, damp: float, act_order: bool) -> _Factored:
    """Dampen ``h`` (cols, cols), order its columns and factor its inverse."""
    cols = h.shape[0]
    diag = np.diag(h).copy()
    dead = ~(diag > 0)  # inputs never seen: no error to spread, nothing to compensate with
    h = h.copy()
    h[dead, :] = 0
    h[:, dead] = 0
    # a dead input's weight rounds to nearest, unchanged: keep what calibration never tested
    h[dead, dead] = 1
    live = ~dead
    if live.any():
        h[np.diag_indices(cols)] += damp * diag[live].mean()
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(cols)
    return _Factored(order, _inverse_cholesky(h[np.ix_(order, order)]))


def _gptq(
    w: np.ndarray,
    factored: _Factored,
    scale: np.ndarray,
    zero: np.ndarray,
    top: int,
    *,
    block: int,
) -> np.ndarray:
    """GPTQ codes of rows ``w`` (rows, cols) with a factored Hessian on a grid given per
    (row, column): ``scale``/``zero`` (rows, cols) float32, so that a grid per group of
    columns needs no change here."""
    cols = w.shape[1]
    order, u_t = factored.order, factored.u_t
    u = u_t.numpy()
    # work column-major (one contiguous vector per column) in act order; torch views of
    # the same memory do the matrix products
    wt = w.T[order].astype(np.float64)
    wt_t = torch.from_numpy(wt)
    errors = np.empty((min(block, cols), wt.shape[1]))
    errors_t = torch.from_numpy(errors)
    scale = scale.T[order]
    scale64 = scale.astype(np.float64)
    zero = zero.T[order].astype(np.float64)
    # nearest code rint(w / s + z), computed as RTN does, rint(w / s) + z, when the zero
    # point is whole (every scheme's is): the same ties, the same codes
    base = np.rint(zero)
    frac = zero - base
    zero32 = zero.astype(np.float32)
    codes = np.empty(wt.shape, dtype=np.uint8)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        for i in range(start, stop):
            q = np.rint(wt[i] / scale64[i] + frac[i])
            q += base[i]
            np.clip(q, 0, top, out=q)
            codes[i] = q
            # the value the decoder makes, two float32 operations: the error is the real one
            value = scale[i] * (q.astype(np.float32) - zero32[i])
            err = (wt[i] - value) / u[i, i]
            wt[i + 1 : stop] -= np.outer(u[i, i + 1 : stop], err)
            errors[i - start] = err
        wt_t[stop:] -= u_t[start:stop, stop:].T @ errors_t[: stop - start]  # all at once
    out = np.empty_like(codes)
    out[order] = codes
    return out.T


def _inverse_cholesky(h: np.ndarray) -> torch.Tensor:
    """Upper-triangular U with ``U^T U = h^-1`` (row i of U, divided by ``U[i, i]``,
    spreads column i's error onto the later columns), damped further if round-off keeps
    ``h`` from factoring.

    With J the reversal, ``J h J = L L^T`` gives ``h^-1 = (J L^-1 J)^T (J L^-1 J)``: one
    Cholesky factorization and one triangular inverse."""
    flipped = torch.from_numpy(np.ascontiguousarray(h)).flip(0, 1)
    eye = torch.eye(len(h), dtype=torch.float64)
    for attempt in range(8):
        lower, info = torch.linalg.cholesky_ex(flipped)
        if not info:
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
        flipped = flipped + eye * (float(flipped.diagonal().mean()) * 1e-6 * 10.0**attempt)
    raise ValueError("hessian is not positive semi-definite")

"""The quantize stage: one floating tensor and its :class:`~qpack.plan.TensorPlan` -> codes
on a grid (:class:`~qpack.schemes.Quantized`), with the checks that make the codes storable.

The scheme chooses the grid (scale and zero point per tensor or per channel); the plan's
rounding chooses the codes on it. Round-to-nearest is done here; error-compensating
rounding comes from a :data:`Rounder` the caller supplies, since it needs statistics of the
model's inputs that this stage does not have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from . import errors as E
from .dtypes import bf16_to_f32
from .plan import TensorPlan
from .schemes import Quantized, decodes_finite, levels_for, quantize

__all__ = ["Rounder", "float_values", "gptq_rounder", "half_values", "quantize_tensor"]

# (name, float32 values, grid from the scheme, levels) -> codes on that grid (each below
# levels), or None to keep the round-to-nearest codes (a tensor it has no statistics for).
Rounder = Callable[[str, np.ndarray, Quantized, int], "np.ndarray | None"]


def float_values(array: np.ndarray, dtype: str) -> np.ndarray:
    """A floating tensor's values as float32 (bfloat16 bit patterns widened exactly)."""
    return bf16_to_f32(array) if dtype == "bfloat16" else array.astype(np.float32, copy=False)


def half_values(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """A floating tensor as little-endian binary16 values (round to nearest even), for
    storage "half"; raises :class:`~qpack.errors.EncodeError` naming the tensor when a
    finite value would overflow to infinity."""
    values = float_values(array, dtype)
    with np.errstate(over="ignore"):
        half = values.astype("<f2")
    if np.isinf(half).sum() != np.isinf(values).sum():
        raise E.EncodeError(
            f"values beyond float16's range (max |w| = {np.abs(values).max():.3g}) "
            "cannot be stored as float16; quantize this tensor or keep it raw",
            tensor=name,
        )
    return half


def quantize_tensor(
    name: str,
    array: np.ndarray,
    dtype: str,
    plan: TensorPlan,
    rounder: Rounder | None = None,
) -> Quantized:
    """Quantize one floating tensor as ``plan`` says; raises
    :class:`~qpack.errors.EncodeError` naming the tensor when it cannot be stored so."""
    values = float_values(array, dtype)
    if not np.isfinite(values).all():
        raise E.EncodeError(
            "holds NaN or infinite values, which cannot be quantized; "
            "clean the weights or keep this tensor raw",
            tensor=name,
        )
    try:
        q = quantize(values, plan.bits, plan.scheme)
    except ValueError as exc:  # e.g. fractional bits for the origin's symmetric quantizer
        raise E.EncodeError(str(exc), tensor=name) from None
    if q.granularity != "tensor" and array.ndim == 0:
        raise E.EncodeError(
            f"{plan.scheme} needs at least one dimension; use a per-layer scheme", tensor=name
        )
    if not decodes_finite(q.bits, q.scale, q.zero_point):
        raise E.EncodeError(
            f"values near the float32 limit (max |w| = {np.abs(values).max():.3g}) overflow "
            f"when quantized to {plan.bits} bits; keep this tensor raw",
            tensor=name,
        )
    if plan.rounding != "nearest":
        if rounder is None:
            raise E.EncodeError(
                f"{plan.rounding} rounding needs calibration statistics (a model and inputs)",
                tensor=name,
            )
        codes = rounder(name, values, q, levels_for(plan.bits))
        if codes is not None:
            q = replace(q, codes=codes)
    return q


def gptq_rounder(stats: Mapping[str, Any], cache: dict | None = None) -> Rounder:
    """A :data:`Rounder` choosing error-compensating codes (:mod:`qpack.gptq`) for the
    tensors that have layer statistics (:mod:`qpack.calibrate`), none for the others.
    With ``cache`` (a dict), codes are kept per tensor and grid, so a plan that is tried,
    measured and then written runs each tensor's rounding once."""
    from .gptq import gptq_codes

    def round_codes(name: str, values: np.ndarray, q: Quantized, levels: int):
        layer = stats.get(name)
        if layer is None:
            return None
        key = (name, levels, q.granularity, q.group_size, q.scale.tobytes(), q.zero_point.tobytes())
        if cache is not None and key in cache:
            return cache[key]
        codes = gptq_codes(
            values,
            layer.hessian,
            q.scale,
            q.zero_point,
            levels,
            granularity=q.granularity,
            group_size=q.group_size,
        )
        if cache is not None:
            codes.flags.writeable = False  # shared by every plan that uses this grid
            cache[key] = codes
        return codes

    return round_codes

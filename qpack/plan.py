"""The plan: what each tensor becomes (width, grid, rounding), decided before any coding.

A plan is plain data. Its public form is the mapping that :func:`qpack.allocate` returns and
:func:`qpack.save` takes as keywords, ``{"bits": ..., "scheme": ..., "rounding": ...}``,
each either one value for every tensor or a mapping from tensor names to values: it can be
printed, saved as JSON and reused. :func:`resolve` turns those options into a
:class:`Plan`, one :class:`TensorPlan` per tensor, which the quantize and encode stages
follow; they never look at the options themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import errors as E
from .container import FLOAT_DTYPES
from .schemes import DEFAULT_SCHEME, check_scheme, levels_for

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_ENTROPY",
    "HALF_BITS",
    "ROUNDINGS",
    "Item",
    "Plan",
    "TensorPlan",
    "resolve",
    "widths",
]

DEFAULT_BITS = 8
# ``bits`` that stores a tensor as IEEE binary16 values (storage "half", spec 6.4) instead of
# codes: GGUF's F16, for tensors too sensitive for 8-bit codes; they decode to ``dtype``.
HALF_BITS = 16
# Huffman-code the quantized codes where that is smaller (it never makes a file larger).
DEFAULT_ENTROPY = True
# How codes are chosen on a tensor's grid: round to nearest, or error-compensating
# rounding from the layer's calibration statistics (needs a model and its inputs).
ROUNDINGS = ("nearest", "gptq")

BitsOption = float | Mapping[str, "float | None"]
SchemeOption = str | Mapping[str, str]
RoundingOption = str | Mapping[str, str]
Item = tuple[str, np.ndarray, str]  # (name, array, header dtype)


@dataclass(frozen=True)
class TensorPlan:
    """What one tensor becomes: ``bits`` None keeps it raw (exact), :data:`HALF_BITS`
    stores binary16 values, 1 to 8 quantizes it."""

    bits: float | None
    scheme: str = DEFAULT_SCHEME
    rounding: str = "nearest"


@dataclass(frozen=True)
class Plan:
    """Every tensor's :class:`TensorPlan`, and whether codes may be Huffman-coded."""

    tensors: Mapping[str, TensorPlan]
    entropy: bool = DEFAULT_ENTROPY

    def options(self) -> dict[str, dict]:
        """The public (JSON-able) form: ``save(sd, path, **plan.options())`` writes it."""
        return {
            "bits": {n: t.bits for n, t in self.tensors.items()},
            "scheme": {n: t.scheme for n, t in self.tensors.items() if t.bits is not None},
            "rounding": {n: t.rounding for n, t in self.tensors.items() if t.bits is not None},
        }


def widths(bits: Mapping[str, float | None]) -> tuple[list[float], int]:
    """A plan's code widths (tensors kept raw left out) and how many tensors it stores as
    float16 values."""
    stored = [b for b in bits.values() if b is not None]
    return [b for b in stored if b != HALF_BITS], sum(b == HALF_BITS for b in stored)


def default_bits(array: np.ndarray, dtype: str, bits: float | None) -> float | None:
    """The rule for tensors a plan does not name: floating tensors with two or more
    dimensions (conv and linear weights) are quantized, the rest kept exact."""
    return bits if dtype in FLOAT_DTYPES and array.ndim >= 2 else None


def resolve(
    items: Sequence[Item],
    *,
    bits: BitsOption = DEFAULT_BITS,
    scheme: SchemeOption = DEFAULT_SCHEME,
    rounding: RoundingOption = "nearest",
    entropy: bool = DEFAULT_ENTROPY,
) -> Plan:
    """Check the options against the tensors and decide every tensor's :class:`TensorPlan`.

    ``bits`` maps names to widths (``None`` keeps that tensor exact, :data:`HALF_BITS`
    stores it as binary16; names it leaves out follow the default rule at
    :data:`DEFAULT_BITS`) or is one width for every tensor the default rule quantizes.
    ``scheme`` and ``rounding`` likewise map names or give one value for all. Raises
    :class:`~qpack.errors.EncodeError` for unknown names or values.
    """
    names = [name for name, _, _ in items]
    _check(names, bits, scheme, rounding)
    tensors = {}
    for name, array, dtype in items:
        if isinstance(bits, Mapping):
            if name in bits:
                chosen = bits[name]
                if chosen is not None and dtype not in FLOAT_DTYPES:
                    raise E.EncodeError(
                        f"only floating tensors can be quantized ({dtype})", tensor=name
                    )
            else:
                chosen = default_bits(array, dtype, DEFAULT_BITS)
        else:
            chosen = default_bits(array, dtype, bits)
        tensors[name] = TensorPlan(
            chosen, _pick(scheme, name, DEFAULT_SCHEME), _pick(rounding, name, "nearest")
        )
    return Plan(tensors, bool(entropy))


def _pick(option, name: str, default: str) -> str:
    return option.get(name, default) if isinstance(option, Mapping) else option


def _check(names: list[str], bits, scheme, rounding) -> None:
    for value in scheme.values() if isinstance(scheme, Mapping) else [scheme]:
        try:
            check_scheme(value)
        except ValueError as exc:
            raise E.EncodeError(str(exc)) from None
    for value in rounding.values() if isinstance(rounding, Mapping) else [rounding]:
        if value not in ROUNDINGS:
            raise E.EncodeError(f"unknown rounding {value!r}; known: {', '.join(ROUNDINGS)}")
    for option, what in ((bits, "bits"), (scheme, "scheme"), (rounding, "rounding")):
        if isinstance(option, Mapping):
            unknown = sorted(set(option) - set(names))
            if unknown:
                raise E.EncodeError(f"{what} given for tensors not in the state_dict: {unknown}")
    for value in bits.values() if isinstance(bits, Mapping) else [bits]:
        if value is not None and value != HALF_BITS:
            try:
                levels_for(value)
            except ValueError as exc:
                raise E.EncodeError(str(exc)) from None

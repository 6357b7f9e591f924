"""Choosing bits per tensor: the smallest file at a quality, or the best quality in a size.

This is writer-side policy, not part of the format: it returns ``bits`` and ``scheme``
mappings for :func:`qpack.save`. Each quantizable tensor gets a width from a grid of whole
and half bits (fractional widths mean ``round(2**bits)`` levels, which Huffman coding stores
in about ``log2(levels)`` bits per weight) and a grid, one step per tensor or per channel.
For every tensor and option it measures the exact encoded size and the distortion that
quantizing *only that tensor* causes, and builds the Lagrangian path of
(size + lambda * distortion) optima over all tensors, treating distortions as additive. To
keep model evaluations few, a tensor's distortion is modelled as its exact squared weight
error times its sensitivity, measured with the model at three anchor widths; the final
choice is then checked (and corrected) with a few joint evaluations.

Distortion comes from ``evaluate``: a callable that takes ``{name: dequantized array}`` for
some tensors (the others keep their float values) and returns a number that adds up across
tensors, such as the mean squared difference of the model's output probabilities on
calibration inputs (see :func:`qpack.demo.unet.make_evaluator`). Without it, the relative weight
error of each tensor is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from . import errors as E
from ._threads import ordered_map
from .container import ALIGNMENT
from .dtypes import as_items, bf16_to_f32
from .plan import DEFAULT_BITS, TensorPlan, default_bits, resolve
from .quantize import quantize_tensor
from .schemes import levels_for
from .writer import encode_chunks, quantized_entry

__all__ = ["allocate", "Allocator", "GRID", "OPTION_SCHEMES", "parse_size"]

# Candidate widths; fractional ones are round(2**bits) levels.
GRID = tuple(float(b) for b in np.arange(2.0, 8.01, 0.5))
# Widths at which a model evaluator is run to measure each tensor's sensitivity (output
# distortion per unit of squared weight error); in between it is interpolated log-linearly.
ANCHORS = (2.0, 4.0, 6.0)

Evaluate = Callable[[Mapping[str, np.ndarray]], float]


# Grids the allocator chooses between for each tensor. With entropy coding one step for the
# whole tensor usually costs fewer bits for the same error (measured on the UNet: per-layer
# 8-bit codes Huffman-code to 409 kB, per-channel ones to 537 kB); per-channel scales win
# at low widths, where a few wide channels would otherwise waste the levels.
OPTION_SCHEMES = ("asymmetric-per-layer", "asymmetric-per-channel")
# Reference of "the quality of N bits": qpack's fixed-width per-channel N-bit quantization.
# At 8 bits no tensor can get a finer grid than that reference, so nothing could be saved;
# there the reference is standard per-layer int8 (the origin's quantizer) instead.
REFERENCE_SCHEME = "asymmetric-per-channel"
TOP_REFERENCE_SCHEME = "symmetric-per-layer"

Option = tuple[float, str]  # (bits, scheme)


@dataclass
class _Choices:
    name: str
    options: list[Option]  # candidate (width, scheme) pairs
    size: np.ndarray  # bytes each option costs (payload + header entry + alignment)
    distortion: np.ndarray  # distortion when only this tensor is quantized that way


def allocate(
    state_dict: Mapping[str, Any],
    *,
    bits: float | None = None,
    max_size: int | None = None,
    evaluate: Evaluate | None = None,
    schemes: tuple[str, ...] = OPTION_SCHEMES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Choose a width and a scheme for every quantizable tensor; returns
    ``{"bits": {...}, "scheme": {...}}`` to pass on: ``qpack.save(sd, path, **plan)``.

    Give exactly one of:

    - ``bits=N``: the smallest file at least as accurate as fixed-width N-bit per-channel
      quantization (at N = 8, as standard per-layer int8: see REFERENCE_SCHEME);
    - ``max_size=BYTES``: the least distortion whose file fits in ``BYTES``.

    Tensors that are not quantized (biases, integer buffers) map to ``None`` (kept exact).
    To choose several plans for one model, build an :class:`Allocator` once instead.
    """
    if (bits is None) == (max_size is None):
        raise E.EncodeError("give exactly one of bits= and max_size=")
    allocator = Allocator(state_dict, evaluate=evaluate, schemes=schemes, progress=progress)
    return allocator.for_bits(bits) if bits is not None else allocator.for_size(max_size)


class Allocator:
    """Measures every tensor's size and distortion for every option once; then answers
    :meth:`for_bits` and :meth:`for_size` queries from those measurements."""

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        *,
        evaluate: Evaluate | None = None,
        schemes: tuple[str, ...] = OPTION_SCHEMES,
        progress: Callable[[str], None] | None = None,
    ):
        self._items = as_items(state_dict)  # torch tensors or numpy arrays, as save() takes
        self._targets = [t for t in self._items if default_bits(t[1], t[2], DEFAULT_BITS)]
        self._weight_error = evaluate is None
        self._measure = _weight_distortion(self._targets) if evaluate is None else evaluate
        options = [(b, s) for s in schemes for b in GRID]
        if progress:
            progress(f"measuring {len(self._targets)} tensors, {len(options)} options each")
        # Tensors are measured on threads when only weight error is needed; a model
        # evaluator runs torch, which already uses every core.
        self._choices = list(
            ordered_map(
                lambda t: _measure(t, options, evaluate),
                self._targets,
                None if evaluate is None else 1,
            )
        )
        self._hull = _hull(self._choices)

    def _joint(self, chosen: Mapping[str, Option]) -> float:
        decoded = {}
        for name, array, dtype in self._targets:
            q = quantize_tensor(name, array, dtype, TensorPlan(*chosen[name]))
            decoded[name] = q.values().reshape(array.shape)
        return self._measure(decoded)

    def _file_size(self, chosen: Mapping[str, Option]) -> int:
        plan = self._plan(chosen)
        chunks = encode_chunks(self._items, resolve(self._items, entropy=True, **plan))
        return sum(len(c) for c in chunks)

    def _plan(self, chosen: Mapping[str, Option]) -> dict[str, dict[str, Any]]:
        return {
            "bits": {n: chosen[n][0] if n in chosen else None for n, _, _ in self._items},
            "scheme": {n: s for n, (_, s) in chosen.items()},
        }

    def for_bits(self, bits: float) -> dict[str, dict[str, Any]]:
        """The smallest plan at least as accurate as the N-bit reference."""
        levels_for(bits)  # validates
        reference = {name: _reference(bits) for name, _, _ in self._targets}
        if not reference:
            return self._plan({})
        joint = None if self._weight_error else self._joint
        chosen = _within_target(self._hull, self._joint(reference), joint)
        return self._plan(chosen if chosen is not None else reference)

    def for_size(self, max_size: int) -> dict[str, dict[str, Any]]:
        """The least-distortion plan whose file is at most ``max_size`` bytes."""
        if not self._targets:
            return self._plan({})
        joint = None if self._weight_error else self._joint
        return self._plan(_within_budget(self._hull, int(max_size), self._file_size, joint))


def _reference(bits: float) -> Option:
    return (float(bits), TOP_REFERENCE_SCHEME if bits >= 8 else REFERENCE_SCHEME)


def _measure(target, options: list[Option], evaluate: Evaluate | None) -> _Choices:
    """Exact sizes and squared weight errors of every option; with a model evaluator,
    distortion = squared error x the tensor's sensitivity, measured at the ANCHORS (with the
    per-channel grid) and interpolated log-linearly in between."""
    name, array, dtype = target
    reference = (bf16_to_f32(array) if dtype == "bfloat16" else array).astype(np.float64)
    schemes = {s for _, s in options}
    anchor_scheme = REFERENCE_SCHEME if REFERENCE_SCHEME in schemes else options[0][1]
    anchors = {(b, anchor_scheme) for b in ANCHORS}
    sizes, errors, decoded = [], [], {}  # decoded: only what the evaluator will need
    for option in options:
        q = quantize_tensor(name, array, dtype, TensorPlan(*option))
        entry, _ = quantized_entry(name, array.shape, dtype, q, option[1], True)
        overhead = len(msgpack.packb(entry.to_header(), use_bin_type=True)) + ALIGNMENT // 2
        sizes.append(entry.length + overhead)
        values = q.values().reshape(array.shape)
        errors.append(float(((values - reference) ** 2).sum()))
        if evaluate is not None and option in anchors:
            decoded[option] = values
    errors = np.maximum(np.array(errors), 1e-30)
    widths = np.array([b for b, _ in options])
    if evaluate is None:
        energy = float((reference**2).mean()) or 1.0
        sensitivity = np.full(len(options), 1.0 / (energy * max(reference.size, 1)))
    else:
        measured = [
            max(evaluate({name: decoded[(b, anchor_scheme)]}), 1e-30)
            / errors[options.index((b, anchor_scheme))]
            for b in ANCHORS
        ]
        sensitivity = np.exp(np.interp(widths, ANCHORS, np.log(measured)))
    return _Choices(name, list(options), np.array(sizes), errors * sensitivity)


def _weight_distortion(targets) -> Evaluate:
    """Relative squared weight error of each replaced tensor, summed (no model)."""
    reference = {
        name: (bf16_to_f32(a) if d == "bfloat16" else a).astype(np.float64)
        for name, a, d in targets
    }

    def measure(replaced: Mapping[str, np.ndarray]) -> float:
        total = 0.0
        for name, value in replaced.items():
            ref = reference[name]
            energy = float(np.mean(ref * ref)) or 1.0
            total += float(np.mean((value.astype(np.float64) - ref) ** 2)) / energy
        return total

    return measure


def _pick(choices: list[_Choices], lam: float) -> dict[str, Option]:
    return {c.name: c.options[int(np.argmin(c.size + lam * c.distortion))] for c in choices}


def _totals(choices: list[_Choices], chosen: Mapping[str, Option]) -> tuple[float, float]:
    size = distortion = 0.0
    for c in choices:
        i = c.options.index(chosen[c.name])
        size += c.size[i]
        distortion += c.distortion[i]
    return size, distortion


def _hull(choices: list[_Choices]) -> list[tuple[float, float, dict[str, Option]]]:
    """(size, additive distortion, choice) along the Lagrangian path, smallest size first."""
    seen, path = set(), []
    for lam in np.logspace(-6, 18, 400):
        chosen = _pick(choices, lam)
        key = tuple(chosen.values())
        if key not in seen:
            seen.add(key)
            path.append((*_totals(choices, chosen), chosen))
    return sorted(path, key=lambda p: p[0])


def _within_target(hull, target: float, joint) -> dict[str, Option] | None:
    """The smallest allocation whose distortion is at most ``target``.

    Without a model the additive estimate is exact. With one, additivity is approximate
    (heavily quantized layers compound; at moderate rates the sum overestimates), so a few
    additive targets around the real one are tried, smallest file first, until a joint
    evaluation confirms one: a handful of forward passes.
    """
    factors = (1.0,) if joint is None else (2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.18)
    tried = set()
    for factor in factors:
        point = next((p for p in hull if p[1] <= target * factor), None)
        if point is None:
            continue
        key = tuple(point[2].values())
        if key in tried:
            continue
        tried.add(key)
        if joint is None or joint(point[2]) <= target:
            return point[2]
    return None


def _within_budget(hull, budget: int, file_size, joint) -> dict[str, Option]:
    """The least distortion whose whole file is at most ``budget`` bytes."""
    # what the tensors' own entries do not account for (raw tensors, the header's fixed
    # part), measured once at the smallest point of the hull
    fixed_cost = file_size(hull[0][2]) - hull[0][0]
    room = budget - fixed_cost
    for _ in range(8):
        fitting = [p for p in hull if p[0] <= room]
        if not fitting:
            break
        if joint is None:
            chosen = min(fitting, key=lambda p: p[1])[2]
        else:  # the best by real evaluation among the largest few that fit
            chosen = min(fitting[-6:], key=lambda p: joint(p[2]))[2]
        over = file_size(chosen) - budget
        if over <= 0:
            return chosen
        room -= over
    raise E.EncodeError(
        f"cannot fit in {budget:,} bytes: the smallest file qpack can make of this "
        f"state_dict is {file_size(hull[0][2]):,} bytes"
    )


def parse_size(text: str) -> int:
    """Parse a byte count: ``145000``, ``145k``/``145kB`` (x1000), ``1.5M``, ``64KiB`` (x1024)."""
    units = {
        "": 1,
        "b": 1,
        "k": 10**3,
        "kb": 10**3,
        "m": 10**6,
        "mb": 10**6,
        "g": 10**9,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }
    raw = text.strip().lower().replace("_", "")
    number = raw.rstrip("kmgib")
    unit = raw[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"not a size: {text!r} (examples: 145000, 145k, 1.5M, 64KiB)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)

"""Choosing bits per tensor: the smallest file at a quality, or the best quality in a size.

This is writer-side policy, not part of the format: it returns a ``bits`` mapping for
:func:`qpack.save`. Each quantizable tensor gets a width from a grid of whole and half bits
(fractional widths mean ``round(2**bits)`` levels, which Huffman coding stores in about
``log2(levels)`` bits per weight). For every tensor and width it measures the exact encoded
size and the distortion that quantizing *only that tensor* causes, then picks one width per
tensor by Lagrangian optimization (minimize size + lambda * distortion, lambda bisected),
treating distortions as additive, and finally checks the whole choice jointly. To keep
model evaluations few, a tensor's distortion at width b is modelled as its exact squared
weight error at b times its sensitivity, measured with the model at three anchor widths;
the final choice is then checked (and corrected) with a few joint evaluations.

Distortion comes from ``evaluate``: a callable that takes ``{name: dequantized array}`` for
some tensors (the others keep their float values) and returns a number that adds up across
tensors, such as the mean squared difference of the model's output probabilities on
calibration inputs (see :func:`qpack.unet.make_evaluator`). Without it, the relative weight
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
from .codec import (
    DEFAULT_BITS,
    _bits_for,
    bf16_to_f32,
    decode_payload,
    encode_chunks,
    encode_tensor,
)
from .container import ALIGNMENT
from .schemes import DEFAULT_SCHEME

__all__ = ["allocate", "GRID"]

# Candidate widths; fractional ones are round(2**bits) levels.
GRID = tuple(float(b) for b in np.arange(2.0, 8.01, 0.5))
# Widths at which a model evaluator is run to measure each tensor's sensitivity (output
# distortion per unit of squared weight error); in between it is interpolated log-linearly.
ANCHORS = (2.0, 4.0, 6.0)

Evaluate = Callable[[Mapping[str, np.ndarray]], float]


@dataclass
class _Choices:
    name: str
    bits: np.ndarray  # candidate widths
    size: np.ndarray  # bytes each width costs (payload + header entry + alignment)
    distortion: np.ndarray  # distortion when only this tensor is quantized at that width


def allocate(
    state_dict: Mapping[str, Any],
    *,
    bits: float | None = None,
    max_size: int | None = None,
    evaluate: Evaluate | None = None,
    scheme: str = DEFAULT_SCHEME,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float | None]:
    """A per-tensor ``bits`` mapping for :func:`qpack.save` (with ``entropy=True``).

    Give exactly one of:

    - ``bits=N``: at least the quality of fixed-width N-bit quantization (same scheme), in
      the smallest file;
    - ``max_size=BYTES``: the least distortion whose file fits in ``BYTES``.
    """
    from .api import _as_numpy  # torch tensors or numpy arrays, as save() accepts

    if (bits is None) == (max_size is None):
        raise E.EncodeError("give exactly one of bits= and max_size=")
    say = progress or (lambda _msg: None)
    items = [(name, *_as_numpy(name, value)) for name, value in state_dict.items()]
    targets = [
        (name, array, dtype)
        for name, array, dtype in items
        if _bits_for(name, array, dtype, DEFAULT_BITS) is not None
    ]
    plan: dict[str, float | None] = {
        name: None for name, _, _ in items if name not in {t[0] for t in targets}
    }
    if not targets:
        return plan
    weight_error = evaluate is None
    measure = _weight_distortion(targets) if weight_error else evaluate
    # the origin's symmetric quantizer needs whole bits; a requested width joins the grid
    grid = {b for b in GRID if scheme != "symmetric-per-layer" or b == int(b)}
    grid = tuple(sorted(grid | ({float(bits)} if bits is not None else set())))
    say(f"measuring {len(targets)} tensors at {len(grid)} widths")
    choices = [_measure(t, grid, scheme, None if weight_error else measure) for t in targets]

    def file_size(chosen: dict[str, float]) -> int:
        full = {**plan, **chosen}
        return sum(len(c) for c in encode_chunks(items, bits=full, scheme=scheme, entropy=True))

    def joint(chosen: dict[str, float]) -> float:
        return measure(
            {
                name: decode_payload(*encode_tensor(name, a, d, chosen[name], scheme, True))
                for name, a, d in targets
            }
        )

    if bits is not None:
        fixed = {name: float(bits) for name, _, _ in targets}
        if weight_error:
            chosen = _smallest_within(choices, _additive(choices, fixed))
        else:
            chosen = _joint_target(choices, fixed, joint)
        say(f"quality of fixed-width {bits}-bit reached")
    else:
        budget = int(max_size)
        # what the tensors' own entries do not account for: raw tensors, the header's fixed
        # part; measured once with every tensor at the smallest width
        fixed_cost = file_size({name: grid[0] for name, _, _ in targets}) - sum(
            c.size[0] for c in choices
        )
        room = budget - fixed_cost
        chosen = None
        for _ in range(8):
            chosen = _best_within(choices, room, None if weight_error else joint)
            if chosen is None:
                break
            over = file_size(chosen) - budget
            if over <= 0:
                break
            room -= over
        if chosen is None or file_size(chosen) > budget:
            smallest = file_size({name: grid[0] for name, _, _ in targets})
            raise E.EncodeError(
                f"cannot fit in {budget:,} bytes: the smallest file qpack can make of this "
                f"state_dict is {smallest:,} bytes"
            )
    plan.update(chosen)
    return {name: plan[name] for name, _, _ in items}


def _measure(target, grid, scheme: str, evaluate: Evaluate | None) -> _Choices:
    """Exact sizes and squared weight errors at every width of ``grid``; with a model
    evaluator, distortion = squared error x sensitivity measured at the ANCHORS."""
    name, array, dtype = target
    reference = (bf16_to_f32(array) if dtype == "bfloat16" else array).astype(np.float64)
    sizes, errors, decoded = [], [], {}
    anchors = [b for b in ANCHORS if b in grid] or [grid[0], grid[-1]]
    for b in grid:
        entry, payload = encode_tensor(name, array, dtype, b, scheme, True)
        overhead = len(msgpack.packb(entry.to_header(), use_bin_type=True)) + ALIGNMENT // 2
        sizes.append(payload.size + overhead)
        values = decode_payload(entry, payload)
        errors.append(float(((values - reference) ** 2).sum()))
        if b in anchors:
            decoded[b] = values
    errors = np.maximum(np.array(errors), 1e-30)
    if evaluate is None:
        energy = float((reference**2).mean()) or 1.0
        sensitivity = np.full(len(grid), 1.0 / (energy * max(reference.size, 1)))
    else:
        measured = [
            max(evaluate({name: decoded[b]}), 1e-30) / errors[grid.index(b)] for b in anchors
        ]
        sensitivity = np.exp(np.interp(grid, anchors, np.log(measured)))
    return _Choices(name, np.array(grid), np.array(sizes), errors * sensitivity)


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


def _additive(choices: list[_Choices], chosen: Mapping[str, float]) -> float:
    return sum(float(c.distortion[np.flatnonzero(c.bits == chosen[c.name])[0]]) for c in choices)


def _pick(choices: list[_Choices], lam: float) -> dict[str, float]:
    return {c.name: float(c.bits[np.argmin(c.size + lam * c.distortion)]) for c in choices}


def _totals(choices, chosen) -> tuple[float, float]:
    size = distortion = 0.0
    for c in choices:
        i = np.flatnonzero(c.bits == chosen[c.name])[0]
        size += c.size[i]
        distortion += c.distortion[i]
    return size, distortion


def _hull(choices: list[_Choices]) -> list[tuple[float, float, dict[str, float]]]:
    """(size, additive distortion, choice) along the Lagrangian path, smallest size first."""
    seen, path = set(), []
    for lam in np.logspace(-6, 18, 400):
        chosen = _pick(choices, lam)
        key = tuple(chosen.values())
        if key not in seen:
            seen.add(key)
            path.append((*_totals(choices, chosen), chosen))
    return sorted(path, key=lambda p: p[0])


def _smallest_within(choices: list[_Choices], target: float) -> dict[str, float]:
    """Smallest total size whose additive distortion is at most ``target``."""
    for _size, distortion, chosen in _hull(choices):
        if distortion <= target:
            return chosen
    return {c.name: float(c.bits[-1]) for c in choices}  # nothing reaches it: finest widths


def _joint_target(choices: list[_Choices], fixed: dict[str, float], joint) -> dict[str, float]:
    """The smallest allocation whose joint distortion is at most that of ``fixed``.

    Additivity is only an approximation (heavily quantized layers compound), so the additive
    target is tightened step by step until a real joint evaluation confirms it: a handful of
    forward passes.
    """
    reference = joint(fixed)
    fixed_size = _totals(choices, fixed)[0]
    target = _additive(choices, fixed)
    for factor in (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.125):
        chosen = _smallest_within(choices, target * factor)
        if _totals(choices, chosen)[0] >= fixed_size:
            break
        if joint(chosen) <= reference:
            return chosen
    return fixed


def _best_within(choices: list[_Choices], room: float, joint=None) -> dict[str, float] | None:
    """Least distortion whose total size is at most ``room`` bytes: the additive optimum, or,
    with ``joint``, the best by joint evaluation among the largest few hull points that fit."""
    fitting = [p for p in _hull(choices) if p[0] <= room]
    if not fitting:
        return None
    if joint is None:
        return min(fitting, key=lambda p: p[1])[2]
    return min(fitting[-6:], key=lambda p: joint(p[2]))[2]


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

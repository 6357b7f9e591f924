"""Choosing each tensor's width and grid: the smallest file at a quality, or the best quality
in a size.

This is writer-side policy, not part of the format: it returns the plan that
:func:`qpack.save` takes (``bits``, ``scheme`` and ``rounding`` mappings). Each quantizable
tensor gets a width from a grid of whole and half bits (fractional widths mean
``round(2**bits)`` levels, which Huffman coding stores in about ``log2(levels)`` bits per
weight) and a grid, one step per tensor or per channel. For every tensor and option it
measures the encoded size and a predicted distortion of quantizing *only that tensor*, and
builds the Lagrangian path of (size + lambda * distortion) optima, treating distortions as
additive. The distortion is predicted as follows:

- a layer with input statistics and output sensitivities (a Linear or Conv the calibration
  reached; :mod:`qpack.calibrate`, :mod:`qpack.sensitivity`): the model output error its
  weight change makes, in closed form, with the gain of error-compensating rounding over
  round-to-nearest measured on one width per grid; no forward pass;
- another tensor, with a model: its squared weight error times its sensitivity, measured
  with the model at three anchor widths;
- without a model: its weight error, each output channel's relative to its energy.

With a model the plan is then checked against the model's real output error on the
calibration inputs (``evaluate``) and corrected, a few forward passes in all.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from . import errors as E
from ._threads import ordered_map
from .container import ALIGNMENT, HALF, TensorEntry
from .dtypes import as_items, bf16_to_f32
from .plan import DEFAULT_BITS, HALF_BITS, TensorPlan, default_bits, resolve
from .quantize import gptq_rounder, half_values, quantize_tensor
from .schemes import (
    Quantized,
    Ranges,
    as_rows,
    code_bits,
    decodes_finite,
    grid,
    levels_for,
    on_grid,
    parse_scheme,
    unit_ranges,
)
from .weighterror import ORIGIN_SCHEME, grid_errors, origin_errors, row_errors
from .writer import encode_chunks, quantized_entry

__all__ = ["allocate", "Allocator", "CHANNEL_SCHEMES", "GRID", "OPTION_SCHEMES", "parse_size"]

# Candidate widths; fractional ones are round(2**bits) levels.
GRID = tuple(float(b) for b in np.arange(2.0, 8.01, 0.5))
# Widths at which a model evaluator is run to measure a tensor's sensitivity (output
# distortion per unit of squared weight error); in between it is interpolated log-linearly.
ANCHORS = (2.0, 4.0, 6.0)
# Width at which the gain of error-compensating rounding over round-to-nearest is measured
# (per grid); the gain barely changes with the width, and each measurement is a GPTQ run.
GAIN_WIDTH = 4.0
# A width query searches many plans on the same calibration inputs, so the one it keeps
# fits them better than unseen data: it is held this far below the reference there.
MARGIN = 0.9
# And beyond the inputs' noise, where the check gives each example's error: the paired
# differences (plan - MARGIN x reference) must be below zero by this many standard errors
# (one-sided, about 98%). On a recurrent model's 512 check examples the margin alone was
# too little; on less noisy outputs it is the margin that binds.
CONFIDENCE_Z = 2.0
# Forward passes a width query may spend on steps between the path's points.
REFINE_STEPS = 4
# Candidates a size query chooses among: this many points of the Lagrangian path, spread
# evenly in log size, besides every plan a width query returned.
SIZE_CANDIDATES = 24

Evaluate = Callable[[Mapping[str, np.ndarray]], float]
# A check: the error plans are held to, or each example's share of it (an array summing to
# it), which lets a plan be compared with its reference as paired samples.
Check = Callable[[Mapping[str, np.ndarray]], "float | np.ndarray"]

# Grids the allocator chooses between for each tensor. With entropy coding one step for the
# whole tensor often costs fewer bits for the same error; per-channel scales win at low
# widths, where a few wide channels would otherwise waste the levels; per-group scales
# (one binary16 scale per 32 to 128 weights of a row, symmetric: one zero point for all)
# win where a row's outliers would widen its channel's step. Of the per-group grids, these
# were the most often on tensors' size/error frontiers, measured on four models of three
# kinds (a UNet, a 1-D CNN, an LSTM, an attention model).
CHANNEL_SCHEMES = ("asymmetric-per-layer", "asymmetric-per-channel")
OPTION_SCHEMES = (
    *CHANNEL_SCHEMES,
    "symmetric-per-group-32",
    "symmetric-per-group-64",
    "symmetric-per-group-128",
)
# Per-group grids are tried at widths up to this: above it a group's scale costs more than
# its finer step saves, and the options would only slow the search.
GROUP_MAX_BITS = 6.0
# Reference of "the quality of N bits": N-bit round-to-nearest quantization with one scale
# per output channel. At 8 bits no tensor can get a finer grid than that reference, so
# nothing could be saved; there the reference is standard per-layer int8 instead.
REFERENCE_SCHEME = "asymmetric-per-channel"
TOP_REFERENCE_SCHEME = "symmetric-per-layer"
# Up to BLOCK_MAX_BITS (whole widths) the reference is also what a GGUF file of N-bit
# blocks holds, whichever is more accurate: N-bit codes in blocks of this many weights where
# a row is a whole number of blocks, binary16 values elsewhere (as GGUF keeps such tensors).
# Then qpack's 4-bit is at least as accurate as a Q4_0 file, on the calibration data with a
# model, tensor by tensor without one (symmetric-per-group-32 is that grid, and HALF_OPTION
# those values, so an option always meets it). Above 5 bits a block's float16 scale costs
# more than coding the step saves: held to blocks, 6- and 7-bit files came out larger than
# 8-bit ones (whose reference is per-layer int8), on every model measured.
REFERENCE_BLOCK = 32
BLOCK_MAX_BITS = 5
# Without a model, the output layer (the last tensor of two or more dimensions in the
# state_dict, whose modules register in forward order) is also held to the reference of this
# many bits, where it holds at most OUTPUT_SHARE_MAX of the weights to quantize: nothing
# after it attenuates its error, and a classifier or a projection to the outputs is small.
# Low-bit CNN practice keeps it at 8 bits, and llama.cpp's 4-bit mixes keep output.weight at
# 6. Measured on a 1-D CNN, its 8x256 classifier alone at --bits 4 (5-bit per-layer codes,
# within Q4_0's weight error channel by channel) made 3.5x the output error of the same
# tensor in Q4_0 blocks.
OUTPUT_REFERENCE_BITS = 8
OUTPUT_SHARE_MAX = 0.05
# Bytes of codes the search keeps for the writer (see Allocator.made)
MADE_MEMORY = 1 << 30
BLOCK_SCHEME = f"symmetric-per-group-{REFERENCE_BLOCK}"

Option = tuple[float, str]  # (bits, scheme)
# The option storing a tensor's binary16 values (storage "half"): its scheme is no grid.
HALF_OPTION: Option = (float(HALF_BITS), HALF)


@dataclass
class _Choices:
    name: str
    options: list[Option]  # candidate (width, scheme) pairs
    size: np.ndarray  # bytes each option costs (payload + header entry + alignment)
    distortion: np.ndarray  # predicted distortion when only this tensor is quantized so
    error: np.ndarray  # channel-relative weight error of each option (round to nearest)


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
    ``{"bits": {...}, "scheme": {...}, "rounding": {...}}`` to pass on:
    ``qpack.save(sd, path, **plan)``.

    Give exactly one of:

    - ``bits=N``: the smallest file at least as accurate as N-bit per-channel round-to-nearest
      quantization (at N = 8, standard per-layer int8) or, for whole N up to 5, a GGUF file
      of N-bit blocks (Q4_0 at 4 bits), whichever is more accurate: every tensor's own
      weight error, or with ``evaluate`` the model's;
    - ``max_size=BYTES``: the least distortion whose file fits in ``BYTES``.

    Tensors that are not quantized (biases, integer buffers) map to ``None`` (kept exact).
    To choose several plans for one model, build an :class:`Allocator` once instead; for a
    model with calibration inputs, pass the model to :func:`qpack.save`.

    Example:
        >>> plan = qpack.allocate(state_dict, bits=4)
        >>> qpack.save(state_dict, "model.qpk", **plan)
    """
    if (bits is None) == (max_size is None):
        raise E.EncodeError("give exactly one of bits= and max_size=")
    allocator = Allocator(state_dict, evaluate=evaluate, schemes=schemes, progress=progress)
    return allocator.for_bits(bits) if bits is not None else allocator.for_size(max_size)


class Allocator:
    """Measures every tensor's size and distortion for every option once; then answers
    :meth:`for_bits` and :meth:`for_size` queries from those measurements.

    ``stats`` (layer input statistics) and ``sensitivity`` (per-channel output weights)
    let a layer's distortion be predicted in closed form, and make its codes
    error-compensating; ``evaluate`` is the model's real distortion (additive across
    layers, e.g. a mean squared output change), ``check`` (default: ``evaluate``) the error
    plans are held to (e.g. a mean absolute output change, or each example's share of it:
    see :data:`CONFIDENCE_Z`); tensors named in ``raw`` are kept exact."""

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        *,
        evaluate: Evaluate | None = None,
        check: Check | None = None,
        stats: Mapping[str, Any] | None = None,
        sensitivity: Mapping[str, np.ndarray] | None = None,
        schemes: tuple[str, ...] = OPTION_SCHEMES,
        raw: Collection[str] = (),
        progress: Callable[[str], None] | None = None,
        bar: Callable[[int, str], Any] | None = None,
    ):
        self._items = as_items(state_dict)  # torch tensors or numpy arrays, as save() takes
        self._targets = [
            t for t in self._items if t[0] not in raw and default_bits(t[1], t[2], DEFAULT_BITS)
        ]
        self._weight_error = evaluate is None
        # the output layer, held to OUTPUT_REFERENCE_BITS as well without a model
        layers = [(name, array.size) for name, array, _ in self._targets if array.ndim >= 2]
        total = sum(array.size for _, array, _ in self._targets)
        small = bool(layers) and layers[-1][1] <= OUTPUT_SHARE_MAX * total
        self.output = layers[-1][0] if small and self._weight_error else None
        self._measure = _weight_distortion(self._targets) if evaluate is None else evaluate
        self._measure = check or self._measure  # what plans are checked against
        names = {name for name, _, _ in self._targets}
        # layer statistics: error-compensating rounding, and layer errors in closed form
        self.stats = {k: v for k, v in (stats or {}).items() if k in names}
        self.rounder = gptq_rounder(self.stats, cache={}) if self.stats else None
        self._options = _options(schemes)
        self._measuring = (sensitivity or {}, evaluate, progress, bar)
        self._choices: list[_Choices] | None = None
        self._joints: dict[tuple, float | np.ndarray] = {}
        self._sizes: dict[tuple, int] = {}
        self._answers: list[dict[str, Option]] = []  # plans for_bits returned
        # without a model: tensors quantized with the option chosen for them, as the
        # search made them (rounded to nearest), which the writer need not make again;
        # up to MADE_MEMORY bytes of codes, so that a large model's save is not held
        # in memory twice
        self.made: dict[str, tuple[Option, Any]] = {}
        self._made_room = MADE_MEMORY
        self._made_lock = threading.Lock()
        # without a model a width query needs no measurements of every option (see
        # _dominant): they are taken when a query needs them
        if not self._weight_error:
            self._measured()

    def _measured(self) -> list[_Choices]:
        """Every tensor's size and distortion for every option, measured once."""
        if self._choices is not None:
            return self._choices
        sensitivity, evaluate, progress, bar = self._measuring
        options = self._options
        if progress:
            progress(f"measuring {len(self._targets)} tensors, {len(options)} options each")

        def measure(target) -> _Choices:
            name = target[0]
            mine = _fitting(options, target[1])
            if name in self.stats and name in sensitivity:
                layer = self.stats[name], sensitivity[name]
                choices = _predict(target, mine, *layer, self.rounder)
            else:
                choices = _measure(target, mine, evaluate)
            tick(1)
            return choices

        # Tensors are measured on threads when no model runs; a model evaluator runs torch,
        # which already uses every core.
        with (bar or _quiet)(len(self._targets), "measuring tensors") as tick:
            workers = 1 if evaluate is not None else None
            choices = list(ordered_map(measure, self._targets, workers))
        # a tensor no option can store (values near the float32 limit) stays exact
        self._targets = [t for t, c in zip(self._targets, choices, strict=True) if c.options]
        self._choices = [c for c in choices if c.options]
        # the path through every option, and through the per-tensor and per-channel grids
        # alone: a search along the first can end on a larger plan than one along the
        # second (the paths are heuristics), so a width query takes the smaller of both
        self._hulls = [_hull(self._choices)]
        channel = _without_groups(self._choices)
        if any(
            len(c.options) != len(k.options) for c, k in zip(channel, self._choices, strict=True)
        ):
            self._hulls.append(_hull(channel))
        self._joints.clear()  # keyed by the targets, which may have changed
        self._sizes.clear()
        return self._choices

    def rounding(self, name: str) -> str:
        """How this allocator's plans round a tensor's codes."""
        return "gptq" if name in self.stats else "nearest"

    def joint(self, chosen: Mapping[str, Option], plain: bool = False) -> float:
        """The distortion with every target quantized as chosen: the model's, or the sum of
        relative weight errors; with plain round-to-nearest codes if ``plain`` (a
        reference's). Memoized."""
        return float(np.sum(self._checked(chosen, plain)))

    def _within(self, chosen: Mapping[str, Option], reference: Mapping[str, Option]) -> bool:
        """Whether ``chosen`` is more accurate than the round-to-nearest ``reference`` on the
        check's inputs, sure beyond their noise (:data:`CONFIDENCE_Z`)."""
        mine, ref = self._checked(chosen), self._checked(reference, plain=True)
        if np.ndim(mine) == 0 or np.size(mine) < 2:
            return float(np.sum(mine)) <= MARGIN * float(np.sum(ref))
        diff = (mine - MARGIN * ref) * mine.size  # per example, in units of the mean error
        return diff.mean() + CONFIDENCE_Z * diff.std(ddof=1) / math.sqrt(diff.size) <= 0

    def _checked(self, chosen: Mapping[str, Option], plain: bool = False) -> Any:
        """The check's result with every target quantized as chosen (see :meth:`joint`)."""
        key = (plain, *(chosen.get(n) for n, _, _ in self._targets))
        if key not in self._joints:
            decoded = {}
            for target in self._targets:
                name, array = target[:2]
                if name not in chosen:
                    continue  # kept exact
                rounding = "nearest" if plain else self.rounding(name)
                q = _quantized(target, chosen[name], rounding, self.rounder, strict=True)
                decoded[name] = q.values().reshape(array.shape)
            self._joints[key] = self._measure(decoded)
        return self._joints[key]

    def file_size(self, chosen: Mapping[str, Option]) -> int:
        """The bytes of the file this choice makes (memoized)."""
        key = tuple(chosen.get(n) for n, _, _ in self._targets)
        if key not in self._sizes:
            plan = resolve(self._items, entropy=True, **self._plan(chosen))
            chunks = encode_chunks(self._items, plan, rounder=self.rounder)
            self._sizes[key] = sum(len(c) for c in chunks)
        return self._sizes[key]

    def _plan(self, chosen: Mapping[str, Option], plain: bool = False) -> dict[str, dict]:
        grids = {n: o for n, o in chosen.items() if o != HALF_OPTION}
        return {
            "bits": {n: chosen[n][0] if n in chosen else None for n, _, _ in self._items},
            "scheme": {n: s for n, (_, s) in grids.items()},
            "rounding": {n: "nearest" if plain else self.rounding(n) for n in grids},
        }

    def for_bits(self, bits: float) -> dict[str, dict[str, Any]]:
        """The smallest plan at least as accurate as the N-bit references (see
        :func:`_references`): without a model, every tensor's weight error is at most its
        references' (dominance, so no tensor gets coarser than a reference); with one, the
        model's output error is at most the more accurate reference's."""
        levels_for(bits)  # validates
        if not self._targets:
            return self._plan({})
        if self._weight_error:
            chosen = self._dominant(bits)
        else:
            reference, target = None, math.inf
            for rule in _references(bits):
                plan = {t[0]: rule(t[1]) for t in self._targets}
                plan = {t[0]: plan[t[0]] for t in self._targets if _storable(t, plan[t[0]])}
                error = self.joint(plan, plain=True)
                if error < target:
                    reference, target = plan, error

            def ok(chosen: Mapping[str, Option]) -> bool:
                return self._within(chosen, reference)

            found = [self._smallest_within(target, ok, 0)]
            if found[0] is not None and len(self._hulls) > 1 and _has_groups(found[0]):
                # only the points predicted smaller than the plan found can replace it
                below = _totals(self._choices, found[0])[0]
                found.append(self._smallest_within(target, ok, 1, below))
            found = [c for c in found if c is not None]
            if not found:  # nothing considered is as accurate: the reference itself
                return self._plan(reference, plain=True)
            chosen = min(found, key=self.file_size)
        self._answers.append(chosen)
        return self._plan(chosen)

    def _dominant(self, bits: float) -> dict[str, Option]:
        """Per tensor, the smallest option whose weight error is at most that of the more
        accurate reference (the output layer's include OUTPUT_REFERENCE_BITS'); that
        reference itself where no option is as accurate. Tensors are
        searched on threads, each without measuring every option (see _smallest_option)."""

        def one(target) -> Option | None:
            weights = _Weights(target)  # a tensor that is not finite is refused, not kept
            option, least = None, math.inf
            rules = _references(bits)
            if target[0] == self.output and bits < OUTPUT_REFERENCE_BITS:
                rules += _references(OUTPUT_REFERENCE_BITS)
            for rule in rules:
                reference = rule(target[1])
                error = weights.option_error(reference)
                if error is not None and error < least:
                    option, least = reference, error
            if option is None:
                return None  # the references keep it exact: so does the plan
            found = _smallest_option(weights, _fitting(self._options, target[1]), least)
            if found is None:
                return option
            if isinstance(found[1], Quantized):  # (binary16 values are cheap to make again)
                with self._made_lock:
                    if found[1].codes.nbytes <= self._made_room:
                        self._made_room -= found[1].codes.nbytes
                        self.made[target[0]] = found
            return found[0]

        found = ordered_map(one, self._targets, cost=lambda t: t[1].size)  # largest first
        return {t[0]: o for t, o in zip(self._targets, found, strict=True) if o is not None}

    def _smallest_within(
        self,
        target: float,
        ok: Callable[[Mapping[str, Option]], bool],
        path: int,
        below: float = math.inf,
    ) -> dict[str, Option] | None:
        """The smallest point of path ``path`` (0: every option; 1: per-tensor and
        per-channel grids alone) predicted smaller than ``below`` that passes ``ok`` (its
        real error is within the reference's, about ``target``): start where the
        prediction says, then gallop and bisect on real evaluations (the real distortion
        falls along the path, give or take noise); then refined. None when no such point
        passes."""
        hull = [p for p in self._hulls[path] if p[0] < below]
        if not hull:
            return None
        start = next((i for i, p in enumerate(hull) if p[1] <= target), len(hull) - 1)
        good = _first_passing(len(hull), start, lambda i: ok(hull[i][2]))
        if good is None:
            return None
        choices = self._choices if path == 0 else _without_groups(self._choices)
        return self._refined(dict(hull[good][2]), ok, choices)

    def _refined(
        self,
        chosen: dict[str, Option],
        ok: Callable[[Mapping[str, Option]], bool],
        choices: list[_Choices],
    ) -> dict[str, Option]:
        """Smaller plans between the path's points: the path holds only the convex points
        of the size/distortion trade, so try single-tensor steps down, the cheapest in
        predicted distortion per byte saved first, keeping each the model confirms."""
        moves = []
        for c in choices:
            i = c.options.index(chosen[c.name])
            for j in np.flatnonzero(c.size < c.size[i]):
                cost = (c.distortion[j] - c.distortion[i]) / (c.size[i] - c.size[j])
                moves.append((cost, c.name, c.options[j], c.size[i] - c.size[j]))
        best = {}  # one step per tensor: its most efficient
        for cost, name, option, _ in sorted(moves, key=lambda m: (m[0], -m[3])):
            best.setdefault(name, (cost, name, option))
        for _, name, option in sorted(best.values(), key=lambda m: m[0])[:REFINE_STEPS]:
            trial = {**chosen, name: option}
            if ok(trial):
                chosen = trial
        return chosen

    def for_size(self, max_size: int) -> dict[str, dict[str, Any]]:
        """The least-distortion plan whose file is at most ``max_size`` bytes, among a
        fixed set of candidates (points spread along the path, and every plan
        :meth:`for_bits` returned), each measured by its real file size and distortion:
        so no candidate that fits is more accurate, and more room never costs accuracy."""
        if not self._targets:
            return self._plan({})
        candidates = self.candidates()
        fitting = [c for c in candidates if self.file_size(c) <= max_size]
        if not fitting:
            smallest = min(map(self.file_size, [self._hulls[0][0][2], *self._answers]))
            raise E.EncodeError(
                f"cannot fit in {max_size:,} bytes: the smallest file qpack can make of this "
                f"state_dict is {smallest:,} bytes"
            )
        best = min(fitting, key=lambda c: (self.joint(c), self.file_size(c)))
        best = self._filled(dict(best), max_size)
        if best not in self._answers:
            self._answers.append(best)  # a candidate of every later query: more room, no worse
        return self._plan(best)

    def _filled(self, chosen: dict[str, Option], max_size: int) -> dict[str, Option]:
        """The room a size query's plan leaves, spent: single-tensor steps up to finer
        options, the most predicted distortion saved per byte first, keeping each step
        whose file still fits and whose real distortion is lower (at most REFINE_STEPS
        tries). The candidates are points of a path, which may leave much of the room."""
        moves, room = [], max_size - self.file_size(chosen)
        for c in self._measured():
            i = c.options.index(chosen[c.name])
            grows = (c.size > c.size[i]) & (c.size - c.size[i] <= room)
            for j in np.flatnonzero(grows & (c.distortion < c.distortion[i])):
                gain = (c.distortion[i] - c.distortion[j]) / (c.size[j] - c.size[i])
                moves.append((gain, c.name, c.options[j]))
        best = {}  # one step per tensor: its most efficient
        for gain, name, option in sorted(moves, key=lambda m: -m[0]):
            best.setdefault(name, (gain, name, option))
        error = self.joint(chosen)
        for _, name, option in sorted(best.values(), key=lambda m: -m[0])[:REFINE_STEPS]:
            trial = {**chosen, name: option}
            if self.file_size(trial) <= max_size and self.joint(trial) < error:
                chosen, error = trial, self.joint(trial)
        return chosen

    def candidates(self) -> list[dict[str, Option]]:
        """The plans :meth:`for_size` chooses among."""
        self._measured()
        out = []
        for hull in self._hulls:
            sizes = np.log([max(p[0], 1.0) for p in hull])
            marks = np.linspace(sizes[0], sizes[-1], SIZE_CANDIDATES)
            picked = sorted({int(np.searchsorted(sizes, m)) for m in marks} | {len(hull) - 1})
            out += [hull[min(i, len(hull) - 1)][2] for i in picked]
        return out + list(self._answers)


def _first_passing(count: int, start: int, passes: Callable[[int], bool]) -> int | None:
    """The first of the indices 0 .. count-1 at which ``passes`` holds, for a predicate that
    fails and then holds along them; None when it holds nowhere. The search starts at
    ``start`` (a prediction), gallops away from it, then bisects: a good prediction costs
    two evaluations, a bad one about as many as a bisection. Each index is tried once."""
    seen: dict[int, bool] = {}

    def ok(i: int) -> bool:
        if i not in seen:
            seen[i] = passes(i)
        return seen[i]

    if ok(start):
        good, step = start, 1
        while good - step >= 0 and ok(good - step):
            good, step = good - step, step * 2
        bad = max(good - step, -1)
    else:
        bad, step = start, 1
        while bad + step < count and not ok(bad + step):
            bad, step = bad + step, step * 2
        if bad + step >= count:
            if not ok(count - 1):
                return None
            step = count - 1 - bad
        good = bad + step
    while good - bad > 1:  # ok(good), not ok(bad) (or bad = -1)
        mid = (good + bad) // 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good


def _options(schemes: tuple[str, ...]) -> list[Option]:
    """Every (width, scheme) pair considered: per-group grids up to GROUP_MAX_BITS, and
    binary16 values."""
    grids = [(b, s) for s in schemes for b in GRID if b <= GROUP_MAX_BITS or not _group(s)]
    return [*grids, HALF_OPTION]


def _group(scheme: str) -> int | None:
    """The group size of a per-group scheme, else None (binary16 values included)."""
    return None if scheme == HALF else parse_scheme(scheme)[1]


def _fitting(options: list[Option], array: np.ndarray) -> list[Option]:
    """The options that make sense for a tensor: per-group grids only where a row holds at
    least two groups (a group as long as the row is its channel's grid)."""
    inner = math.prod(array.shape[1:])
    return [o for o in options if (_group(o[1]) or 0) * 2 <= inner]


@contextlib.contextmanager
def _quiet(total: int, what: str):
    yield lambda _n=1: None


def _references(bits: float) -> list[Callable[[np.ndarray], Option]]:
    """The N-bit references, each a tensor -> option rule (a plan is held to whichever is
    more accurate): N-bit per channel (per-layer int8 at 8 bits), and up to BLOCK_MAX_BITS,
    for whole widths, a GGUF file of N-bit blocks: symmetric blocks of REFERENCE_BLOCK
    weights with binary16 scales where a row is whole blocks (GGUF's Q4_0 at 4 bits), the
    binary16 values elsewhere (GGUF keeps such a tensor in F16)."""
    scheme = TOP_REFERENCE_SCHEME if bits >= 8 else REFERENCE_SCHEME

    def blocks(array: np.ndarray) -> Option:
        return (float(bits), BLOCK_SCHEME) if _whole_blocks(array) else HALF_OPTION

    if bits <= BLOCK_MAX_BITS and float(bits).is_integer():
        return [lambda array: (float(bits), scheme), blocks]
    return [lambda array: (float(bits), scheme)]


def _whole_blocks(array: np.ndarray) -> bool:
    """Whether the tensor's rows are whole numbers of REFERENCE_BLOCK weights."""
    return array.ndim > 0 and math.prod(array.shape[1:]) % REFERENCE_BLOCK == 0


def _option_size(name: str, array: np.ndarray, dtype: str, q, scheme: str) -> int:
    """A quantized tensor's bytes in a file: payload, header entry, alignment on average."""
    if scheme == HALF:
        entry = TensorEntry(name, array.shape, dtype, HALF, 0, 2 * array.size, 0)
    else:
        entry, _ = quantized_entry(name, array.shape, dtype, q, scheme, True)
    overhead = len(msgpack.packb(entry.to_header(), use_bin_type=True)) + ALIGNMENT // 2
    return entry.length + overhead


def _values(array: np.ndarray, dtype: str) -> np.ndarray:
    """The values a tensor's errors are measured against: float32 (exact for binary16 and
    bfloat16), float64 for a float64 tensor; no copy where the array already is one."""
    if dtype == "bfloat16":
        return bf16_to_f32(array)
    return array if array.dtype == np.float64 else array.astype(np.float32, copy=False)


def _finite(target) -> np.ndarray:
    """The tensor's :func:`_values`; NaN or infinite values raise quantize_tensor's error
    (an option may be skipped when its grid overflows, never a tensor that is not
    finite)."""
    name, array, dtype = target
    values = _values(array, dtype)
    if not np.isfinite(values).all():
        quantize_tensor(name, array, dtype, TensorPlan(8.0))
    return values


def _measure(target, options: list[Option], evaluate: Evaluate | None) -> _Choices:
    """Exact sizes and squared weight errors of every option (round to nearest); with a
    model evaluator, distortion = squared error x the tensor's sensitivity, measured at the
    ANCHORS (with the per-channel grid) and interpolated log-linearly in between."""
    name, array, dtype = target
    reference = _finite(target)
    schemes = {s for _, s in options}
    anchor_scheme = REFERENCE_SCHEME if REFERENCE_SCHEME in schemes else options[0][1]
    anchors = {(b, anchor_scheme) for b in ANCHORS}
    energy = _energy(reference)
    sizes, errors, relative, decoded, kept = [], [], [], {}, []  # decoded: for the evaluator
    for option, values, size in _each_option(target, options):
        kept.append(option)
        sizes.append(size)
        relative.append(_channel_error(values, reference, energy))
        if evaluate is not None:
            diff = np.subtract(values.reshape(-1), reference.reshape(-1), dtype=np.float64)
            errors.append(float(diff @ diff))
            if option in anchors:
                decoded[option] = values
    options, anchors = kept, {o for o in anchors if o in kept}
    if not options:
        return _Choices(name, [], np.zeros(0), np.zeros(0), np.zeros(0))
    relative = np.array(relative)
    if evaluate is None:
        return _Choices(name, list(options), np.array(sizes), relative, relative)
    errors = np.maximum(np.array(errors), 1e-30)
    widths = np.array([b for b, _ in options])
    at = [b for b in ANCHORS if (b, anchor_scheme) in anchors] or [widths.max()]
    if (at[0], anchor_scheme) not in decoded:  # no anchor storable: the finest option
        finest = options[int(np.argmax(widths))]
        q = _quantized(target, finest, strict=True)
        decoded[(at[0], anchor_scheme)] = q.values().reshape(array.shape)
        errors_at = {at[0]: errors[options.index(finest)]}
    else:
        errors_at = {b: errors[options.index((b, anchor_scheme))] for b in at}
    measured = [
        max(evaluate({name: decoded[(b, anchor_scheme)]}), 1e-30) / errors_at[b] for b in at
    ]
    sensitivity = np.exp(np.interp(widths, at, np.log(measured)))
    return _Choices(name, list(options), np.array(sizes), errors * sensitivity, relative)


def _predict(target, options: list[Option], stats, weights: np.ndarray, rounder) -> _Choices:
    """Sizes and predicted model output errors of every option of a layer with input
    statistics and per-channel output sensitivities, without running the model: round to
    nearest for every option, then error-compensating rounding at GAIN_WIDTH on each grid
    to scale that grid's errors and sizes by what it gains."""
    from .gptq import row_output_errors

    name, array, dtype = target
    reference = _finite(target)
    energy = _energy(reference)

    def predicted(values: np.ndarray) -> float:
        rows = row_output_errors(np.subtract(values, reference, dtype=np.float64), stats.hessian)
        return float(weights @ rows)

    sizes, relative, predictions, kept = [], [], [], []
    for option, values, size in _each_option(target, options):
        kept.append(option)
        sizes.append(size)
        relative.append(_channel_error(values, reference, energy))
        predictions.append(predicted(values))
    options = kept
    if not options:
        return _Choices(name, [], np.zeros(0), np.zeros(0), np.zeros(0))
    sizes, predictions = np.array(sizes, dtype=np.float64), np.array(predictions)
    for family, schemes in _families({s for _, s in options}).items():
        mine = [i for i, (_, s) in enumerate(options) if s in schemes]
        at = min(mine, key=lambda i: (abs(options[i][0] - GAIN_WIDTH), options[i][1] != family))
        q = quantize_tensor(name, array, dtype, TensorPlan(*options[at], "gptq"), rounder)
        gain = predicted(q.values().reshape(array.shape)) / max(predictions[at], 1e-30)
        grow = _option_size(name, array, dtype, q, options[at][1]) / sizes[at]
        predictions[mine] *= min(gain, 1.0)
        sizes[mine] *= grow
    predictions = np.maximum(predictions, 1e-30)
    return _Choices(name, list(options), np.rint(sizes), predictions, np.array(relative))


def _families(schemes: Collection[str]) -> dict[str, list[str]]:
    """Schemes that share one measured gain of error-compensating rounding, keyed by the
    one it is measured on: each scheme alone, but the group sizes of a per-group scheme
    together (measured at the middle size), whose gains differ little."""
    out: dict[str, list[str]] = {}
    groups: dict[str, list[tuple[int, str]]] = {}
    for scheme in sorted(schemes):
        if scheme == HALF:
            continue  # values, not codes: nothing to round
        base, size = parse_scheme(scheme)
        if size is None:
            out[scheme] = [scheme]
        else:
            groups.setdefault(base, []).append((size, scheme))
    for members in groups.values():
        members.sort()
        out[members[len(members) // 2][1]] = [s for _, s in members]
    return out


def _each_option(target, options: list[Option]) -> Iterator[tuple[Option, np.ndarray, int]]:
    """(option, decoded values, bytes in a file) of every option the tensor can be stored
    with, rounding to nearest: values near the float32 limit overflow coarse grids, which
    the file must not hold, so those options are left out."""
    name, array, dtype = target
    for option in options:
        q = _quantized(target, option)
        if q is not None:
            size = _option_size(name, array, dtype, q, option[1])
            yield option, q.values().reshape(array.shape), size


@dataclass
class _Half:
    """A tensor stored as binary16 values, with the ``values()`` of a quantized one."""

    half: np.ndarray

    def values(self, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return self.half.astype(np.float32)
        np.copyto(out.reshape(self.half.shape), self.half)
        return out


def _quantized(
    target, option: Option, rounding: str = "nearest", rounder=None, strict: bool = False
):
    """The tensor stored with ``option`` (rounded as ``rounding`` says), or None where it
    cannot be stored so (``strict``: raise instead): values near the float32 limit
    overflow coarse grids, and values beyond 65504 binary16."""
    name, array, dtype = target
    try:
        if option == HALF_OPTION:
            return _Half(half_values(name, array, dtype))
        return quantize_tensor(name, array, dtype, TensorPlan(*option, rounding), rounder)
    except E.EncodeError:
        if strict:
            raise
        return None


def _storable(target, option: Option) -> bool:
    """Whether a tensor can be quantized with ``option`` (see :func:`_each_option`)."""
    return _quantized(target, option) is not None


def _energy(reference: np.ndarray) -> np.ndarray:
    """Each output channel's energy (sum of squares), as :func:`_channel_error` divides by."""
    return row_errors(reference)


def _divisor(energy: np.ndarray) -> np.ndarray:
    """What :func:`_relative` divides each channel's squared error by: its energy, and a
    floor for all-zero channels."""
    return energy + 1e-12 * max(float(energy.mean()), 1e-30) if energy.size else energy


def _relative(sums: np.ndarray, divisor: np.ndarray) -> float:
    """Channels' squared errors ``sums``, each relative to its energy (``divisor``, see
    :func:`_divisor`), averaged."""
    return float((sums / divisor).mean()) if sums.size else 0.0


def _channel_error(
    values: np.ndarray, reference: np.ndarray, energy: np.ndarray | None = None
) -> float:
    """The weight error that stands in for a model's: each output channel's squared error
    relative to its own energy, averaged over channels. Unlike the tensor's total squared
    error it does not let a grid trade away small channels (which a per-layer grid zeroes)
    for precision on large ones: the next layer feels every channel. (``reference``: the
    tensor's :func:`_values`; ``energy``: its :func:`_energy`, when already known.) Sums
    are taken as :mod:`qpack.weighterror` says, the same with or without the compiled
    kernels."""
    if not reference.size:
        return 0.0
    energy = _energy(reference) if energy is None else energy
    return _relative(row_errors(reference, values), _divisor(energy))


class _Weights:
    """One tensor searched without a model: its :func:`_values` and channel energies, the
    value ranges its grids are made from, and a buffer that a trial's values decode into
    where they must be decoded (a large tensor's fresh pages cost more than its
    arithmetic)."""

    def __init__(self, target):
        self.target = target
        self.reference = _finite(target)
        self.energy = _energy(self.reference)
        self.divisor = _divisor(self.energy)
        self._buffer: np.ndarray | None = None
        self._ranges: dict[int | None, Ranges] = {}

    def error(self, q) -> float:
        """:func:`_channel_error` of a quantized (or binary16) version of the tensor."""
        if self._buffer is None:
            self._buffer = np.empty(self.reference.size, dtype=np.float32)
        values = q.values(out=self._buffer)
        return _relative(row_errors(self.reference, values), self.divisor)

    def option_error(self, option: Option) -> float | None:
        """:func:`_channel_error` of the tensor stored with ``option``, rounding to
        nearest, or None where it cannot be stored so (see :func:`_quantized`)."""
        found = self.trial(option, keep=False)
        return None if found is None else found[0]

    def trial(self, option: Option, keep: bool = True) -> tuple[float, Any] | None:
        """(:func:`_channel_error`, the quantized tensor or None unless ``keep``) of the
        tensor stored with ``option``, rounding to nearest; None where it cannot be stored
        so (see :func:`_quantized`). A grid made from value ranges alone is measured in
        one pass over the weights, with no values decoded."""
        array = self.target[1]
        g = None
        if option != HALF_OPTION and self.reference.dtype == np.float32 and array.ndim:
            if not keep and option[1] == ORIGIN_SCHEME and float(option[0]).is_integer():
                high, low = self.ranges(None)
                peak = np.float32(max(high.max(initial=0), -low.min(initial=0)))
                sums = origin_errors(self.reference, int(option[0]), peak)
                return _relative(sums, self.divisor), None
            g = grid(self.reference, option[0], option[1], self.ranges)
        if g is None:
            q = _quantized(self.target, option)
            return None if q is None else (self.error(q), q)
        if not decodes_finite(code_bits(g.levels), g.scale, g.zero):
            return None  # values near the float32 limit overflow this grid
        codes = np.empty(self.reference.size, dtype=np.uint8) if keep else None
        error = _relative(grid_errors(self.reference, g, codes), self.divisor)
        return error, None if codes is None else on_grid(g, codes)

    def ranges(self, size: int | None) -> Ranges:
        """:func:`~qpack.schemes.unit_ranges` of the rows (``size`` None) or of each group of
        ``size`` weights, reduced from those of a group size that divides it, or that of
        any group for the rows, where already taken."""
        if size not in self._ranges:
            rows = as_rows(self.reference)
            base = next((b for b in self._ranges if b and (size is None or size % b == 0)), None)
            if base is None or not rows.size:
                self._ranges[size] = unit_ranges(rows, size)
            else:
                high, low = self._ranges[base]
                k = high.shape[1] if size is None else size // base  # base units per unit
                units = -(-high.shape[1] // k)
                if units * k > high.shape[1]:  # a short last unit: pad with no values
                    pad = ((0, 0), (0, units * k - high.shape[1]))
                    high = np.pad(high, pad, constant_values=-np.inf)
                    low = np.pad(low, pad, constant_values=np.inf)
                high, low = high.reshape(-1, units, k), low.reshape(-1, units, k)
                self._ranges[size] = (high.max(axis=2), low.min(axis=2))
        return self._ranges[size]


def _predicted_errors(weights: _Weights, scheme: str, widths: list[float]) -> np.ndarray | None:
    """Each width's :func:`_channel_error` on a grid of ``scheme`` as the grid's steps alone
    predict it (rounding noise of step**2 / 12 a weight, a channel's at most its energy),
    without quantizing: where the search of a grid's widths starts. None for a scheme it
    does not model (the MSE-clipped ones, and binary16 values)."""
    reference, energy = weights.reference, weights.energy
    if scheme == HALF or not reference.size:
        return None
    base, size = parse_scheme(scheme)
    if base.startswith("mse"):
        return None
    rows, cols = as_rows(reference).shape
    if size is not None and cols < size:
        size = None  # a group as long as the row: its channel's grid
    high, low = weights.ranges(size)
    if size is not None:  # whole groups: a short last group is taken to be like them
        high, low = high[:, : cols // size], low[:, : cols // size]
    if base.endswith("per-layer"):
        high, low = high.max(keepdims=True), low.min(keepdims=True)
    high, low = high.astype(np.float64), low.astype(np.float64)
    # symmetric: steps of 1 / (levels // 2) of the largest magnitude; else of 1 / (levels
    # - 1) of the range, which holds 0
    symmetric = base.startswith("symmetric")
    spans = np.maximum(high, -low) if symmetric else np.maximum(high, 0) - np.minimum(low, 0)
    # a weight's error at a step of one span, summed over each row (a short last group is
    # taken to be like the row's whole ones)
    per_row = np.broadcast_to((spans**2 / 12).mean(axis=1) * cols, (rows,))
    live = energy > 0
    levels = np.array([levels_for(b) for b in widths])
    steps = (levels // 2 if symmetric else levels - 1)[:, None]
    relative = np.minimum(per_row[live][None, :] / steps**2 / energy[live][None, :], 1.0)
    return relative.sum(axis=1) / rows


def _smallest_option(
    weights: _Weights, options: list[Option], limit: float
) -> tuple[Option, Any] | None:
    """(The option of least file size whose :func:`_channel_error` is at most ``limit``,
    the tensor quantized so), or None: for each grid the smallest such width
    (:func:`_smallest_width`), then the smallest file among the grids. The binary16
    values' size is known before they are made: they are tried last, and only where they
    would be the smallest file."""
    name, array, dtype = weights.target
    best: tuple[int, Option, Any] | None = None
    schemes = sorted(dict.fromkeys(s for _, s in options), key=lambda s: s == HALF)
    for scheme in schemes:
        if scheme == HALF and best and _option_size(name, array, dtype, None, HALF) >= best[0]:
            continue  # could not replace the file found
        widths = sorted(b for b, s in options if s == scheme)
        found = _smallest_width(weights, scheme, widths, limit)
        if found is not None:
            size = _option_size(name, array, dtype, found[1], scheme)
            if best is None or size < best[0]:
                best = (size, (found[0], scheme), found[1])
    return None if best is None else best[1:]


def _smallest_width(
    weights: _Weights, scheme: str, widths: list[float], limit: float
) -> tuple[float, Any] | None:
    """(width, quantized tensor) of the narrowest of ``widths`` (ascending) on the grid of
    ``scheme`` whose :func:`_channel_error` is at most ``limit``, or None: searched from
    the width the grid's steps predict (:func:`_first_passing`), since a finer width of one
    grid has less error. About two quantizations instead of one per width."""
    found: dict[int, Any] = {}

    def passes(i: int) -> bool:
        trial = weights.trial((widths[i], scheme))  # None: too coarse to store
        if trial is None or trial[0] > limit:
            return False
        found[i] = trial[1]
        return True

    predicted = _predicted_errors(weights, scheme, widths)
    start = len(widths) // 2
    if predicted is not None:
        start = next((i for i, e in enumerate(predicted) if e <= limit), len(widths) - 1)
    first = _first_passing(len(widths), start, passes)
    return None if first is None else (widths[first], found[first])


def _weight_distortion(targets) -> Evaluate:
    """:func:`_channel_error` of each replaced tensor, summed (no model). Each tensor's
    reference values are taken when a plan first replaces it."""
    arrays = {name: (a, d) for name, a, d in targets}
    reference: dict[str, np.ndarray] = {}

    def measure(replaced: Mapping[str, np.ndarray]) -> float:
        for n in replaced:
            if n not in reference:
                reference[n] = _values(*arrays[n])
        return sum(_channel_error(v, reference[n]) for n, v in replaced.items())

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


def _without_groups(choices: list[_Choices]) -> list[_Choices]:
    """The choices restricted to per-tensor and per-channel grids."""
    out = []
    for c in choices:
        keep = [i for i, (_, s) in enumerate(c.options) if _group(s) is None]
        if not keep:
            keep = list(range(len(c.options)))
        out.append(
            _Choices(
                c.name,
                [c.options[i] for i in keep],
                c.size[keep],
                c.distortion[keep],
                c.error[keep],
            )
        )
    return out


def _has_groups(chosen: Mapping[str, Option]) -> bool:
    return any(_group(s) is not None for _, s in chosen.values())


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

"""Planning a save: from what the user asks for to a plan (:mod:`qpack.plan`) and the
rounder that carries out its error-compensating rounding.

``bits=N`` (one number) asks for the accuracy of N-bit quantization in the smallest file:
qpack chooses every tensor's width and grid (:mod:`qpack.budget`). Its reference is
round-to-nearest N-bit quantization with one scale per output channel (at 8 bits, standard
per-layer int8). With a model and calibration inputs, accuracy is the model's mean output
error on those inputs and codes are chosen by error-compensating rounding
(:mod:`qpack.gptq`) wherever a layer's inputs are seen (:mod:`qpack.calibrate`): the
rounding is fitted to every other calibration batch and plans are checked on the others.
Without them, every tensor's own weight error is held to its reference's (a small output
layer's to 8-bit's too: see :data:`qpack.budget.OUTPUT_REFERENCE_BITS`). ``uniform=True``
(or ``entropy=False``, or naming a ``scheme``) asks for exactly N bits everywhere instead,
``max_size`` for the least error within a size, and a mapping ``bits={name: N}`` spells
the plan out.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors as E
from .dtypes import as_items
from .plan import (
    DEFAULT_BITS,
    DEFAULT_ENTROPY,
    HALF_BITS,
    ROUNDINGS,
    Item,
    Plan,
    default_bits,
    resolve,
    widths,
)
from .quantize import Rounder, gptq_rounder
from .schemes import DEFAULT_SCHEME, levels_for

__all__ = ["EVAL_EXAMPLES", "Planned", "Planner", "plan_items", "plan_save"]

# Calibration examples the model's output error is measured on while planning (the first
# ones): each check of a plan is one forward pass over them, and too few let a plan fit
# them rather than the data (64 did on a small transformer). Layer statistics use them all.
EVAL_EXAMPLES = 512


@dataclass
class Planned:
    """A plan's public form (``save``'s keyword options), its rounder, and a summary."""

    options: dict[str, Any]
    rounder: Rounder | None = None
    summary: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    # name -> ((bits, scheme), quantized tensor) the planner already made, rounded to
    # nearest: the writer takes them where the plan still says so
    quantized: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)


class Planner:
    """Plans for one state_dict (and its model and calibration inputs, if any): what the
    model costs to measure (layer statistics, output sensitivities, the reference outputs)
    is measured once, when first needed, and shared by every :meth:`plan`."""

    def __init__(
        self,
        state: Mapping[str, Any],
        *,
        model: Any = None,
        calibration: Iterable[Any] | None = None,
        postprocess: Callable | None = None,
        progress: Callable[[str], None] | None = None,
        bar: Callable[[int, str], Any] | None = None,
        schemes: tuple[str, ...] | None = None,
    ):
        if calibration is not None and model is None:
            raise E.EncodeError(
                "calibration inputs need the model: pass the nn.Module, not its state_dict"
            )
        self.state = state
        self.model = model if calibration is not None else None
        self.calibration = list(calibration) if calibration is not None else None
        # Rounding is fitted to one half of the batches and plans are checked on the other:
        # error-compensating codes fit the inputs they were computed from (a recurrent
        # model's by 1.8x), which a check on those same inputs would not see.
        batches = self.calibration or []
        self._fit = batches[0::2] if len(batches) > 1 else batches
        self._check = batches[1::2] if len(batches) > 1 else batches
        self.postprocess = postprocess
        self.note = progress or (lambda _msg: None)
        # bar(total, what): a context manager yielding update(n) for a long step
        self.bar = bar or _no_bar
        # the grids plans choose among (None: the allocator's OPTION_SCHEMES)
        self.schemes = schemes
        self.timings: dict[str, float] = {}
        self._stats: dict | None = None
        self._measured: tuple | None = None
        self._allocator = None

    @property
    def stats(self) -> dict:
        """Layer input statistics (:mod:`qpack.calibrate`), or {} without a model."""
        if self._stats is None:
            self._stats = {}
            if self.model is not None:
                from .calibrate import layer_statistics

                count = len(self._fit)
                self.note(f"calibrating: layer inputs on {_batches(count)}")
                with self._timed("statistics"), self.bar(count, "calibrating") as tick:
                    self._stats = _run_model(
                        lambda: layer_statistics(self.model, self._fit, progress=lambda _m: tick(1))
                    )
        return self._stats

    def _model_measures(self) -> tuple:
        """(evaluate, sensitivity): the model's real output error on the first calibration
        examples, and its per-channel output sensitivities; (None, {}) without a model."""
        if self._measured is None:
            self._measured = (None, {})
            if self.model is not None:
                from .measure import Evaluator
                from .sensitivity import output_sensitivity

                probe = _first_examples(self._check, EVAL_EXAMPLES)
                fit = _first_examples(self._fit, EVAL_EXAMPLES)
                self.note(f"measuring output sensitivities on {_batches(len(fit))}")
                with self._timed("sensitivity"):
                    model, post = self.model, self.postprocess
                    evaluate = _run_model(lambda: Evaluator(model, probe, post))
                    sensitivity = {}
                    if self.stats:
                        sensitivity = _run_model(lambda: output_sensitivity(model, fit, post))
                self._measured = (evaluate, sensitivity)
        return self._measured

    def allocator(self):
        """The :class:`~qpack.budget.Allocator` of this state (built once)."""
        if self._allocator is None:
            from .budget import Allocator

            evaluate, sensitivity = self._model_measures()
            with self._timed("measure"):
                self._allocator = self._run(
                    lambda: Allocator(
                        self.state,
                        evaluate=evaluate,
                        check=evaluate.example_errors if evaluate is not None else None,
                        stats=self.stats,
                        sensitivity=sensitivity,
                        progress=self.note,
                        bar=self.bar,
                        **self._schemes(),
                    )
                )
        return self._allocator

    def _run(self, fn: Callable[[], Any]) -> Any:
        """Run a planning step; with a model, its errors name the model (it runs there)."""
        return _run_model(fn) if self.model is not None else fn()

    @contextlib.contextmanager
    def _timed(self, what: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - started

    def plan(
        self,
        *,
        bits: Any = DEFAULT_BITS,
        max_size: int | None = None,
        scheme: Any = None,
        rounding: Any = None,
        uniform: bool = False,
        entropy: bool = True,
        raw: Iterable[str] = (),
    ) -> Planned:
        """Decide every tensor's width, grid and rounding (see the module's documentation);
        the tensors named in ``raw`` are kept exact."""
        raw = set(raw)
        unknown = sorted(raw - set(self.state))
        if unknown:
            raise E.EncodeError(f"tensors to keep raw are not in the state_dict: {unknown}")
        if max_size is not None and not entropy:
            raise E.EncodeError("max_size needs entropy coding (entropy=True)")
        # a named scheme, or a mapping, spells the plan out: qpack chooses nothing
        spelled = isinstance(bits, Mapping) or scheme is not None
        if max_size is not None and (uniform or spelled):
            raise E.EncodeError(
                "max_size chooses the widths: it cannot be combined with "
                "uniform=True, a scheme or a bits mapping"
            )
        if not isinstance(bits, Mapping) and bits != HALF_BITS:
            try:
                levels_for(bits)
            except ValueError as exc:
                raise E.EncodeError(str(exc)) from None
        if isinstance(rounding, str) and rounding not in ROUNDINGS:
            raise E.EncodeError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDINGS)}")
        wants_gptq = rounding != "nearest"
        stats = self.stats if wants_gptq else {}
        if rounding == "gptq" and not stats:
            raise E.EncodeError("gptq rounding needs a model and calibration inputs")
        rounder = gptq_rounder(stats) if stats else None

        def default_rounding(names: Iterable[str]) -> Any:
            if rounding is not None:
                return rounding
            return {n: "gptq" if n in stats else "nearest" for n in names}

        half = bits == HALF_BITS  # every weight's float16 value: nothing to choose
        if raw and not isinstance(bits, Mapping) and (spelled or uniform or half or not entropy):
            bits = {  # every tensor spelled out: the others at the width asked for
                name: None if name in raw else default_bits(array, dtype, bits)
                for name, array, dtype in as_items(self.state)
            }
        elif raw and isinstance(bits, Mapping):
            bits = {**bits, **dict.fromkeys(raw)}
        if isinstance(bits, Mapping):
            named = [n for n, b in bits.items() if b is not None]
            options = {
                "bits": dict(bits),
                "scheme": scheme or DEFAULT_SCHEME,
                "rounding": default_rounding(named),
            }
            return Planned(options, rounder, "widths as given", dict(self.timings))
        if half and max_size is None:
            options = {"bits": bits, "scheme": scheme or DEFAULT_SCHEME, "rounding": "nearest"}
            return Planned(options, None, "float16 values", dict(self.timings))
        if max_size is None and (uniform or spelled or not entropy):
            scheme = scheme or DEFAULT_SCHEME
            options = {
                "bits": bits,
                "scheme": scheme,
                "rounding": default_rounding(n for n in self.state if n in stats),
            }
            kind = "Huffman-coded" if entropy else "fixed-width"
            how = f"{bits:g}-bit {kind}, {scheme}, {_rounding_words(options['rounding'])}"
            return Planned(options, rounder, how, dict(self.timings))

        if raw:
            allocator = self._plain_allocator(stats, raw)
        else:
            allocator = self.allocator() if wants_gptq else self._plain_allocator({}, ())
        with self._timed("plan"):
            if max_size is not None:
                options = self._run(lambda: allocator.for_size(max_size))
                target = f"at most {max_size:,} bytes"
            else:
                options = self._run(lambda: allocator.for_bits(bits))
                target = f"accuracy of {bits:g}-bit"
        if rounding is not None:
            options["rounding"] = rounding
        coded, halves = widths(options["bits"])
        span = f"{min(coded):g}-{max(coded):g} bits per tensor" if coded else "no codes"
        span += f", {halves} float16" if halves else ""
        grids = ", ".join(sorted(set(options["scheme"].values()))) or "-"
        basis = "the model's output error" if self.model is not None else "weight error"
        from .budget import OUTPUT_REFERENCE_BITS

        if allocator.output is not None and max_size is None and bits < OUTPUT_REFERENCE_BITS:
            basis += f"; output layer {allocator.output} held to {OUTPUT_REFERENCE_BITS}-bit too"
        how = (
            f"{target}: {span} ({grids}), {_rounding_words(options['rounding'])}, chosen by {basis}"
        )
        made = dict(allocator.made)
        return Planned(options, allocator.rounder or rounder, how, dict(self.timings), made)

    def _plain_allocator(self, stats: Mapping, raw: Iterable[str]):
        """An allocator for other settings than the shared one: without error-compensating
        rounding (``stats`` empty) or with tensors kept raw."""
        from .budget import Allocator

        evaluate, sensitivity = self._model_measures()
        return self._run(
            lambda: Allocator(
                self.state,
                evaluate=evaluate,
                check=evaluate.example_errors if evaluate is not None else None,
                stats=stats,
                sensitivity=sensitivity if stats else {},
                raw=set(raw),
                progress=self.note,
                bar=self.bar,
                **self._schemes(),
            )
        )

    def _schemes(self) -> dict[str, tuple[str, ...]]:
        return {} if self.schemes is None else {"schemes": self.schemes}


def plan_save(
    state: Mapping[str, Any],
    *,
    model: Any = None,
    calibration: Iterable[Any] | None = None,
    postprocess: Callable | None = None,
    progress: Callable[[str], None] | None = None,
    bar: Callable[[int, str], Any] | None = None,
    **request: Any,
) -> Planned:
    """One plan for one state (see the module's documentation and :meth:`Planner.plan`)."""
    planner = Planner(
        state,
        model=model,
        calibration=calibration,
        postprocess=postprocess,
        progress=progress,
        bar=bar,
    )
    return planner.plan(**request)


def _rounding_words(rounding: Any) -> str:
    if isinstance(rounding, str):
        return f"{rounding} rounding"
    gptq = sum(r == "gptq" for r in rounding.values())
    if not gptq:
        return "nearest rounding"
    return f"error-compensating rounding on {gptq}/{len(rounding)} tensors"


def _run_model(fn: Callable[[], Any]) -> Any:
    """Run a step that calls the user's model: its errors become one-line QpackErrors."""
    try:
        return fn()
    except E.QpackError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise E.EncodeError(
            f"the model failed on the calibration inputs ({type(exc).__name__}: {first})"
        ) from None


def plan_items(
    state: Mapping[str, Any], planned: Planned | None = None, **request: Any
) -> tuple[list[Item], Plan, Planned]:
    """:func:`plan_save` (unless ``planned`` is given), then the state's items and the plan
    resolved for them: what the writer takes."""
    if planned is None:
        planned = plan_save(state, **request)
    items = as_items(state)
    entropy = request.get("entropy", DEFAULT_ENTROPY)
    return items, resolve(items, entropy=entropy, **planned.options), planned


def _first_examples(batches: list[Any], count: int) -> list[Any]:
    """The first batches holding at least ``count`` examples (along the first dimension of
    each batch's first tensor)."""
    out, seen = [], 0
    for batch in batches:
        out.append(batch)
        seen += _examples(batch)
        if seen >= count:
            break
    return out


def _examples(batch: Any) -> int:
    if hasattr(batch, "shape"):
        return int(batch.shape[0]) if len(batch.shape) else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)) and batch:
        return _examples(batch[0])
    return 1


@contextlib.contextmanager
def _no_bar(total: int, what: str):
    yield lambda _n=1: None


def _batches(count: int) -> str:
    return f"{count} batch" + ("" if count == 1 else "es")

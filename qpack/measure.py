"""A model's output error when some of its weights are replaced by their quantized values.

This is what model-aware planning minimizes: run the model on the user's calibration
inputs once with its float weights, keep the outputs, and compare later runs against them.
Outputs may be any tensor or nested structure (tuples, lists, dicts) of tensors; the error
is the mean squared difference over all of their floating elements, optionally after a
``postprocess`` (e.g. a sigmoid, to compare probabilities rather than logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from . import errors as E

__all__ = ["Evaluator", "call_model", "flat_outputs"]


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """``model(batch)``, ``model(*batch)`` for a tuple or list, ``model(**batch)`` for a dict."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def flat_outputs(output: Any) -> Iterator[torch.Tensor]:
    """The floating tensors of a model's output, in a fixed order."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point() or output.is_complex():
            yield output
    elif isinstance(output, Mapping):
        for key in sorted(output, key=str):
            yield from flat_outputs(output[key])
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from flat_outputs(item)
    elif hasattr(output, "__dataclass_fields__"):  # e.g. Hugging Face ModelOutput
        for key in output.__dataclass_fields__:
            yield from flat_outputs(getattr(output, key))


class Evaluator:
    """``evaluator(replaced)`` -> the mean squared output change on the calibration inputs
    when the parameters named in ``replaced`` (``{name: array}``) take those values; the
    model's own weights are restored afterwards. Distortions of separate layers roughly
    add up, which is what the allocator assumes."""

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: Iterable[Any],
        postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self.inputs = list(inputs)
        if not self.inputs:
            raise E.EncodeError("calibration needs at least one input")
        self.postprocess = postprocess
        self._params = dict(model.named_parameters())
        self._params.update(dict(model.named_buffers()))
        self.reference = self._outputs()
        self.count = sum(int(t.numel()) for t in self.reference)
        if not self.count:
            raise E.EncodeError("the model returns no floating tensors to compare")
        self.calls = 0

    def _outputs(self) -> list[torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        outs = []
        try:
            with torch.no_grad():
                for batch in self.inputs:
                    for t in flat_outputs(call_model(self.model, batch)):
                        t = self.postprocess(t) if self.postprocess else t
                        outs.append(t.detach().to(torch.float64))
        finally:
            self.model.train(was_training)
        return outs

    def __call__(self, replaced: Mapping[str, np.ndarray]) -> float:
        """The mean squared output change (adds up across layers: what the allocator's
        predictions use)."""
        return self._compare(replaced, squared=True)

    def mean_abs(self, replaced: Mapping[str, np.ndarray]) -> float:
        """The mean absolute output change (the error users read, e.g. mean |p - p_float|)."""
        return self._compare(replaced, squared=False)

    def example_errors(self, replaced: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each example's share of :meth:`mean_abs` (their sum is it): the absolute output
        change summed over each index of an output's first (batch) dimension, over the
        element count. What plans are checked against: per example, a plan's error can be
        compared with a reference's as paired samples, which says how sure a comparison
        on these inputs is."""
        rows = [
            (o - r).abs().reshape(o.shape[0] if o.dim() and o.shape[0] else 1, -1).sum(1)
            for o, r in self._changed(replaced)
        ]
        return torch.cat(rows).numpy() / self.count

    def _compare(self, replaced: Mapping[str, np.ndarray], squared: bool) -> float:
        power = 2 if squared else 1
        total = sum(float(((o - r).abs() ** power).sum()) for o, r in self._changed(replaced))
        return total / self.count

    def _changed(self, replaced: Mapping[str, np.ndarray]) -> list[tuple]:
        """(output, reference output) pairs with the parameters replaced."""
        saved = {}
        self.calls += 1
        with torch.no_grad():
            try:
                for name, value in replaced.items():
                    param = self._params[name]
                    saved[name] = param.detach().clone()
                    new = torch.as_tensor(np.asarray(value)).reshape(param.shape)
                    param.copy_(new.to(param.dtype))
                outs = self._outputs()
            finally:
                for name, value in saved.items():
                    self._params[name].copy_(value)
        if len(outs) != len(self.reference) or any(
            o.shape != r.shape for o, r in zip(outs, self.reference, strict=True)
        ):
            raise E.EncodeError("the model's outputs change shape between calls")
        return list(zip(outs, self.reference, strict=True))

"""How much a model's output feels each layer's output error: per output channel, from a
few backward passes (no forward pass per layer).

For a layer whose output changes by ``dy``, the model's output changes by about ``J dy``
(``J``: the Jacobian of the output, after any postprocess, with respect to that layer's
output). With ``dy`` uncorrelated with ``J``'s structure, the mean squared output change is
``sum_c G_c * |dy_c|^2 / (rows * N)``, where ``G_c = E_v |(J^T v)_c|^2`` for ``v`` of
independent standard normals over the ``N`` output elements (Hutchinson's estimator: one
backward pass per probe gives every layer's ``G`` at once), and ``rows`` is the number of
times channel ``c`` is computed. A layer's ``|dy_c|^2 / rows`` is ``dW_c H dW_c^T`` in
closed form (:mod:`qpack.calibrate`), so :func:`output_sensitivity`'s per-channel weights
turn a weight change into a predicted model output error without running the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .measure import call_model, flat_outputs

__all__ = ["PROBES", "output_sensitivity"]

PROBES = 2  # random projections per batch: the sums over positions already average a lot
_HOOKED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def output_sensitivity(
    model: nn.Module,
    inputs: Iterable[Any],
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    probes: int = PROBES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per output channel of every Linear and Conv layer that ran, keyed by its weight's
    state_dict name: the mean squared model output change per unit of ``dW_c H dW_c^T``
    (float64, one value per row of ``weight.reshape(out_channels, -1)``)."""
    names: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), name)
    captured: list[tuple[str, torch.Tensor, int]] = []

    def hook(module: nn.Module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            axis = output.dim() - 1 if isinstance(module, nn.Linear) else 1
            captured.append((names[id(module.weight)], output, axis))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, _HOOKED) and id(m._parameters.get("weight")) in names
    ]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    sums: dict[str, np.ndarray] = {}
    total = 0
    gen = torch.Generator().manual_seed(seed)
    try:
        model.eval()
        for p, _ in flags:  # a graph to the layers' outputs, even for a frozen model
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in inputs:
                captured.clear()
                outs = [
                    postprocess(t) if postprocess else t
                    for t in flat_outputs(call_model(model, batch))
                ]
                outs = [t for t in outs if t.requires_grad]
                if not outs or not captured:
                    continue
                total += sum(int(t.numel()) for t in outs)
                layer_outputs = [y for _, y, _ in captured]
                for i in range(probes):
                    loss = sum(
                        (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
                        for t in outs
                    )
                    grads = torch.autograd.grad(
                        loss, layer_outputs, retain_graph=i + 1 < probes, allow_unused=True
                    )
                    for (name, _, axis), g in zip(captured, grads, strict=True):
                        if g is None:
                            continue
                        per = (g.double() ** 2).transpose(0, axis).reshape(g.shape[axis], -1)
                        add = per.sum(dim=1).numpy() / probes
                        sums[name] = sums.get(name, 0.0) + add
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    if not total:
        return {}
    return {name: value / total for name, value in sums.items()}

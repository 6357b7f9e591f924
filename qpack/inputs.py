"""What a user brings besides the checkpoint for model-aware packing: the model's code
(``--model MODULE:CALLABLE``) and calibration inputs (``--calibration FILE``).

Calibration files are read without running code: ``.npy`` with ``allow_pickle=False``,
``.pt`` with ``torch.load(weights_only=True)``. One array or tensor is a batch of examples
along its first dimension; a ``.pt`` may also hold a list of ready batches (each a tensor,
a tuple of positional inputs or a dict of keyword inputs), a tuple of tensors (positional
inputs, split together) or a dict of tensors (keyword inputs, split together).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import errors as E

__all__ = ["BATCH", "build_model", "read_calibration"]

# Examples per forward pass: enough to keep BLAS busy, small enough for any model's memory.
BATCH = 32


def build_model(spec: str, kwargs_json: str | None = None) -> Any:
    """Build a model from ``MODULE:CALLABLE`` (an importable module, or a ``.py`` file's
    path) and ``kwargs_json``, a JSON object of keyword arguments for the callable.

    Example:
        >>> model = build_model("torchvision.models:resnet18", '{"num_classes": 10}')
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise E.QpackError(f"--model must be MODULE:CALLABLE or FILE.py:CALLABLE, got {spec!r}")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as exc:
        raise E.QpackError(f"--model-args is not JSON ({exc.msg})") from None
    if not isinstance(kwargs, dict):
        raise E.QpackError("--model-args must be a JSON object of keyword arguments")
    module = _import(module_name)
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise E.QpackError(f"{module_name} has no {attr!r}") from None
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code: report it in one line
        raise E.QpackError(f"{spec}(**{kwargs}) failed: {type(exc).__name__}: {exc}") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise E.QpackError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(name: str):
    try:
        if name.endswith(".py") or os.sep in name:
            path = Path(name)
            if not path.is_file():
                raise E.QpackError(f"no such file: {name}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(name)
    except E.QpackError:
        raise
    except Exception as exc:
        raise E.QpackError(f"cannot import {name} ({type(exc).__name__}: {exc})") from None


def read_calibration(path: str | os.PathLike, batch: int = BATCH) -> list[Any]:
    """Calibration inputs as a list of batches, each ready for the model (see the module's
    documentation for the forms a file may take)."""
    import numpy as np
    import torch

    name = os.fspath(path)
    try:
        if name.endswith(".npy"):
            obj = torch.from_numpy(np.load(name, allow_pickle=False))
        elif name.endswith(".npz"):
            with np.load(name, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            obj = torch.load(name, weights_only=True, map_location="cpu")
    except OSError as exc:
        raise E.QpackError(f"cannot read calibration inputs ({exc.strerror or exc})",
                           path=name) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise E.QpackError(f"cannot read calibration inputs ({first})", path=name) from None
    batches = _batches(obj, batch)
    if not batches:
        raise E.QpackError("calibration inputs are empty", path=name)
    for b in batches:
        for t in _tensors(b):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise E.QpackError("calibration inputs hold NaN or infinite values", path=name)
    return batches


def _tensors(batch: Any):
    import torch

    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


def _batches(obj: Any, batch: int) -> list[Any]:
    import torch

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        t = t.float() if t.dtype in (torch.float64, torch.float16, torch.bfloat16) else t
        return list(t.split(batch)) if t.ndim else [t]

    if isinstance(obj, torch.Tensor):
        return split(obj)
    if isinstance(obj, list):
        return obj
    if isinstance(obj, tuple) and all(isinstance(t, torch.Tensor) for t in obj):
        return [tuple(p) for p in zip(*(split(t) for t in obj), strict=True)]
    if isinstance(obj, Mapping) and all(isinstance(t, torch.Tensor) for t in obj.values()):
        keys = list(obj)
        parts = [split(obj[k]) for k in keys]
        return [dict(zip(keys, p, strict=True)) for p in zip(*parts, strict=True)]
    raise E.QpackError(
        f"calibration inputs must be a tensor, a list of batches, a tuple or a dict of "
        f"tensors; got {type(obj).__name__}"
    )

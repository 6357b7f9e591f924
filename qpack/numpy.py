"""qpack for numpy arrays, without torch: the verbs of :mod:`qpack` for a mapping of
names to arrays (``save``/``load``/``open``), and their in-memory twins (``encode``,
``decode``). The options are :func:`qpack.save`'s, but a model (and so calibration) is
torch's.

Quantized tensors decode to float32; raw tensors keep their dtype, except bfloat16, which
numpy lacks and which is widened exactly to float32.

Example:
    >>> import qpack.numpy as qnp
    >>> qnp.save({"w": np.ones((4, 4), np.float32)}, "w.qpk", bits=4)
    >>> qnp.load("w.qpk")["w"].shape
    (4, 4)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import errors as E
from .container import RAW
from .dtypes import bf16_to_f32
from .plan import DEFAULT_BITS, DEFAULT_ENTROPY
from .planner import plan_items
from .reader import Reader, decode, load_numpy
from .writer import encode_chunks, write_file

__all__ = ["NumpyFile", "decode", "encode", "load", "open", "save"]

load = load_numpy


def _planned(arrays, bits, max_size, scheme, rounding, uniform, entropy):
    """The items, resolved plan and planning of arrays, for :func:`encode` and :func:`save`
    alike."""
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    return plan_items(arrays, bits=bits, max_size=max_size, scheme=scheme, rounding=rounding,
                      uniform=uniform, entropy=entropy)


def encode(
    arrays: Mapping[str, np.ndarray],
    *,
    bits: Any = DEFAULT_BITS,
    max_size: int | None = None,
    scheme: Any = None,
    rounding: Any = None,
    uniform: bool = False,
    entropy: bool = DEFAULT_ENTROPY,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The bytes of the .qpk file :func:`save` would write.

    Example:
        >>> blob = qpack.numpy.encode({"w": np.ones((4, 4), np.float32)}, bits=4)
        >>> qpack.numpy.decode(blob)["w"].shape
        (4, 4)
    """
    items, plan, planned = _planned(arrays, bits, max_size, scheme, rounding, uniform, entropy)
    chunks = encode_chunks(items, plan, metadata, planned.rounder)
    return b"".join(bytes(c) if isinstance(c, np.ndarray) else c for c in chunks)


def save(
    arrays: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    bits: Any = DEFAULT_BITS,
    max_size: int | None = None,
    scheme: Any = None,
    rounding: Any = None,
    uniform: bool = False,
    entropy: bool = DEFAULT_ENTROPY,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Quantize and write numpy arrays to ``path`` (the options of :func:`qpack.save`).

    Example:
        >>> qpack.numpy.save({"w": np.ones((4, 4), np.float32)}, "w.qpk", bits=4)
    """
    try:
        items, plan, planned = _planned(
            arrays, bits, max_size, scheme, rounding, uniform, entropy
        )
        write_file(path, items, plan, metadata, rounder=planned.rounder)
    except E.QpackError as exc:
        if exc.path is None:
            raise type(exc)(exc.reason, path=path, tensor=exc.tensor) from None
        raise


class NumpyFile:
    """Lazy access to a .qpk file as numpy arrays, with safetensors' ``safe_open`` verbs:
    the header is read and validated when opened; :meth:`get_tensor` reads, checks and
    decodes only that tensor's bytes (and the alignment bytes before them)."""

    def __init__(self, path: str | os.PathLike):
        self._reader = Reader(path)

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return self._reader.keys()

    def metadata(self) -> dict[str, str]:
        """The file's string metadata."""
        return self._reader.metadata

    def get_tensor(self, name: str) -> np.ndarray:
        """One tensor as a numpy array; KeyError for an unknown name."""
        entry = self._reader.entry(name)
        array = self._reader.array(name)
        if entry.storage == RAW and entry.dtype == "bfloat16":
            return bf16_to_f32(array)
        return array

    def get_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor in file order, decoded one at a time."""
        for name in self.keys():
            yield name, self.get_tensor(name)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> NumpyFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike) -> NumpyFile:  # noqa: A001 (the safe_open verb)
    """Open a .qpk file for lazy, per-tensor reading as numpy arrays.

    Example:
        >>> with qpack.numpy.open("w.qpk") as f:
        ...     w = f.get_tensor("w")
    """
    return NumpyFile(path)

"""The element types a file stores (spec section 4.2) as numpy sees them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import errors as E
from .container import check_name

__all__ = ["NUMPY_DTYPES", "as_items", "as_numpy", "bf16_to_f32", "dtype_name", "is_tensor"]

# numpy dtype of each header dtype's raw bytes; bfloat16 travels as its uint16 bit patterns.
NUMPY_DTYPES = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}


def dtype_name(array: np.ndarray) -> str:
    """The header dtype of a numpy array (bfloat16 arrays come from the torch layer)."""
    native = array.dtype.newbyteorder("=")  # big-endian input is converted on write
    for name, np_dtype in NUMPY_DTYPES.items():
        if name != "bfloat16" and native == np.dtype(np_dtype).newbyteorder("="):
            return name
    raise E.EncodeError(f"dtype {array.dtype} cannot be stored")


def bf16_to_f32(bits16: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns to float32 (exact)."""
    return (bits16.astype(np.uint32) << 16).view(np.float32)


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def as_numpy(name: str, value: Any) -> tuple[np.ndarray, str]:
    """A CPU numpy view of a tensor or array, plus its header dtype."""
    if isinstance(value, np.ndarray):
        return value, dtype_name(value)
    if not is_tensor(value):
        raise E.EncodeError(f"is a {type(value).__name__}, not a tensor", tensor=name)
    import torch

    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in NUMPY_DTYPES:
        raise E.EncodeError(f"dtype {value.dtype} cannot be stored", tensor=name)
    if value.is_meta:
        raise E.EncodeError("is a meta tensor: it has a shape but no values", tensor=name)
    if getattr(value, "is_nested", False) or value.layout != torch.strided:
        kind = "nested" if getattr(value, "is_nested", False) else str(value.layout)
        raise E.EncodeError(
            f"is a {kind.removeprefix('torch.')} tensor; store its dense form "
            "(tensor.to_dense()) instead",
            tensor=name,
        )
    tensor = value.detach().to("cpu").contiguous()
    if dtype == "bfloat16":
        return tensor.view(torch.int16).numpy().view(np.uint16), dtype
    return tensor.numpy(), dtype


def as_items(state_dict: Mapping[str, Any]) -> list[tuple[str, np.ndarray, str]]:
    """``(name, CPU numpy view, header dtype)`` of every tensor, in order; names a file
    cannot hold (empty, not UTF-8, too long) are refused first."""
    for name in state_dict:
        check_name(name)
    return [(name, *as_numpy(name, value)) for name, value in state_dict.items()]

"""Reading and writing the checkpoints qpack converts from and to: PyTorch ``.pt`` files
(read with ``weights_only=True``, never unpickling code) and ``.safetensors`` files.

Training code wraps its state_dict in many ways; :func:`read_checkpoint` finds it under
the common wrapper keys (:data:`WRAPPER_KEYS`), removes a ``module.`` prefix that
``DataParallel`` adds to every name, and says what it did, so nothing is dropped or renamed
silently.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import errors as E
from .atomic import write_atomic
from .dtypes import is_tensor

__all__ = ["WRAPPER_KEYS", "Checkpoint", "read_checkpoint", "write_checkpoint"]

#: Keys under which training checkpoints commonly wrap the state_dict, in order of
#: preference: Lightning and most trainers ("state_dict"), PyTorch's own tutorial
#: ("model_state_dict"), and others seen in released checkpoints.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model")
#: A prefix on every name that is an artifact of how the model was trained, not of the model
#: (``torch.nn.DataParallel`` and ``DistributedDataParallel`` add it).
PARALLEL_PREFIX = "module."
# safetensors reserves this name for its metadata
SAFETENSORS_RESERVED = "__metadata__"


@dataclass
class Checkpoint:
    """A state_dict read from a file, and how it was found there."""

    state_dict: dict[str, Any]
    key: str | None = None  # the wrapper key it was under, if any
    stripped: str | None = None  # the prefix removed from every name, if any

    def describe(self) -> str:
        """A few words on where the tensors came from (empty for a plain state_dict)."""
        parts = []
        if self.key is not None:
            parts.append(f"the state_dict under {self.key!r}")
        if self.stripped is not None:
            parts.append(f"{self.stripped!r} removed from every name")
        return "; ".join(parts)


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _first_sentence(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    head, dot, _ = text.partition(". ")
    text = head if dot else text.rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


_BOILERPLATE = (
    "weights only load failed",
    "please file an issue",
    "check the documentation",
    "(1)",
    "(2)",
)


def _torch_load_message(exc: BaseException) -> str:
    """A one-line reason out of torch.load's (often many-line) error messages."""
    text = str(exc)
    if "weights only load failed" in text.lower():
        marker = "WeightsUnpickler error:"
        if marker in text:
            details = text.split(marker, 1)[1].strip().split("\n\n")[0]
        else:
            details = " ".join(
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.strip().lower().startswith(_BOILERPLATE)
            )
        if "torch.nn.modules" in details or "GLOBAL __main__." in details:
            return (
                "holds a whole pickled model, which cannot be loaded without running its "
                "code; save its weights instead: torch.save(model.state_dict(), PATH)"
            )
        reason = _first_sentence(details)
        return "refused to load: unsafe or unsupported pickle content" + (
            f" ({reason})" if reason else ""
        )
    detail = _first_sentence(_first_line(text))
    kind = type(exc).__name__
    return f"not a readable PyTorch checkpoint ({kind}{': ' + detail if detail else ''})"


def _looks_like_torch_file(path: str) -> bool:
    """Whether a file torch.load failed on at least starts like one of torch.save's formats
    (a zip archive, or a legacy pickle stream); only used to word the error message."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return head.startswith((b"PK\x03\x04", b"\x80"))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a ``.pt`` file safely (``weights_only=True``), or a ``.safetensors`` file, and
    find its state_dict.

    Accepts a plain state_dict, or a dict wrapping one under one of :data:`WRAPPER_KEYS`
    (tensors beside the wrapper are refused, not dropped); a ``module.`` prefix on every
    name is removed. Raises :class:`~qpack.errors.CheckpointError` naming the file when it
    cannot be opened, when unpickling is refused, or when it holds no state_dict.

    Example:
        >>> ckpt = read_checkpoint("model.pt")
        >>> qpack.save(ckpt.state_dict, "model.qpk")
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise E.CheckpointError("is a directory, not a checkpoint file", path=name)
    if name.endswith(".safetensors"):
        return _unprefixed(Checkpoint(_read_safetensors(name)), name)
    obj = _torch_load(name)
    ckpt = _find_state_dict(obj, name)
    return _unprefixed(ckpt, name)


def _torch_load(name: str) -> Any:
    import torch

    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol: errors only
            warnings.simplefilter("ignore")
            return torch.load(name, weights_only=True, map_location="cpu")
    except OSError as exc:
        reason = exc.strerror or _first_line(str(exc)) or type(exc).__name__
        raise E.CheckpointError(f"cannot open ({reason})", path=name) from None
    except Exception as exc:  # torch.load raises many kinds for a bad or hostile file
        if not _looks_like_torch_file(name):
            raise E.CheckpointError(
                "not a PyTorch checkpoint (neither a zip archive nor a pickle)", path=name
            ) from None
        raise E.CheckpointError(_torch_load_message(exc), path=name) from None


def _find_state_dict(obj: Any, name: str) -> Checkpoint:
    if not isinstance(obj, Mapping):
        raise E.CheckpointError(
            f"not a checkpoint: holds {_a(type(obj).__name__)}, not a state_dict", path=name
        )
    top = [k for k, v in obj.items() if is_tensor(v)]
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(is_tensor(v) for v in inner.values()):
            if top:
                raise E.CheckpointError(
                    f"holds a state_dict under {key!r} and {len(top)} more tensors beside it "
                    f"(e.g. {top[0]!r}); save the one state_dict to pack on its own",
                    path=name,
                )
            return Checkpoint(dict(inner), key)
    if not top:
        raise E.CheckpointError(
            "not a checkpoint: a dict without tensors "
            f"(and no state_dict under {', '.join(repr(k) for k in WRAPPER_KEYS)})",
            path=name,
        )
    return Checkpoint(dict(obj))


def _unprefixed(ckpt: Checkpoint, name: str) -> Checkpoint:
    """Remove the ``module.`` prefix where every name has it (and no clash results)."""
    keys = list(ckpt.state_dict)
    if keys and all(isinstance(k, str) and k.startswith(PARALLEL_PREFIX) for k in keys):
        renamed = {k[len(PARALLEL_PREFIX) :]: v for k, v in ckpt.state_dict.items()}
        if len(renamed) == len(keys) and "" not in renamed:
            ckpt.state_dict, ckpt.stripped = renamed, PARALLEL_PREFIX
    return ckpt


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise E.QpackError(
            "reading or writing .safetensors needs the safetensors package "
            "(pip install 'qpack[safetensors]')"
        ) from None
    return safetensors.torch


def _read_safetensors(name: str) -> dict[str, Any]:
    """A .safetensors file's tensors (safetensors never runs code either)."""
    st = _safetensors()
    try:
        with open(name, "rb") as f:
            state = st.load(f.read())
    except OSError as exc:
        raise E.CheckpointError(f"cannot open ({exc.strerror or exc})", path=name) from None
    except Exception as exc:  # SafetensorError and friends, for a bad file
        raise E.CheckpointError(
            f"not a readable safetensors file ({_first_line(str(exc))})", path=name
        ) from None
    if not state:
        raise E.CheckpointError("not a checkpoint: a safetensors file without tensors", path=name)
    return {key: state[key] for key in _safetensors_order(name, state)}


def _safetensors_order(name: str, state: Mapping[str, Any]) -> list[str]:
    """Tensor names in the order of their bytes in the file: a loaded dict's order is not
    stable, and qpack's output must be (same input, same bytes)."""
    with open(name, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sorted(state, key=lambda k: (header[k]["data_offsets"][0], k))


def checkpoint_bytes(
    state: Mapping[str, Any], fmt: str, metadata: Mapping[str, str] | None = None
) -> bytes | memoryview:
    """A state_dict as the bytes of a ``"pt"`` (torch.save) or ``"safetensors"`` file;
    raises :class:`~qpack.errors.EncodeError` for what that format cannot hold."""
    if fmt == "safetensors":
        if SAFETENSORS_RESERVED in state:
            raise E.EncodeError(
                f"safetensors reserves the name {SAFETENSORS_RESERVED!r}; write a .pt instead",
                tensor=SAFETENSORS_RESERVED,
            )
        st = _safetensors()
        try:
            return st.save(dict(state), metadata=dict(metadata or {}))
        except Exception as exc:  # SafetensorError: e.g. metadata over its header limit
            raise E.EncodeError(f"safetensors cannot store this ({_first_line(exc)})") from None
    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getbuffer()


def write_checkpoint(
    state: Mapping[str, Any],
    path: str | os.PathLike,
    fmt: str,
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Write a state_dict atomically as a ``"pt"`` or ``"safetensors"`` file (``overwrite``
    and ``inputs`` as in :func:`qpack.atomic.write_atomic`)."""
    data = checkpoint_bytes(state, fmt, metadata)
    write_atomic(path, [data], overwrite=overwrite, inputs=inputs)

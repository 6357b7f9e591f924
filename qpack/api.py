"""The PyTorch face of the codec: state_dict -> .qpk -> state_dict.

torch is imported inside the functions that make or read tensors, so ``import qpack``
stays cheap and a numpy-only loader never pulls it in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import errors as E
from .container import RAW
from .plan import DEFAULT_BITS, DEFAULT_ENTROPY, BitsOption, RoundingOption, SchemeOption
from .planner import Planned, plan_items, plan_save
from .reader import Reader, describe
from .writer import write_file

if TYPE_CHECKING:
    import torch


def save(
    obj: Mapping[str, Any] | torch.nn.Module,
    path: str | os.PathLike,
    *,
    bits: BitsOption = DEFAULT_BITS,
    max_size: int | None = None,
    scheme: SchemeOption | None = None,
    rounding: RoundingOption | None = None,
    uniform: bool = False,
    entropy: bool = DEFAULT_ENTROPY,
    calibration: Iterable[Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Quantize and write a model or a state_dict (torch tensors or numpy arrays) to ``path``.

    Floating tensors with two or more dimensions (conv and linear weights) are quantized; the
    others (biases, integer buffers) are stored exactly. ``bits=N`` asks for the accuracy of
    N-bit quantization in the smallest file: qpack chooses each tensor's width and grid (one
    scale per tensor, per output channel or per group of weights) so that no tensor's weight
    error exceeds that of N-bit round-to-nearest quantization with one scale per output
    channel (standard per-layer int8 at 8 bits; below 8 bits, N-bit blocks of 32 weights as
    GGUF's Q4_0 has at 4, where those are more accurate); given a model and
    ``calibration`` inputs (an iterable of batches: tensors, tuples or dicts, called as
    ``model(x)``, ``model(*x)``, ``model(**x)``), it is the model's mean output error that
    is held (on every other batch; the rest fit the rounding), and codes are chosen by
    error-compensating rounding (GPTQ) wherever a Linear, Conv, RNN, GRU or LSTM layer's
    inputs are seen. ``max_size`` asks instead for the least error
    within that many bytes. ``uniform=True`` (or ``entropy=False``) writes exactly ``bits``
    bits everywhere with ``scheme``; ``bits`` may also map names to widths (``None`` keeps
    a tensor exact; names it leaves out follow the rule above at 8 bits), and ``scheme``
    and ``rounding`` (``"nearest"`` or ``"gptq"``) may map names too, as the plan that
    :func:`qpack.allocate` returns does. With ``entropy`` codes are Huffman-coded where
    that is smaller (lossless). The file is written atomically; ``path`` may exist and is
    then replaced.

    Example:
        >>> qpack.save(model.state_dict(), "model.qpk", bits=4)
        >>> qpack.save(model, "model.qpk", bits=4, calibration=[x[:64] for x in batches])
    """
    pack(
        obj, path, bits=bits, max_size=max_size, scheme=scheme, rounding=rounding,
        uniform=uniform, entropy=entropy, calibration=calibration, metadata=metadata,
    )


def pack(
    obj,
    path,
    *,
    metadata=None,
    progress=None,
    note=None,
    bar=None,
    write=None,
    postprocess=None,
    planned=None,
    **request,
) -> Planned:
    """The pack pipeline behind :func:`save` and ``qpack pack``: plan, quantize, encode,
    write. As :func:`save`, reporting each tensor's element count to ``progress`` when encoded and
    each planning phase to ``note`` (and long steps to ``bar(total, what)``, a context
    manager yielding ``update(n)``); ``write`` passes ``overwrite``/``inputs`` on to
    :func:`qpack.atomic.write_atomic`; ``planned`` (a :class:`~qpack.planner.Planned`)
    skips planning; ``raw`` (in ``request``) names tensors to keep exact. Returns what was
    planned."""
    model = None
    if _is_module(obj):
        model, obj = obj, obj.state_dict()
    if not isinstance(obj, Mapping):
        raise E.EncodeError(
            f"expected a model or a mapping of names to tensors, got {type(obj).__name__}",
            path=path,
        )
    try:
        if planned is None:
            planned = plan_save(obj, model=model, postprocess=postprocess, progress=note,
                                bar=bar, **request)
        items, plan, planned = plan_items(obj, planned, entropy=request.get("entropy", True))
        write_file(path, items, plan, metadata, rounder=planned.rounder, progress=progress,
                   quantized=planned.quantized, **(write or {}))
        planned = replace(planned, quantized={})  # the codes are written: let them go
    except E.QpackError as exc:
        if exc.path is None:
            raise type(exc)(exc.reason, path=path, tensor=exc.tensor) from None
        raise
    return planned


def _is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a model means torch is imported already
    return torch is not None and isinstance(obj, torch.nn.Module)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a .qpk file into a state_dict with the original names, order, shapes and dtypes.

    Quantized tensors are dequantized to float32 exactly as the spec says, then cast to their
    original floating dtype. With a ``device`` other than the CPU (e.g. ``"cuda"``), the
    packed bytes are moved there and decoded by torch ops on the device, bit-identical to
    the CPU decoder. Raises a :class:`qpack.QpackError` subclass for any bad file. Every
    checksum, padding bit and alignment byte of the file is checked.

    Example:
        >>> state = qpack.load("model.qpk")
        >>> model.load_state_dict(state)
    """
    with Reader(path) as reader:
        return read_state(reader, device)


def read_state(reader: Reader, device="cpu", progress=None) -> dict[str, torch.Tensor]:
    """:func:`load` from an open reader, reporting each tensor's element count to
    ``progress`` when decoded."""
    if _on_cpu(device):
        decoded = _decode_into_torch(reader)
    else:
        from .device import finish, host_workers, stage

        device = _usable(device)
        # checks, CRCs and Huffman decoding on the host's threads; the rest on the device
        staged = reader.payloads(
            host_workers(reader), then=lambda e, payload: stage(e, payload, device, reader.path)
        )
        decoded = ((e, finish(e, host, device)) for e, host in staged)
    state = {}
    for entry, tensor in decoded:
        state[entry.name] = tensor
        if progress is not None:
            progress(entry.numel)
    return state


def _decode_into_torch(reader: Reader):
    """(entry, tensor) in file order, each decoded straight into a tensor torch allocated
    (its allocator reuses memory where numpy's would page-fault it in afresh)."""
    from .device import dequantize_cpu

    made = {}

    def alloc(entry) -> np.ndarray:
        made[entry.name], view = _torch_out(entry)
        return view

    # torch's kernels use every core: faster on one decoding thread, slower on several
    workers = reader.default_workers()
    dequant = dequantize_cpu if workers == 1 else None
    # the state_dict keeps every tensor: all are handed out at once (1 ms of 13 saved on a
    # 19M-weight 8-bit load: the workers stop waiting on this thread between tensors)
    ahead = len(reader.header.tensors)
    for entry, _ in reader.arrays(workers, alloc=alloc, dequant=dequant, ahead=ahead):
        yield entry, _finish(entry, made.pop(entry.name))


def _torch_out(entry) -> tuple[torch.Tensor, np.ndarray]:
    """A CPU tensor of the entry's shape to decode into, and the flat numpy view the
    decoder writes: float32 for quantized tensors, else the stored dtype (bfloat16 as its
    bit patterns)."""
    import torch

    quantized = entry.storage != RAW
    if quantized and entry.dtype == "float64":
        # the float32 values go to the upper half of the float64 tensor, which _finish
        # widens in place: never a float32 and a float64 copy of the tensor at once
        tensor = torch.empty(entry.shape, dtype=torch.float64)
        return tensor, tensor.numpy().reshape(-1).view(np.float32)[entry.numel :]
    tensor = torch.empty(entry.shape, dtype=torch.float32 if quantized else _dtype(entry))
    if entry.dtype == "bfloat16" and not quantized:
        return tensor, tensor.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    return tensor, tensor.numpy().reshape(-1)


# Values a step of the in-place widening converts (through a copy of this size).
WIDEN_BLOCK = 1 << 16


def _finish(entry, tensor: torch.Tensor) -> torch.Tensor:
    """A decoded tensor (made by :func:`_torch_out`) in its original dtype."""
    dtype = _dtype(entry)
    if entry.dtype == "float64" and entry.storage != RAW:
        wide = tensor.numpy().reshape(-1)
        narrow = wide.view(np.float32)[entry.numel :]
        # in order: block [a, b) lands on bytes [8a, 8b), below the float32 values not yet
        # read (from byte 4 * numel + 4b on), since b <= numel
        for start in range(0, entry.numel, WIDEN_BLOCK):
            stop = min(start + WIDEN_BLOCK, entry.numel)
            wide[start:stop] = narrow[start:stop].copy()
        return tensor
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _dtype(entry) -> torch.dtype:
    import torch

    return getattr(torch, entry.dtype)


def _usable(device) -> torch.device:
    """``device`` as a torch.device, or a QpackError when this torch cannot use it (e.g.
    "cuda" with a CPU-only build, where torch raises a bare AssertionError)."""
    import torch

    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise E.QpackError(f"cannot use device {str(device)!r} ({first})") from None
    return device


def _on_cpu(device) -> bool:
    return str(device).split(":")[0] == "cpu"


def load_into(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> Any:
    """Load a .qpk file into ``model`` (onto the device of its parameters).

    With ``strict`` every name must match in both directions and every shape must agree;
    otherwise a :class:`qpack.QpackError` lists the missing, unexpected and mismatched names
    (instead of torch's long error text). Returns what ``load_state_dict`` returns: the
    missing and unexpected keys.

    Example:
        >>> missing, unexpected = qpack.load_into(model, "model.qpk", strict=False)
    """
    expected = model.state_dict()
    device = next((t.device for t in expected.values()), "cpu")
    state = load(path, device=device)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
        for what, names in (
            ("missing from the file", missing),
            ("not in the model", unexpected),
            ("shape mismatch", mismatched),
        )
        if names
    ]
    if mismatched or (strict and problems):
        raise E.QpackError(
            f"does not fit {type(model).__name__}: " + "; ".join(problems), path=path
        )
    return model.load_state_dict(state, strict=strict)


class QpackFile:
    """Lazy access to a .qpk file, with the verbs of safetensors' ``safe_open``: the header
    is read and validated when opened; :meth:`get_tensor` reads, checks and decodes only
    that tensor's bytes (and the alignment bytes before them)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self._reader = Reader(path)
        self._device = device

    def keys(self) -> list[str]:
        """Tensor names, in file (state_dict) order."""
        return self._reader.keys()

    def metadata(self) -> dict[str, str]:
        """The file's string metadata."""
        return self._reader.metadata

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, decoded (on the device given to :func:`open`) and in its original
        dtype; KeyError for an unknown name."""
        entry = self._reader.entry(name)
        if _on_cpu(self._device):
            from .device import dequantize_cpu

            tensor, view = _torch_out(entry)
            self._reader.array(name, out=view, dequant=dequantize_cpu)
            return _finish(entry, tensor)
        from .device import decode_on_device

        payload = self._reader.checked_payload(name)
        device = _usable(self._device)
        return decode_on_device(entry, payload, device, path=self._reader.path)

    get = get_tensor

    def get_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in file order, decoded one at a time."""
        for name in self.keys():
            yield name, self.get_tensor(name)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> QpackFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> QpackFile:
    """Open a .qpk file for lazy, per-tensor reading (use as a context manager).

    Example:
        >>> with qpack.open("model.qpk") as f:
        ...     w = f.get_tensor("fc.weight")
    """
    return QpackFile(path, device)


def inspect(path: str | os.PathLike, *, stats: bool = False) -> dict:
    """The file's header as plain Python data: version, metadata and, per tensor, its shape,
    dtype, storage, bits, scheme, byte count, bits per weight, offset and checksum.

    Reads only the header, unless ``stats`` asks for each quantized tensor's empirical
    entropy bound (``entropy_bytes``), which reads and checks its codes.

    Example:
        >>> info = qpack.inspect("model.qpk")
        >>> [(t["name"], t["bits"], t["bytes"]) for t in info["tensors"]]
    """
    with Reader(path) as reader:
        return describe(reader, stats=stats)

"""The ``qpack`` command line: pack, unpack, inspect, verify and demo.

Each subcommand is a thin layer over the library. Problems with a file or an argument are
reported as one line, ``qpack: error: <message>``, on stderr: exit status 1 for bad data
(missing, unreadable or corrupted files, inputs that are not checkpoints, unwritable
outputs), 2 for bad usage, 130 on Ctrl-C. Outputs are written atomically, so a failed
command leaves no partial file behind.

torch is imported only by the subcommands that need it, so ``inspect`` and ``verify`` start
quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, kernels
from . import errors as E
from ._zlib import BACKEND as ZLIB_BACKEND
from .api import _is_tensor
from .codec import Reader, describe, write_atomic
from .schemes import DEFAULT_SCHEME, SCHEMES

__all__ = ["CheckpointError", "build_parser", "main", "read_checkpoint", "totals"]

PROG = "qpack"
#: Keys under which a training checkpoint commonly wraps its state_dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model")


class CheckpointError(E.QpackError):
    """An input given as a PyTorch checkpoint cannot be read as a state_dict."""

    code = "not-a-checkpoint"


# --------------------------------------------------------------------------- helpers


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def qpack_metadata(path) -> dict[str, str]:
    """The string metadata of a .qpk file (header only)."""
    with Reader(path) as reader:
        return reader.metadata


def _first_sentence(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    head, dot, _ = text.partition(". ")
    text = head if dot else text.rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """Read a ``.pt`` file safely (``weights_only=True``), or a ``.safetensors`` file, and
    return its state_dict.

    Accepts a plain state_dict or a dict wrapping one under ``"state_dict"`` or ``"model"``;
    returns ``(state_dict, wrapper_key_or_None)``. Raises :class:`CheckpointError` (a
    :class:`~qpack.QpackError`) naming the file when it cannot be opened, when unpickling is
    refused, or when it holds no tensors.
    """
    import torch

    name = os.fspath(path)
    if os.path.isdir(name):
        raise CheckpointError("is a directory, not a checkpoint file", path=name)
    if name.endswith(".safetensors"):
        return _read_safetensors(name), None
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol: errors only
            warnings.simplefilter("ignore")
            obj = torch.load(name, weights_only=True, map_location="cpu")
    except OSError as exc:
        reason = exc.strerror or _first_line(str(exc)) or type(exc).__name__
        raise CheckpointError(f"cannot open ({reason})", path=name) from None
    except Exception as exc:  # torch.load raises many kinds for a bad or hostile file
        if not _looks_like_torch_file(name):
            raise CheckpointError(
                "not a PyTorch checkpoint (neither a zip archive nor a pickle)", path=name
            ) from None
        raise CheckpointError(_torch_load_message(exc), path=name) from None

    wrapper = None
    state = obj
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(_is_tensor(v) for v in inner.values()):
                state, wrapper = inner, key
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"not a checkpoint: holds {_a(type(obj).__name__)}, not a state_dict", path=name
        )
    if not any(_is_tensor(v) for v in state.values()):
        raise CheckpointError(
            "not a checkpoint: a dict without tensors "
            f"(and no state_dict under {' or '.join(repr(k) for k in WRAPPER_KEYS)})",
            path=name,
        )
    return dict(state), wrapper


def totals(info: Mapping[str, Any]) -> dict[str, Any]:
    """Totals over a :func:`qpack.inspect` dict: tensor and parameter counts, file size,
    the float32 size of the same parameters (4 bytes each) and the compression ratio."""
    params = sum(_numel(t["shape"]) for t in info["tensors"])
    float32_bytes = 4 * params
    file_size = int(info["file_size"])
    return {
        "tensors": len(info["tensors"]),
        "parameters": params,
        "file_size": file_size,
        "float32_bytes": float32_bytes,
        "ratio": float32_bytes / file_size if file_size else 0.0,
    }


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


# --------------------------------------------------------------------------- argument types


def _bits_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bits must be an integer from 1 to 8, got {text!r}"
        ) from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 1 to 8, got {value}")
    return value


def _metadata_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"metadata must be KEY=VALUE, got {text!r}")
    return key, value


def _size_arg(text: str) -> int:
    from .budget import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _UsageError(Exception):
    """A combination of options that makes no sense (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with errors printed as ``qpack: error: ...`` after the usage line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sub = self.prog.removeprefix(PROG).strip()
        where = f"{sub}: " if sub else ""
        self.exit(2, f"{PROG}: error: {where}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Pack, inspect and verify quantized neural-network weights (.qpk files).",
    )
    # which compiled kernels and CRC-32/inflate run: the same results, other speeds
    engines = f"kernels: {kernels.BACKEND}, crc32: {ZLIB_BACKEND}"
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} ({engines})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    schemes = list(SCHEMES)

    p = sub.add_parser(
        "pack",
        help="quantize a PyTorch checkpoint (.pt) into a .qpk file",
        description="Quantize a PyTorch state_dict (.pt, read with weights_only=True) into a "
        ".qpk file. Floating tensors with two or more dimensions are quantized; biases and "
        "integer buffers are stored exactly. A dict wrapping the state_dict under "
        "'state_dict' or 'model' is accepted.",
    )
    p.add_argument("input", metavar="IN", help="input checkpoint (.pt or .safetensors)")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="output .qpk file")
    p.add_argument(
        "--bits", type=_bits_arg, default=8, metavar="{1..8}", help="bits per weight (default 8)"
    )
    p.add_argument(
        "--scheme",
        choices=schemes,
        default=None,
        help="quantization scheme (default: the best of asymmetric-per-layer and "
        f"asymmetric-per-channel for each tensor; with --uniform or --no-entropy, "
        f"{DEFAULT_SCHEME})",
    )
    p.add_argument(
        "--metadata",
        type=_metadata_arg,
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="extra metadata strings to record in the header (repeatable)",
    )
    p.add_argument(
        "--entropy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Huffman-code the quantized codes and choose widths per tensor (default); "
        "--no-entropy writes fixed-width N-bit codes (format 1.0)",
    )
    p.add_argument(
        "--uniform",
        action="store_true",
        help="the same --bits for every tensor (Huffman-coded, lossless on top of "
        "fixed-width) instead of choosing widths per tensor",
    )
    p.add_argument(
        "--max-size",
        type=_size_arg,
        metavar="SIZE",
        help="choose widths per tensor for the least output error within SIZE bytes "
        "(145000, 145k, 1.5M, 64KiB); replaces --bits",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE.npy",
        help="inputs [N, 1, 36, 36] to measure each layer's effect on the UNet's output "
        "(default: synthetic patches); only for UNet checkpoints",
    )
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "unpack",
        help="decode a .qpk file back to a float state_dict (.pt or .safetensors)",
        description="Decode every tensor of a .qpk file and write the state_dict with "
        "torch.save, or as .safetensors when OUT ends so (atomically).",
    )
    p.add_argument("input", metavar="IN", help="input .qpk file")
    p.add_argument(
        "-o", "--output", metavar="OUT", required=True, help="output .pt or .safetensors file"
    )
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser(
        "inspect",
        help="show a .qpk file's tensors, sizes and compression ratio",
        description="Print a per-tensor table (with bits per weight and each quantized tensor's "
        "entropy bound, for which the codes are read and checked) and totals: tensors, "
        "parameters, file size, float32 size (4 bytes per parameter) and compression ratio.",
    )
    p.add_argument("input", metavar="IN", help="input .qpk file")
    p.add_argument(
        "--json", action="store_true", help="print the header as JSON, plus a 'totals' object"
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "verify",
        help="check every checksum and decode every tensor of a .qpk file",
        description="Check the header and every tensor checksum, padding and alignment byte, "
        "and decode every tensor. Exits 0 if the file is valid, 1 otherwise.",
    )
    p.add_argument("input", metavar="IN", help="input .qpk file")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "demo",
        help="quantize the reference UNet and compare accuracy at several bit widths",
        description="Pack the reference UNet at each bit width into a temporary folder, load "
        "every file back into the model (strict), and evaluate it on held-out synthetic "
        "patches against the float32 model: size, compression ratio, dice, IoU and mean "
        "|probability difference|.",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=None,
        help="UNet state_dict (.pt) to use instead of the embedded trained checkpoint",
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="held-out patches to evaluate (default: qpack.demo.DEFAULT_SAMPLES, 300)",
    )
    p.add_argument(
        "--bits",
        type=_bits_arg,
        nargs="+",
        default=[8, 4, 3],
        metavar="B",
        help="bit widths to try (default: 8 4 3)",
    )
    p.add_argument(
        "--scheme",
        choices=schemes,
        default=None,
        help=f"quantization scheme (default {DEFAULT_SCHEME})",
    )
    p.add_argument(
        "--origin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also show the origin's per-layer symmetric quantizer, stored fixed-width",
    )
    p.add_argument(
        "--uniform",
        action="store_true",
        help="qpack rows use the same bits for every layer instead of per-layer widths",
    )
    p.set_defaults(func=cmd_demo)
    return parser


# --------------------------------------------------------------------------- commands


# Progress bars appear on a terminal for models at least this large (parameters).
PROGRESS_MIN_PARAMS = 5_000_000


@contextlib.contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], object] | None]:
    """A tqdm bar on stderr counting parameters, when stderr is a terminal and the model is
    large; yields its ``update`` (or None)."""
    if total < PROGRESS_MIN_PARAMS or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="param", unit_scale=True, leave=False) as bar:
        yield bar.update


def cmd_pack(args: argparse.Namespace) -> int:
    from .api import _save

    state, wrapper = read_checkpoint(args.input)
    metadata = {"source": Path(args.input).name}
    if wrapper is not None:
        metadata["source_key"] = wrapper
    metadata.update(dict(args.metadata))
    try:
        options, how = _choose(state, args)
    except E.QpackError as exc:
        if exc.path is not None:
            raise
        raise type(exc)(exc.reason, path=args.input, tensor=exc.tensor) from None
    params = sum(_numel(v.shape) for v in state.values() if _is_tensor(v))
    with progress_bar(params, "packing") as progress:
        _save(state, args.output, entropy=args.entropy, metadata=metadata, progress=progress,
              **options)

    size = os.path.getsize(args.output)
    float32_bytes = 4 * params
    ratio = float32_bytes / size if size else 0.0
    print(
        f"packed {args.input} -> {args.output}: {len(state)} tensors, {params:,} parameters, "
        f"{size:,} bytes ({how}), {ratio:.2f}x smaller than float32 ({float32_bytes:,} bytes)"
    )
    return 0


def _choose(state: Mapping[str, Any], args: argparse.Namespace) -> tuple[dict, str]:
    """save()'s ``bits`` and ``scheme`` options, and a few words saying how they were chosen."""
    if args.max_size is not None and not args.entropy:
        raise _UsageError("--max-size needs entropy coding (drop --no-entropy)")
    per_tensor = args.max_size is not None or (args.entropy and not args.uniform)
    if args.calibration is not None and not per_tensor:
        raise _UsageError("--calibration only applies when widths are chosen per tensor")
    if not per_tensor:
        scheme = args.scheme or DEFAULT_SCHEME
        kind = "Huffman-coded" if args.entropy else "fixed-width"
        return {"bits": args.bits, "scheme": scheme}, f"{args.bits}-bit {kind}, {scheme}"
    from .budget import OPTION_SCHEMES, allocate

    evaluate, basis = _evaluator(state, args.calibration)

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"qpack: {message}", file=sys.stderr)

    goal = dict(max_size=args.max_size) if args.max_size is not None else dict(bits=args.bits)
    plan = allocate(
        state,
        **goal,
        evaluate=evaluate,
        schemes=(args.scheme,) if args.scheme else OPTION_SCHEMES,
        progress=progress,
    )
    widths = [b for b in plan["bits"].values() if b is not None]
    span = f"{min(widths):g}-{max(widths):g} bits per tensor" if widths else "no weights"
    used = ", ".join(sorted(set(plan["scheme"].values())))
    target = (
        f"at most {args.max_size:,} bytes"
        if args.max_size is not None
        else f"accuracy of {args.bits}-bit"
    )
    return plan, f"{target}: {span} ({used}), chosen by {basis}"


def _evaluator(state: Mapping[str, Any], calibration: str | None):
    """A model-output distortion for UNet checkpoints, else None (weight error)."""
    from .unet import is_unet_state_dict, make_evaluator

    if not is_unet_state_dict(state):
        if calibration is not None:
            raise _UsageError(
                "--calibration needs a UNet checkpoint (other models use weight error)"
            )
        return None, "weight error"
    import numpy as np

    if calibration is None:
        from .synthetic import CALIBRATION_PATCHES, CALIBRATION_SEED, make_patches

        inputs = make_patches(CALIBRATION_PATCHES, CALIBRATION_SEED)[0]
        source = f"{CALIBRATION_PATCHES} synthetic patches"
    else:
        inputs = _read_calibration(calibration)
        source = f"{len(inputs)} patches of {Path(calibration).name}"
    return make_evaluator(dict(state), np.asarray(inputs)), f"UNet output error on {source}"


def _read_calibration(path: str):
    import numpy as np

    try:
        inputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or _first_line(str(exc))
        raise E.QpackError(f"cannot read calibration inputs ({reason})", path=path) from None
    if (
        not isinstance(inputs, np.ndarray)
        or inputs.ndim != 4
        or inputs.shape[1:] != (1, 36, 36)
        or not len(inputs)
        or inputs.dtype.kind not in "fiu"
    ):
        shape = getattr(inputs, "shape", None)
        raise E.QpackError(
            f"calibration inputs must be an [N, 1, 36, 36] numeric array, got {shape}", path=path
        )
    inputs = inputs.astype(np.float32)
    if not np.isfinite(inputs).all():
        raise E.QpackError("calibration inputs hold NaN or infinite values", path=path)
    return inputs


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
        raise CheckpointError(f"cannot open ({exc.strerror or exc})", path=name) from None
    except Exception as exc:  # SafetensorError and friends, for a bad file
        raise CheckpointError(
            f"not a readable safetensors file ({_first_line(str(exc))})", path=name
        ) from None
    if not state:
        raise CheckpointError("not a checkpoint: a safetensors file without tensors", path=name)
    return {key: state[key] for key in _safetensors_order(name, state)}


def _safetensors_order(name: str, state: Mapping[str, Any]) -> list[str]:
    """Tensor names in the order of their bytes in the file: a loaded dict's order is not
    stable, and qpack's output must be (same input, same bytes)."""
    import json
    import struct

    with open(name, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sorted(state, key=lambda k: (header[k]["data_offsets"][0], k))


def cmd_unpack(args: argparse.Namespace) -> int:
    import torch

    from .api import _load

    with Reader(args.input) as reader:
        params = sum(entry.numel for entry in reader.header.tensors)
        with progress_bar(params, "unpacking") as progress:
            state = _load(reader, progress=progress)
    if str(args.output).endswith(".safetensors"):
        data = _safetensors().save(state, metadata=qpack_metadata(args.input))
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
    write_atomic(args.output, [data])
    print(
        f"unpacked {args.input} -> {args.output}: {len(state)} tensors, {params:,} parameters, "
        f"{os.path.getsize(args.output):,} bytes"
    )
    return 0


def _format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def format_inspect(info: Mapping[str, Any]) -> str:
    """The human-readable ``qpack inspect`` report for a :func:`qpack.inspect` dict."""
    head = (
        "name",
        "shape",
        "dtype",
        "storage",
        "bits",
        "scheme",
        "granularity",
        "bytes",
        "bits/weight",
        "entropy bound",
    )
    rows = [
        (
            t["name"],
            _format_shape(t["shape"]),
            t["dtype"],
            t["storage"],
            str(t["bits"]),
            t["scheme"],
            t.get("granularity") or "-",
            f"{t['bytes']:,}",
            f"{t['bits_per_weight']:.2f}",
            f"{t['entropy_bytes']:,.0f} B" if "entropy_bytes" in t else "-",
        )
        for t in info["tensors"]
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    right = {4, 7, 8, 9}  # numeric columns

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    tot = totals(info)
    out = [f"{info['path']}: qpack format {info['version']}"]
    for key, value in info["metadata"].items():
        out.append(f"  {key}: {value}")
    out += ["", line(head), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    out += [
        "",
        f"tensors:      {tot['tensors']:,}",
        f"parameters:   {tot['parameters']:,}",
        f"file size:    {tot['file_size']:,} bytes",
        f"float32 size: {tot['float32_bytes']:,} bytes (4 bytes per parameter)",
        f"ratio:        {tot['ratio']:.2f}x",
        "entropy bound: n * H(codes) of each quantized tensor, the least any coder of "
        "independent codes could store them in",
    ]
    return "\n".join(out)


def cmd_inspect(args: argparse.Namespace) -> int:
    with Reader(args.input) as reader:
        # the entropy bound needs the codes: read the tensors too (CRCs are checked)
        info = describe(reader, stats=True)
    if args.json:
        print(json.dumps({**info, "totals": totals(info)}, indent=2))
    else:
        print(format_inspect(info))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with Reader(args.input) as reader:
        reader.verify()
        count = len(reader.keys())
    print(f"OK {args.input}: {count} tensors, checksums valid")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from .demo import DEFAULT_SAMPLES, format_table, run_demo

    started = time.perf_counter()
    samples = args.samples or DEFAULT_SAMPLES
    rows = run_demo(
        checkpoint=args.checkpoint,
        samples=samples,
        bits=args.bits,
        scheme=args.scheme,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        origin=args.origin,
        uniform=args.uniform,
    )
    print(format_table(rows))
    print(f"({samples} held-out patches, {time.perf_counter() - started:.1f} s)")
    return 0


# --------------------------------------------------------------------------- entry point


def _fail(message: str, status: int = 1) -> int:
    print(f"{PROG}: error: {_first_line(message) or message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version and usage errors
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        try:
            return args.func(args)
        except _UsageError as exc:
            return _fail(f"{args.command}: {exc}", status=2)
        except E.QpackError as exc:
            return _fail(str(exc))
        except BrokenPipeError:
            # stdout went away (e.g. piped into `head`): not an error of ours.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError, io.UnsupportedOperation):
                pass
            return 1
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            reason = exc.strerror or str(exc) or type(exc).__name__
            return _fail(f"{where}{reason}")
        except MemoryError:
            return _fail("out of memory")
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130

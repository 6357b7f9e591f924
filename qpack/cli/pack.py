"""``qpack pack IN -o OUT``: quantize a checkpoint into a .qpk file.

The pipeline, stage by stage: read the checkpoint (:mod:`qpack.checkpoint`) -> plan each
tensor's width, grid and rounding (fixed, or chosen by :mod:`qpack.budget`) -> quantize
and encode (:mod:`qpack.writer`) -> write atomically (:mod:`qpack.atomic`).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import errors as E
from ..atomic import check_output
from ..checkpoint import read_checkpoint
from ..dtypes import is_tensor
from ..plan import HALF_BITS
from ..schemes import DEFAULT_SCHEME, SCHEMES
from ._common import (
    UsageError,
    add_output,
    file_size,
    output_format,
    progress_bar,
    scheme_arg,
    step_bar,
    width_arg,
    write_options,
)

# Output suffixes that name formats pack does not write (a mistyped -o would otherwise
# leave a .qpk file named like a checkpoint).
NOT_QPK = {s: "" for s in (".pt", ".pth", ".ckpt", ".safetensors", ".npz", ".npy", ".gguf")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="quantize a PyTorch checkpoint (.pt or .safetensors) into a .qpk file",
        description="Quantize a PyTorch state_dict (.pt, read with weights_only=True, or "
        ".safetensors) into a .qpk file. Floating tensors with two or more dimensions are "
        "quantized; biases and integer buffers are stored exactly. A state_dict wrapped "
        "under 'state_dict', 'model_state_dict', 'model_state' or 'model' is found, and a "
        "'module.' prefix on every name (DataParallel) is removed.",
    )
    p.add_argument("input", metavar="IN", help="input checkpoint (.pt or .safetensors)")
    add_output(p, "output .qpk file")
    p.add_argument(
        "--bits",
        type=_bits_arg,
        default=None,
        metavar="{1..8,16}",
        help="the accuracy of N-bit quantization in the smallest file qpack can make "
        "(default 8); with --uniform, --scheme or --no-entropy exactly N bits everywhere; "
        "fractional widths (3.5) mean round(2**N) levels; 16 stores every weight as its "
        "float16 value",
    )
    p.add_argument(
        "--keep-raw",
        metavar="NAME",
        nargs="+",
        action="extend",
        default=[],
        help="store these tensors exactly (shell-style patterns, e.g. 'head.*')",
    )
    p.add_argument(
        "--scheme",
        type=scheme_arg,
        default=None,
        metavar="SCHEME",
        help="quantize every tensor with this scheme at exactly --bits (as --uniform does, "
        f"with {DEFAULT_SCHEME}); by default qpack chooses each tensor's width and grid. "
        f"One of {', '.join(SCHEMES)}; a per-group scheme may end in its group size "
        "(symmetric-per-group-64; default 32)",
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
        help="choose widths and grids per tensor for the least error within SIZE bytes "
        "(145000, 145k, 1.5M, 64KiB); instead of --bits",
    )
    p.add_argument(
        "--model",
        metavar="MODULE:CALLABLE",
        help="build the model (an importable module or a FILE.py, and a class or function "
        "returning the nn.Module), so widths are chosen by its output error and codes by "
        "error-compensating rounding; a UNet checkpoint of qpack's demo needs none",
    )
    p.add_argument(
        "--model-args", metavar="JSON", help="keyword arguments for --model, a JSON object"
    )
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="inputs to run the model on (.npy, .npz or .pt: one batch of examples along "
        "the first dimension, or a list of batches); default for the demo UNet: "
        "synthetic patches",
    )
    p.add_argument(
        "--rounding",
        choices=["nearest", "gptq"],
        default=None,
        help="how codes are chosen on each grid (default: error-compensating 'gptq' "
        "wherever the model's calibration reaches a layer, else 'nearest')",
    )
    p.set_defaults(func=run)


def _bits_arg(text: str) -> float:
    """--bits: a width (:func:`width_arg`), or 16 for float16 values."""
    if text.strip() == str(HALF_BITS):
        return HALF_BITS
    try:
        return width_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"bits must be a number from 1 to 8, or 16 (float16), got {text!r}"
        ) from None


def _metadata_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"metadata must be KEY=VALUE, got {text!r}")
    return key, value


def _size_arg(text: str) -> int:
    from ..budget import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ..api import pack

    output_format(args.output, NOT_QPK, "qpk", "pack")
    check_output(args.output, **write_options(args))
    ckpt = read_checkpoint(args.input)
    state = ckpt.state_dict
    metadata = {"source": Path(args.input).name}
    if ckpt.key is not None:
        metadata["source_key"] = ckpt.key
    if ckpt.stripped is not None:
        metadata["source_prefix"] = ckpt.stripped
    metadata.update(dict(args.metadata))
    request = _request(args)
    request["raw"] = _raw_names(state, args.keep_raw)
    note = _note(sys.stderr)
    try:
        request.update(_model(state, args))
    except E.QpackError as exc:
        if exc.path is not None:
            raise
        raise type(exc)(exc.reason, path=args.input, tensor=exc.tensor) from None
    params = sum(int(v.numel()) for v in state.values() if is_tensor(v))
    with progress_bar(params, "packing") as progress:
        try:
            planned = pack(
                request.pop("model", None) or state,
                args.output,
                metadata=metadata,
                progress=progress,
                note=note,
                bar=step_bar,
                write=write_options(args),
                **request,
            )
        except E.EncodeError as exc:  # about the input's tensors: name the input
            raise type(exc)(exc.reason, path=args.input, tensor=exc.tensor) from None
    size = file_size(args.output)
    float32_bytes = 4 * params
    ratio = float32_bytes / size if size else 0.0
    found = ckpt.describe()
    print(
        f"packed {args.input} -> {args.output}: {len(state)} tensors, {params:,} parameters"
        f"{' (' + found + ')' if found else ''}, {size:,} bytes ({planned.summary}), "
        f"{ratio:.2f}x smaller than float32 ({float32_bytes:,} bytes)"
    )
    return 0


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """save()'s options from the command line."""
    if args.max_size is not None and not args.entropy:
        raise UsageError("--max-size needs entropy coding (drop --no-entropy)")
    if args.max_size is not None and (args.uniform or args.scheme):
        raise UsageError("--max-size chooses widths and grids: drop --uniform and --scheme")
    if args.max_size is not None and args.bits is not None:
        raise UsageError("--max-size chooses the widths: drop --bits")
    return {
        "bits": 8 if args.bits is None else args.bits,
        "max_size": args.max_size,
        "scheme": args.scheme,
        "rounding": args.rounding,
        "uniform": args.uniform,
        "entropy": args.entropy,
    }


def _raw_names(state: Mapping[str, Any], patterns: list[str]) -> list[str]:
    """The tensors --keep-raw names (each pattern must match at least one)."""
    names = []
    for pattern in patterns:
        matched = [n for n in state if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise UsageError(f"--keep-raw {pattern!r} matches no tensor of the checkpoint")
        names += [n for n in matched if n not in names]
    return names


def _note(stream):
    """On a terminal, print a line per planning phase (long steps also get a bar); nothing
    otherwise, so that a failing command's stderr is its one error line."""

    def note(message: str) -> None:
        if stream.isatty():
            print(f"qpack: {message}", file=stream, flush=True)

    return note


def _model(state: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The model and calibration inputs for model-aware packing, if any: --model, or the
    demo's UNet recognised by its names and shapes (with synthetic patches by default)."""
    if args.model_args is not None and args.model is None:
        raise UsageError("--model-args needs --model")
    if args.model is not None:
        from ..inputs import build_model, read_calibration

        if args.calibration is None:
            raise UsageError("--model needs --calibration FILE (inputs to run it on)")
        model = build_model(args.model, args.model_args)
        _load_weights(model, state, args.model)
        return {"model": model, "calibration": read_calibration(args.calibration)}
    from ..demo.unet import UNet, is_unet_state_dict

    if not is_unet_state_dict(state):
        if args.calibration is not None:
            raise UsageError("--calibration needs --model MODULE:CALLABLE (the model to run)")
        if args.rounding == "gptq":
            raise UsageError("--rounding gptq needs --model and --calibration")
        return {}
    import torch

    model = UNet()
    _load_weights(model, state, "the demo UNet")
    if args.calibration is None:
        from ..demo.synthetic import CALIBRATION_PATCHES, CALIBRATION_SEED, make_patches

        inputs = torch.from_numpy(make_patches(CALIBRATION_PATCHES, CALIBRATION_SEED)[0])
        batches = list(inputs.split(16))
    else:
        from ..inputs import read_calibration

        batches = read_calibration(args.calibration)
    return {"model": model, "calibration": batches, "postprocess": torch.sigmoid}


def _load_weights(model, state: Mapping[str, Any], what: str) -> None:
    """Load the checkpoint into the model built for it (strict: every name and shape)."""
    import torch

    try:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise E.QpackError(f"the checkpoint does not fit {what}: {first}") from None
    model.eval()

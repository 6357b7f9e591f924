"""``qpack pack IN -o OUT``: quantize a checkpoint into a .qpk file.

The pipeline, stage by stage: read the checkpoint (:mod:`qpack.checkpoint`) -> plan each
tensor's width, grid and rounding (fixed, or chosen by :mod:`qpack.budget`) -> quantize
and encode (:mod:`qpack.writer`) -> write atomically (:mod:`qpack.atomic`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import errors as E
from ..checkpoint import read_checkpoint
from ..dtypes import is_tensor
from ..schemes import DEFAULT_SCHEME, SCHEMES
from ._common import (
    UsageError,
    add_output,
    bits_arg,
    file_size,
    output_format,
    progress_bar,
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
        "--bits", type=bits_arg, default=8, metavar="{1..8}", help="bits per weight (default 8)"
    )
    p.add_argument(
        "--scheme",
        choices=list(SCHEMES),
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
    p.set_defaults(func=run)


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
    from ..api import _save

    output_format(args.output, NOT_QPK, "qpk", "pack")
    ckpt = read_checkpoint(args.input)
    state = ckpt.state_dict
    metadata = {"source": Path(args.input).name}
    if ckpt.key is not None:
        metadata["source_key"] = ckpt.key
    if ckpt.stripped is not None:
        metadata["source_prefix"] = ckpt.stripped
    metadata.update(dict(args.metadata))
    try:
        options, how = _choose(state, args)
    except E.QpackError as exc:
        if exc.path is not None:
            raise
        raise type(exc)(exc.reason, path=args.input, tensor=exc.tensor) from None
    params = sum(int(v.numel()) for v in state.values() if is_tensor(v))
    with progress_bar(params, "packing") as progress:
        _save(state, args.output, entropy=args.entropy, metadata=metadata, progress=progress,
              write=write_options(args), **options)

    size = file_size(args.output)
    float32_bytes = 4 * params
    ratio = float32_bytes / size if size else 0.0
    found = ckpt.describe()
    print(
        f"packed {args.input} -> {args.output}: {len(state)} tensors, {params:,} parameters"
        f"{' (' + found + ')' if found else ''}, {size:,} bytes ({how}), "
        f"{ratio:.2f}x smaller than float32 ({float32_bytes:,} bytes)"
    )
    return 0


def _choose(state: Mapping[str, Any], args: argparse.Namespace) -> tuple[dict, str]:
    """save()'s ``bits`` and ``scheme`` options, and a few words saying how they were chosen."""
    if args.max_size is not None and not args.entropy:
        raise UsageError("--max-size needs entropy coding (drop --no-entropy)")
    per_tensor = args.max_size is not None or (args.entropy and not args.uniform)
    if args.calibration is not None and not per_tensor:
        raise UsageError("--calibration only applies when widths are chosen per tensor")
    if not per_tensor:
        scheme = args.scheme or DEFAULT_SCHEME
        kind = "Huffman-coded" if args.entropy else "fixed-width"
        return {"bits": args.bits, "scheme": scheme}, f"{args.bits}-bit {kind}, {scheme}"
    from ..budget import OPTION_SCHEMES, allocate

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
    from ..demo.unet import is_unet_state_dict, make_evaluator

    if not is_unet_state_dict(state):
        if calibration is not None:
            raise UsageError(
                "--calibration needs a UNet checkpoint (other models use weight error)"
            )
        return None, "weight error"
    import numpy as np

    if calibration is None:
        from ..demo.synthetic import CALIBRATION_PATCHES, CALIBRATION_SEED, make_patches

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
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
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

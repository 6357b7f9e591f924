"""``qpack unpack IN -o OUT``: decode a .qpk file back to a float state_dict."""

from __future__ import annotations

import argparse

from ..checkpoint import write_checkpoint
from ..reader import Reader
from ._common import add_output, file_size, output_format, progress_bar, write_options

# The output's suffix picks the format; these name formats unpack does not write.
FORMATS = {
    ".safetensors": "safetensors",
    ".pt": "pt",
    ".pth": "pt",
    ".bin": "pt",
    ".ckpt": "pt",
    **{s: "" for s in (".qpk", ".npz", ".npy", ".gguf", ".onnx", ".json")},
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unpack",
        help="decode a .qpk file back to a float state_dict (.pt or .safetensors)",
        description="Decode every tensor of a .qpk file and write the state_dict with "
        "torch.save, or as .safetensors when OUT ends so (atomically).",
    )
    p.add_argument("input", metavar="IN", help="input .qpk file")
    add_output(p, "output .pt or .safetensors file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import read_state

    fmt = output_format(args.output, FORMATS, "pt", "unpack")
    with Reader(args.input) as reader:
        params = sum(entry.numel for entry in reader.header.tensors)
        metadata = reader.metadata
        with progress_bar(params, "unpacking") as progress:
            state = read_state(reader, progress=progress)
    write_checkpoint(state, args.output, fmt, metadata=metadata, **write_options(args))
    print(
        f"unpacked {args.input} -> {args.output}: {len(state)} tensors, {params:,} parameters, "
        f"{file_size(args.output):,} bytes"
    )
    return 0

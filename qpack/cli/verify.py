"""``qpack verify IN``: check every byte of a .qpk file and decode every tensor."""

from __future__ import annotations

import argparse

from ..reader import Reader


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check every checksum and decode every tensor of a .qpk file",
        description="Check the header and every tensor checksum, padding and alignment byte, "
        "and decode every tensor. Exits 0 if the file is valid, 1 otherwise.",
    )
    p.add_argument("input", metavar="IN", help="input .qpk file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Reader(args.input) as reader:
        reader.verify()
        count = len(reader.keys())
    print(f"OK {args.input}: {count} tensors, checksums valid")
    return 0

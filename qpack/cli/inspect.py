"""``qpack inspect IN``: a .qpk file's tensors, sizes and compression ratio."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..reader import Reader, describe

__all__ = ["format_inspect", "totals"]


def register(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


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


def _format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _granularity(t: Mapping[str, Any]) -> str:
    """tensor, channel, or group/SIZE (with "f16" where scales are binary16)."""
    if t.get("granularity") != "group":
        return t.get("granularity") or "-"
    half = " f16" if t.get("scale_dtype") == "float16" else ""
    return f"group/{t['group_size']}{half}"


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
            _bits(t),
            t["scheme"],
            _granularity(t),
            f"{t['bytes']:,}",
            f"{t['bits_per_weight']:.2f}",
            _bound(t),
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
        "bits/weight: the tensor's bytes and its scales and zero points in the header",
        "entropy bound: n * H(codes) of each quantized tensor: the least a coder of one "
        "code at a time could store them in (coding codes in groups, as qpack may, can go "
        "below it)",
    ]
    problems = [t for t in info["tensors"] if "problem" in t]
    if problems:
        out.append("")
        out += [f"BAD tensor {t['name']!r}: {t['problem']}" for t in problems]
        out.append(f"{len(problems)} bad tensor(s): `qpack verify` checks the whole file")
    return "\n".join(out)


def _bits(t: Mapping[str, Any]) -> str:
    """The code width, and the levels the codes use where fewer than it holds (a
    fractional width: 2.5 bits is 6 levels in 3-bit codes)."""
    levels = t.get("levels")
    if levels and levels < 1 << t["bits"] and t["storage"] != "raw":
        return f"{t['bits']} ({levels} lv)"
    return str(t["bits"])


def _bound(t: Mapping[str, Any]) -> str:
    if "problem" in t:
        return "BAD"
    return f"{t['entropy_bytes']:,.0f} B" if "entropy_bytes" in t else "-"


def run(args: argparse.Namespace) -> int:
    with Reader(args.input) as reader:
        # the entropy bound needs the codes: read the tensors too (CRCs are checked)
        info = describe(reader, stats=True)
    if args.json:
        print(json.dumps({**info, "totals": totals(info)}, indent=2))
    else:
        print(format_inspect(info))
    return 0

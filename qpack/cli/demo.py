"""``qpack demo``: quantize the embedded UNet and compare accuracy at several widths."""

from __future__ import annotations

import argparse
import sys
import time

from ..schemes import DEFAULT_SCHEME, SCHEMES
from ._common import bits_arg, positive_int, scheme_arg


def register(sub: argparse._SubParsersAction) -> None:
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
        type=positive_int,
        default=None,
        metavar="N",
        help="held-out patches to evaluate (default: qpack.demo.DEFAULT_SAMPLES, 300)",
    )
    p.add_argument(
        "--bits",
        type=bits_arg,
        nargs="+",
        default=[8, 4, 3],
        metavar="B",
        help="bit widths to try (default: 8 4 3)",
    )
    p.add_argument(
        "--scheme",
        type=scheme_arg,
        default=None,
        metavar="SCHEME",
        help=f"quantization scheme (default {DEFAULT_SCHEME}); one of {', '.join(SCHEMES)}",
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DEFAULT_SAMPLES, format_table, run_demo

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

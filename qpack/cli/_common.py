"""What the ``qpack`` commands share: argument types, usage errors, progress, outputs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from ..schemes import check_scheme

PROG = "qpack"
# Progress bars appear on a terminal for models at least this large (parameters).
PROGRESS_MIN_PARAMS = 5_000_000


class UsageError(Exception):
    """A combination of options that makes no sense (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors printed as ``qpack: error: ...`` after the usage line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sub = self.prog.removeprefix(PROG).strip()
        where = f"{sub}: " if sub else ""
        self.exit(2, f"{PROG}: error: {where}{message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def bits_arg(text: str) -> int:
    """A whole width in bits from 1 to 8 (:func:`width_arg` without fractions)."""
    value = width_arg(text)
    if not float(value).is_integer():
        raise argparse.ArgumentTypeError(f"bits must be an integer from 1 to 8, got {text!r}")
    return int(value)


def scheme_arg(text: str) -> str:
    """A scheme name (:data:`qpack.SCHEMES`, a per-group one possibly ending in its size)."""
    try:
        return check_scheme(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def width_arg(text: str) -> float:
    """A width in bits from 1 to 8; fractional widths (3.5) mean round(2**bits) levels."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bits must be a number from 1 to 8, got {text!r}"
        ) from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be a number from 1 to 8, got {text}")
    return int(value) if value.is_integer() else value


def add_output(parser: argparse.ArgumentParser, what: str) -> None:
    """``-o OUT`` and ``--force``: an existing output is replaced only when asked."""
    parser.add_argument("-o", "--output", metavar="OUT", required=True, help=what)
    parser.add_argument(
        "-f", "--force", action="store_true", help="replace OUT if it exists (never an input)"
    )


def output_format(path: str, formats: dict[str, str], default: str, command: str) -> str:
    """The format an output's extension names (``formats``: suffix -> format; a suffix
    mapped to "" names a format this command does not write: a usage error)."""
    suffix = Path(path).suffix.lower()
    fmt = formats.get(suffix, default)
    if not fmt:
        writes = ", ".join(sorted(s for s, f in formats.items() if f))
        raise UsageError(f"{command} does not write {suffix} files (OUT may end in {writes})")
    return fmt


def write_options(args: argparse.Namespace) -> dict:
    """:func:`qpack.atomic.write_atomic`'s ``overwrite`` and ``inputs`` for a command."""
    return {"overwrite": args.force, "inputs": [args.input]}


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


@contextlib.contextmanager
def step_bar(total: int, what: str) -> Iterator[Callable[[int], object]]:
    """A tqdm bar on stderr for a planning step of ``total`` items, shown on a terminal once
    the step has run 2 s; yields its ``update`` (a no-op without a terminal)."""
    if not sys.stderr.isatty():
        yield lambda _n=1: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=what, delay=2, leave=False) as bar:
        yield bar.update


def file_size(path: str) -> int:
    """An output's size (0 for a device or FIFO written through)."""
    st = os.stat(path)
    return st.st_size if os.path.isfile(path) else 0

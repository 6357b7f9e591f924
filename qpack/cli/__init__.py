"""The ``qpack`` command line: pack, unpack, inspect, verify and demo.

Each command lives in its own module, which declares its arguments (``register``) beside
its implementation (``run``); this module builds the parser and maps errors to exit
statuses. Problems with a file or an argument are reported as one line,
``qpack: error: <message>``, on stderr: exit status 1 for bad data (missing, unreadable or
corrupted files, inputs that are not checkpoints, refused or unwritable outputs), 2 for bad
usage, 130 on Ctrl-C. Outputs are written atomically and never replace an input, nor an
existing file without ``--force``, so a failed command leaves no partial file behind.

torch is imported only by the commands that need it, so ``inspect`` and ``verify`` start
quickly.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence

from .. import errors as E
from .. import kernels
from .._version import __version__
from .._zlib import BACKEND as ZLIB_BACKEND
from . import demo, inspect, pack, unpack, verify
from ._common import PROG, PROGRESS_MIN_PARAMS, Parser, UsageError

__all__ = ["PROGRESS_MIN_PARAMS", "build_parser", "main"]

COMMANDS = (pack, unpack, inspect, verify, demo)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each module's ``register`` adds its own)."""
    parser = Parser(
        prog=PROG,
        description="Pack, inspect and verify quantized neural-network weights (.qpk files).",
    )
    # which compiled kernels and CRC-32/inflate run: the same results, other speeds
    engines = f"kernels: {kernels.BACKEND}, crc32: {ZLIB_BACKEND}"
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} ({engines})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub)
    return parser


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _report(message: str, status: int = 1) -> int:
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
        except UsageError as exc:
            return _report(f"{args.command}: {exc}", status=2)
        except E.QpackError as exc:
            return _report(str(exc))
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
            return _report(f"{where}{reason}")
        except MemoryError:
            return _report("out of memory")
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130

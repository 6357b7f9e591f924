"""Worker threads: how many this process may use, and an ordered parallel map over them."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["cpu_count", "ordered_map"]


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on every platform
        return max(1, os.cpu_count() or 1)


def ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable,
    workers: int | None = None,
    ahead: int | None = None,
) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads (default: one per CPU), a few items ahead
    of the consumer, in order. numpy, zlib and file I/O release the GIL, so tensors are
    coded in parallel; an exception surfaces at its item, as in a sequential loop. At most
    ``ahead + 1`` results are held at a time (default ``ahead``: ``2 * workers``)."""
    workers = workers or cpu_count()
    if workers == 1:
        yield from map(fn, items)
        return
    ahead = 2 * workers if ahead is None else ahead
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

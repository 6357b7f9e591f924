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
    cost: Callable[[Any], float] | None = None,
) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads (default: one per CPU), a few items ahead
    of the consumer, in order. numpy, zlib and file I/O release the GIL, so tensors are
    coded in parallel; an exception surfaces at its item, as in a sequential loop. At most
    ``ahead + 1`` results are held at a time (default ``ahead``: ``2 * workers``). With
    ``cost`` (an estimate of each item's work), every item is handed out at once, the
    costliest first, so that the threads finish together; results still come in order."""
    workers = workers or cpu_count()
    if workers == 1:
        yield from map(fn, items)
        return
    if cost is not None:
        yield from _costliest_first(fn, list(items), workers, cost)
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


def _costliest_first(fn, items: list, workers: int, cost: Callable[[Any], float]) -> Iterator:
    """:func:`ordered_map` of all ``items`` at once, started in decreasing ``cost`` (the
    longest jobs first leave the short ones to fill the threads' ends)."""
    with ThreadPoolExecutor(workers) as pool:
        futures: list = [None] * len(items)
        try:
            for i in sorted(range(len(items)), key=lambda i: -cost(items[i])):
                futures[i] = pool.submit(fn, items[i])
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                if future is not None:
                    future.cancel()

"""Give memory back to the system once a burst of connections has ended.

CPython frees a connection's objects when it closes, but the pages stay with the process:
malloc keeps freed memory in its arenas, and the cycles trio's cancelled tasks leave wait for
the garbage collector. So a task watches the open connection count: once it has fallen by
`burst` or more from its peak and then held still for a few seconds, the collector runs and
`malloc_trim(0)` hands the free pages of every arena back. Under steady load (no fall that
large) it never runs, so it costs nothing where memory is reused anyway.

What it cannot give back: CPython's own small-object arenas (pymalloc) are returned only
when wholly empty, and the objects that outlive a burst (pooled connections, caches) keep
some of them. So proxy workers run on libc's malloc (agent/workers/launch.py: the figures
there, a worker 60 -> 190 -> 84-91 MiB over 5,000 connections instead of 157 with pymalloc);
later bursts of the same size reuse what stays instead of adding to it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import trio
from meshagent.common.heap import trim_heap

__all__ = ["malloc_trim", "trim_after_bursts"]

log = logging.getLogger(__name__)

BURST = 256  # connections closed since the peak that count as a burst's end
QUIET = 16  # ... once the count has moved by no more than this
SETTLE = 7.0  # ... for this long (s): more than the upstream pool's sweep interval
INTERVAL = 1.0


def malloc_trim() -> bool:
    """Collect garbage, then return free heap pages to the system; whether libc could."""
    gc.collect()
    return trim_heap()


async def trim_after_bursts(
    open_connections: Callable[[], int],
    *,
    on_trim: Callable[[], object] = lambda: None,
    burst: int = BURST,
    quiet: int = QUIET,
    settle: float = SETTLE,
    interval: float = INTERVAL,
) -> None:
    """Every `interval` s, compare `open_connections()` with its peak since the last trim;
    trim once it has fallen by `burst` or more and then stayed within `quiet` for `settle`
    seconds (longer than the upstream pool's sweep, which closes what a burst left idle): a
    trim in the middle of the fall would stall the connections still served and miss the
    memory freed after it. `on_trim` counts each trim (a test waits for it). Never returns."""
    peak = 0
    steady, since = 0, trio.current_time()  # the count and when it last moved
    while True:
        await trio.sleep(interval)
        now, at = open_connections(), trio.current_time()
        peak = max(peak, now)
        if abs(now - steady) > quiet:
            steady, since = now, at
        elif peak - now >= burst and at - since >= settle:
            malloc_trim()
            on_trim()
            log.debug("%d connections closed since the peak: memory trimmed", peak - now)
            peak = now

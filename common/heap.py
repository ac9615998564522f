"""Handing freed heap back to the system (glibc's malloc_trim), loaded once for the process.

glibc keeps memory freed by `free` in its arenas; after a burst (of connections, or a large
metrics scrape) the process would stay at its peak. `malloc_trim(0)` returns the free pages of
every arena. Elsewhere (musl has no malloc_trim) it is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["trim_heap"]


def _load() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load()


def trim_heap() -> bool:
    """Return free heap pages to the system; whether libc could (and released any)."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False

"""Handing free heap pages back to the system (glibc's `malloc_trim`).

glibc keeps freed memory in its arenas, so a process's RSS stays at its largest burst: a
metrics scrape (agent/telemetry/page.py) or a burst of connections (agent/proxy/trim.py).
One loader for both; musl and other libcs have no `malloc_trim`, and then nothing happens."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _libc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _libc_trim()


def return_free_pages() -> bool:
    """Give the heap's free pages back to the system; whether libc could."""
    return bool(_TRIM(0)) if _TRIM is not None else False

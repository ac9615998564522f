"""Log lines that an abusive peer can trigger at will, rate-limited per kind.

A flood (20,000 refused streams in 5 s) must not become 20,000 log lines: each kind of line
(a refusal status, a flood kind, a policy close) gets `burst` lines at once and then
`per_second` on average; lines over the limit are counted, and the next line that gets
through says how many of its kind were left out. No line is ever written with an empty
reason (`reason` fills one in).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog", "reason"]


def reason(exc: BaseException | str | None, default: str = "no reason given") -> str:
    """A non-empty description of ``exc``: its message, else its type's name (a trio
    ``TooSlowError`` says nothing by itself: it reads "timeout")."""
    if exc is None:
        return default
    if isinstance(exc, str):
        return exc or default
    text = str(exc)
    if text:
        return text
    name = type(exc).__name__
    return "timeout" if name == "TooSlowError" else name


class RateLimitedLog:
    """A token bucket of log lines per kind (kinds are a small fixed set chosen by callers)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 20,
        per_second: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # kind -> (tokens, at)
        self.suppressed: dict[str, int] = {}

    def log(self, level: int, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``kind`` is over its rate; whether it was logged."""
        now = self.clock()
        tokens, at = self._buckets.get(kind, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
        if tokens < 1.0:
            self._buckets[kind] = (tokens, now)
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        self._buckets[kind] = (tokens - 1.0, now)
        left_out = self.suppressed.pop(kind, 0)
        if left_out:
            message += " (%d similar lines left out)"
            args = (*args, left_out)
        self.logger.log(level, message, *args)
        return True

    def warning(self, kind: str, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, message, *args)

    def info(self, kind: str, message: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, message, *args)

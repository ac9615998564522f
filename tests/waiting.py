"""Waiting for state another process (or task) updates on its own schedule.

A test that acts, then reads asynchronous state once (a status the proxy workers report every
second, a counter, a log line, a file written by another process) is flaky; one that sleeps a
fixed time is slow and still flaky. Poll instead, with a deadline:

    denials = wait_until(
        lambda: lab.status("node-1")["agent"]["authz"]["recent_denials"],
        lambda ds: any(d["policy"] == "shop/deny-admin" for d in ds),
        what="node-1 lists the deny-admin denial",
    )

`read` is called until `until(value)` holds (without `until`: until the value is truthy);
the value that satisfied it is returned, so the test can go on asserting on it. Past the
deadline it raises AssertionError naming what was awaited and the last value seen, so a
test keeps its power to fail, and says why.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

TIMEOUT = 10.0
INTERVAL = 0.1
_SHOWN = 3000  # characters of the last value in the failure message


def _failure(what: str, timeout: float, last: Any, calls: int) -> AssertionError:
    shown = repr(last)
    if len(shown) > _SHOWN:
        shown = shown[:_SHOWN] + f"... ({len(shown)} characters)"
    return AssertionError(
        f"not within {timeout:g}s ({calls} looks): {what}\n  last value seen: {shown}"
    )


def wait_until(
    read: Callable[[], T],
    until: Callable[[T], object] | None = None,
    *,
    what: str,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """`read()` until `until(value)` holds (else until the value is truthy); returns it.

    Exceptions of `retry_on` types raised by `read` count as "not yet" (the last one is
    shown on failure); any other exception, an AssertionError too, ends the wait at once.
    The condition is always checked at least once, also with `timeout` 0 or less.
    """
    deadline = time.monotonic() + timeout
    calls = 0
    while True:
        calls += 1
        try:
            value = read()
        except retry_on as exc:
            last: Any = exc
        else:
            if until(value) if until is not None else value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, last, calls)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def await_until(
    read: Callable[[], T | Awaitable[T]],
    until: Callable[[T], object] | None = None,
    *,
    what: str,
    timeout: float = TIMEOUT,
    interval: float = 0.01,
) -> T:
    """`wait_until` inside a trio test: sleeps with `trio.sleep` (so an autojump clock moves
    on) and measures the deadline on trio's clock. `read` may be a coroutine function."""
    import inspect

    import trio

    deadline = trio.current_time() + timeout
    calls = 0
    while True:
        calls += 1
        value = read()
        if inspect.isawaitable(value):
            value = await value
        if until(value) if until is not None else value:  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if trio.current_time() >= deadline:
            raise _failure(what, timeout, value, calls)
        await trio.sleep(interval)

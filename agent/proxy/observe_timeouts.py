"""The HTTP engine's slow-client timeouts for a connection relayed at the `observe` level.

At `full` the engine answers a request head not complete `request_header_timeout` after its
first byte (a slowloris) with 408 and closes, and closes a keep-alive connection on which no
request began for `client_idle_timeout` (agent/proxy/http/proxy.py). At `observe` the bytes are
relayed unchanged while the observer (agent/proxy/http/observer.py) parses a copy, so the
observer knows the same two things: when the request being read began and whether its head is
complete, and since when the connection has had no exchange in progress. One cancel scope per
connection, its deadline moved as the observer's state changes (no task, no polling), ends the
relay when either runs out; then the proxy answers 408 with `Connection: close` if no response
is owed or under way (the server has not answered), closes both sides, and counts and logs it
as the engine does (`meshagent_proxy_refused_total{reason="header_timeout"}`, rate-limited).
An idle connection is closed quietly, as the engine does. Once the observer stops following
the bytes (an upgrade, HTTP/2, a parse error), neither applies: the relay's TCP idle timeout
still does.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import trio
from meshagent.agent.proxy.http import wire
from meshagent.agent.proxy.http.proxy import CLIENT_ERRORS, linger
from meshagent.agent.proxy.limits import HEADER_TIMEOUT
from meshagent.agent.proxy.relay import RelayResult, relay

if TYPE_CHECKING:
    from meshagent.agent.proxy.http.observer import Http1Observer
    from meshagent.agent.proxy.http.types import HttpSettings
    from meshagent.agent.proxy.limits import Limits


def _timeout_response() -> bytes:
    """The engine's 408, as its codec writes it for a request whose head never completed."""
    body = b"request header timeout"
    conn = wire.Connection(wire.SERVER)
    headers = [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"text/plain"),
        (b"connection", b"close"),
    ]
    return (
        conn.send(wire.Response(status_code=408, headers=headers))
        + conn.send(wire.Data(data=body))
        + conn.send(wire.EndOfMessage())
    )


TIMEOUT_RESPONSE = _timeout_response()


class ObserveTimeouts:
    """Header and idle timeouts for one observed relay: run the relay inside `scope`, then
    call `enforce` (a no-op unless the scope's deadline ended it) before the observer's
    `finish`. The observer's clock must be trio's (`http_observer` makes it so)."""

    def __init__(self, observer: Http1Observer, settings: HttpSettings) -> None:
        self.observer = observer
        self.header_timeout = settings.request_header_timeout
        self.idle_timeout = settings.client_idle_timeout
        self.drain_limit = settings.drain_limit
        self.scope = trio.CancelScope(deadline=self._deadline())
        observer.on_change = self._changed

    def _deadline(self) -> float:
        o = self.observer
        if o.head_begun is not None:
            return o.head_begun + self.header_timeout
        if o.idle_since is not None:
            return o.idle_since + self.idle_timeout
        return math.inf

    def _changed(self) -> None:
        deadline = self._deadline()
        if deadline != self.scope.deadline:  # moving a deadline is work in trio's heap
            self.scope.deadline = deadline

    @property
    def expired(self) -> str | None:
        """What ended the relay: "header", "idle", or None (it ended by itself)."""
        if not self.scope.cancelled_caught:
            return None
        return "header" if self.observer.head_begun is not None else "idle"

    async def enforce(
        self, client: trio.abc.Stream, limits: Limits, listener: str, source: object
    ) -> None:
        """After the relay: on a header timeout, count and log it, and answer 408 if the
        server has not answered (the caller closes both sides)."""
        if self.expired != "header":
            return
        limits.refused(
            listener,
            HEADER_TIMEOUT,
            source,
            f"request head not complete within {self.header_timeout:g} s",
        )
        observer = self.observer
        if not observer.answerable:
            return  # a response is owed first: only the close (the caller's `finish` reports)
        observer.report_local(408)
        with contextlib.suppress(*CLIENT_ERRORS, trio.BusyResourceError):
            with trio.move_on_after(1.0):
                await client.send_all(TIMEOUT_RESPONSE)
            await linger(client, self.drain_limit)


async def relay_observed(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    result: RelayResult,
    tap: Http1Observer,
    settings: HttpSettings,
    limits: Limits,
    *,
    idle_timeout: float,
    listener: str,
    source: object,
) -> None:
    """`relay` with the observer watching, under the engine's header and idle timeouts
    (`settings`; refusals counted in `limits`); the observer is finished (its last exchanges
    reported) however it ends."""
    timeouts = ObserveTimeouts(tap, settings)
    try:
        with timeouts.scope:
            await relay(client, upstream, result, idle_timeout=idle_timeout, tap=tap)
        await timeouts.enforce(client, limits, listener, source)
    finally:
        tap.finish()

"""A small HTTP/1.1 server (h11 over trio) for the admin, readiness and metrics ports.

These endpoints answer a handful of GETs from operators and scrapers; they
share this one server so each port only declares its routes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import h11
import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str], Awaitable[Response]]  # gets the query string ("" if none)


def json_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), "application/json")


async def _serve_one(stream: trio.SocketStream, routes: dict[str, Handler]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    with trio.move_on_after(REQUEST_TIMEOUT):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                break
            if isinstance(event, h11.ConnectionClosed):
                return
    if not isinstance(event, h11.Request):
        return
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    handler = routes.get(path)
    if event.method != b"GET":
        response = Response(405, b"method not allowed\n")
    elif handler is None:
        response = Response(404, b"not found\n")
    else:
        try:
            response = await handler(query)
        except Exception:
            log.exception("handler for %s failed", path)
            response = Response(500, b"internal error\n")
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
    ]
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    out += conn.send(h11.Data(data=response.body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(out)


async def serve_http(
    listen: tuple[str, int] | Sequence[trio.abc.Listener[trio.SocketStream]],
    routes: dict[str, Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `routes` (path -> handler) on ``listen`` (``(host, port)`` or ready listeners,
    e.g. shared `common.listeners.PausableListener`s) until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _serve_one(stream, routes)
        except (trio.BrokenResourceError, h11.ProtocolError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    if isinstance(listen, tuple):
        host, port = listen
        listeners = list(await trio.open_tcp_listeners(port, host=host))
    else:
        listeners = list(listen)
    async with trio.open_nursery() as nursery:
        task_status.started()
        nursery.start_soon(trio.serve_listeners, handle, listeners)


async def http_get(host: str, port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET path from host:port (used by CLIs talking to the admin endpoints)."""
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            request = h11.Request(method="GET", target=path, headers=[("host", host)])
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            status, body = 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, bytes(body)

"""A small HTTP/1.1 server (h11 over trio) for the admin, readiness and metrics ports.

These endpoints answer a handful of GETs from operators and scrapers; they
share this one server so each port only declares its routes. A port may also take POSTs
with a body (`post_routes`, e.g. the controller's admission webhook, served over TLS by
passing `trio.SSLListener`s) and put a `guard` in front of every route (e.g. the
controller's check that a caller of its debug endpoints is local or authenticated).
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
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers


@dataclass(frozen=True)
class Request:
    """What a guard or a POST handler sees of one request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-case (h11's); a repeated header keeps its last value
    peer: str  # the client's IP address ("" when the transport has none)
    body: bytes = b""


Handler = Callable[[str], Awaitable[Response]]  # gets the query string ("" if none)
PostHandler = Callable[[Request], Awaitable[Response]]
# Runs before every route: None lets the request through, a Response answers it instead.
Guard = Callable[[Request], Awaitable[Response | None]]


def json_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), "application/json")


def peer_ip(stream: trio.abc.Stream) -> str:
    """The remote IP address of a socket stream, also under TLS; "" if there is none."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else ""
    except (OSError, IndexError, TypeError):
        return ""


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(data)


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, max_body: int
) -> tuple[h11.Request, bytes] | Response | None:
    """The request and its body; a Response to answer at once (too large); None if the
    client went away."""
    event = await _next_event(conn, stream)
    if not isinstance(event, h11.Request):
        return None
    length = next((v for k, v in event.headers if k == b"content-length"), None)
    if length is not None and length.isdigit() and int(length) > max_body:
        return Response(413, b"request body too large\n")
    body = bytearray()
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > max_body:
                return Response(413, b"request body too large\n")
        elif isinstance(part, h11.EndOfMessage):
            return event, bytes(body)
        else:
            return None


async def _serve_one(
    stream: trio.abc.Stream,
    routes: dict[str, Handler],
    post_routes: dict[str, PostHandler],
    guard: Guard | None,
    max_body: int,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    read: tuple[h11.Request, bytes] | Response | None = None
    with trio.move_on_after(REQUEST_TIMEOUT):
        read = await _read_request(conn, stream, max_body)
    if read is None:
        return
    if isinstance(read, Response):
        response = read
    else:
        event, body = read
        response = await _respond(event, body, peer_ip(stream), routes, post_routes, guard)
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
        *response.headers,
    ]
    if conn.our_state is not h11.SEND_RESPONSE:
        return  # the client's request was cut short: nothing to answer
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    out += conn.send(h11.Data(data=response.body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(out)


async def _respond(
    event: h11.Request,
    body: bytes,
    peer: str,
    routes: dict[str, Handler],
    post_routes: dict[str, PostHandler],
    guard: Guard | None,
) -> Response:
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    method = event.method.decode("latin-1")
    table: dict = post_routes if method == "POST" else routes
    if method not in ("GET", "POST") or (path not in table and path in {**routes, **post_routes}):
        return Response(405, b"method not allowed\n")
    handler = table.get(path)
    if handler is None:
        return Response(404, b"not found\n")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    request = Request(method, path, query, headers, peer, body)
    try:
        if guard is not None:
            refused = await guard(request)
            if refused is not None:
                return refused
        return await (handler(request) if method == "POST" else handler(query))
    except Exception:
        log.exception("handler for %s failed", path)
        return Response(500, b"internal error\n")


async def serve_http(
    listen: tuple[str, int] | Sequence[trio.abc.Listener[trio.abc.Stream]],
    routes: dict[str, Handler],
    *,
    post_routes: dict[str, PostHandler] | None = None,
    guard: Guard | None = None,
    max_body: int = MAX_REQUEST_BYTES,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `routes` (path -> GET handler) and `post_routes` (path -> POST handler, bodies
    up to ``max_body`` bytes) on ``listen`` (``(host, port)`` or ready listeners, e.g. shared
    `common.listeners.PausableListener`s or `trio.SSLListener`s) until cancelled. ``guard``,
    if given, sees every request to a known route first and may answer it instead."""
    posts = post_routes or {}

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            await _serve_one(stream, routes, posts, guard, max_body)
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


async def http_get(
    host: str,
    port: int,
    path: str,
    timeout: float = 3.0,
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> tuple[int, bytes]:
    """GET path from host:port (used by CLIs talking to the admin endpoints)."""
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            request = h11.Request(method="GET", target=path, headers=[("host", host), *headers])
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

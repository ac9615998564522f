"""HTTP/1.x through the HTTP/1.1 engine as it came (issue #15 item 3): what the server receives
and what the client gets back, over loopback sockets with a raw server that records each
request head it reads and answers as scripted."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import trio

from tests.unit.test_http_proxy import Backend, open_mesh


@dataclass
class RawServer:
    """Reads one request head per connection, records it, then runs `answer`."""

    heads: list[bytes] = field(default_factory=list)
    answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    continue_first: bool = False  # answer 100 Continue, read the body, then `answer`
    chunked: list[bytes] | None = None  # given: read a chunked body up to its end, kept here

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            part = await stream.receive_some(65536)
            if not part:
                return
            data += part
        head, _, rest = data.partition(b"\r\n\r\n")
        self.heads.append(head)
        if self.continue_first:
            await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = int(_header(head, b"content-length") or 0)
            while len(rest) < length:
                rest += await stream.receive_some(65536)
        if self.chunked is not None:
            while not rest.endswith(b"0\r\n\r\n"):
                rest += await stream.receive_some(65536)
            self.chunked.append(rest)
        await stream.send_all(self.answer)
        await stream.aclose()


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def _exchange(
    server: RawServer,
    request: bytes,
    *,
    body_after_100: bytes = b"",
    until_close: bool = True,
) -> bytes:
    """Send `request` through the mesh to `server`; what the client read until the close (or,
    not `until_close`, until the response body `ok`: the client connection stays open)."""
    backend = Backend("raw", external=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
            )
            backend.port = listeners[0].socket.getsockname()[1]
            async with open_mesh([backend]) as mesh:
                stream = await trio.open_tcp_stream("127.0.0.1", mesh.port)
                await stream.send_all(request)
                got = b""
                if body_after_100:
                    while b"\r\n\r\n" not in got:
                        got += await stream.receive_some(65536)
                    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), got
                    await stream.send_all(body_after_100)
                if until_close:
                    while part := await stream.receive_some(65536):
                        got += part
                else:
                    while not got.endswith(b"ok"):
                        got += await stream.receive_some(65536)
                await stream.aclose()
            nursery.cancel_scope.cancel()
    return got


async def test_http_1_0_reaches_the_server_as_1_0_and_the_connection_closes():
    server = RawServer(answer=b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    got = await _exchange(server, b"GET /old HTTP/1.0\r\n\r\n")
    assert server.heads[0].startswith(b"GET /old HTTP/1.0\r\n")
    assert _header(server.heads[0], b"connection") is None  # no keep-alive asked for
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nok")
    assert b"connection: close" in got.lower()


async def test_http_1_0_keep_alive_is_passed_on():
    server = RawServer()
    request = b"GET / HTTP/1.0\r\nHost: reviews\r\nConnection: keep-alive\r\n\r\n"
    got = await _exchange(server, request, until_close=False)
    assert server.heads[0].startswith(b"GET / HTTP/1.0\r\n")
    assert _header(server.heads[0], b"connection") == b"keep-alive"
    assert b"connection: keep-alive" in got.lower()


async def test_expect_100_continue_goes_to_the_server_which_answers_it():
    server = RawServer(continue_first=True)
    head = (
        b"PUT /up HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    got = await _exchange(server, head, body_after_100=b"hello")
    assert _header(server.heads[0], b"expect") == b"100-continue"
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")


async def test_expect_100_continue_refused_by_the_server_gets_its_final_answer():
    server = RawServer(answer=b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    head = b"PUT /up HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    got = await _exchange(server, head)  # the client never sends its body
    assert got.startswith(b"HTTP/1.1 417 Expectation Failed\r\n")  # no 100 from the mesh
    assert b" 100 " not in got


async def test_upgrade_h2c_is_dropped_and_served_as_http_1_1():
    server = RawServer()
    got = await _exchange(
        server,
        b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: Upgrade, HTTP2-Settings, close\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    head = server.heads[0].lower()
    assert b"upgrade" not in head and b"http2-settings" not in head
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"ok")


async def test_upgrade_h2c_with_a_chunked_body_is_served_as_http_1_1_with_its_body():
    """As curl --http2 sends a body of unknown length; it got 400 when llhttp stopped at the
    upgrade's head and the body was taken for the new protocol's bytes."""
    server = RawServer(chunked=[])
    got = await _exchange(
        server,
        b"POST /up HTTP/1.1\r\nHost: reviews\r\nConnection: Upgrade, HTTP2-Settings, close\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    head = server.heads[0].lower()
    assert b"upgrade" not in head and b"http2-settings" not in head
    assert _header(head, b"transfer-encoding") == b"chunked"
    body, chunks = b"", server.chunked[0]
    while size := int(chunks.split(b"\r\n", 1)[0], 16):
        chunks = chunks.partition(b"\r\n")[2]
        body, chunks = body + chunks[:size], chunks[size + 2 :]
    assert body == b"hello world"
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"ok")


async def test_malformed_requests_get_envoy_words_and_the_problem_in_plain_words():
    bad_name = await _exchange(RawServer(), b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n")
    assert bad_name.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert bad_name.endswith(b"\r\n\r\nbad request: invalid character in a header name\n")
    huge = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 70_000 + b"\r\n\r\n"
    too_large = await _exchange(RawServer(), huge)
    assert too_large.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert too_large.endswith(b"\r\n\r\nrequest header fields too large: headers too large\n")

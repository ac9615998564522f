"""The SNI of a redirected TLS connection, peeked (MSG_PEEK) so the bytes stay in the
socket for the relay: `tls` routes choose a destination by it (agent/proxy/routing.py
TlsRoutes), as Envoy's tls_inspector does before its filter chains are matched."""

from __future__ import annotations

import socket

import trio
from meshagent.common.tlshello import MAX_HELLO, Hello, server_name

# How long a connection on a port with `tls` routes may take to send its ClientHello before
# it is routed as if it had no SNI (Envoy's listener filter timeout is 15 s; a TLS client
# sends its hello at once, so this only bounds a client that sends nothing).
HELLO_WAIT = 5.0
# A ClientHello seen in part is looked at again this often until the rest arrives (the
# socket stays readable meanwhile, so waiting for readability would spin).
PARTIAL_RETRY = 0.005


async def peek_server_name(stream: trio.SocketStream, wait: float = HELLO_WAIT) -> str | None:
    """The host_name the client's ClientHello asks for; None for a client that sends no TLS
    hello, a hello without SNI, an end of stream or nothing within ``wait`` seconds."""
    with trio.move_on_after(wait):
        while True:
            data = await stream.socket.recv(MAX_HELLO, socket.MSG_PEEK)
            if not data:
                return None
            answer = server_name(data)
            if isinstance(answer, str):
                return answer
            if answer is not Hello.INCOMPLETE:
                return None
            await trio.sleep(PARTIAL_RETRY)
    return None

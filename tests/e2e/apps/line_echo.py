"""A line echo server and a client that holds one connection open, for live-policy tests.

    python3 line_echo.py serve PORT
    python3 line_echo.py hold HOST:PORT SECONDS
    python3 line_echo.py idle HOST:PORT SECONDS

``serve`` echoes every connection's bytes back (a thread per connection). ``hold`` connects
once, sends a numbered line every 0.1 s and prints ``ok N`` for each echo it gets back; when
the connection ends it prints ``closed <time.time()> <why>`` and exits 0; after SECONDS it
prints ``done`` and exits. ``idle`` gets one echo (``ok 1``), then sends nothing and waits
for the connection to end (``closed <time.time()> eof``), ``done`` after SECONDS. Stdlib
only: it runs under the system Python inside lab pods.
"""

from __future__ import annotations

import socket
import sys
import threading
import time


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def hold(target: str, seconds: float) -> None:
    host, _, port = target.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    print("connected", flush=True)
    deadline = time.monotonic() + seconds
    n = 0
    try:
        while time.monotonic() < deadline:
            n += 1
            line = f"{n}\n".encode()
            sock.sendall(line)
            got = b""
            while len(got) < len(line):
                chunk = sock.recv(len(line) - len(got))
                if not chunk:
                    print(f"closed {time.time():.3f} eof", flush=True)
                    return
                got += chunk
            print(f"ok {n}", flush=True)
            time.sleep(0.1)
    except OSError as exc:
        print(f"closed {time.time():.3f} {type(exc).__name__}", flush=True)
        return
    print("done", flush=True)


def idle(target: str, seconds: float) -> None:
    """One echo, then nothing: waits up to SECONDS for the connection to be closed."""
    host, _, port = target.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    print("connected", flush=True)
    try:
        sock.sendall(b"1\n")
        got = b""
        while len(got) < 2 and (chunk := sock.recv(2 - len(got))):
            got += chunk
        print("ok 1" if got == b"1\n" else f"closed {time.time():.3f} eof", flush=True)
        sock.settimeout(seconds)
        chunk = sock.recv(1)
        print(f"closed {time.time():.3f} {'eof' if not chunk else 'data'}", flush=True)
    except TimeoutError:
        print("done", flush=True)
    except OSError as exc:
        print(f"closed {time.time():.3f} {type(exc).__name__}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "idle":
        idle(sys.argv[2], float(sys.argv[3]))
    else:
        hold(sys.argv[2], float(sys.argv[3]))

"""Bulk bytes with a checksum at both ends, for the kernel-join test (issue #18 item 2).

    python3 bulk_hash.py serve PORT
    python3 bulk_hash.py send HOST:PORT BYTES

``serve`` reads each connection to its end (the client's half-close), then answers one line
``<bytes> <sha256>`` of what it read and closes. ``send`` sends BYTES bytes read from
/dev/urandom (1 MiB at a time), half-closes, reads the answer and prints
``sent <bytes> <sha256>`` then ``got <answer>``; exit 1 if the connection broke. Both bound
every wait by a socket timeout. Stdlib only: it runs under the system Python in lab pods.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading

CHUNK = 1 << 20
TIMEOUT = 120.0


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)

    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            digest, total = hashlib.sha256(), 0
            try:
                while data := conn.recv(CHUNK):
                    digest.update(data)
                    total += len(data)
                conn.sendall(f"{total} {digest.hexdigest()}\n".encode())
            except OSError:
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def send(target: str, size: int) -> int:
    host, _, port = target.rpartition(":")
    digest, sent = hashlib.sha256(), 0
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
        try:
            while sent < size:
                block = os.urandom(min(CHUNK, size - sent))
                conn.sendall(block)
                digest.update(block)
                sent += len(block)
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while data := conn.recv(4096):
                answer += data
        except OSError as exc:
            print(f"broken after {sent} bytes: {exc}", flush=True)
            return 1
    print(f"sent {sent} {digest.hexdigest()}", flush=True)
    print(f"got {answer.decode(errors='replace').strip()}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        sys.exit(send(sys.argv[2], int(sys.argv[3])))

"""Hold many TCP connections to line echo servers and check each still echoes, on demand.

    python3 conn_holder.py SECONDS N HOST:PORT [HOST:PORT ...]

Opens N connections, round-robin over the targets, and prints ``{"connected": N}``. Then,
every 0.5 s, sends a numbered line on each open connection and reads its echo back; a
connection that fails (closed, reset, wrong or no echo in 10 s) is closed and counted
failed, never reopened. Each line read on stdin asks for a report: one more round on every
connection, then ``{"open": k, "echoed": k, "rounds": r, "failures": [...]}``. Exits at
stdin's end or after SECONDS, printing ``{"closed": k, "bytes": {conn: bytes sent}}`` (each
echoed back as much) for the connections it closed itself. Stdlib only: it runs under the
system Python inside lab pods.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

ECHO_TIMEOUT = 10.0


def main() -> None:
    seconds, n, targets = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    conns: dict[int, socket.socket] = {}
    names: dict[int, str] = {}
    failures: list[str] = []
    sent: dict[int, int] = {}  # bytes each open connection sent (and got echoed)
    for i in range(n):
        host, _, port = targets[i % len(targets)].rpartition(":")
        names[i] = targets[i % len(targets)]
        try:
            conns[i] = socket.create_connection((host, int(port)), timeout=ECHO_TIMEOUT)
        except OSError as exc:
            failures.append(f"{time.time():.2f} connect {i} {names[i]}: {exc!r}")
    print(json.dumps({"connected": len(conns), "failures": failures}), flush=True)

    rounds = 0

    def one_round() -> int:
        nonlocal rounds
        rounds += 1
        echoed = 0
        for i, sock in list(conns.items()):
            line = f"{i} {rounds}\n".encode()
            try:
                sock.sendall(line)
                got = b""
                while not got.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                if got != line:
                    raise ConnectionError(f"echo {got!r} for {line!r}")
                sent[i] = sent.get(i, 0) + len(line)
                echoed += 1
            except (OSError, ConnectionError) as exc:
                failures.append(f"{time.time():.2f} round {rounds} conn {i} {names[i]}: {exc!r}")
                sock.close()
                del conns[i]
        return echoed

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        readable, _, _ = select.select([sys.stdin], [], [], 0.5)
        if readable:
            if not sys.stdin.readline():
                break
            echoed = one_round()
            report = {"open": len(conns), "echoed": echoed, "rounds": rounds}
            print(json.dumps({**report, "failures": failures}), flush=True)
        else:
            one_round()
    for sock in conns.values():
        sock.close()
    closed = {str(i): sent.get(i, 0) for i in conns}
    print(json.dumps({"closed": len(conns), "bytes": closed}), flush=True)


if __name__ == "__main__":
    main()

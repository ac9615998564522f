"""Dials each TARGET over and over and prints one JSON line per attempt, as it happens.

    python3 connect_probe.py [--interval S] [--timeout S] [--duration S] 10.244.2.3:8080 ...

Each attempt opens a TCP connection, sends `GET /` and reads the answer's body:
`{"t": unix time, "target": ..., "ok": bool, "body": ..., "error": errno name or message,
"seconds": how long the attempt took}`. For measuring, from inside a pod, when its traffic
changes path (the agent dies, comes back) and how fast a refused connect fails. Stdlib only.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
import time


def attempt(target: str, timeout: float) -> dict:
    host, _, port = target.rpartition(":")
    started = time.monotonic()
    out: dict = {"t": time.time(), "target": target, "ok": False, "body": "", "error": ""}
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        out["ok"] = head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        out["body"] = body.decode(errors="replace")
        if not out["ok"]:
            out["error"] = head.split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError as exc:
        out["error"] = errno.errorcode.get(exc.errno or 0, "") or str(exc) or type(exc).__name__
    out["seconds"] = round(time.monotonic() - started, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=60.0, help="then exit")
    parser.add_argument("targets", nargs="+")
    args = parser.parse_args()
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        for target in args.targets:
            print(json.dumps(attempt(target, args.timeout)), flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())

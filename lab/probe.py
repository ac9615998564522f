"""Talking to things inside lab namespaces from the lab process (which stays in the host's).

A socket opened while a worker thread is inside a namespace stays in that
namespace, so the lab can check readiness without spawning a process.
"""

from __future__ import annotations

import json
import socket

from meshagent.common.netns import entered
from meshagent.lab.paths import NETNS_DIR


def _connect(netns: str, host: str, port: int, timeout: float) -> socket.socket:
    with entered(str(NETNS_DIR / netns)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def tcp_open(netns: str, host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _connect(netns, host, port, timeout).close()
    except OSError:
        return False
    return True


def http_get_json(
    netns: str, host: str, port: int, path: str, timeout: float = 2.0, token: str | None = None
) -> dict:
    """GET a JSON document (the agent's admin endpoint, the controller's status with a bearer
    ``token``); raises OSError or ValueError."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with _connect(netns, host, port, timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode()
        )
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return json.loads(body)

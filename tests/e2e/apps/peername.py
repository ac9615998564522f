"""Connects to each ADDRESS:PORT given and prints what getpeername() answers, as JSON.

    python3 peername.py 10.96.0.10:80 [fd00:10:96::a]:80 [::ffff:10.96.0.10]:80

A bracketed address is dialled on an IPv6 socket (an IPv4-mapped one too), a plain one on
an IPv4 socket. Stdlib only: it runs under the system Python inside lab pods.
"""

from __future__ import annotations

import json
import socket
import sys


def peer_of(target: str) -> list:
    host, _, port = target.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect((host.strip("[]"), int(port)))
        return list(s.getpeername()[:2])


if __name__ == "__main__":
    print(json.dumps({t: peer_of(t) for t in sys.argv[1:]}))

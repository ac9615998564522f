"""A client that ends its connection with a reset (RST), not a FIN.

    python3 reset_client.py HOST:PORT BYTES

Connects, sends BYTES bytes to an echo server, reads the BYTES back (so every byte has been
through the mesh both ways), then sets SO_LINGER to 0 and closes: the kernel sends a RST.
Prints ``<sent> <received>``. Stdlib only: it runs under the system Python inside lab pods.
"""

from __future__ import annotations

import socket
import struct
import sys


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    size = int(sys.argv[2])
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(b"r" * size)
    received = 0
    while received < size:
        data = sock.recv(min(65536, size - received))
        if not data:
            break
        received += len(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    print(size, received)


if __name__ == "__main__":
    main()

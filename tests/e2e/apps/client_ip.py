"""An HTTP server that answers every GET with the address the connection came from.

    python3 client_ip.py PORT

Through the mesh a pod on another node is reached by its node proxy, so the answer is that
proxy's address; a connection that bypassed the mesh shows the client pod's own IP. Stdlib
only: it runs under the system Python inside lab pods.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("", int(sys.argv[1])), Handler).serve_forever()

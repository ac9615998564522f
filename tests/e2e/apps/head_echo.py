"""A stock HTTP/1.1 server (the stdlib's http.server) answering each request with what it
received: the request line, then the header lines as sent, then the body's length (a chunked
body's too: the stdlib's server does not decode chunks, so this does).

    python3 head_echo.py PORT [LOGFILE]

With LOGFILE, each request's text is also appended to it (a test reads what a server got
without asking it: a mirrored copy's answer goes nowhere).

`protocol_version` HTTP/1.1 makes the stdlib answer `Expect: 100-continue` with its own
100 Continue (only when the request is HTTP/1.1) and keep HTTP/1.1 connections alive; an
HTTP/1.0 request gets the stdlib's 1.0 rules. Stdlib only: it runs under the system Python.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _chunked(self) -> bytes:
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()  # the chunk's CRLF
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return body

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = self._chunked()
        text = f"{self.requestline}\n{self.headers.as_string().strip()}\nbody: {len(body)}\n"
        data = text.encode()
        if LOG is not None:
            with open(LOG, "a") as log:
                log.write(text + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _echo

    def log_message(self, *args: object) -> None:
        pass


LOG = sys.argv[2] if len(sys.argv) > 2 else None

if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Echo).serve_forever()

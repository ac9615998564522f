"""An HTTP server that keeps serving after SIGTERM (as an app draining its connections
during its grace period): it logs the signal and goes on. `GET /slow?seconds=N` answers
after N seconds; every answer names the pod ($POD_NAME)."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = os.environ.get("POD_NAME", "?")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/slow":
            print(f"slow request started {self.path}", flush=True)
            time.sleep(float(query.get("seconds", ["1"])[0]))
        body = f"{NAME}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        print(f"{self.address_string()} {fmt % args}", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM: serving on", flush=True))
    server = ThreadingHTTPServer(("", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()

"""A small HTTP ext-authz server, as Istio's sample (samples/extauthz): a check request with
`x-ext-authz: allow` is answered 200 with `x-ext-authz-check-result: allowed` (for the
upstream request); any other gets 403, `x-ext-authz-check-result: denied` and a body saying why.

    python3 ext_authz.py PORT

Stdlib only: it runs under the system Python.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Check(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _check(self) -> None:
        allowed = self.headers.get("x-ext-authz") == "allow"
        body = b"" if allowed else b"denied by ext_authz for not found header `x-ext-authz: allow`"
        self.send_response(200 if allowed else 403)
        self.send_header("x-ext-authz-check-result", "allowed" if allowed else "denied")
        self.send_header("x-ext-authz-path", self.path)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _check

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("", int(sys.argv[1])), Check).serve_forever()

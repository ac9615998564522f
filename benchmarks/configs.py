"""Configuration text for the benchmark's own servers and reference proxies. Pure: addresses
and file paths in, nginx.conf and haproxy.cfg text out; the harness writes them to its run folder.

The sidecar pair is HAProxy in TCP mode, as a sidecar mesh's proxies forward TCP: proxy A
(client's node) accepts plaintext and opens a mutual-TLS 1.3 connection to proxy B (server's
node) for every client connection; B verifies A's certificate and forwards plaintext to the server.
"""

from __future__ import annotations

from dataclasses import dataclass

HTTP_PORT = 8080  # nginx in every server pod
IDLE_PORT = 8081  # the same nginx, behind a Service port named as opaque TCP (idle connections)
IPERF_PORT = 5201  # iperf3 -s in every server pod
SMALL_PATH = "/small"  # a 3-byte body: small requests
KIB_PATH = "/1k"  # a 1,024-byte body: the fixed-rate scenario
KIB_BODY = ("meshagent-bench-" * 64)[:1024]
# proxy A's plaintext listeners (client's node) and proxy B's TLS ones (server's node)
SIDECAR_A_HTTP, SIDECAR_A_IPERF = 10080, 10201
SIDECAR_B_HTTP, SIDECAR_B_IPERF = 10443, 10444
SIDECAR_B_NAME = "sidecar-b.bench-plain"  # proxy B's certificate name; A verifies it
MAX_CONNECTIONS = 8000  # above the idle-connection scenario's 5,000


def nginx_conf(workers: str = "auto") -> str:
    """One nginx.conf for every HTTP server pod (each runs it with its own -p prefix, where the
    pid file and temp folders go). Keep-alive limits are lifted so that only the client ends
    connections, and idle ones are held for the idle-connection scenario."""
    return f"""# written by benchmarks/run.py
worker_processes {workers};
worker_rlimit_nofile {2 * MAX_CONNECTIONS};
pid nginx.pid;
daemon off;
error_log stderr warn;
events {{
    worker_connections {2 * MAX_CONNECTIONS};
}}
http {{
    access_log off;
    client_body_temp_path body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_header_timeout 600s;
    server {{
        listen {HTTP_PORT} backlog=4096;
        listen {IDLE_PORT} backlog=4096;
        default_type text/plain;
        location = {SMALL_PATH} {{ return 200 "ok\\n"; }}
        location = {KIB_PATH} {{ return 200 "{KIB_BODY}"; }}
    }}
}}
"""


@dataclass(frozen=True)
class SidecarFiles:
    """Where a proxy's PEM files are: its certificate chain with its key (HAProxy's `crt`
    format), and the CA bundle it verifies its peer against."""

    crt: str
    ca: str


_GLOBAL = f"""# written by benchmarks/run.py
global
    maxconn {MAX_CONNECTIONS}
    log stderr format short local0 warning
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 600s
    timeout server 600s
"""


def haproxy_a(b_ip: str, files: SidecarFiles) -> str:
    """Proxy A: plaintext in from the client pod, mutual TLS out to proxy B, which must present
    a certificate for SIDECAR_B_NAME signed by the bench CA."""
    tls = (
        f"ssl crt {files.crt} ca-file {files.ca} verify required "
        f"verifyhost {SIDECAR_B_NAME} sni str({SIDECAR_B_NAME})"
    )
    return (
        _GLOBAL
        + f"""frontend http
    bind :{SIDECAR_A_HTTP}
    default_backend http
backend http
    server b {b_ip}:{SIDECAR_B_HTTP} {tls}
frontend iperf
    bind :{SIDECAR_A_IPERF}
    default_backend iperf
backend iperf
    server b {b_ip}:{SIDECAR_B_IPERF} {tls}
"""
    )


def haproxy_b(http_ip: str, iperf_ip: str, files: SidecarFiles) -> str:
    """Proxy B: mutual TLS in (a client certificate from the bench CA is required), plaintext
    out to the server pods on its node."""
    tls = f"ssl crt {files.crt} ca-file {files.ca} verify required"
    return (
        _GLOBAL
        + f"""frontend http
    bind :{SIDECAR_B_HTTP} {tls}
    default_backend http
backend http
    server s {http_ip}:{HTTP_PORT}
frontend iperf
    bind :{SIDECAR_B_IPERF} {tls}
    default_backend iperf
backend iperf
    server s {iperf_ip}:{IPERF_PORT}
"""
    )

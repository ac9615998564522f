"""Configuration text for the benchmark's own servers and reference proxies. Pure: addresses
and file paths in, nginx.conf and haproxy.cfg text out; the harness writes them to its run folder.

The sidecar pair is HAProxy in TCP mode, as a sidecar mesh's proxies forward TCP: proxy A
(client's node) accepts plaintext and opens a mutual-TLS 1.3 connection to proxy B (server's
node) for every client connection; B verifies A's certificate and forwards plaintext to the server.
HTTP/2 (h2c) and gRPC go through the pair in HTTP mode instead, as a sidecar mesh handles them at
L7 (per request): h2 from the client, h2 over the mutual TLS between A and B (ALPN h2), and h2c
prior knowledge to the server.
"""

from __future__ import annotations

from dataclasses import dataclass

HTTP_PORT = 8080  # nginx in every server pod
IDLE_PORT = 8081  # the same nginx, behind a Service port named as opaque TCP (idle connections)
IPERF_PORT = 5201  # iperf3 -s in every server pod
H2_PORT = 8082  # the same nginx: HTTP/2 with prior knowledge (h2c), no TLS
GRPC_PORT = 50051  # a grpcio server (tests/e2e/apps/grpc_echo.py) in every gRPC server pod
GRPC_METHOD = "/meshtest.Echo/Who"  # answers the server's name; prints nothing per call
SMALL_PATH = "/small"  # a 3-byte body: small requests
KIB_PATH = "/1k"  # a 1,024-byte body: the fixed-rate scenario
KIB_BODY = ("meshagent-bench-" * 64)[:1024]
# proxy A's plaintext listeners (client's node) and proxy B's TLS ones (server's node)
SIDECAR_A_HTTP, SIDECAR_A_IPERF = 10080, 10201
SIDECAR_B_HTTP, SIDECAR_B_IPERF = 10443, 10444
SIDECAR_A_H2, SIDECAR_A_GRPC = 10082, 10051  # HTTP mode: h2 in, h2 over TLS to B
SIDECAR_B_H2, SIDECAR_B_GRPC = 10445, 10446
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
        listen {H2_PORT} http2 backlog=4096;
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


def _h2_pair_a(name: str, port: int, b_ip: str, b_port: int, tls: str) -> str:
    """Proxy A's HTTP-mode section for h2c clients: h2 to B over mutual TLS (ALPN h2)."""
    return f"""frontend {name}
    mode http
    bind :{port} proto h2
    default_backend {name}
backend {name}
    mode http
    server b {b_ip}:{b_port} {tls} alpn h2
"""


def _h2_pair_b(name: str, port: int, server: str, tls: str) -> str:
    """Proxy B's HTTP-mode section: h2 over mutual TLS in, h2c prior knowledge to the server."""
    return f"""frontend {name}
    mode http
    bind :{port} {tls} alpn h2
    default_backend {name}
backend {name}
    mode http
    server s {server} proto h2
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
        + _h2_pair_a("h2", SIDECAR_A_H2, b_ip, SIDECAR_B_H2, tls)
        + _h2_pair_a("grpc", SIDECAR_A_GRPC, b_ip, SIDECAR_B_GRPC, tls)
    )


def haproxy_b(http_ip: str, iperf_ip: str, grpc_ip: str, files: SidecarFiles) -> str:
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
        + _h2_pair_b("h2", SIDECAR_B_H2, f"{http_ip}:{H2_PORT}", tls)
        + _h2_pair_b("grpc", SIDECAR_B_GRPC, f"{grpc_ip}:{GRPC_PORT}", tls)
    )

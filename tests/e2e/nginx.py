"""nginx as the e2e tests' stock server: one config shape for every test that runs one.

`write_conf` writes `<folder>/<name>.conf`: nginx in the foreground (the lab kubelet is its
parent) as one process, its pid file beside the config, errors on stderr (the pod's log),
with the test's own `http` block. Pods run it as `nginx -p <folder>/ -c <folder>/<name>.conf`.
"""

from __future__ import annotations

from pathlib import Path

_MAIN = """daemon off;
master_process off;
worker_processes 1;
pid {pid};
error_log stderr;
events {{ worker_connections {connections}; }}
http {{
{http}}}
"""


def write_conf(folder: Path, name: str, http: str, *, connections: int = 1024) -> Path:
    """`<folder>/<name>.conf` serving `http` (the body of the http block, formatted)."""
    path = folder / f"{name}.conf"
    text = _MAIN.format(pid=folder / f"{name}.pid", connections=connections, http=http)
    path.write_text(text)
    return path

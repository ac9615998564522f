"""A Service port's L7 level as the data path and `meshagent status` read it (DESIGN.md
section 1): the controller's mark in `Snapshot.l7_levels` (controller/l7level.py decides it),
else, from a controller older than the field, what the proxy did before levels existed:
`full` on HTTP ports, `l4` on the rest. The pods' own node may serve them lower
where only the source decides per request (`at_pods`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: `meshagent status` reads levels without pydantic
    from meshagent.common.snapshot import L7Level

_HTTP1 = frozenset({"http", "grpc-web"})
_HTTP2 = frozenset({"http2", "grpc", "h2c", "kubernetes.io/h2c"})


def http_version(name: str, app_protocol: str | None, protocol: str = "TCP") -> int | None:
    """1 or 2 for an HTTP Service port, None otherwise: Istio's protocol selection (appProtocol,
    else the name's prefix), as agent/proxy/routing.port_protocol serves it."""
    if protocol != "TCP":
        return None
    if app_protocol is not None:
        kind = app_protocol.lower()
    else:
        kind = name.lower().partition("-")[0]
        if kind == "grpc" and name.lower().startswith("grpc-web"):
            kind = "grpc-web"
    return 1 if kind in _HTTP1 else 2 if kind in _HTTP2 else None


def level_of(
    levels: Mapping[str, str],
    namespace: str,
    name: str,
    port: int,
    port_name: str,
    app_protocol: str | None,
    protocol: str = "TCP",
    *,
    at_pods: bool = False,
) -> L7Level:
    """The level in force for one Service port (the snapshot's mark, else the default);
    `at_pods`: the level its pods' own node serves them at, which the controller marks apart
    only where it is lower (the per-request decisions are all the source's)."""
    key = f"{namespace}/{name}:{port}"  # snapshot.level_key
    for mark in (f"{key}@pods", key) if at_pods else (key,):  # snapshot.pods_level_key
        level = levels.get(mark)
        if level in ("l4", "observe", "full"):
            return level  # type: ignore[return-value]
    return "l4" if http_version(port_name, app_protocol, protocol) is None else "full"

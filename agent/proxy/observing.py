"""The `observe` level's reporting (issue 18): an HTTP/1.1 observer for one relayed connection
whose requests go to Istio's metrics and the access log as the HTTP engine reports them
(agent/proxy/report.py), under each reporter's labels.

Which level a connection gets (`level_of_route`, `level_of_endpoint`) is the snapshot's mark
(common/l7.py); the source proxy reads it for the Service port the client dialled, the
destination proxy for the pod port the tunnel names (the highest of the levels the Service
ports in front of it are served at on the pods' node, so a port another Service needs at `full`
stays `full`; a Service `full` only for its routes is `observe` there: `at_pods`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio
from meshagent.agent import sockio
from meshagent.agent.proxy.http import RequestRecord
from meshagent.agent.proxy.http.observer import Http1Observer
from meshagent.agent.proxy.report import report_http
from meshagent.common.l7 import level_of
from meshagent.common.snapshot import L7Level, Snapshot

if TYPE_CHECKING:
    from meshagent.agent.proxy.inputs import ProxyInputs
    from meshagent.agent.state import ServicePortRoute
    from meshagent.agent.telemetry import ConnectionLabels

_RANK = {"l4": 0, "observe": 1, "full": 2}

# An HTTP/2 client on an HTTP/1.1 port (a gRPC channel on a port named `http`) opens with the
# preface; no HTTP/1.1 method starts with its first three bytes. How long a client may take to
# send them before it is observed as HTTP/1.1 (an HTTP client speaks first; this bounds a
# server-first protocol on a port named http), and how often a part is looked at again.
PREFACE_START = b"PRI"
PREFACE_WAIT = 1.0
PARTIAL_RETRY = 0.005


async def opens_with_h2_preface(stream: trio.SocketStream, wait: float = PREFACE_WAIT) -> bool:
    """Whether the client's first bytes are HTTP/2's preface, peeked (MSG_PEEK) so they stay
    in the socket: such a client goes to the HTTP/2 engine, which `observe` cannot parse."""
    if sockio.readable_now((stream.socket.fileno(),)):  # usually: no deadline to arm
        seen = await _peeked_preface(stream)
        if seen is not None:
            return seen
    with trio.move_on_after(wait):
        while True:
            seen = await _peeked_preface(stream)
            if seen is not None:
                return seen
            await trio.sleep(PARTIAL_RETRY)
    return False


async def _peeked_preface(stream: trio.SocketStream) -> bool | None:
    """Whether what the client sent so far starts the preface; None while too little came
    to tell (waits for a first byte)."""
    data = await stream.socket.recv(len(PREFACE_START), socket.MSG_PEEK)
    if len(data) >= len(PREFACE_START) or not data:
        return data == PREFACE_START
    if not PREFACE_START.startswith(data):
        return False
    return None


def level_of_route(snapshot: Snapshot, route: ServicePortRoute) -> L7Level:
    """The level of the Service port a client dialled."""
    svc, port = route.service, route.service_port
    return level_of(
        snapshot.l7_levels,
        svc.namespace,
        svc.name,
        port.port,
        port.name,
        port.app_protocol,
        port.protocol,
    )


_ENDPOINT_LEVELS: tuple[Snapshot, dict[tuple[str, int], L7Level]] | None = None


def level_of_endpoint(snapshot: Snapshot, ip: str, port: int) -> L7Level | None:
    """The level this node serves a pod port at (the highest of the pods' levels of the Service
    ports that lead to it; None when no Service does). Built once per snapshot."""
    global _ENDPOINT_LEVELS
    if _ENDPOINT_LEVELS is None or _ENDPOINT_LEVELS[0] is not snapshot:
        levels: dict[tuple[str, int], L7Level] = {}
        for svc in snapshot.services:
            for sp in svc.ports:
                level = level_of(
                    snapshot.l7_levels,
                    svc.namespace,
                    svc.name,
                    sp.port,
                    sp.name,
                    sp.app_protocol,
                    sp.protocol,
                    at_pods=True,
                )
                for e in svc.endpoints:
                    pod_port = e.ports.get(sp.port)
                    if pod_port is None:
                        continue
                    key = (e.ip, pod_port)
                    if key not in levels or _RANK[level] > _RANK[levels[key]]:
                        levels[key] = level
        _ENDPOINT_LEVELS = (snapshot, levels)
    return _ENDPOINT_LEVELS[1].get((ip, port))


def http_observer(
    inputs: ProxyInputs,
    labels: Sequence[ConnectionLabels],
    *,
    client: str,
    upstream: str,
    count: Callable[[], None] | None = None,
) -> Http1Observer:
    """An observer reporting each request once per reporter in `labels` (the source's, and
    the destination's for a hop that stays on this node); `count` told of each."""

    def done(record: RequestRecord) -> None:
        if count is not None:
            count()
        for each in labels:
            report_http(inputs, each, record, source_address=client, destination_address=upstream)

    reporter = labels[0].reporter if labels else "source"
    return Http1Observer(
        done,
        lambda reason: inputs.metrics.observe_stopped(reporter, reason),
        peer=client,
        upstream=upstream,
        clock=trio.current_time,  # the timeouts' deadlines (observe_timeouts.py) are trio's
    )

"""Policy reaches live connections (issue #17 item 1), in process.

Open L4 connections are registered with what authorized them; a new snapshot that forbids
one (a DENY, the destination leaving the mesh, the source leaving it, mutual TLS required
again) cancels its relay at once, counts and logs why, and leaves the allowed ones alone. The
relays here are real: loopback TCP through `relay`, as the proxy's paths run them.
"""

from __future__ import annotations

import trio
import trio.testing
from meshagent.agent.proxy.live import (
    LiveConnections,
    all_of,
    destination_check,
    plaintext_check,
    source_check,
)
from meshagent.agent.proxy.relay import relay
from meshagent.agent.state import Tables
from meshagent.common.snapshot import Snapshot, Workload
from meshagent.common.spiffe import Identity
from prometheus_client import REGISTRY

TD = "cluster.local"
NODE = "node-1"
FRONTEND = Identity(TD, "shop", "frontend")
INTRUDER = Identity(TD, "shop", "intruder")
REVIEWS = Workload(
    uid="r",
    namespace="shop",
    name="reviews",
    node=NODE,
    ips=["10.0.1.5"],
    service_account="reviews",
    labels={"app": "reviews"},
    meshed=True,
)
CLIENT = Workload(
    uid="c", namespace="shop", name="client", node=NODE, ips=["10.0.1.9"], meshed=True
)
REMOTE = Workload(
    uid="x", namespace="shop", name="remote", node="node-2", ips=["10.0.2.5"], meshed=True
)


def deny(principal: str) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-one", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "reviews"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [principal]}}]}],
        },
    }


def peer_auth(mode: str) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": {"mtls": {"mode": mode}},
    }


def tables(*resources: dict, workloads=(REVIEWS, CLIENT, REMOTE)) -> Tables:
    snap = Snapshot(node=NODE, workloads=list(workloads), istio_resources=list(resources))
    return Tables.build(snap.with_version())


def closed_total(kind: str) -> float:
    return (
        REGISTRY.get_sample_value("meshagent_connections_closed_by_policy_total", {"kind": kind})
        or 0.0
    )


def check_for(source: Identity):
    return destination_check(
        NODE, TD, source=source, source_ip="10.0.2.9", ip="10.0.1.5", port=9000
    )


def test_checks_say_why_a_connection_must_end():
    allowed = tables()
    assert check_for(INTRUDER)(allowed) is None
    verdict = check_for(INTRUDER)(tables(deny(INTRUDER.principal)))
    assert verdict is not None and verdict.kind == "denied" and "deny-one" in verdict.detail
    assert check_for(FRONTEND)(tables(deny(INTRUDER.principal))) is None

    unmeshed = REVIEWS.model_copy(update={"meshed": False})
    gone = check_for(FRONTEND)(tables(workloads=(unmeshed, CLIENT)))
    assert gone is not None and gone.kind == "destination_left_mesh"

    left = source_check(CLIENT)(tables(workloads=(REVIEWS,)))
    assert left is not None and left.kind == "source_left_mesh"
    assert source_check(CLIENT)(allowed) is None

    plain = plaintext_check(NODE, "10.0.2.5", 80)
    assert plain(tables(peer_auth("DISABLE"))) is None
    required = plain(tables(peer_auth("STRICT")))
    assert required is not None and required.kind == "mtls_required"

    both = all_of(None, source_check(CLIENT), check_for(INTRUDER))
    assert both(tables(deny(INTRUDER.principal))).kind == "denied"


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def test_a_denied_relay_is_closed_and_an_allowed_one_keeps_passing_data():
    live = LiveConnections()
    denied_before = closed_total("denied")
    async with trio.open_nursery() as nursery:
        pods = await nursery.start(trio.serve_tcp, _echo, 0)
        ended: dict[str, object] = {}

        async def proxied(name: str, source: Identity, client_end: trio.SocketStream) -> None:
            pod = await trio.testing.open_stream_to_socket_listener(pods[0])
            async with pod, client_end:
                with live.track(f"{source.uri} -> reviews", check_for(source)) as conn:
                    await relay(client_end, pod)
                ended[name] = conn.closed_by

        clients = {}
        for name, source in (("intruder", INTRUDER), ("frontend", FRONTEND)):
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            app = await trio.testing.open_stream_to_socket_listener(listener)
            proxy_end = await listener.accept()
            await listener.aclose()
            clients[name] = app
            nursery.start_soon(proxied, name, source, proxy_end)

        for app in clients.values():
            await app.send_all(b"ping")
            assert await app.receive_some() == b"ping"
        assert len(live) == 2

        closed = live.reevaluate(tables(deny(INTRUDER.principal)))
        assert [v.kind for v in closed] == ["denied"]
        with trio.fail_after(2):  # the bound
            assert await clients["intruder"].receive_some() == b""
        assert ended["intruder"] is not None and ended["intruder"].kind == "denied"
        assert closed_total("denied") == denied_before + 1
        assert live.closed == {"denied": 1}

        await clients["frontend"].send_all(b"still here")
        assert await clients["frontend"].receive_some() == b"still here"
        assert "frontend" not in ended and len(live) == 1
        assert live.reevaluate(tables(deny(INTRUDER.principal))) == []  # nothing more to close

        for app in clients.values():
            await app.aclose()
        with trio.fail_after(2):
            while len(live):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

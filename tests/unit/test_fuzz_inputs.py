"""Fuzzing what peers send (issue #17 item 8), bounded for the test command.

Each input a peer controls must end in its one documented outcome, never in another exception:

- the HTTP/2 engine (`proxy_http2`): any frames after the preface end the connection or leave
  it serving, and another client of the same engine is still served;
- the config stream (`MessageStream`): any bytes give messages, None (clean close) or WireError;
- snapshots (`SnapshotStore.apply`, `apply_delta`): any corruption of a valid document is
  applied or refused with SnapshotRejected, and a refusal changes nothing.

The HTTP/1.1 engine, its codec, HBONE framing and the Istio resource parser have theirs beside
their other tests (test_http_proxy, test_http_wire, test_hbone_stream, test_istio_schema).
Longer runs: `HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/unit -k fuzz` (50 times
the examples; profiles in tests/conftest.py).
"""

from __future__ import annotations

import copy
import json

import hpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshagent.agent.proxy.http.h2proxy import proxy_http2
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.state import SnapshotRejected, SnapshotStore
from meshagent.common.configwire import MessageStream, WireError
from meshagent.common.h2guard import PREFACE
from meshagent.common.snapshot import (
    Endpoint,
    Service,
    ServicePort,
    Snapshot,
    Workload,
    wire_version,
)

from tests.conftest import fuzz_examples
from tests.unit.test_h2_proxy import HOST, _Lab, _routes

NODE = "node-1"


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=fuzz_examples(examples),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# -- HTTP/2 engine --------------------------------------------------------------------------

_stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1])
_block = hpack.Encoder().encode(
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", HOST)]
)


_TYPES = {
    "data": 0x0,
    "headers": 0x1,
    "priority": 0x2,
    "rst": 0x3,
    "settings": 0x4,
    "ping": 0x6,
    "goaway": 0x7,
    "window": 0x8,
    "continuation": 0x9,
}


def _frame(kind: str, sid: int, flags: int, payload: bytes) -> bytes:
    """One frame as it goes on the wire, well formed or not: any flags, stream id and payload
    (a HEADERS frame mostly carries a real header block)."""
    if kind == "headers" and flags & 0x1:
        payload = _block + payload[:4]
    return (
        len(payload).to_bytes(3, "big")
        + bytes([_TYPES[kind], flags])
        + sid.to_bytes(4, "big")
        + payload
    )


_frames = st.lists(
    st.one_of(
        st.builds(
            _frame,
            st.sampled_from(sorted(_TYPES)),
            _stream_ids,
            st.sampled_from([0x0, 0x1, 0x4, 0x5, 0x8, 0x9, 0x20, 0x25, 0xFF]),
            st.binary(max_size=40),
        ),
        st.binary(min_size=1, max_size=30),  # not a frame at all
    ),
    max_size=14,
)


@fuzz(80)
@given(_frames)
def test_any_frames_end_the_connection_or_are_served_and_others_go_on(frames):
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            lab = _Lab(nursery, _routes("10.1.0.1"))
            client, proxy_end = memory_stream_pair()
            served = trio.Event()

            async def serve() -> None:
                await proxy_http2(proxy_end, lab.ctx)  # returns; never raises
                served.set()
                await proxy_end.aclose()  # what the listener does with a connection served

            nursery.start_soon(serve)
            with trio.fail_after(5):  # the engine ends once the client is gone, whatever it sent
                try:
                    await client.send_all(PREFACE + b"".join(frames))
                    await client.send_eof()
                    while await client.receive_some(65536):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await served.wait()
            headers, body, _ = await lab.call("/other", b"ok")
            assert headers[b":status"] == b"200" and body == b"ok"
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- the config stream ----------------------------------------------------------------------


@fuzz(200)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_any_bytes_on_the_config_stream_give_messages_a_close_or_a_wire_error(chunks):
    async def main() -> list:
        ours, theirs = trio.testing.memory_stream_pair()
        wire = MessageStream(ours)
        for chunk in chunks:
            await theirs.send_all(chunk)
        await theirs.send_eof()
        got: list = []
        with trio.fail_after(2):
            while True:
                try:
                    message = await wire.receive()
                except WireError:
                    return got
                if message is None:
                    return got
                assert isinstance(message, dict) and isinstance(message["type"], str)
                got.append(message)

    trio.run(main)


# -- snapshots ------------------------------------------------------------------------------


def _valid() -> dict:
    pod = Workload(
        uid="u1",
        namespace="shop",
        name="web",
        node=NODE,
        ips=["10.0.1.10"],
        service_account="web",
        labels={"app": "web"},
        meshed=True,
    )
    web = Service(
        namespace="shop",
        name="web",
        vips=["10.96.0.10"],
        ports=[ServicePort(name="http", port=80, target_port=8080)],
        endpoints=[Endpoint(ip="10.0.1.10", node=NODE, workload_uid="u1", ports={80: 8080})],
    )
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
    }
    snap = Snapshot(node=NODE, workloads=[pod], services=[web], istio_resources=[deny])
    return snap.with_version().model_dump(mode="json")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def _paths(doc, prefix=()):
    """Every place in a JSON document a value could be swapped."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


def _replace(doc, path, value):
    if not path:
        return value
    out = copy.deepcopy(doc)
    target = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


@fuzz(150)
@given(data=st.data(), garbage=_json, reversion=st.booleans())
def test_any_corruption_of_a_snapshot_is_applied_or_refused_leaving_the_last_good(
    tmp_path_factory, data, garbage, reversion
):
    good = _valid()
    path = data.draw(st.sampled_from([p for p in _paths(good) if p != ("version",)]))
    bad = _replace(good, path, garbage)
    if reversion and isinstance(bad, dict):  # versioned as sent: only the content is judged
        bad["version"] = wire_version(bad)
    store = SnapshotStore(NODE, tmp_path_factory.mktemp("fuzz"))
    store.apply(good)
    try:
        store.apply(bad)
    except SnapshotRejected:
        assert store.version == good["version"]
        saved = json.loads((store.state_dir / "snapshot.json").read_text())
        assert saved["version"] == good["version"]


@fuzz(150)
@given(changes=st.dictionaries(st.text(max_size=16), _json, max_size=3), base_ok=st.booleans())
def test_any_delta_is_applied_or_refused_leaving_the_last_good(tmp_path_factory, changes, base_ok):
    good = _valid()
    store = SnapshotStore(NODE, tmp_path_factory.mktemp("fuzz"))
    store.apply(good)
    base = good["version"] if base_ok else "nope"
    with pytest.raises(SnapshotRejected):  # a garbage delta never yields the version it claims
        store.apply_delta(base, "0123456789abcdef", changes)
    assert store.version == good["version"]

"""One immutable data-plane view per snapshot, built before the ACK (issue #17 item 6).

The real `SnapshotStore` and config client against a fake controller on loopback: a
snapshot whose trust bundle does not parse is NACKed with the reason, never saved, and the
last good one stays in force, also for a store started again from the saved copy.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio
from meshagent.agent.configclient import ControllerLink, serve_config_client
from meshagent.agent.state import SNAPSHOT_FILE, SnapshotRejected, SnapshotStore
from meshagent.common.configwire import MessageStream
from meshagent.common.snapshot import Snapshot

from tests.certs import TestCA

NODE = "node-1"
BAD_BUNDLE = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


def snapshot(bundle: str | None, **extra) -> dict:
    snap = Snapshot(node=NODE, trust_bundle=bundle, **extra).with_version()
    return snap.model_dump(mode="json")


def test_a_bad_trust_bundle_is_refused_before_anything_changes(tmp_path):
    store = SnapshotStore(NODE, tmp_path)
    seen = []
    store.on_change(seen.append)
    good = snapshot(TestCA().pem.decode())
    store.apply(good)
    for bad in (BAD_BUNDLE, "no PEM here"):
        with pytest.raises(SnapshotRejected, match="trust bundle"):
            store.apply(snapshot(bad))
    assert store.version == good["version"]
    assert len(seen) == 1  # listeners heard of the good one only
    saved = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    assert saved["version"] == good["version"]


def test_the_view_carries_compiled_routes(tmp_path):
    store = SnapshotStore(NODE, tmp_path, root_namespace="mesh-root")
    store.apply(snapshot(None))
    assert store.tables is not None
    assert store.tables.routes.problems == ()


async def test_the_config_client_nacks_a_bad_trust_bundle_and_keeps_the_last_good(tmp_path):
    good = snapshot(TestCA().pem.decode())
    bad = snapshot(BAD_BUNDLE)
    answers: list[dict] = []

    async def controller(stream: trio.SocketStream) -> None:
        wire = MessageStream(stream)
        hello = await wire.receive()
        assert hello is not None and hello["type"] == "hello"
        for snap in (good, bad):
            await wire.send({"type": "snapshot", "version": snap["version"], "snapshot": snap})
            answer = await wire.receive()
            assert answer is not None
            answers.append(answer)
        await trio.sleep_forever()

    store, link = SnapshotStore(NODE, tmp_path), ControllerLink("test")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, controller, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(lambda: serve_config_client(store, "127.0.0.1", port, "token", link))
        with trio.fail_after(10):
            while len(answers) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    assert answers[0] == {"type": "ack", "version": good["version"]}
    assert answers[1]["type"] == "nack" and answers[1]["version"] == bad["version"]
    assert "trust bundle" in answers[1]["error"]
    assert "trust bundle" in link.last_nack
    assert store.version == good["version"]
    assert json.loads((tmp_path / SNAPSHOT_FILE).read_text())["version"] == good["version"]

    restarted = SnapshotStore(NODE, tmp_path)  # the agent started again: the last good one
    assert restarted.load_saved()
    assert restarted.version == good["version"]
    assert restarted.tables is not None
    assert restarted.tables.snapshot.trust_bundle == good["trust_bundle"]

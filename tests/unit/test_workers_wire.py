"""What the agent tells its proxy workers, and what a worker makes of it: certificates from
the real CA through the identity manager, the mirror a worker keeps, the merged status."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import trio
from meshagent.agent.identity import IdentityManager, IdentityUnavailable
from meshagent.agent.identity.manager import WorkloadCert
from meshagent.agent.workers.mirror import IdentityMirror
from meshagent.agent.workers.wire import (
    certs_message,
    merge_status,
    parse_certs,
    snapshot_message,
)
from meshagent.common.spiffe import Identity
from meshagent.controller.ca import CertificateAuthority

from tests.unit.test_identity_manager import FRONTEND, REVIEWS, CASigner


@pytest.fixture
def signer(tmp_path):
    return CASigner(CertificateAuthority.load_or_create(tmp_path / "ca.pem"))


async def test_every_certificate_change_reaches_the_mirror_through_the_wire(signer, nursery):
    manager = IdentityManager(signer)
    mirror = IdentityMirror()
    sent: list[str] = []
    # what the pool does: encode on every change; the worker decodes into its mirror
    manager.on_change(lambda: sent.append(json.dumps(certs_message(manager.current()))))
    await nursery.start(manager.serve)
    manager.set_wanted({FRONTEND, REVIEWS})
    with trio.fail_after(5):
        await manager.wait_for(FRONTEND, 5)
        await manager.wait_for(REVIEWS, 5)
    mirror.replace(parse_certs(json.loads(sent[-1])))
    for identity in (FRONTEND, REVIEWS):
        assert mirror.get(identity) == manager.get(identity)
        assert b"PRIVATE KEY" in mirror.get(identity).key_pem

    manager.set_wanted({REVIEWS})  # a pod left the node: its identity goes from the workers
    mirror.replace(parse_certs(json.loads(sent[-1])))
    assert mirror.get(FRONTEND) is None and mirror.get(REVIEWS) is not None


def _cert(identity: Identity, not_after: datetime) -> WorkloadCert:
    return WorkloadCert(identity, b"chain", b"key", not_after - timedelta(days=1), not_after)


async def test_the_mirror_leaves_out_expired_certificates_and_wait_for_wakes_on_arrival():
    mirror = IdentityMirror()
    past = datetime.now(UTC) - timedelta(seconds=1)
    mirror.replace([_cert(FRONTEND, past)])
    assert mirror.get(FRONTEND) is None
    with pytest.raises(IdentityUnavailable, match="the agent has sent none"):
        await mirror.wait_for(FRONTEND, 0.05)

    fresh = _cert(FRONTEND, datetime.now(UTC) + timedelta(hours=1))
    async with trio.open_nursery() as nursery:
        got: list[WorkloadCert] = []

        async def wait() -> None:
            got.append(await mirror.wait_for(FRONTEND, 5))

        nursery.start_soon(wait)
        await trio.sleep(0.01)
        mirror.replace([fresh])
    assert got == [fresh]


def test_status_of_workers_adds_up():
    a = {
        "proxy": {"active_connections": 2, "accepted_connections": 10, "by_destination": {"x": 3}},
        "inbound": {"refused": {"403": 1}, "peers": {}},
        "tunnels": [{"node": "n2", "connections": 1}],
        "route_problems": ["vs/a: no such host"],
        "authz": {"allowed": 5, "recent_denials": [{"n": 1}]},
    }
    b = {
        "proxy": {"active_connections": 1, "accepted_connections": 4, "by_destination": {"x": 1}},
        "inbound": {"refused": {"403": 2}, "peers": {"spiffe://p": 1}},
        "tunnels": [{"node": "n2", "connections": 1}],
        "route_problems": ["vs/a: no such host"],
        "authz": {"allowed": 1, "recent_denials": [{"n": 2}]},
    }
    merged = merge_status([a, b])
    assert merged["proxy"] == {
        "active_connections": 3,
        "accepted_connections": 14,
        "by_destination": {"x": 4},
    }
    assert merged["inbound"] == {"refused": {"403": 3}, "peers": {"spiffe://p": 1}}
    assert len(merged["tunnels"]) == 2
    assert merged["route_problems"] == ["vs/a: no such host"]
    assert merged["authz"] == {"allowed": 6, "recent_denials": [{"n": 1}, {"n": 2}]}
    assert merge_status([]) == {}


def test_the_snapshot_travels_as_its_own_json():
    message = json.loads(snapshot_message('{"version": "v1", "node": "node-1"}'))
    assert message == {"type": "snapshot", "snapshot": {"version": "v1", "node": "node-1"}}


def test_recent_denials_are_the_newest_of_all_workers_in_time_order():
    old = [{"time": float(t), "n": t} for t in range(0, 40, 2)]  # worker a: 20 older ones
    new = [{"time": 100.0 + t, "n": 100 + t} for t in range(3)]  # worker b: 3 newer ones
    merged = merge_status([{"authz": {"recent_denials": new}}, {"authz": {"recent_denials": old}}])
    denials = merged["authz"]["recent_denials"]
    assert len(denials) == 20
    assert denials[-3:] == new  # the newest survive whatever order the workers answered in
    assert [d["time"] for d in denials] == sorted(d["time"] for d in denials)


def test_each_workers_tunnels_carry_its_index():
    from meshagent.agent.workers.pool import _tag_tunnels

    status = {"tunnels": [{"node": "n2", "connections": 1}], "proxy": {"accepted_connections": 1}}
    tagged = merge_status([_tag_tunnels(status, 0), _tag_tunnels(status, 1)])
    assert [t["worker"] for t in tagged["tunnels"]] == [0, 1]
    assert status["tunnels"] == [{"node": "n2", "connections": 1}]  # the worker's own is intact

"""Leader election and once-only work, against the fake API server over real HTTP: the real
lightkube client reading and writing a coordination.k8s.io/v1 Lease with resourceVersions."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import httpx2
import pytest
import trio
from lightkube import AsyncClient, KubeConfig
from meshagent.controller.leader import LeaderElector, ensure_secret
from meshagent.controller.sources.kubernetes import open_kube_client

from tests.fakes.kube_apiserver import FakeApiServer, open_fake_apiserver

TIMEOUT = 10
NAMESPACE = "meshagent-system"
# Fast but in the same proportions as the defaults (15 s, 10 s, 2 s).
FAST = {"lease_duration": 1, "renew_deadline": 0.6, "retry_period": 0.1}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with open_fake_apiserver() as server:
        yield server


@asynccontextmanager
async def kube(api: FakeApiServer) -> AsyncIterator[AsyncClient]:
    async with open_kube_client(KubeConfig.from_dict(api.kubeconfig())) as client:
        yield client


def elector(client: AsyncClient, identity: str) -> LeaderElector:
    return LeaderElector(client, NAMESPACE, identity, **FAST)


async def until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await trio.sleep(0.01)


def lease(api: FakeApiServer) -> dict:
    (only,) = api.objects("Lease")
    return only


async def campaign(nursery: trio.Nursery, who: LeaderElector, **options) -> trio.CancelScope:
    """Start ``who`` in its own cancel scope, so a test can stop just that replica."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await who.serve(task_status=task_status, **options)

    await nursery.start(run)
    return scope


async def test_one_replica_leads_and_the_other_takes_over_when_it_stops_renewing(api) -> None:
    with trio.fail_after(TIMEOUT):
        async with kube(api) as client, trio.open_nursery() as nursery:
            a, b = elector(client, "meshctl-a"), elector(client, "meshctl-b")
            stop_a = await campaign(nursery, a, release_on_exit=False)
            await campaign(nursery, b)
            assert a.is_leader and not b.is_leader
            assert b.holder == "meshctl-a"
            assert lease(api)["spec"]["holderIdentity"] == "meshctl-a"
            assert lease(api)["spec"]["leaseDurationSeconds"] == 1

            await trio.sleep(0.5)  # a keeps renewing: b stays a follower
            assert a.is_leader and not b.is_leader

            stop_a.cancel()  # a crashes: no release, its Lease just stops being renewed
            stopped = trio.current_time()
            await until(lambda: b.is_leader)
            waited = trio.current_time() - stopped
            assert waited >= 0.8  # b waited for the Lease to expire by its own clock
            assert lease(api)["spec"]["holderIdentity"] == "meshctl-b"
            assert lease(api)["spec"]["leaseTransitions"] == 1
            assert b.status()["leader"] is True
            nursery.cancel_scope.cancel()


async def test_a_leader_that_stops_cleanly_hands_over_at_once(api) -> None:
    with trio.fail_after(TIMEOUT):
        async with kube(api) as client, trio.open_nursery() as nursery:
            a, b = elector(client, "meshctl-a"), elector(client, "meshctl-b")
            stop_a = await campaign(nursery, a)
            await campaign(nursery, b)
            stop_a.cancel()
            stopped = trio.current_time()
            await until(lambda: b.is_leader)
            assert trio.current_time() - stopped < 0.5  # no waiting out the lease duration
            nursery.cancel_scope.cancel()


async def test_replicas_racing_for_the_lease_never_lead_together(api) -> None:
    with trio.fail_after(TIMEOUT):
        async with kube(api) as client, trio.open_nursery() as nursery:
            replicas = [elector(client, f"meshctl-{i}") for i in range(3)]
            for replica in replicas:
                nursery.start_soon(partial(replica.serve))
            for _ in range(100):
                await trio.sleep(0.01)
                assert sum(r.is_leader for r in replicas) <= 1
            assert sum(r.is_leader for r in replicas) == 1
            nursery.cancel_scope.cancel()
    assert api.served[("update", "Lease")] + api.served[("create", "Lease")] >= 1


async def test_a_stale_write_gets_409_conflict(api) -> None:
    created = api.create(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "meshctl", "namespace": NAMESPACE},
            "spec": {"holderIdentity": "x"},
        }
    )
    api.update({**created, "spec": {"holderIdentity": "y"}})  # someone else wrote meanwhile
    url = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/meshctl"
    stale = {**created, "spec": {"holderIdentity": "z"}}
    async with httpx2.AsyncClient(
        base_url=api.url, verify=False, headers={"Authorization": f"Bearer {api.token}"}
    ) as http:
        answer = await http.put(url, content=json.dumps(stale))
    assert (answer.status_code, answer.json()["reason"]) == (409, "Conflict")
    assert lease(api)["spec"]["holderIdentity"] == "y"


async def test_a_leader_that_finds_another_holder_steps_down(api) -> None:
    with trio.fail_after(TIMEOUT):
        async with kube(api) as client, trio.open_nursery() as nursery:
            a = elector(client, "meshctl-a")
            await campaign(nursery, a)
            assert a.is_leader
            taken = lease(api)
            taken["spec"]["holderIdentity"] = "meshctl-intruder"
            api.update(taken)
            await until(lambda: not a.is_leader)
            assert a.holder == "meshctl-intruder"
            nursery.cancel_scope.cancel()


async def test_only_the_leader_creates_the_secret_and_followers_load_it(api) -> None:
    made: list[bytes] = []

    def make() -> bytes:
        made.append(b"ca material %d" % len(made))
        return made[-1]

    with trio.fail_after(TIMEOUT):
        async with kube(api) as client, trio.open_nursery() as nursery:
            a, b = elector(client, "meshctl-a"), elector(client, "meshctl-b")
            await campaign(nursery, b)  # b leads, a is a follower
            got: dict[str, bytes] = {}

            async def load(who: LeaderElector) -> None:
                got[who.identity] = await ensure_secret(
                    client, who, "meshagent-ca", "ca.pem", make, poll=0.05
                )

            async with trio.open_nursery() as both:
                both.start_soon(load, a)
                both.start_soon(load, b)
            assert not a.is_leader
            nursery.cancel_scope.cancel()
    assert made == [b"ca material 0"]
    assert got == {"meshctl-a": made[0], "meshctl-b": made[0]}
    (secret,) = api.objects("Secret")
    assert base64.b64decode(secret["data"]["ca.pem"]) == made[0]


async def test_a_follower_waits_for_the_secret_until_a_leader_makes_it(api) -> None:
    with trio.fail_after(TIMEOUT):
        async with kube(api) as client, trio.open_nursery() as nursery:
            a = elector(client, "meshctl-a")  # not campaigning yet: a follower
            got: list[bytes] = []

            async def load() -> None:
                got.append(await ensure_secret(client, a, "ca", "ca.pem", lambda: b"x", poll=0.05))

            nursery.start_soon(load)
            await trio.sleep(0.3)
            assert got == [] and api.objects("Secret") == []
            await campaign(nursery, a)
            await until(lambda: got)
            assert got == [b"x"]
            nursery.cancel_scope.cancel()


async def test_a_secret_without_the_key_is_a_clear_error(api) -> None:
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "ca", "namespace": NAMESPACE},
            "data": {"other": "eA=="},
        }
    )
    async with kube(api) as client:
        with pytest.raises(ValueError, match=r"Secret meshagent-system/ca has no 'ca.pem' entry"):
            await ensure_secret(client, elector(client, "a"), "ca", "ca.pem", lambda: b"")


def test_timings_must_leave_room_to_renew() -> None:
    with pytest.raises(ValueError, match="lease_duration > renew_deadline"):
        LeaderElector(None, NAMESPACE, "a", lease_duration=2, renew_deadline=3, retry_period=1)  # type: ignore[arg-type]

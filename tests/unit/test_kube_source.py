"""The Kubernetes source against the fake API server: real HTTP, real lightkube client.

Each test changes the fake cluster and checks what the sink (a recording stand-in
for the controller's model) ends up holding, and what the source asked the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from lightkube import KubeConfig
from meshagent.controller.sources.kubernetes import (
    ALL_KINDS,
    KubernetesSourceState,
    backoff_delay,
    serve_kubernetes_source,
)
from prometheus_client import REGISTRY

from tests.fakes.kube_apiserver import ISTIO_GROUPS, FakeApiServer, open_fake_apiserver

TIMEOUT = 10  # seconds; every test finishes far sooner
FAST_BACKOFF = (0.01, 0.05)


class RecordingSink:
    """Keeps the objects like the model does, and the calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.objects: dict[str, dict[tuple[str, str], dict]] = {}

    def replace(self, kind: str, objects: list[dict]) -> None:
        self.calls.append(("replace", kind, sorted(_name(o) for o in objects)))
        self.objects[kind] = {_key(o): o for o in objects}

    def upsert(self, kind: str, obj: dict) -> None:
        self.calls.append(("upsert", kind, _name(obj)))
        self.objects.setdefault(kind, {})[_key(obj)] = obj

    def delete(self, kind: str, obj: dict) -> None:
        self.calls.append(("delete", kind, _name(obj)))
        self.objects.get(kind, {}).pop(_key(obj), None)

    def names(self, kind: str) -> list[str]:
        return sorted(_name(o) for o in self.objects.get(kind, {}).values())

    def calls_for(self, kind: str) -> list[tuple[str, object]]:
        return [(verb, what) for verb, k, what in self.calls if k == kind]


def _key(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _name(obj: dict) -> str:
    return obj["metadata"]["name"]


def pod(name: str, namespace: str = "shop", **labels: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": "node-1", "serviceAccountName": "default"},
        "status": {"podIP": "10.1.0.5"},
    }


def service(name: str, namespace: str = "shop") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"port": 9080}], "clusterIP": "10.96.0.10"},
    }


def authorization_policy(name: str, namespace: str = "shop") -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"action": "DENY", "rules": [{}]},
    }


def restarts(kind: str, reason: str) -> float:
    labels = {"kind": kind, "reason": reason}
    return REGISTRY.get_sample_value("meshagent_controller_watch_restarts_total", labels) or 0.0


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.005)


@asynccontextmanager
async def running_source(
    api: FakeApiServer, sink: RecordingSink, **options
) -> AsyncIterator[KubernetesSourceState]:
    options.setdefault("relist_backoff", FAST_BACKOFF)
    config = KubeConfig.from_dict(api.kubeconfig())
    async with trio.open_nursery() as nursery:
        state = await nursery.start(
            partial(serve_kubernetes_source, sink, client_config=config, **options)
        )
        yield state
        nursery.cancel_scope.cancel()


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with open_fake_apiserver() as server:
        yield server


async def test_initial_list_arrives_whole_through_replace(api: FakeApiServer) -> None:
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    for i in range(40):
        api.create(pod(f"web-{i:02}", app="web"))
    api.create(service("web"))
    policy = authorization_policy("deny-all")
    api.create(policy)
    odd = pod("odd")
    odd["spec"]["fieldFromTheFuture"] = {"kept": True}
    api.create(odd)
    sink = RecordingSink()
    with trio.fail_after(TIMEOUT):
        async with running_source(api, sink) as state:
            assert state.complete
            # Exactly one replace per kind before started, nothing else.
            assert sorted(kind for _, kind, _ in sink.calls) == sorted(ALL_KINDS)
            assert {verb for verb, _, _ in sink.calls} == {"replace"}
            assert sink.names("Pod") == sorted([f"web-{i:02}" for i in range(40)] + ["odd"])
            assert sink.names("Service") == ["web"]
            assert sink.names("Namespace") == ["shop"]
            assert sink.names("AuthorizationPolicy") == ["deny-all"]
            assert sink.names("EndpointSlice") == []
            # Typed lists leave apiVersion/kind out; the sink still gets manifests.
            listed_pod = sink.objects["Pod"][("shop", "odd")]
            assert (listed_pod["apiVersion"], listed_pod["kind"]) == ("v1", "Pod")
            assert listed_pod["spec"]["fieldFromTheFuture"] == {"kept": True}
            assert (
                sink.objects["AuthorizationPolicy"][("shop", "deny-all")]["spec"]
                == (policy["spec"])
            )
            assert state.kinds["Pod"].resource_version == api.resource_version
            assert all(s.synced and s.connected for s in state.kinds.values())


async def test_large_lists_are_paged(api: FakeApiServer) -> None:
    for i in range(25):
        api.create(pod(f"p{i:02}"))
    sink = RecordingSink()
    with trio.fail_after(TIMEOUT):
        async with running_source(api, sink, kinds=["Pod"], list_chunk_size=10):
            pages = [r for r in api.list_requests if r.kind == "Pod"]
            assert [r.limit for r in pages] == [10, 10, 10]
            assert pages[0].continue_token is None
            assert all(r.continue_token for r in pages[1:])
            assert sink.calls == [("replace", "Pod", [f"p{i:02}" for i in range(25)])]


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_changes_arrive_through_the_watch_in_order(tls: bool) -> None:
    sink = RecordingSink()
    with trio.fail_after(TIMEOUT):
        async with open_fake_apiserver(tls=tls) as api, running_source(api, sink) as state:
            api.create(pod("a"))
            api.create(pod("b"))
            api.update(pod("a", version="2"))
            api.delete(pod("b"))
            await wait_until(lambda: len(sink.calls_for("Pod")) == 5)
            assert sink.calls_for("Pod") == [
                ("replace", []),
                ("upsert", "a"),
                ("upsert", "b"),
                ("upsert", "a"),
                ("delete", "b"),
            ]
            assert sink.objects["Pod"][("shop", "a")]["metadata"]["labels"] == {"version": "2"}
            await wait_until(lambda: state.kinds["Pod"].resource_version == api.resource_version)


async def test_bookmark_moves_the_resume_point(api: FakeApiServer) -> None:
    sink = RecordingSink()
    with trio.fail_after(TIMEOUT):
        async with running_source(api, sink, kinds=["Pod", "Service"]) as state:
            listed_at = state.kinds["Pod"].resource_version
            for i in range(3):
                api.create(service(f"s{i}"))  # moves the cluster's version, not the pods'
            await wait_until(lambda: api.open_watches == 2)  # bookmarks reach open watches
            api.bookmark()
            await wait_until(lambda: state.kinds["Pod"].resource_version == api.resource_version)
            assert state.kinds["Pod"].resource_version != listed_at
            assert sink.calls_for("Pod") == [("replace", [])]  # a bookmark is no change
            assert all(r.allow_bookmarks for r in api.watch_requests)

            seen = len(api.watch_requests)
            api.drop_watches()
            await wait_until(lambda: any(r.kind == "Pod" for r in api.watch_requests[seen:]))
            resumed = next(r for r in api.watch_requests[seen:] if r.kind == "Pod")
            assert resumed.resource_version == api.resource_version
            assert api.served[("list", "Pod")] == 1


async def test_dropped_watch_resumes_without_relisting(api: FakeApiServer) -> None:
    api.create(pod("p0"))
    sink = RecordingSink()
    dropped_before = restarts("Pod", "disconnected")
    with trio.fail_after(TIMEOUT):
        async with running_source(api, sink) as state:
            version = state.kinds["Pod"].resource_version
            await wait_until(lambda: api.open_watches == len(ALL_KINDS))
            seen = len(api.watch_requests)
            assert api.drop_watches() == len(ALL_KINDS)
            api.create(pod("late"))  # happen while the source is away
            api.delete(pod("p0"))
            await wait_until(lambda: sink.names("Pod") == ["late"])
            resumed = [r for r in api.watch_requests[seen:] if r.kind == "Pod"]
            assert resumed[0].resource_version == version
            assert api.served[("list", "Pod")] == 1
            assert state.kinds["Pod"].relists == 0
            assert sink.calls_for("Pod")[1:] == [("upsert", "late"), ("delete", "p0")]
            assert restarts("Pod", "disconnected") == dropped_before + 1


async def test_server_side_watch_timeout_reconnects_quietly(api: FakeApiServer) -> None:
    sink = RecordingSink()
    restarts_before = sum(restarts("Pod", r) for r in ("gone", "disconnected", "idle", "error"))
    with trio.fail_after(TIMEOUT):
        async with running_source(api, sink, kinds=["Pod"], watch_timeout=1) as state:
            api.create(pod("a"))
            await wait_until(lambda: sink.names("Pod") == ["a"])
            await wait_until(lambda: len(api.watch_requests) == 2)  # the server ended the first
            assert api.watch_requests[1].resource_version == api.resource_version
            assert api.watch_requests[1].timeout_seconds == 1
            assert state.kinds["Pod"].connected
            assert (
                sum(restarts("Pod", r) for r in ("gone", "disconnected", "idle", "error"))
                == restarts_before
            )


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
async def test_compacted_history_relists_and_loses_no_delete(
    api: FakeApiServer, gone_as_http: bool
) -> None:
    api.gone_as_http = gone_as_http
    for name in ("a", "b", "c"):
        api.create(pod(name))
    sink = RecordingSink()
    gone_before = restarts("Pod", "gone")
    with trio.fail_after(TIMEOUT):
        async with running_source(api, sink) as state:
            await wait_until(lambda: api.open_watches == len(ALL_KINDS))
            api.drop_watches()
            api.delete(pod("b"))  # while away; compaction then forgets the event
            api.create(pod("d"))
            api.compact()
            await wait_until(lambda: state.kinds["Pod"].relists == 1)
            assert sink.names("Pod") == ["a", "c", "d"]
            assert sink.names("Pod") == [_name(o) for o in api.objects("Pod")]
            assert sink.calls_for("Pod")[-1] == ("replace", ["a", "c", "d"])
            assert api.served[("list", "Pod")] == 2
            assert restarts("Pod", "gone") == gone_before + 1
            # ... and it watches again from the new list.
            api.create(pod("e"))
            await wait_until(lambda: sink.names("Pod") == ["a", "c", "d", "e"])


async def test_missing_istio_crds_do_not_block_started() -> None:
    sink = RecordingSink()
    with trio.fail_after(TIMEOUT):
        async with (
            open_fake_apiserver(missing_groups=ISTIO_GROUPS) as api,
            running_source(api, sink, crd_retry=0.05) as state,
        ):
            api.create(pod("web"))
            await wait_until(lambda: sink.names("Pod") == ["web"])
            policy = state.kinds["AuthorizationPolicy"]
            assert (policy.installed, policy.synced, policy.connected) == (False, False, False)
            assert ("replace", []) in sink.calls_for("AuthorizationPolicy")
            assert all(state.kinds[k].synced for k in ("Namespace", "Pod", "Service"))

            for group in ISTIO_GROUPS:  # the CRDs get installed later
                api.install_group(group)
            api.create(authorization_policy("deny-all"))
            await wait_until(lambda: sink.names("AuthorizationPolicy") == ["deny-all"])
            assert policy.installed and policy.synced


async def test_rejected_credentials_hold_back_started_and_say_why() -> None:
    sink = RecordingSink()
    state = KubernetesSourceState(["Pod"])
    with trio.fail_after(TIMEOUT):
        async with open_fake_apiserver() as api, trio.open_nursery() as nursery:
            config = api.kubeconfig()
            config["users"][0]["user"]["token"] = "wrong"
            nursery.start_soon(
                partial(
                    serve_kubernetes_source,
                    sink,
                    kinds=["Pod"],
                    client_config=KubeConfig.from_dict(config),
                    relist_backoff=FAST_BACKOFF,
                    state=state,
                )
            )
            await wait_until(lambda: state.kinds["Pod"].last_error is not None)
            assert "401" in state.kinds["Pod"].last_error
            assert not state.complete
            assert sink.calls == []
            nursery.cancel_scope.cancel()


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n, 0.5, 4.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


async def test_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="Deployment"):
        await serve_kubernetes_source(RecordingSink(), kinds=["Pod", "Deployment"])


async def test_backoff_must_grow() -> None:
    with pytest.raises(ValueError, match="relist_backoff"):
        await serve_kubernetes_source(RecordingSink(), relist_backoff=(5.0, 1.0))

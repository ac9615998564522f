"""Fail mode per namespace (issue #17 item 2): `meshagent.io/fail-mode` on a Namespace, a Pod
label of the same key overriding it, `closed` by default and for any value but `open`;
compiled into each workload of the snapshot, written by the agent into the pod's mesh_netns
entry; the heartbeat that tells the programs the agent is alive beats only while it serves."""

from __future__ import annotations

import threading
import time

import pytest
from meshagent.agent.datapath import maps
from meshagent.agent.heartbeat import Heartbeat
from meshagent.agent.meshing import MeshReconciler
from meshagent.agent.state import SnapshotStore
from meshagent.common.snapshot import Snapshot, Workload
from meshagent.controller.compiler import compile_snapshot, fail_mode
from meshagent.controller.model import ClusterModel

from tests.waiting import wait_until


def namespace(name: str, **labels: str) -> dict:
    labels = {"meshagent.io/mesh": "enabled", **labels}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, ns: str, ip: str, **labels: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name, **labels}},
        "spec": {"nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": ip},
    }


FM = "meshagent.io/fail-mode"


@pytest.mark.parametrize(
    ("ns_mode", "pod_mode", "expected"),
    [
        (None, None, "closed"),  # the default
        ("open", None, "open"),  # the namespace's
        ("closed", None, "closed"),
        ("open", "closed", "closed"),  # the pod's label wins, both ways
        ("closed", "open", "open"),
        (None, "open", "open"),
        ("Open", None, "closed"),  # anything but `open`/`closed` is closed, never open
        ("yes", None, "closed"),
        ("open", "", "closed"),  # a pod label that is set but wrong does not fall back to open
        ("open", "OPEN", "closed"),
    ],
)
def test_label_resolution(ns_mode, pod_mode, expected):
    ns = namespace("shop", **({FM: ns_mode} if ns_mode is not None else {}))
    p = pod("a", "shop", "10.244.1.2", **({FM: pod_mode} if pod_mode is not None else {}))
    assert fail_mode(p, ns) == expected


def test_no_namespace_object_is_closed():
    assert fail_mode(pod("a", "ghost", "10.244.1.2"), None) == "closed"


def model(ns_mode: str | None) -> ClusterModel:
    m = ClusterModel()
    m.replace(
        "Namespace",
        [namespace("shop", **({FM: ns_mode} if ns_mode else {})), namespace("bank")],
    )
    m.replace(
        "Pod",
        [
            pod("web", "shop", "10.244.1.2"),
            pod("batch", "shop", "10.244.1.3", **{FM: "closed"}),
            pod("teller", "bank", "10.244.1.4"),
        ],
    )
    return m


def test_compiler_puts_the_mode_in_each_workload_and_a_label_change_is_a_new_version():
    closed = compile_snapshot(model(None), "node-1")
    opened = compile_snapshot(model("open"), "node-1")
    assert {w.name: w.fail_mode for w in closed.workloads} == {
        "web": "closed",
        "batch": "closed",
        "teller": "closed",
    }
    assert {w.name: w.fail_mode for w in opened.workloads} == {
        "web": "open",  # from shop's label
        "batch": "closed",  # its own label overrides
        "teller": "closed",  # bank says nothing
    }
    assert closed.version != opened.version  # so the change is pushed to the agents


def test_a_snapshot_without_the_field_means_closed():
    """A workload as an older controller wrote it (no fail_mode) is fail-closed."""
    w = Workload.model_validate(
        {"uid": "u", "namespace": "shop", "name": "a", "node": "node-1", "ips": ["10.0.0.1"]}
    )
    assert w.fail_mode == "closed"
    with pytest.raises(ValueError):
        Workload(uid="u", namespace="s", name="a", node="n", ips=["10.0.0.1"], fail_mode="maybe")


def test_flags_in_the_map():
    assert maps.fail_mode_flags("open") == maps.POD_FAIL_OPEN
    assert maps.fail_mode_flags("closed") == 0
    assert maps.fail_mode_flags("whatever") == 0
    assert maps.fail_mode_of(maps.POD_FAIL_OPEN) == "open"
    assert maps.fail_mode_of(0) == "closed"


class FakeMaps:
    """mesh_netns and peer_auth as dicts (the typed operations the reconciler uses)."""

    def __init__(self) -> None:
        self.pods: dict[int, tuple[str, str]] = {}
        self.writes = 0

    def meshed_pods(self):
        return dict(self.pods)

    def set_meshed(self, cookie, ip, fail_mode="closed"):
        self.pods[cookie] = (ip, fail_mode)
        self.writes += 1

    def unset_meshed(self, cookie):
        self.pods.pop(cookie, None)

    def set_peer_auth(self, wanted):
        pass


class FakeScanner:
    def scan(self, wanted):
        cookies = {"10.244.1.2": 102, "10.244.1.3": 103, "10.244.1.4": 104}

        class Found:
            def __init__(self, cookie):
                self.cookie = cookie

        return {ip: Found(cookies[ip]) for ip in wanted if ip in cookies}


def test_reconciler_writes_each_pods_mode_and_rewrites_it_when_it_changes(tmp_path):
    store = SnapshotStore("node-1", tmp_path)
    fake = FakeMaps()
    reconciler = MeshReconciler(store, fake, interval=1.0)
    reconciler.scanner = FakeScanner()
    store.apply(compile_snapshot(model(None), "node-1").model_dump(mode="json"))
    reconciler.reconcile()
    assert fake.pods == {
        102: ("10.244.1.2", "closed"),
        103: ("10.244.1.3", "closed"),
        104: ("10.244.1.4", "closed"),
    }
    writes = fake.writes
    reconciler.reconcile()
    assert fake.writes == writes  # nothing changed, nothing written
    store.apply(compile_snapshot(model("open"), "node-1").model_dump(mode="json"))
    reconciler.reconcile()
    assert fake.pods[102] == ("10.244.1.2", "open")
    assert fake.pods[103] == ("10.244.1.3", "closed")
    assert fake.writes == writes + 1
    assert {p.name: p.fail_mode for p in reconciler.state.pods} == {
        "web": "open",
        "batch": "closed",
        "teller": "closed",
    }


def test_heartbeat_beats_only_while_the_agent_serves():
    beats: list[int] = []
    serving = threading.Event()
    hb = Heartbeat(lambda: beats.append(1), serving.is_set, interval=0.01)
    hb.start()
    try:
        wait_until(lambda: hb.beats, lambda n: n == 0 and not hb.beating, what="not serving yet")
        serving.set()
        wait_until(lambda: len(beats), lambda n: n >= 3, what="beats while serving")
        serving.clear()  # handed over, draining: stops beating
        wait_until(lambda: hb.beating, lambda b: b is False, what="stopped beating")
        stopped_at = len(beats)
        time.sleep(0.1)  # a window in which a running beat would show
        assert len(beats) <= stopped_at + 1
    finally:
        hb.stop()


def test_becoming_ready_beats_at_once_not_an_interval_later():
    """The agent beats as it becomes ready (`beat_now`), before anyone can see it ready: with
    the thread's next beat up to an interval away, a restarted agent looked ready while the
    connect programs still refused its closed pods (a stale beat)."""
    beats: list[int] = []
    ready = False
    hb = Heartbeat(lambda: beats.append(1), lambda: ready, interval=3600)  # no thread beat
    hb.beat_now()
    assert beats == []  # not serving: no beat
    ready = True
    hb.beat_now()
    assert beats == [1] and hb.beats == 1


def test_a_failing_beat_is_logged_once_and_retried(caplog):
    calls: list[int] = []

    def beat():
        calls.append(1)
        if len(calls) < 5:
            raise OSError("EBADF")

    hb = Heartbeat(beat, lambda: True, interval=0.01)
    hb.start()
    try:
        wait_until(lambda: hb.beats, what="a beat written after failures")
    finally:
        hb.stop()
    assert sum("cannot write the heartbeat" in r.message for r in caplog.records) == 1


def test_snapshot_schema_round_trip_keeps_the_mode():
    snap = compile_snapshot(model("open"), "node-1")
    again = Snapshot.model_validate(snap.model_dump(mode="json"))
    assert again.version == snap.version == again.content_version()
    assert {w.name: w.fail_mode for w in again.workloads}["web"] == "open"


def test_the_agent_beats_only_while_its_proxy_takes_the_nodes_connections():
    from types import SimpleNamespace

    from meshagent.agent import handover
    from meshagent.agent.run import Agent
    from meshagent.agent.workers.pool import WorkerPool

    def serves(**state) -> bool:
        agent = SimpleNamespace(
            ready=True, draining=False, phase=handover.Phase.OWNER, dataplane=None
        )
        for key, value in state.items():
            setattr(agent, key, value)
        return Agent._serves_node(agent)

    pool = WorkerPool.__new__(WorkerPool)  # only its worker slots matter here
    pool.workers = [SimpleNamespace(pid=0), SimpleNamespace(pid=0)]
    assert serves()
    assert serves(phase=handover.Phase.SUCCESSOR_STARTING)  # the old one serves until then
    assert not serves(ready=False)  # starting: nothing listens yet
    assert not serves(draining=True)  # SIGTERM: stopped accepting
    assert not serves(phase=handover.Phase.HANDED_OVER)  # the newer agent beats
    assert not serves(dataplane=pool)  # every worker dead
    pool.workers[1].pid = 4242
    assert serves(dataplane=pool)

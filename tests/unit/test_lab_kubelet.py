"""The lab on a real control plane, the parts that are pure logic: where the scheduler puts a
pod, what `meshlab apply` adds to a Pod the API requires, the pods' hosts files from the API's
Services, how the lab knows EndpointSlices caught up with the pods, and the order in which the
kubelet writes a pod's status."""

from __future__ import annotations

import socket
import threading

import pytest
from meshagent.lab import lab
from meshagent.lab.kubelet import Hub, NodeKubelet, forwarder_socket, is_agent, least_loaded
from meshagent.lab.topology import PodPlan, hosts_for, make_nodes


def _pod(name: str, node: str | None = None, **meta) -> dict:
    spec = {"nodeName": node} if node else {}
    return {"metadata": {"name": name, "namespace": "shop", **meta}, "spec": spec}


def test_the_least_loaded_node_first_agents_and_deleted_pods_do_not_count():
    nodes = make_nodes(3)
    assert least_loaded(nodes, []).name == "node-1"
    pods = [_pod("a", "node-1"), _pod("b", "node-2")]
    assert least_loaded(nodes, pods).name == "node-3"
    pods += [
        _pod("agent", "node-3", annotations={"meshlab.io/runs": "agent"}),
        _pod("going", "node-3", deletionTimestamp="2026-01-01T00:00:00Z"),
        _pod("unbound"),
    ]
    assert is_agent(pods[2])
    assert least_loaded(nodes, pods).name == "node-3"


def test_pods_get_the_image_and_container_names_the_api_requires():
    obj = {
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"command": ["sleep", "1"]}, {"name": "x", "image": "y"}]},
    }
    out = lab._pod_defaults(obj)
    assert out["spec"]["containers"][0] == {
        "command": ["sleep", "1"],
        "name": "main",
        "image": lab.DEFAULT_IMAGE,
    }
    assert out["spec"]["containers"][1] == {"name": "x", "image": "y"}
    assert "image" not in obj["spec"]["containers"][0]  # the caller's object is left alone


def test_hosts_list_every_vip_of_the_apis_services_and_skip_headless_ones():
    pod = PodPlan("shop", "frontend", "node-1", "10.244.1.10", {})
    services = [
        {
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:10:96::20"]},
        },
        {
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1"},
        },
        {"metadata": {"name": "headless", "namespace": "shop"}, "spec": {"clusterIP": "None"}},
    ]
    lines = hosts_for(pod, services).splitlines()
    assert "10.244.1.10 frontend" in lines
    assert "10.96.0.20 web web.shop web.shop.svc web.shop.svc.cluster.local" in lines
    assert "fd00:10:96::20 web web.shop web.shop.svc web.shop.svc.cluster.local" in lines
    assert (
        "10.96.0.1 kubernetes.default kubernetes.default.svc kubernetes.default.svc.cluster.local"
        in lines
    )
    assert not any("headless" in line for line in lines)


def test_a_service_that_comes_while_a_pod_starts_is_in_the_pods_hosts_file(monkeypatch):
    """A pod's start reads the Services, then writes its hosts file; a Service event in between
    must not leave the file without the Service (a CI run once could not resolve a Service
    for the whole test: the file kept what the start had read)."""
    files: dict[str, str] = {}
    writing, release = threading.Event(), threading.Event()

    def write_hosts(pod: PodPlan, text: str) -> None:
        if not writing.is_set():  # the start's write: held until the event came
            writing.set()
            assert release.wait(10)
        files[pod.key] = text

    monkeypatch.setattr(lab, "write_hosts", write_hosts)
    hub = Hub()
    pod = PodPlan("shop", "frontend", "node-1", "10.244.1.10", {})
    web = {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.20"}}
    start = threading.Thread(target=hub.host, args=(pod,))
    start.start()
    assert writing.wait(10)
    event = threading.Thread(target=hub.service_event, args=("ADDED", web))
    event.start()
    event.join(0.5)  # it could run to its end now, if nothing held it back
    release.set()
    start.join(10)
    event.join(10)
    assert "10.96.0.20 web" in files["shop/frontend"]
    hub.forget(pod)
    hub.service_event("DELETED", web)
    assert "10.96.0.20 web" in files["shop/frontend"]  # a removed pod's file is left alone


class _Api:
    def __init__(self, pods, slices, services) -> None:
        self.answers = {
            "/api/v1/pods": pods,
            "/apis/discovery.k8s.io/v1/endpointslices": slices,
            "/api/v1/services": services,
        }

    def get(self, path: str) -> dict:
        return {"items": self.answers[path]}


def _ready_pod(name: str, ips: list[str], ready: bool = True) -> dict:
    return {
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "status": {
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_endpoints_are_behind_until_the_slices_list_exactly_the_ready_pods():
    service = {
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "clusterIPs": ["10.96.0.20"]},
    }
    pods = [_ready_pod("a", ["10.244.1.10", "fd00::a"]), _ready_pod("b", ["10.244.1.11"], False)]

    def slice_with(*addresses: str) -> dict:
        return {
            "metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        }

    assert lab.endpoints_behind(_Api(pods, [], [service])) == ["shop/web"]
    assert lab.endpoints_behind(_Api(pods, [slice_with("10.244.1.10")], [service])) == []
    stale = [slice_with("10.244.1.10", "10.244.1.11")]
    assert lab.endpoints_behind(_Api(pods, stale, [service])) == ["shop/web"]


def test_a_pod_the_kubelet_calls_ready_is_waited_for_until_the_api_says_so_too():
    """`meshlab up` and `apply` return only once the Pod objects are Ready: EndpointSlices (and
    so the mesh's endpoints) follow the API, not the kubelet's own state."""
    pods = [_ready_pod("a", ["10.244.1.10"]), _ready_pod("b", ["10.244.1.11"], False)]
    for pod, uid in zip(pods, ("uid-a", "uid-b"), strict=True):
        pod["metadata"]["uid"] = uid
    api = _Api(pods, [], [])
    assert lab.not_ready_in_api(api, {"shop/a": "uid-a"}) == []
    assert lab.not_ready_in_api(api, {"shop/a": "uid-a", "shop/b": "uid-b"}) == ["shop/b"]
    # an older incarnation of the name, or none at all, is not the pod waited for
    assert lab.not_ready_in_api(api, {"shop/a": "uid-new", "shop/c": "uid-c"}) == [
        "shop/a",
        "shop/c",
    ]


class _StatusApi:
    """Pod status writes as the API applies them: the first one is held on its way until
    `release` (a slow request), `fail` makes the next one fail as a refused request would."""

    def __init__(self, hold_first: bool = False) -> None:
        self.ready_written: list[bool] = []  # the Ready condition of each write, as it landed
        self.holding = threading.Event()
        self.release = threading.Event()
        self.hold_first = hold_first
        self.fail = False

    def merge_patch(self, path: str, patch: dict) -> dict:
        if self.hold_first:
            self.hold_first = False
            self.holding.set()
            assert self.release.wait(10)
        if self.fail:
            self.fail = False
            raise OSError("connection reset")
        (ready,) = [c for c in patch["status"]["conditions"] if c["type"] == "Ready"]
        self.ready_written.append(ready["status"] == "True")
        return patch


def _probed_pod(probe: bool = True) -> PodPlan:
    container = {"name": "s", "readinessProbe": {"tcpSocket": {"port": 8080}}} if probe else {}
    return PodPlan("shop", "web", "node-1", "10.244.1.10", {"spec": {"containers": [container]}})


def test_a_probe_answering_while_the_start_still_writes_not_ready_leaves_the_pod_ready():
    """The start's "not Ready" write is slow; the probe answers meanwhile. Its "Ready" must land
    after, not before (a Pod left not Ready gets no endpoints: the mesh answers 503)."""
    api = _StatusApi(hold_first=True)
    kubelet = NodeKubelet(make_nodes(1)[0], api, hub=None)
    pod = _probed_pod()
    start = threading.Thread(target=kubelet._report, args=(pod,))
    start.start()
    assert api.holding.wait(10)
    pod.probed = True  # what the probe thread does before it writes
    probed = threading.Thread(target=kubelet._report, args=(pod,))
    probed.start()
    probed.join(timeout=0.5)  # room for the probe's write to overtake the held one
    api.release.set()
    start.join(10)
    probed.join(10)
    assert api.ready_written == [False, True]
    assert kubelet.written[pod.key] is True


def test_a_status_write_that_failed_is_written_again_by_the_next_probe_pass():
    api = _StatusApi()
    kubelet = NodeKubelet(make_nodes(1)[0], api, hub=None)
    pod = _probed_pod(probe=False)  # no readiness probe: Ready at once
    kubelet.pods[pod.key] = pod
    api.fail = True
    kubelet._report(pod)
    assert api.ready_written == [] and kubelet.written[pod.key] is None
    kubelet.probe_once()
    assert api.ready_written == [True]
    kubelet.probe_once()  # written: nothing more to say
    assert api.ready_written == [True]


def test_a_terminating_pod_is_never_written_ready():
    api = _StatusApi()
    kubelet = NodeKubelet(make_nodes(1)[0], api, hub=None)
    pod = _probed_pod()
    pod.probed = True
    kubelet.pods[pod.key] = pod
    kubelet.terminating.add(pod.key)
    kubelet._report(pod)
    kubelet.probe_once()
    assert api.ready_written == [False]


def test_a_taken_forwarder_port_ends_the_kubelet_start_with_the_port_named():
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port}"):
            forwarder_socket(port)
    finally:
        taken.close()
    free = forwarder_socket(port)  # and once it is free, it listens
    try:
        assert free.getsockname() == ("127.0.0.1", port)
    finally:
        free.close()

"""The lab kubelet: runs the Pods the lab's kube-apiserver binds to the lab's nodes.

One detached process for the whole lab (`python -m meshagent.lab.kubelet run`, started by
`meshlab up` in the lab cgroup's ``system/kubelet``), with, in threads:

- one kubelet per node, with that node's own credential (``system:node:<node>``, so the
  Node authorizer and NodeRestriction hold it to its node's pods). It watches the Pods bound
  to its node; a new one gets the node's first free pod IP (pods are numbered in the order
  the API created them, as `lab/topology.py` plans), its network namespace and veth
  (lab/net.py), its ``/etc/hosts`` (from the API's Services), its process in its cgroup
  (lab/cgroups.py) logging to ``logs/pod-<ns>-<name>.log``; then its status: podIP and
  podIPs (both families), hostIP, phase Running, Ready once its readiness probe (tcpSocket
  or httpGet port) accepts. A Pod being deleted is marked not Ready at once, its processes
  get SIGTERM, SIGKILL once the grace period (``deletionGracePeriodSeconds``) is over, its
  network and cgroup are removed, then the object is deleted with grace 0. The lab's agents
  (Pods annotated ``meshlab.io/runs: agent``) are run by `meshlab` itself: the kubelet only
  reports them Running on the node's address;
- the scheduler (there is no kube-scheduler): a Pod without ``spec.nodeName`` is bound
  (pods/binding) to the node with the fewest pods, the lowest index first, among the nodes its
  nodeSelector, required node affinity and tolerations allow (lab/placement.py; a DaemonSet's
  pods name their node so) (`meshlab apply` places its own pods the same way);
- a watch of Services that rewrites the pods' ``/etc/hosts`` when a VIP comes or goes;
- a loopback forwarder: kubectl on the host reaches the apiserver (which listens in the lab's
  underlay namespace) at ``127.0.0.1:<port>`` of `meshlab kubeconfig`.

The pods it runs are recorded in the lab's state file (``pods``), for `meshlab exec`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from meshagent.common.netns import entered
from meshagent.lab import cgroups, lab, net, placement, probe
from meshagent.lab.kubeapi import ApiError, KubeApi
from meshagent.lab.paths import ETC_NETNS, KUBE_DIR, NETNS_DIR, RUN_DIR
from meshagent.lab.topology import (
    APISERVER_PORT,
    FIRST_POD_HOST,
    UNDERLAY_BRIDGE_IP,
    UNDERLAY_NETNS,
    NodePlan,
    PodPlan,
    hosts_for,
)

log = logging.getLogger("meshlab.kubelet")

AGENT_ANNOTATION = "meshlab.io/runs"
DEFAULT_GRACE = 30
PROBE_PERIOD = 0.1
RETRY = 0.5
READY_FILE = RUN_DIR / "kubelet.ready"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_agent(pod: dict) -> bool:
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(AGENT_ANNOTATION) == "agent"


def key_of(pod: dict) -> str:
    meta = pod["metadata"]
    return f"{meta.get('namespace', 'default')}/{meta['name']}"


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


def node_kubeconfig(node: str) -> Path:
    return KUBE_DIR / "kubeconfigs" / f"system_node_{node}.kubeconfig"


def least_loaded(nodes: list[NodePlan], pods: Iterable[dict]) -> NodePlan:
    """The node with the fewest lab pods (not agents, not being deleted), lowest index first."""
    load = {n.name: 0 for n in nodes}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node in load and not is_agent(pod) and not pod["metadata"].get("deletionTimestamp"):
            load[node] += 1
    return min(nodes, key=lambda n: (load[n.name], n.index))


def place(
    pod: dict, nodes: list[NodePlan], node_objects: dict[str, dict], pods: Iterable[dict]
) -> NodePlan | None:
    """Where a Pod without a node goes: the least loaded of the nodes whose Node object it
    fits (lab/placement.py), None when it fits none. The scheduler and `meshlab apply`."""
    allowed = [
        n for n in nodes if n.name in node_objects and placement.fits(pod, node_objects[n.name])
    ]
    return least_loaded(allowed, pods) if allowed else None


def informer(
    api: KubeApi,
    path: str,
    on_list: Callable[[list[dict]], None],
    on_event: Callable[[str, dict], None],
    what: str,
    **query: str,
) -> None:
    """List then watch ``path`` forever: `on_list` with every full list (at start and after
    a watch expired), `on_event` with each change."""
    while True:
        try:
            listing = api.get(path, **query)
            on_list(listing.get("items") or [])
            version = listing["metadata"]["resourceVersion"]
            while True:
                for event in api.watch(path, version, **query):
                    if event["type"] == "ERROR":
                        raise ApiError(event["object"].get("code", 410), "watch expired")
                    version = event["object"]["metadata"].get("resourceVersion", version)
                    if event["type"] != "BOOKMARK":
                        on_event(event["type"], event["object"])
        except Exception as exc:  # a kubelet keeps going, as the real one
            log.warning("%s: %s; listing again", what, exc)
            time.sleep(RETRY)


class Hub:
    """What the node kubelets share: the pods they run (the state file), the Services, and the
    pods whose hosts files follow those Services."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.kubelets: list[NodeKubelet] = []
        self.services: dict[str, dict] = {}
        self.hosted: dict[str, PodPlan] = {}  # by ns/name: the pods whose hosts files we keep

    def save(self) -> None:
        with self.lock:
            pods = [p for k in self.kubelets for p in k.pods.values()]
            lab.save_pods(pods)

    def host(self, pod: PodPlan) -> None:
        """Write the pod's hosts file and keep it current from now on. The file is written
        under the lock that a Service event takes too: a pod starting while a Service came
        could otherwise write the Services it read before the event after the event's rewrite
        had passed it by, and keep a name unresolved until the next Service change."""
        with self.lock:
            self.hosted[pod.key] = pod
            self._write(pod)

    def forget(self, pod: PodPlan) -> None:
        """Stop keeping the pod's hosts file (it is being removed)."""
        with self.lock:
            if self.hosted.get(pod.key) is pod:
                del self.hosted[pod.key]

    def services_listed(self, items: list[dict]) -> None:
        with self.lock:
            self.services = {key_of(s): s for s in items}
            self._rewrite()

    def service_event(self, kind: str, svc: dict) -> None:
        with self.lock:
            if kind == "DELETED":
                self.services.pop(key_of(svc), None)
            else:
                self.services[key_of(svc)] = svc
            self._rewrite()

    def _rewrite(self) -> None:
        for pod in list(self.hosted.values()):
            self._write(pod)

    def _write(self, pod: PodPlan) -> None:
        lab.write_hosts(pod, hosts_for(pod, list(self.services.values())))


class NodeKubelet:
    def __init__(self, node: NodePlan, api: KubeApi, hub: Hub) -> None:
        self.node = node
        self.api = api
        self.hub = hub
        self.pods: dict[str, PodPlan] = {}  # running here, by ns/name
        self.terminating: set[str] = set()
        self.reported_agents: set[str] = set()
        self.lock = threading.RLock()
        # One status write at a time, each built from the pod's state when its turn comes, and
        # the Ready value the API last took from each pod (None: the write failed).
        self.status_lock = threading.Lock()
        self.written: dict[str, bool | None] = {}
        self.synced = threading.Event()  # the first list is handled: watching now

    # -- the watch
    def run(self) -> None:
        informer(
            self.api,
            "/api/v1/pods",
            self.listed,
            self.event,
            f"pods of {self.node.name}",
            fieldSelector=f"spec.nodeName={self.node.name}",
        )

    def listed(self, items: list[dict]) -> None:
        seen = {key_of(p): p for p in items}
        with self.lock:
            gone = [p for k, p in self.pods.items() if k not in seen]
        for pod in gone:
            self._stop(pod, grace=0, delete=False)
        # in the order they were created, as far as the list tells (a restarted kubelet)
        for item in sorted(items, key=lambda p: p["metadata"].get("creationTimestamp", "")):
            self.event("MODIFIED", item)
        self.synced.set()

    def event(self, kind: str, obj: dict) -> None:
        key = key_of(obj)
        if is_agent(obj):
            if kind != "DELETED" and obj["metadata"]["uid"] not in self.reported_agents:
                self._report_agent(obj)
            return
        uid = obj["metadata"]["uid"]
        with self.lock:
            running = self.pods.get(key)
        if kind == "DELETED":
            if running is not None and running.uid == uid and key not in self.terminating:
                self._stop(running, grace=0, delete=False)  # force-deleted
            return
        if running is not None and running.uid != uid:  # an older incarnation of the name
            self._stop(running, grace=0, delete=False)
            running = None
        if obj["metadata"].get("deletionTimestamp"):
            if running is None:
                self.api.delete(pod_path(*key.split("/")), grace=0, uid=uid)
            elif key not in self.terminating:
                grace = obj["metadata"].get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = (obj.get("spec") or {}).get("terminationGracePeriodSeconds")
                self.terminating.add(key)
                threading.Thread(
                    target=self._stop,
                    args=(running, DEFAULT_GRACE if grace is None else int(grace), True),
                    daemon=True,
                ).start()
            return
        if running is None:
            self._start(obj)
        else:
            running.manifest = _manifest(obj)

    # -- starting
    def _free_ip(self) -> str:
        with self.lock:
            used = {p.ip for p in self.pods.values()}
        for host in range(FIRST_POD_HOST, 255):
            ip = f"{self.node.gateway.rsplit('.', 1)[0]}.{host}"
            if ip not in used:
                return ip
        raise RuntimeError(f"node {self.node.name} has no free pod IP")

    def _start(self, obj: dict) -> None:
        meta = obj["metadata"]
        pod = PodPlan(
            meta.get("namespace", "default"),
            meta["name"],
            self.node.name,
            self._free_ip(),
            _manifest(obj),
            uid=meta["uid"],
        )
        with contextlib.suppress(OSError):
            net.delete_pod(pod)  # a leftover of a crashed kubelet
        net.create_pod(pod, self.node)
        self.hub.host(pod)
        with self.lock:
            self.pods[pod.key] = pod
        self.hub.save()
        lab.start_pod(pod)
        log.info("started %s on %s at %s", pod.key, self.node.name, pod.ip)
        self._report(pod)

    def _report(self, pod: PodPlan, ready: bool | None = None) -> None:
        """Write the pod's status: Ready as ``ready``, else as its probe says (never while it
        terminates). Writes are serialized and each reads the pod's state once its turn came:
        a merge patch carries no order, so the start's "not Ready" sent beside the probe's
        "Ready" could land last, and the API kept a probed pod not Ready for good (no
        endpoints: the mesh answered 503 "no healthy upstream" to the first requests)."""
        with self.status_lock:
            if ready is None:
                ready = pod.ready and pod.key not in self.terminating
            try:
                self.api.merge_patch(
                    f"{pod_path(pod.namespace, pod.name)}/status",
                    {"status": self._status(pod, ready)},
                )
            except (ApiError, OSError) as exc:
                self.written[pod.key] = None  # the probe loop writes it again
                log.warning("status of %s: %s", pod.key, exc)
            else:
                self.written[pod.key] = ready

    def _status(self, pod: PodPlan, ready: bool) -> dict:
        flag = "True" if ready else "False"
        containers = (pod.manifest.get("spec") or {}).get("containers") or []
        status = {
            "phase": "Running",
            "hostIP": self.node.underlay_ip,
            "hostIPs": [{"ip": self.node.underlay_ip}, {"ip": self.node.underlay_ip6}],
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}, {"ip": pod.ip6}],
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": flag},
                {"type": "Ready", "status": flag},
            ],
            "containerStatuses": [
                {
                    "name": c.get("name", "main"),
                    "image": c.get("image", "meshlab"),
                    "imageID": "",
                    "ready": ready,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": pod.manifest.get("started", now())}},
                }
                for c in containers
            ],
        }
        return status

    def _report_agent(self, obj: dict) -> None:
        meta = obj["metadata"]
        ip = self.node.underlay_ip
        status = {
            "phase": "Running",
            "hostIP": ip,
            "podIP": ip,
            "podIPs": [{"ip": ip}, {"ip": self.node.underlay_ip6}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {
                    "name": c.get("name", "agent"),
                    "image": c.get("image", "meshagent"),
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now()}},
                }
                for c in (obj.get("spec") or {}).get("containers") or []
            ],
        }
        try:
            self.api.merge_patch(
                f"{pod_path(meta['namespace'], meta['name'])}/status", {"status": status}
            )
            self.reported_agents.add(meta["uid"])
        except (ApiError, OSError) as exc:
            log.warning("status of agent pod %s: %s", meta["name"], exc)

    # -- probing
    def probe_forever(self) -> None:
        while True:
            self.probe_once()
            time.sleep(PROBE_PERIOD)

    def probe_once(self) -> None:
        """Probe the running pods not Ready yet; write again a status the API did not take."""
        with self.lock:
            running = [p for p in self.pods.values() if p.key not in self.terminating]
        for pod in running:
            if not pod.ready and probe.tcp_open(self.node.netns, pod.ip, pod.readiness_port, 0.5):
                pod.probed = True
                self.hub.save()
                self._report(pod)
                log.info("%s ready", pod.key)
            elif pod.key in self.written and self.written[pod.key] != pod.ready:
                self._report(pod)

    # -- stopping
    def _stop(self, pod: PodPlan, grace: int, delete: bool) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds, remove the pod's network and cgroup; then
        (``delete``) remove the object, as the kubelet does once the containers are gone."""
        try:
            if grace > 0:
                self._report(pod, ready=False)
            cg = cgroups.pod_cgroup(pod.node, pod.namespace, pod.name)
            if grace > 0:
                for pid in cgroups.pids(cg):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + grace
                while cgroups.populated(cg) and time.monotonic() < deadline:
                    time.sleep(0.05)
            cgroups.kill_tree(cg)
            cgroups.remove_tree(cg)
            with contextlib.suppress(OSError):
                net.delete_pod(pod)
            self.hub.forget(pod)
            shutil.rmtree(ETC_NETNS / pod.netns, ignore_errors=True)
            with self.lock:
                if self.pods.get(pod.key) is pod:
                    del self.pods[pod.key]
                    self.written.pop(pod.key, None)
            self.hub.save()
            log.info("stopped %s (grace %ds)", pod.key, grace)
            if delete:
                self.api.delete(pod_path(pod.namespace, pod.name), grace=0, uid=pod.uid)
        except Exception:
            log.exception("stopping %s", pod.key)
        finally:
            self.terminating.discard(pod.key)


def _manifest(obj: dict) -> dict:
    meta = obj["metadata"]
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace", "default"),
            "labels": meta.get("labels") or {},
            "uid": meta["uid"],
        },
        "spec": obj.get("spec") or {},
        "started": (obj.get("status") or {}).get("startTime") or now(),
    }


class Scheduler:
    """Binds Pods without a node, in the order they came, to the least loaded lab node among
    those kube-scheduler's filters allow (lab/placement.py); a Pod no node fits stays
    pending until a node changes."""

    def __init__(self, nodes: list[NodePlan], api: KubeApi) -> None:
        self.nodes = nodes
        self.api = api
        self.pods: dict[str, dict] = {}
        self.node_objects: dict[str, dict] = {}
        self.unplaced: set[str] = set()  # pods no node fits (logged once)
        self.lock = threading.RLock()
        self.nodes_synced = threading.Event()

    def run(self) -> None:
        threading.Thread(
            target=informer,
            args=(self.api, "/api/v1/nodes", self.nodes_listed, self.node_event, "nodes"),
            daemon=True,
        ).start()
        self.nodes_synced.wait()  # labels and taints known before the first pod is placed
        informer(self.api, "/api/v1/pods", self.listed, self.event, "scheduler")

    def nodes_listed(self, items: list[dict]) -> None:
        with self.lock:
            self.node_objects = {n["metadata"]["name"]: n for n in items}
        self.nodes_synced.set()
        self._retry_pending()

    def node_event(self, kind: str, node: dict) -> None:
        with self.lock:
            if kind == "DELETED":
                self.node_objects.pop(node["metadata"]["name"], None)
            else:
                self.node_objects[node["metadata"]["name"]] = node
        self._retry_pending()

    def listed(self, items: list[dict]) -> None:
        with self.lock:
            self.pods = {key_of(p): p for p in items}
            for item in items:
                self._bind_if_due(item)

    def event(self, kind: str, obj: dict) -> None:
        with self.lock:
            if kind == "DELETED":
                self.pods.pop(key_of(obj), None)
                self.unplaced.discard(key_of(obj))
                return
            self.pods[key_of(obj)] = obj
            self._bind_if_due(obj)

    def _retry_pending(self) -> None:
        with self.lock:
            for obj in list(self.pods.values()):
                self._bind_if_due(obj)

    def _bind_if_due(self, obj: dict) -> None:
        spec, meta = obj.get("spec") or {}, obj["metadata"]
        if spec.get("nodeName") or meta.get("deletionTimestamp"):
            return
        node = place(obj, self.nodes, self.node_objects, self.pods.values())
        if node is None:
            if key_of(obj) not in self.unplaced:
                self.unplaced.add(key_of(obj))
                log.warning("no node fits %s: %s; pending", key_of(obj), placement.NO_NODE_FITS)
                self._mark_unschedulable(meta)
            return
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default")},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node.name},
        }
        try:
            self.api.create(f"{pod_path(meta['namespace'], meta['name'])}/binding", binding)
            spec["nodeName"] = node.name  # counted at once for the next one
            obj["spec"] = spec
            self.unplaced.discard(key_of(obj))
            log.info("bound %s to %s", key_of(obj), node.name)
        except ApiError as exc:
            log.warning("binding %s: %s", key_of(obj), exc)

    def _mark_unschedulable(self, meta: dict) -> None:
        """Say why the pod stays Pending where `kubectl get/describe pod` shows it, as
        kube-scheduler does (PodScheduled=False, reason Unschedulable)."""
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": f"0/{len(self.nodes)} nodes are available: {placement.NO_NODE_FITS}",
            "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        try:
            self.api.merge_patch(
                f"{pod_path(meta['namespace'], meta['name'])}/status",
                {"status": {"phase": "Pending", "conditions": [condition]}},
            )
        except (ApiError, OSError) as exc:
            log.warning("status of %s/%s: %s", meta["namespace"], meta["name"], exc)


# -- the loopback forwarder for kubectl ------------------------------------------------------


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket) -> None:
    try:
        with entered(str(NETNS_DIR / UNDERLAY_NETNS)):
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.settimeout(10)
        upstream.connect((UNDERLAY_BRIDGE_IP, APISERVER_PORT))
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def forwarder_socket(port: int) -> socket.socket:
    """The listening socket of kubectl's forwarder, bound before the kubelet says it is ready:
    a port taken meanwhile fails the start (`meshlab up` shows the log) instead of a thread."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("127.0.0.1", port))
    except OSError as exc:
        server.close()
        raise SystemExit(f"kubectl's forwarder cannot listen on 127.0.0.1:{port}: {exc}") from exc
    server.listen(64)
    return server


def forward(server: socket.socket) -> None:
    """Relay each connection to ``server`` (127.0.0.1 on the host) to the apiserver in the
    underlay namespace."""
    while True:
        client, _ = server.accept()
        threading.Thread(target=_relay, args=(client,), daemon=True).start()


# -- entry points ----------------------------------------------------------------------------


def _exit_on_thread_death(args: threading.ExceptHookArgs) -> None:
    """A kubelet thread that dies would leave a lab that looks up but no longer places,
    starts, probes or reports pods: end the whole process, loudly, instead."""
    log.critical(
        "lab kubelet thread %s died; exiting",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
    logging.shutdown()
    os._exit(70)


def run() -> None:
    """The kubelet process: every node's kubelet, the scheduler, the hosts files, the
    forwarder; runs until killed."""
    state = lab.load_state()
    nodes = lab.make_nodes(state["nodes"])
    hub = Hub()
    threading.excepthook = _exit_on_thread_death
    forwarder = forwarder_socket(state["api_host_port"])
    threads = [threading.Thread(target=forward, args=(forwarder,), daemon=True)]
    admin = lab.admin_api()
    for node in nodes:
        api = KubeApi.from_kubeconfig(node_kubeconfig(node.name), netns=lab.UNDERLAY_NETNS_PATH)
        kubelet = NodeKubelet(node, api, hub)
        hub.kubelets.append(kubelet)
        threads += [
            threading.Thread(target=kubelet.run, daemon=True),
            threading.Thread(target=kubelet.probe_forever, daemon=True),
        ]
    threads.append(threading.Thread(target=Scheduler(nodes, admin).run, daemon=True))
    threads.append(
        threading.Thread(
            target=informer,
            args=(admin, "/api/v1/services", hub.services_listed, hub.service_event, "services"),
            daemon=True,
        )
    )
    for thread in threads:
        thread.start()
    for kubelet in hub.kubelets:
        kubelet.synced.wait()
    READY_FILE.touch()  # `meshlab up` creates its pods once every node's kubelet watches
    log.info("lab kubelet running for %s", ", ".join(n.name for n in nodes))
    while True:
        time.sleep(3600)


def start_control_plane() -> None:
    """Start etcd, kube-apiserver and kube-controller-manager (run inside the underlay
    namespace); exit once the apiserver is ready, leaving them running."""
    from meshagent.lab.kubecontrol import ControlPlane, ControlPlaneError

    plane = lab.control_plane()
    assert isinstance(plane, ControlPlane)
    try:
        plane.start()
    except ControlPlaneError as exc:
        print(f"control plane: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"control plane ready at {plane.url}", flush=True)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "run":
        run()
    elif command == "control-plane":
        start_control_plane()
    else:
        sys.exit("usage: python -m meshagent.lab.kubelet run|control-plane")


if __name__ == "__main__":
    main()

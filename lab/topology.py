"""The lab's plan: which nodes, pods and services exist and their addresses. Pure logic.

Addressing (all inside the lab's own network namespaces):
  underlay 172.30.0.0/24: bridge (and controller) .1, node-i at .(10+i)
  node-i pod CIDR 10.244.i.0/24: node bridge (the proxy's address) .1, pods from .10
    (10.<POD_NET_OCTET>.i.0/24 for a named lab instance, so pod IPs stay unique)
  Service VIPs from 10.96.0.0/16 (a manifest's clusterIP is kept)

Dual-stack, as a Kubernetes cluster with both families: every node and pod also has an
IPv6 address, the IPv4 one's numbers written into fd00::/8 (IPv6 text) so either names the
other at a glance: underlay fd00:172:30::/64 (node-i at ::(10+i) in hex), node-i's pods
fd00:10:244:i::/64 (bridge ::1, pod 10.244.i.h at ::h in hex). A Service whose
`ipFamilyPolicy` is PreferDualStack or RequireDualStack (or whose `ipFamilies` names IPv6)
gets an IPv6 VIP from fd00:10:96::/112 as well, listed in `clusterIPs` in `ipFamilies` order.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshagent.lab.paths import NETNS_PREFIX, POD_NET_OCTET

UNDERLAY_BRIDGE_IP = "172.30.0.1"
UNDERLAY_PREFIX = 24
CONTROLLER_PORT = 15012
CONTROLLER_METRICS_PORT = 15014
# The lab's kube-apiserver, in the underlay namespace beside the controller.
APISERVER_PORT = 16443
SERVICE_NET = ipaddress.ip_network("10.96.0.0/16")
SERVICE_NET6 = ipaddress.ip_network("fd00:10:96::/112")
SERVICE_CIDRS = f"{SERVICE_NET},{SERVICE_NET6}"  # the apiserver's dual-stack Service ranges
UNDERLAY_BRIDGE_IP6 = "fd00:172:30::1"
UNDERLAY_PREFIX6 = 64
POD_PREFIX6 = 64
DUAL_STACK_POLICIES = ("PreferDualStack", "RequireDualStack")
FIRST_POD_HOST = 10
UNDERLAY_NETNS = NETNS_PREFIX + "underlay"


class PlanError(ValueError):
    """The manifests ask for something the lab cannot build; names the object."""


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.name

    @property
    def underlay_ip(self) -> str:
        return f"172.30.0.{10 + self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{POD_NET_OCTET}.{self.index}.0/24"

    @property
    def gateway(self) -> str:
        """The node bridge's address: pods' default gateway and the proxy's listener."""
        return f"10.{POD_NET_OCTET}.{self.index}.1"

    @property
    def underlay_ip6(self) -> str:
        return str(ipaddress.IPv6Address(f"fd00:172:30::{10 + self.index:x}"))

    @property
    def pod_cidr6(self) -> str:
        return f"fd00:10:{POD_NET_OCTET}:{self.index}::/{POD_PREFIX6}"

    @property
    def gateway6(self) -> str:
        """The node bridge's IPv6 address: pods' IPv6 gateway and the proxy's IPv6 listener."""
        return str(ipaddress.IPv6Address(f"fd00:10:{POD_NET_OCTET}:{self.index}::1"))

    @property
    def underlay_veth(self) -> str:
        return f"ul-{self.name}"[:15]


@dataclass
class PodPlan:
    namespace: str
    name: str
    node: str
    ip: str
    manifest: dict
    probed: bool = False  # its readiness probe has answered (the kubelet marks it Ready)
    uid: str = ""  # the Pod object's metadata.uid (this incarnation of the name)

    @property
    def ready(self) -> bool:
        return self.probed or self.readiness_port is None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip6(self) -> str:
        """The pod's IPv6 address, derived from its IPv4 one (module docstring)."""
        _, octet, node, host = self.ip.split(".")
        return str(ipaddress.IPv6Address(f"fd00:10:{octet}:{node}::{int(host):x}"))

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}pod-{self.namespace}-{self.name}"

    @property
    def host_veth(self) -> str:
        """Node-side veth name: short (IFNAMSIZ) and stable for the pod."""
        return "vp" + hashlib.sha1(self.key.encode()).hexdigest()[:10]

    @property
    def command(self) -> list[str]:
        containers = (self.manifest.get("spec") or {}).get("containers") or []
        if not containers:
            return []
        c = containers[0]
        return [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]

    @property
    def env(self) -> dict[str, str]:
        containers = (self.manifest.get("spec") or {}).get("containers") or []
        out = {"POD_NAME": self.name, "POD_NAMESPACE": self.namespace, "POD_IP": self.ip}
        for c in containers[:1]:
            for item in c.get("env") or []:
                out[str(item["name"])] = str(item.get("value", ""))
        return out

    @property
    def readiness_port(self) -> int | None:
        containers = (self.manifest.get("spec") or {}).get("containers") or []
        probe = (containers[0].get("readinessProbe") or {}) if containers else {}
        for kind in ("tcpSocket", "httpGet"):
            if kind in probe:
                return int(probe[kind]["port"])
        return None


@dataclass
class LabPlan:
    nodes: list[NodePlan]
    namespaces: dict[str, dict] = field(default_factory=dict)
    pods: dict[str, PodPlan] = field(default_factory=dict)
    services: dict[str, dict] = field(default_factory=dict)
    others: list[dict] = field(default_factory=list)  # e.g. Istio resources, for the controller

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise PlanError(f"no node {name!r} in this lab (nodes: {[n.name for n in self.nodes]})")

    def pods_on(self, node: str) -> list[PodPlan]:
        return [p for p in self.pods.values() if p.node == node]


def _meta(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise PlanError(f"{obj.get('kind')} without metadata.name")
    return meta.get("namespace") or "default", name


def make_nodes(count: int) -> list[NodePlan]:
    if not 1 <= count <= 200:
        raise PlanError(f"--nodes must be between 1 and 200, not {count}")
    return [NodePlan(f"node-{i}", i) for i in range(1, count + 1)]


def add_objects(plan: LabPlan, objects: list[dict]) -> None:
    """Place pods on nodes and give them IPs; give services VIPs. Keeps existing ones."""
    used_vips = {s["spec"]["clusterIP"] for s in plan.services.values()}
    for obj in objects:
        kind = obj.get("kind")
        if kind == "Namespace":
            plan.namespaces[_meta(obj)[1]] = obj
        elif kind == "Pod":
            ns, name = _meta(obj)
            key = f"{ns}/{name}"
            if key in plan.pods:
                plan.pods[key].manifest = obj
                continue
            wanted = (obj.get("spec") or {}).get("nodeName")
            if wanted:
                node = plan.node(wanted)
            else:  # spread over nodes: the least loaded first
                node = min(plan.nodes, key=lambda n: (len(plan.pods_on(n.name)), n.index))
            plan.pods[key] = PodPlan(ns, name, node.name, _free_pod_ip(plan, node), obj)
        elif kind == "Service":
            ns, name = _meta(obj)
            spec = obj.setdefault("spec", {})
            vip = spec.get("clusterIP")
            existing = plan.services.get(f"{ns}/{name}")
            if (not vip or vip == "None") and existing is not None:
                vip = existing["spec"]["clusterIP"]  # an update keeps its VIP
            if not vip or vip == "None":
                vip = _free_vip(used_vips)
            used_vips.add(vip)
            spec["clusterIP"] = vip
            spec["clusterIPs"] = _cluster_ips(spec, vip)
            spec["ipFamilies"] = [
                "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
                for ip in spec["clusterIPs"]
            ]
            plan.services[f"{ns}/{name}"] = obj
        else:
            plan.others = [o for o in plan.others if _identity(o) != _identity(obj)]
            plan.others.append(obj)


def _identity(obj: dict) -> tuple[str, str, str]:
    return (obj.get("kind", ""), *_meta(obj))


def remove_objects(plan: LabPlan, objects: list[dict]) -> list[PodPlan]:
    """Forget the given objects; returns the pods removed (the lab stops them)."""
    removed: list[PodPlan] = []
    for obj in objects:
        kind, ns, name = _identity(obj)
        if kind == "Pod":
            pod = plan.pods.pop(f"{ns}/{name}", None)
            if pod is not None:
                removed.append(pod)
        elif kind == "Namespace":
            plan.namespaces.pop(name, None)
        elif kind == "Service":
            plan.services.pop(f"{ns}/{name}", None)
        else:
            plan.others = [o for o in plan.others if _identity(o) != (kind, ns, name)]
    return removed


def _free_pod_ip(plan: LabPlan, node: NodePlan) -> str:
    used = {p.ip for p in plan.pods.values()}
    for host in range(FIRST_POD_HOST, 255):
        ip = f"10.{POD_NET_OCTET}.{node.index}.{host}"
        if ip not in used:
            return ip
    raise PlanError(f"node {node.name} has no free pod IP")


def _cluster_ips(spec: dict, vip: str) -> list[str]:
    """The Service's VIPs: IPv4 `vip`, plus an IPv6 one when dual-stack is asked for (its
    offset in fd00:10:96::/112 is the IPv4 one's in 10.96.0.0/16), in ipFamilies order."""
    families = spec.get("ipFamilies") or []
    if spec.get("ipFamilyPolicy") not in DUAL_STACK_POLICIES and "IPv6" not in families:
        return [vip]
    offset = int(ipaddress.IPv4Address(vip)) - int(SERVICE_NET.network_address)
    vip6 = str(SERVICE_NET6.network_address + offset)
    return [vip6, vip] if families[:1] == ["IPv6"] else [vip, vip6]


def _free_vip(used: set[str]) -> str:
    for ip in SERVICE_NET.hosts():
        if int(ip) - int(SERVICE_NET.network_address) < 10:
            continue
        if str(ip) not in used:
            return str(ip)
    raise PlanError("no free service IP")


def hosts_file(plan: LabPlan, pod: PodPlan) -> str:
    """/etc/hosts for a pod of a plan (its planned Services)."""
    return hosts_for(pod, plan.services.values())


def hosts_for(pod: PodPlan, services: Iterable[dict]) -> str:
    """/etc/hosts for a pod: itself, and every Service with a VIP by short, namespaced and
    FQDN names, every VIP (both families of a dual-stack Service)."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost", f"{pod.ip} {pod.name}"]
    for svc in services:
        ns, name = _meta(svc)
        spec = svc.get("spec") or {}
        names = [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        if ns == pod.namespace:
            names.insert(0, name)
        for vip in spec.get("clusterIPs") or [spec.get("clusterIP")]:
            if vip and vip != "None":
                lines.append(f"{vip} {' '.join(names)}")
    return "\n".join(lines) + "\n"


def cluster_objects(plan: LabPlan) -> list[dict]:
    """What the controller sees: nodes, namespaces, pods with their status, services, rest."""
    out: list[dict] = []
    for node in plan.nodes:
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name},
                "spec": {"podCIDRs": [node.pod_cidr, node.pod_cidr6]},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": node.underlay_ip},
                        {"type": "InternalIP", "address": node.underlay_ip6},
                    ]
                },
            }
        )
    out.extend(plan.namespaces.values())
    for pod in plan.pods.values():
        obj = dict(pod.manifest)
        meta = dict(obj.get("metadata") or {})
        meta.setdefault("namespace", pod.namespace)
        meta.setdefault("uid", hashlib.sha1(pod.key.encode()).hexdigest()[:16])
        spec = dict(obj.get("spec") or {})
        spec["nodeName"] = pod.node
        obj.update(
            metadata=meta,
            spec=spec,
            status={
                "phase": "Running",
                "podIP": pod.ip,
                "podIPs": [{"ip": pod.ip}, {"ip": pod.ip6}],
                "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
            },
        )
        out.append(obj)
    out.extend(plan.services.values())
    out.extend(plan.others)
    return out

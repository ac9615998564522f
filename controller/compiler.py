"""Compiles the cluster model into one snapshot per node (DESIGN.md section 4).

Pure functions of the model's objects: the same input gives the same snapshot
and so the same version. Pods become workloads (meshed when their namespace
carries `meshagent.io/mesh=enabled` and the pod does not say `disabled`; their fail mode
from `meshagent.io/fail-mode` on the Pod, else the Namespace);
Services become services with endpoints, read from their EndpointSlices as kube-proxy
reads them (or, for a Service with no EndpointSlice in the model, from the pods its
selector matches): see the rules above `compile_services`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from meshagent.common.failmode import DEFAULT_FAIL_MODE, FAIL_MODE_LABEL, FAIL_MODES
from meshagent.common.istio.resource import SUPPORTED_KINDS, ResourceError, parse_resource
from meshagent.common.locality import of_labels as locality_of_labels
from meshagent.common.snapshot import (
    MESH_LABEL,
    Endpoint,
    Node,
    Service,
    ServicePort,
    Snapshot,
    Workload,
)
from meshagent.common.workloadname import pod_workload
from meshagent.controller.failclosed import unenforceable_deny
from meshagent.controller.jwks import compile_jwks
from meshagent.controller.l7level import compile_levels, forced_levels, needs_of_manifests
from meshagent.controller.model import ClusterModel
from meshagent.controller.resolver import resolved_names
from meshagent.controller.serviceentry import compile_entries, model_entries, model_entry_hosts


def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _labels(obj: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in (_meta(obj).get("labels") or {}).items()}


def _pod_ips(pod: dict) -> list[str]:
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return ips


def is_meshed(pod: dict, namespace: dict | None) -> bool:
    if namespace is None or _labels(namespace).get(MESH_LABEL) != "enabled":
        return False
    return _labels(pod).get(MESH_LABEL) != "disabled"


def fail_mode(pod: dict, namespace: dict | None) -> str:
    """The pod's `meshagent.io/fail-mode`: its own label if it has one, else its Namespace's,
    else `closed`. A value other than `open` or `closed` counts as `closed`: a typo must
    never let a pod's traffic out unmeshed. Only labels of API objects decide (the pod's
    processes cannot choose their mode)."""
    for obj in (pod, namespace):
        if obj is None:
            continue
        value = _labels(obj).get(FAIL_MODE_LABEL)
        if value is not None:
            return value if value in FAIL_MODES else DEFAULT_FAIL_MODE
    return DEFAULT_FAIL_MODE


def compile_workload(pod: dict, namespace: dict | None) -> Workload | None:
    """The pod's workload, None while it is not scheduled or has no address (nothing to
    route to). Depends on the pod and its Namespace only, so it can be kept per pod."""
    meta, spec = _meta(pod), pod.get("spec") or {}
    ips, node = _pod_ips(pod), spec.get("nodeName")
    if not ips or not node:
        return None
    ns = meta.get("namespace", "default")
    return Workload(
        uid=meta.get("uid") or f"{ns}/{meta['name']}",
        namespace=ns,
        name=meta["name"],
        node=node,
        ips=ips,
        service_account=spec.get("serviceAccountName") or "default",
        labels=_labels(pod),
        meshed=is_meshed(pod, namespace),
        fail_mode=fail_mode(pod, namespace),
        workload_name=pod_workload(pod).name,
    )


def compile_workloads(model: ClusterModel) -> list[Workload]:
    out = []
    for pod in model.objects("Pod"):
        ns = _meta(pod).get("namespace", "default")
        workload = compile_workload(pod, model.get("Namespace", "", ns))
        if workload is not None:
            out.append(workload)
    return sorted(out, key=lambda w: (w.namespace, w.name))


def _is_ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return True


def _resolve_target(pod: dict, target: int | str) -> int | None:
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- endpoints -------------------------------------------------------------------------------
#
# A Service's endpoints come from its EndpointSlices, read the way kube-proxy reads them:
#
# - a slice belongs to the Service named by its `kubernetes.io/service-name` label, in its own
#   namespace; only `addressType` IPv4 and IPv6 count (FQDN slices are ignored), and of each
#   endpoint only its first address (as kube-proxy), which must be of the slice's family;
# - a slice port serves the Service port of the same name and protocol; its number is the
#   endpoint's port (so named target ports resolve per pod, as the slice controller wrote
#   them); a slice port without a number is ignored;
# - conditions: `ready` absent counts as true, `serving` absent as true, `terminating` absent
#   as false. New connections go to the ready endpoints of a Service port; when it has none,
#   to those that are serving and terminating (kube-proxy's ProxyTerminatingEndpoints: a
#   Service whose pods are all shutting down keeps serving until they stop); endpoints that
#   are neither are left out. The slice controller never writes `ready` true for a
#   terminating pod unless the Service sets `publishNotReadyAddresses`, which asks for
#   exactly that, so `ready` alone decides, as in kube-proxy. An endpoint carries only the
#   Service ports it was chosen for;
# - one Endpoint per pod, whatever the number of slices or families it appears in (the pod
#   is named by the endpoint's `targetRef`, else found by its address among the model's
#   pods): its `ip` is its address in the Service's primary family, `workload_uid` the pod's
#   workload, so the agent finds its other addresses (an IPv6 VIP dials the pod's IPv6
#   address) and its labels (DestinationRule subsets);
# - an endpoint that is no pod (a hand-made slice, `kubernetes.default`'s API server) is one
#   Endpoint per address, `workload_uid` `address:<ip>` (stable, never a pod's uid) and
#   `node` its `nodeName` or empty: the agent finds no workload at that address and dials
#   it directly, in plaintext, as any destination outside the mesh. (Behind a dual-stack
#   Service such endpoints are one per address and family: with no pod to find the other
#   address in, the proxy may reach either family from either VIP);
# - a Service with cluster IPs takes endpoints of its VIPs' families only (kube-proxy: a VIP
#   reaches endpoints of its own family); a headless Service (clusterIP None) takes every
#   family: clients dial the pod addresses themselves, and the proxy still knows which
#   Service (and so which protocol) a pod address and port belong to.
#
# A Service with no EndpointSlice at all in the model (the lab's manifest folder has none; a
# new Service before the slice controller wrote its slice) falls back to its selector: the
# model's ready pods that match it, with the same rules (a pod with `deletionTimestamp` is
# terminating: not ready, serving while its Ready condition holds).

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_FAMILIES = {"IPv4": 4, "IPv6": 6}


@dataclass
class _Candidate:
    """One endpoint of a Service as read from its slices (or from a pod, in the fallback)."""

    uid: str
    node: str
    addresses: dict[int, str]  # family (4, 6) -> address
    ports: dict[tuple[str, str], int]  # (port name, protocol) -> the endpoint's port
    ready: bool
    serving: bool
    terminating: bool

    def merge(self, other: _Candidate) -> None:
        """The same endpoint seen in another slice (its other family, or a duplicate while
        slices are rebalanced): the least available reading of the two wins."""
        for family, ip in other.addresses.items():
            self.addresses.setdefault(family, ip)
        for key, port in other.ports.items():
            self.ports.setdefault(key, port)
        self.node = self.node or other.node
        self.ready = self.ready and other.ready
        self.serving = self.serving and other.serving
        self.terminating = self.terminating or other.terminating


@functools.lru_cache(maxsize=65536)
def _family(ip: str) -> int | None:
    """4 or 6, None for no address (cached: every compile asks again for every pod IP)."""
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return None


def _service_families(spec: dict, vips: list[str]) -> list[int]:
    """The Service's address families, primary first."""
    families = [_FAMILIES[f] for f in spec.get("ipFamilies") or [] if f in _FAMILIES]
    for ip in vips:
        family = _family(ip)
        if family is not None and family not in families:
            families.append(family)
    return families


def _slices_by_service(model: ClusterModel) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for eps in model.objects("EndpointSlice"):
        meta = _meta(eps)
        service = _labels(eps).get(SERVICE_NAME_LABEL)
        if service:
            out.setdefault((meta.get("namespace", "default"), service), []).append(eps)
    for slices in out.values():
        slices.sort(key=lambda s: _meta(s).get("name", ""))
    return out


class PodLookup(Protocol):
    """How endpoints find pods: `_Pods` below, or the incremental compiler's kept index."""

    by_key: Mapping[tuple[str, str], Workload]
    by_ip: Mapping[str, Workload]

    def selected(self, namespace: str, selector: dict[str, str]) -> list[dict]: ...


class _Pods:
    """The model's pods as endpoints need them: by name, and by address when only one pod
    has it (host-network pods share their node's address and are never found that way)."""

    def __init__(self, model: ClusterModel, workloads: Iterable[Workload]) -> None:
        self.by_key = {(w.namespace, w.name): w for w in workloads}
        owners: dict[str, list[Workload]] = {}
        # (namespace, label, value) -> the pods with it, so a selector looks only at the pods
        # of its rarest label instead of at every pod (compile cost: services x pods before)
        self.by_label: dict[tuple[str, str, str], list[dict]] = {}
        for pod in model.objects("Pod"):
            meta = _meta(pod)
            namespace = meta.get("namespace", "default")
            for label, value in _labels(pod).items():
                self.by_label.setdefault((namespace, label, value), []).append(pod)
            workload = self.by_key.get((namespace, meta.get("name")))
            if workload is None or (pod.get("spec") or {}).get("hostNetwork"):
                continue
            for ip in workload.ips:
                owners.setdefault(ip, []).append(workload)
        self.by_ip = {ip: ws[0] for ip, ws in owners.items() if len(ws) == 1}

    def selected(self, namespace: str, selector: dict[str, str]) -> list[dict]:
        """The pods of `namespace` that may match `selector` (all its labels still checked
        by the caller): those carrying its least common label; none for an empty one."""
        if not selector:
            return []
        lists = [self.by_label.get((namespace, k, v), []) for k, v in selector.items()]
        return min(lists, key=len)


def _slice_candidates(
    slices: list[dict], namespace: str, families: list[int], pods: PodLookup
) -> list[_Candidate]:
    found: dict[str, _Candidate] = {}
    for eps in slices:
        family = _FAMILIES.get(eps.get("addressType", ""))
        if family is None or (families and family not in families):
            continue
        ports = {}
        for p in eps.get("ports") or []:
            if p.get("port") is not None:
                ports[(p.get("name") or "", p.get("protocol") or "TCP")] = int(p["port"])
        for ep in eps.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses or _family(addresses[0]) != family:
                continue
            ip = addresses[0]
            conditions = ep.get("conditions") or {}
            ref = ep.get("targetRef") or {}
            workload = None
            if ref.get("kind") == "Pod" and ref.get("name"):
                ref_ns = ref.get("namespace") or namespace
                workload = pods.by_key.get((ref_ns, ref["name"]))
                uid = workload.uid if workload else ref.get("uid") or f"{ref_ns}/{ref['name']}"
            elif not ref:
                workload = pods.by_ip.get(ip)
                uid = workload.uid if workload else f"address:{ip}"
            else:
                uid = f"address:{ip}"  # some other kind of object: no pod of ours
            ready = conditions.get("ready") is not False
            candidate = _Candidate(
                uid=uid,
                node=ep.get("nodeName") or (workload.node if workload else ""),
                addresses={family: ip},
                ports=dict(ports),
                ready=ready,
                serving=conditions.get("serving") is not False,
                terminating=conditions.get("terminating") is True,
            )
            if uid in found:
                found[uid].merge(candidate)
            else:
                found[uid] = candidate
    return list(found.values())


def _selector_candidates(
    namespace: str, spec: dict, ports: list[ServicePort], pods: PodLookup
) -> list[_Candidate]:
    """The fallback for a Service without EndpointSlices: the pods its selector matches."""
    selector = {str(k): str(v) for k, v in (spec.get("selector") or {}).items()}
    out = []
    for pod in pods.selected(namespace, selector):
        meta = _meta(pod)
        workload = pods.by_key.get((namespace, meta.get("name")))
        if workload is None or not _matches(selector, workload.labels):
            continue
        terminating = bool(meta.get("deletionTimestamp"))
        serving = _is_ready(pod)
        targets = {(p.name, p.protocol): _resolve_target(pod, p.target_port) for p in ports}
        addresses: dict[int, str] = {}
        for ip in workload.ips:
            family = _family(ip)
            if family is not None:
                addresses.setdefault(family, ip)
        out.append(
            _Candidate(
                uid=workload.uid,
                node=workload.node,
                addresses=addresses,
                ports={k: v for k, v in targets.items() if v is not None},
                ready=serving and not terminating,
                serving=serving,
                terminating=terminating,
            )
        )
    return out


def _choose_endpoints(
    candidates: list[_Candidate], ports: list[ServicePort], families: list[int]
) -> list[Endpoint]:
    """Per Service port: the ready endpoints, else the serving terminating ones."""
    chosen: dict[str, dict[int, int]] = {}
    for sp in ports:
        key = (sp.name, sp.protocol)
        having = [c for c in candidates if key in c.ports]
        picked = [c for c in having if c.ready] or [
            c for c in having if c.serving and c.terminating
        ]
        for c in picked:
            chosen.setdefault(c.uid, {})[sp.port] = c.ports[key]
    out = []
    for c in candidates:
        if c.uid not in chosen or not c.addresses:
            continue
        ip = next(c.addresses[f] for f in [*families, *c.addresses] if f in c.addresses)
        out.append(Endpoint(ip=ip, node=c.node, workload_uid=c.uid, ports=chosen[c.uid]))
    return out


def compile_services(model: ClusterModel, workloads: Iterable[Workload]) -> list[Service]:
    """Services with their endpoints: from the Service's EndpointSlices as kube-proxy reads
    them, or, for a Service that has no EndpointSlice at all in the model (the lab's manifest
    folder), from the pods its selector matches (see the rules above)."""
    pods = _Pods(model, workloads)
    slices = _slices_by_service(model)
    out = []
    for svc in model.objects("Service"):
        meta = _meta(svc)
        own = slices.get((meta.get("namespace", "default"), meta["name"]))
        out.append(compile_service(svc, own, pods))
    return sorted(out, key=lambda s: (s.namespace, s.name))


def compile_service(svc: dict, own: list[dict] | None, pods: PodLookup) -> Service:
    """One Service with its endpoints, from its EndpointSlices `own` (sorted by name), or
    with None (no slice at all) from the pods its selector matches."""
    meta, spec = _meta(svc), svc.get("spec") or {}
    ns = meta.get("namespace", "default")
    vips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip]
    vips = [ip for ip in vips if ip != "None"]
    ports = [
        ServicePort(
            name=p.get("name", ""),
            port=int(p["port"]),
            target_port=p.get("targetPort", p["port"]),
            protocol=p.get("protocol", "TCP"),
            app_protocol=p.get("appProtocol"),
        )
        for p in spec.get("ports") or []
    ]
    families = _service_families(spec, vips)
    if own is None:
        candidates = _selector_candidates(ns, spec, ports, pods)
    else:
        # a headless Service takes every family its slices carry
        candidates = _slice_candidates(own, ns, _service_families({}, vips), pods)
    endpoints = _choose_endpoints(candidates, ports, families)
    endpoints.sort(key=lambda e: (e.ip, e.workload_uid))
    return Service(namespace=ns, name=meta["name"], vips=vips, ports=ports, endpoints=endpoints)


def compile_nodes(model: ClusterModel) -> list[Node]:
    out = []
    for node in model.objects("Node"):
        addresses = (node.get("status") or {}).get("addresses") or []
        internal = [a["address"] for a in addresses if a.get("type") == "InternalIP"]
        if internal:
            where = locality_of_labels(_labels(node))
            out.append(Node(name=_meta(node)["name"], address=internal[0], locality=where))
    return sorted(out, key=lambda n: n.name)


def compile_istio(model: ClusterModel) -> list[dict]:
    """The Istio resources that pass validation, as manifests (rejected ones are left out
    here and reported by the validator; they never affect the others), except that a
    rejected DENY AuthorizationPolicy fails closed: a deny-all `<name>.unenforceable` for
    the workloads it selects stands in for it (controller/failclosed.py)."""
    out = []
    entry_hosts = model_entry_hosts(model)
    for kind in sorted(SUPPORTED_KINDS - OWN_FIELD_KINDS):
        for obj in model.objects(kind):
            try:
                parse_resource(obj, entry_hosts=entry_hosts)
            except ResourceError as exc:
                fail_closed = unenforceable_deny(obj, exc)
                if fail_closed is not None:
                    out.append(fail_closed.manifest())
                continue
            out.append(_manifest(obj))
    return _in_order(out)


def compile_telemetry(model: ClusterModel) -> list[dict]:
    """The Telemetry resources that pass validation, as manifests; each agent compiles them
    with its root namespace (common/istio/telemetry.py)."""
    out = []
    for obj in model.objects("Telemetry"):
        try:
            parse_resource(obj)
        except ResourceError:
            continue  # reported by the validator; the metrics stay as they were configured
        out.append(_manifest(obj))
    return _in_order(out)


# Kinds that travel in a snapshot field of their own, not in `istio_resources`: an agent
# older than the kind refuses a snapshot whose istio_resources hold a kind it cannot parse,
# and ignores a field it does not know. ServiceEntries travel as the services they declare
# (controller/serviceentry.py), with Service.host set.
OWN_FIELD_KINDS = frozenset({"Telemetry", "ServiceEntry"})
_KEPT_METADATA = ("name", "namespace", "labels", "annotations")


def _manifest(obj: dict) -> dict:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k in _KEPT_METADATA}
    meta.setdefault("namespace", "default")
    return {**{k: obj[k] for k in ("apiVersion", "kind", "spec") if k in obj}, "metadata": meta}


def _in_order(manifests: list[dict]) -> list[dict]:
    return sorted(
        manifests, key=lambda o: (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])
    )


@dataclass(frozen=True)
class SharedSnapshot:
    """What one model change compiles to: the part every node gets, and per node its pods
    that nobody else needs (not meshed, not behind a Service)."""

    snapshot: Snapshot
    digest: str
    local: dict[str, list[Workload]]

    def for_node(self, node: str) -> Snapshot:
        return self.snapshot.for_node(node, self.digest, self.local.get(node, []))


def compile_shared(model: ClusterModel, trust_bundle: str | None = None) -> SharedSnapshot:
    """Compiled once per model change; each node's snapshot is `shared.for_node(node)`. A
    change to a pod that only its own node needs gives a new version to that node only."""
    full = _compile(model, "", trust_bundle)
    endpoints = {e.workload_uid for s in full.services for e in s.endpoints}
    shared, local = [], {}
    for w in full.workloads:
        if w.meshed or w.uid in endpoints:
            shared.append(w)
        else:
            local.setdefault(w.node, []).append(w)
    snapshot = full.model_copy(update={"workloads": shared})
    return SharedSnapshot(snapshot, snapshot.body_digest(), local)


def compile_snapshot(model: ClusterModel, node: str, trust_bundle: str | None = None) -> Snapshot:
    return _compile(model, node, trust_bundle).with_version()


def _compile(model: ClusterModel, node: str, trust_bundle: str | None) -> Snapshot:
    workloads = compile_workloads(model)
    services = [
        *compile_services(model, workloads),
        *compile_entries(model_entries(model), resolved_names(model)),
    ]
    istio = compile_istio(model)
    needs = needs_of_manifests(istio, model_entry_hosts(model))
    return Snapshot(
        node=node,
        nodes=compile_nodes(model),
        workloads=workloads,
        services=services,
        trust_bundle=trust_bundle,
        istio_resources=istio,
        telemetry=compile_telemetry(model),
        jwks=compile_jwks(model),
        l7_levels=compile_levels(
            services, forced_levels(model.objects("Service")), needs, workloads
        ),
    )

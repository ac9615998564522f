"""Compiles the cluster model into one snapshot per node (DESIGN.md section 4).

Pure functions of the model's objects: the same input gives the same snapshot
and so the same version. Pods become workloads (meshed when their namespace
carries `meshagent.io/mesh=enabled` and the pod does not say `disabled`);
Services with their ready pods become services with endpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshagent.common.istio.resource import SUPPORTED_KINDS, ResourceError, parse_resource
from meshagent.common.snapshot import (
    MESH_LABEL,
    Endpoint,
    Node,
    Service,
    ServicePort,
    Snapshot,
    Workload,
)
from meshagent.controller.model import ClusterModel


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


def compile_workloads(model: ClusterModel) -> list[Workload]:
    out = []
    for pod in model.objects("Pod"):
        meta, spec = _meta(pod), pod.get("spec") or {}
        ips, node = _pod_ips(pod), spec.get("nodeName")
        if not ips or not node:
            continue  # not scheduled or not started yet: nothing to route to
        ns = meta.get("namespace", "default")
        out.append(
            Workload(
                uid=meta.get("uid") or f"{ns}/{meta['name']}",
                namespace=ns,
                name=meta["name"],
                node=node,
                ips=ips,
                service_account=spec.get("serviceAccountName") or "default",
                labels=_labels(pod),
                meshed=is_meshed(pod, model.get("Namespace", "", ns)),
            )
        )
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


def compile_services(model: ClusterModel, workloads: Iterable[Workload]) -> list[Service]:
    by_key = {(w.namespace, w.name): w for w in workloads}
    out = []
    for svc in model.objects("Service"):
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
        selector = {str(k): str(v) for k, v in (spec.get("selector") or {}).items()}
        endpoints = []
        for pod in model.objects("Pod"):
            pmeta = _meta(pod)
            workload = by_key.get((pmeta.get("namespace", "default"), pmeta.get("name")))
            if workload is None or pmeta.get("namespace", "default") != ns:
                continue
            if not _matches(selector, workload.labels) or not _is_ready(pod):
                continue
            targets = {p.port: _resolve_target(pod, p.target_port) for p in ports}
            endpoints.append(
                Endpoint(
                    ip=workload.ips[0],
                    node=workload.node,
                    workload_uid=workload.uid,
                    ports={k: v for k, v in targets.items() if v is not None},
                )
            )
        endpoints.sort(key=lambda e: e.ip)
        out.append(
            Service(namespace=ns, name=meta["name"], vips=vips, ports=ports, endpoints=endpoints)
        )
    return sorted(out, key=lambda s: (s.namespace, s.name))


def compile_nodes(model: ClusterModel) -> list[Node]:
    out = []
    for node in model.objects("Node"):
        addresses = (node.get("status") or {}).get("addresses") or []
        internal = [a["address"] for a in addresses if a.get("type") == "InternalIP"]
        if internal:
            out.append(Node(name=_meta(node)["name"], address=internal[0]))
    return sorted(out, key=lambda n: n.name)


def compile_istio(model: ClusterModel) -> list[dict]:
    """The Istio resources that pass validation, as manifests (rejected ones are left out
    here and reported by the validator; they never affect the others)."""
    out = []
    for kind in sorted(SUPPORTED_KINDS):
        for obj in model.objects(kind):
            try:
                parse_resource(obj)
            except ResourceError:
                continue
            meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k in _KEPT_METADATA}
            meta.setdefault("namespace", "default")
            out.append(
                {
                    **{k: obj[k] for k in ("apiVersion", "kind", "spec") if k in obj},
                    "metadata": meta,
                }
            )
    return sorted(out, key=lambda o: (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]))


_KEPT_METADATA = ("name", "namespace", "labels", "annotations")


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
    return Snapshot(
        node=node,
        nodes=compile_nodes(model),
        workloads=workloads,
        services=compile_services(model, workloads),
        trust_bundle=trust_bundle,
        istio_resources=compile_istio(model),
    )

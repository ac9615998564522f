"""The saved snapshot as `meshagent status` reads it: the JSON document, not the agent's Tables.

Building `Tables` (every Istio model, compiled routes and authorization) is most of what
`meshagent status` cost to start on a full node (issue 22: ~0.1 s of imports against 0.01 s
of work), and status needs only each pod's name, identity parts and mTLS mode, and the
Services. So this reads those from the document with the snapshot model's defaults, and
imports the PeerAuthentication model only when the snapshot holds one. It does not check the
document as the agent does (that is the agent's job); a document for another node, or one
that is not a snapshot, counts as no saved snapshot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshagent.common.failmode import DEFAULT_FAIL_MODE
from meshagent.common.l7 import level_of

if TYPE_CHECKING:
    from meshagent.agent.policy.peerauth import MtlsPolicy

__all__ = ["SNAPSHOT_FILE", "PodInfo", "SavedView", "load"]

SNAPSHOT_FILE = "snapshot.json"  # agent/state.py's SnapshotStore writes it


@dataclass(frozen=True)
class PodInfo:
    """What status shows of one workload of the snapshot."""

    namespace: str
    name: str
    service_account: str
    fail_mode: str
    mtls_mode: str
    mtls_ports: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedView:
    """The snapshot's version, its workloads by IP and its Services (report rows, sorted)."""

    version: str
    pods_by_ip: dict[str, PodInfo]
    services: list[dict[str, Any]]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> SavedView:
        """The view of a snapshot document (as the controller sent it, or a model's JSON dump).
        Raises KeyError/TypeError/ValueError when it is not one."""
        resolve_mtls = _mtls_resolver(doc.get("istio_resources") or [])
        pods: dict[str, PodInfo] = {}
        for w in [*(doc.get("workloads") or []), *(doc.get("local_workloads") or [])]:
            mtls = resolve_mtls(w["namespace"], w.get("labels") or {})
            info = PodInfo(
                namespace=w["namespace"],
                name=w["name"],
                service_account=w.get("service_account", "default"),
                fail_mode=w.get("fail_mode", DEFAULT_FAIL_MODE),
                mtls_mode=mtls.mode,
                mtls_ports=dict(mtls.ports),
            )
            for ip in w["ips"]:
                pods[ip] = info
        services = _services(doc.get("services") or [], doc.get("l7_levels") or {})
        return cls(str(doc["version"]), pods, services)


def _port(svc: dict[str, Any], port: dict[str, Any], levels: Mapping[str, str]) -> dict[str, Any]:
    """A Service port as status shows it: its level in force, and its pods' where lower."""
    where = (
        levels,
        svc["namespace"],
        svc["name"],
        port["port"],
        port.get("name", ""),
        port.get("app_protocol"),
        port.get("protocol", "TCP"),
    )
    shown = {
        "name": port.get("name", ""),
        "port": port["port"],
        "protocol": port.get("protocol", "TCP"),
        "l7": level_of(*where),
    }
    if (at_pods := level_of(*where, at_pods=True)) != shown["l7"]:
        shown["l7_pods"] = at_pods
    return shown


def _services(services: list[dict[str, Any]], levels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Each Service with the endpoints the proxy balances over, as the report has them, and
    each port's L7 level in force (common/l7.py: the snapshot's mark, else the default)."""
    return [
        {
            "namespace": svc["namespace"],
            "name": svc["name"],
            "vips": list(svc["vips"]),
            "ports": [_port(svc, p, levels) for p in svc["ports"]],
            "endpoints": [
                {
                    "ip": e["ip"],
                    "node": e["node"],
                    "ports": {str(k): v for k, v in e["ports"].items()},
                }
                for e in svc.get("endpoints") or []
            ],
        }
        for svc in sorted(services, key=lambda s: (s["namespace"], s["name"]))
    ]


def _mtls_resolver(resources: list[Any]) -> Callable[[str, Mapping[str, str]], MtlsPolicy]:
    """resolve(namespace, labels) -> MtlsPolicy with the snapshot's PeerAuthentications, as the
    agent resolves them (agent/policy/peerauth.py); the models load only if there are any."""
    from meshagent.agent.policy.peerauth import DEFAULT_MODE, MtlsPolicy

    docs = [r for r in resources if isinstance(r, dict) and r.get("kind") == "PeerAuthentication"]
    if not docs:
        default = MtlsPolicy(DEFAULT_MODE)
        return lambda namespace, labels: default

    from meshagent.agent.policy.peerauth import resolve
    from meshagent.common.istio.security import PeerAuthentication

    policies = []
    for doc in docs:
        meta = doc.get("metadata") or {}
        if not meta.get("namespace"):
            doc = {**doc, "metadata": {**meta, "namespace": "default"}}
        policies.append(PeerAuthentication.model_validate(doc))
    return lambda namespace, labels: resolve(policies, namespace, labels)


def load(state_dir: Path, node: str) -> SavedView | None:
    """The last snapshot the agent accepted for `node`, or None if there is none to read."""
    try:
        doc = json.loads((state_dir / SNAPSHOT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("node") != node:
        return None
    try:
        return SavedView.from_document(doc)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None

"""Offline validation of manifest files (`meshctl validate`): one verdict per Istio resource.

Every object of a supported Istio kind goes through the controller's own `parse_resource`,
so the verdict is the one the controller and the admission webhook would give: `ok` (applied;
possibly with warnings naming settings the data path does not fully honour), `skipped` (does
not concern the mesh, not applied: a warning, not an error) or `rejected` (one message per
cause, each naming the field path). The corpus test (tests/unit/test_istio_corpus.py) runs
this same code over tests/corpus/istio/.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshagent.common.istio import (
    SUPPORTED_KINDS,
    IstioResource,
    ResourceError,
    ResourceSkipped,
    parse_resource,
)
from meshagent.common.istio import networking as net
from meshagent.common.istio.serviceentry import entry_hosts
from meshagent.common.istio.support import service_fqdn, warnings
from meshagent.common.manifests import ManifestError, load_documents
from meshagent.controller.describe import ROOT_NAMESPACE, describe, service_ports
from meshagent.controller.validation import DEFAULT_NAMESPACE

Outcome = Literal["ok", "skipped", "rejected"]


@dataclass
class Verdict:
    """What the mesh makes of one resource of one file."""

    file: str
    kind: str
    namespace: str
    name: str
    outcome: Outcome
    problems: list[tuple[str, str]] = field(default_factory=list)  # rejected/skipped: why
    warnings: list[tuple[str, str]] = field(default_factory=list)  # ok: what is not honoured
    resource: IstioResource | None = None

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def reasons(self) -> str:
        return "; ".join(f"{p}: {m}" if p else m for p, m in self.problems)

    def explain(self, services: Any = None) -> list[str]:
        return describe(self.resource, services) if self.resource is not None else []

    def as_dict(self, services: Any = None, explain: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "outcome": self.outcome,
            "problems": [{"path": p, "message": m} for p, m in self.problems],
            "warnings": [{"path": p, "message": m} for p, m in self.warnings],
        }
        if explain:
            out["explain"] = self.explain(services)
        return out


@dataclass
class Report:
    verdicts: list[Verdict] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)  # files that are not manifests
    other_kinds: int = 0  # objects of kinds meshctl does not validate (Pod, Service, ...)
    services: dict = field(default_factory=dict)  # Service ports seen, for --explain

    def count(self, outcome: Outcome) -> int:
        return sum(v.outcome == outcome for v in self.verdicts)


def judge(obj: dict, file: str, entry_hosts: Collection[str] = ()) -> Verdict:
    """The verdict on one object of a supported kind; `entry_hosts`: the hosts the
    ServiceEntries among the checked manifests declare."""
    try:
        resource = parse_resource(obj, DEFAULT_NAMESPACE, entry_hosts)
    except ResourceSkipped as exc:
        return Verdict(file, exc.kind, exc.namespace, exc.name, "skipped", list(exc.problems))
    except ResourceError as exc:
        return Verdict(file, exc.kind, exc.namespace, exc.name, "rejected", list(exc.problems))
    return Verdict(
        file,
        resource.kind,
        resource.namespace,
        resource.name,
        "ok",
        warnings=warnings(resource, entry_hosts),
        resource=resource,
    )


def check_files(paths: Sequence[Path]) -> Report:
    """Verdicts for every Istio resource in `paths` (files, in order)."""
    report = Report()
    objects: list[tuple[str, dict]] = []
    for path in paths:
        try:
            docs = load_documents(Path(path).read_text(), str(path))
        except (ManifestError, OSError, UnicodeDecodeError) as exc:
            report.file_errors.append(str(exc))
            continue
        objects += [(str(path), doc) for doc in docs]
    report.services = service_ports([doc for _f, doc in objects], DEFAULT_NAMESPACE)
    hosts = entry_hosts(doc for _f, doc in objects)
    for file, doc in objects:
        if doc.get("kind") not in SUPPORTED_KINDS:
            report.other_kinds += 1
            continue
        report.verdicts.append(judge(doc, file, hosts))
    _warn_shadowed(report.verdicts)
    _warn_http_rules_without_l7_port(report.verdicts, report.services)
    return report


def _warn_http_rules_without_l7_port(verdicts: list[Verdict], services: dict) -> None:
    """`http` rules only act on http/http2/grpc ports: when the manifests hold the host's
    Service and none of its ports is one, the rules never apply (its ports relay bytes)."""
    for v in verdicts:
        res = v.resource
        if not isinstance(res, net.VirtualService) or not res.spec.http:
            continue
        for i, host in enumerate(res.spec.hosts):
            ports = services.get(service_fqdn(host, v.namespace))
            if ports and all(protocol == "tcp" for _n, _name, protocol in ports):
                listed = ", ".join(f"{n} ({name or 'unnamed'})" for n, name, _p in ports)
                v.warnings.append(
                    (
                        f"spec.hosts[{i}]",
                        f"{host}: no http/http2/grpc port among its Service's ports {listed}, "
                        "so the http rules never apply to it (name a port http-*, http2-* or "
                        "grpc-*, or set appProtocol; tcp routes act on tcp ports)",
                    )
                )


def _warn_shadowed(verdicts: list[Verdict]) -> None:
    """One VirtualService and one DestinationRule apply per host (Istio does not merge them
    for sidecars): warn on the others, picked as the data path picks (agent/proxy/routing.py:
    the Service's own namespace first, then the root namespace for DestinationRules, then by
    namespace and name)."""
    by_host: dict[tuple[str, str], list[Verdict]] = {}
    for v in verdicts:
        res = v.resource
        if isinstance(res, net.VirtualService):
            hosts = [(i, h) for i, h in enumerate(res.spec.hosts)]
        elif isinstance(res, net.DestinationRule):
            hosts = [(None, res.spec.host)]
        else:
            continue
        for _i, host in hosts:
            fqdn = service_fqdn(host, v.namespace)
            if not fqdn.startswith("*"):
                by_host.setdefault((v.kind, fqdn), []).append(v)
    for (kind, fqdn), group in by_host.items():
        if len(group) < 2:
            continue
        namespace = fqdn.split(".")[1] if fqdn.count(".") >= 2 else ""
        preferred = [namespace, ROOT_NAMESPACE] if kind == "DestinationRule" else [namespace]
        rank = {ns: i for i, ns in enumerate(preferred)}
        ordered = sorted(
            group, key=lambda v: (rank.get(v.namespace, len(rank)), v.namespace, v.name)
        )
        winner = ordered[0]
        field = "spec.hosts" if kind == "VirtualService" else "spec.host"
        for v in ordered[1:]:
            if (v.namespace, v.name) == (winner.namespace, winner.name):
                continue  # the same object written twice: the later one replaces it
            v.warnings.append(
                (
                    field,
                    f"{fqdn}: {kind} {winner.namespace}/{winner.name} applies to it instead "
                    f"(one {kind} per host; they are not merged)",
                )
            )

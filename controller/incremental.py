"""The controller's compile, kept between model changes, so one change costs work in
proportion to what it touches, not to the cluster (issue 19, item 2).

`IncrementalCompiler.compile(model)` returns what `compiler.compile_shared` returns for the
same model (tests/unit/test_incremental_compiler.py compares them over random change
sequences). It keeps:

- per pod its workload, remade only when the pod or its Namespace changed (a workload depends
  on nothing else), with the workload's JSON as the version digest hashes it;
- the pod index endpoints look pods up in (by name, by unique address, by label), updated
  pod by pod;
- per Service its compiled Service, remade only when the Service, its EndpointSlices or a pod
  it may select or reference changed (before or after the change: a pod that stops matching
  leaves); past `MANY_PODS` changed pods at once every Service is remade;
- the rest (nodes, Istio resources, Telemetry, JWKS, ServiceEntries, what the Istio
  resources need per request), remade when an object of any other kind changed;
- the L7 level of each Service port (controller/l7level.py), recomputed on every change from
  the above (it depends on Services, their endpoints' workloads and the Istio resources).

A model object counts as unchanged when it is the same object or equal to it: the model
replaces objects and never edits them in place, and a relist's equal copies cost a
comparison. Only the pods the model's journal names as changed since the last compile are
looked at (`ClusterModel.changed_since`; after a relist, every pod), and the last workload
lists are copied with the changed workloads put in their places unless a pod came, went or
moved between the shared list and a node's. What still grows with the cluster, with a small
constant: copying those lists, and hashing the shared body for the content version (each
item's JSON is kept; the join and the SHA-256 are redone): ~0.05 s at 30,000 pods.
Pods are keyed by namespace and name, as API objects always carry a namespace.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from meshagent.common.snapshot import Service, Snapshot, Workload
from meshagent.controller.compiler import (
    SharedSnapshot,
    _labels,
    _matches,
    _meta,
    _slices_by_service,
    compile_istio,
    compile_nodes,
    compile_service,
    compile_telemetry,
    compile_workload,
)
from meshagent.controller.jwks import compile_jwks
from meshagent.controller.l7level import (
    L7Needs,
    compile_levels,
    forced_levels,
    needs_of_manifests,
)
from meshagent.controller.model import ClusterModel
from meshagent.controller.resolver import resolved_names
from meshagent.controller.serviceentry import compile_entries, model_entries, model_entry_hosts

PodKey = tuple[str, str]  # (namespace, name)
# Kinds with a cache of their own; any other kind's change remakes "the rest".
_OWN_KINDS = frozenset({"Pod", "Namespace", "Service", "EndpointSlice"})
# More changed pods than this at once (a Namespace relabelled, a relist): every Service is
# remade instead of asking each whether a changed pod concerns it.
MANY_PODS = 256
_NOT_SHARED = frozenset({"node", "version", "local_workloads"})


def _json(value: Any) -> str:
    """A JSON value exactly as `Snapshot.body_digest` writes it (sorted keys, default
    separators), so a body joined from these pieces hashes the same."""
    dump = getattr(value, "model_dump", None)
    return json.dumps(dump(mode="json") if dump is not None else value, sort_keys=True)


def _json_list(pieces: list[str]) -> str:
    return "[" + ", ".join(pieces) + "]"


def _same(a: Any, b: Any) -> bool:
    return a is b or a == b


@dataclass
class _PodEntry:
    pod: dict
    namespace: dict | None
    workload: Workload | None
    json: str  # the workload's digest JSON ("" without a workload)


class _UniqueOwners:
    """Address -> the one workload with it (`by_ip`: an address two pods share is nobody's)."""

    def __init__(self) -> None:
        self._owners: dict[str, dict[PodKey, Workload]] = {}

    def get(self, ip: str, default: Workload | None = None) -> Workload | None:
        owners = self._owners.get(ip)
        if owners is None or len(owners) != 1:
            return default
        return next(iter(owners.values()))

    def add(self, key: PodKey, workload: Workload) -> None:
        for ip in workload.ips:
            self._owners.setdefault(ip, {})[key] = workload

    def remove(self, key: PodKey, workload: Workload) -> None:
        for ip in workload.ips:
            owners = self._owners.get(ip)
            if owners is not None:
                owners.pop(key, None)
                if not owners:
                    del self._owners[ip]


class _PodIndex:
    """`compiler.PodLookup` kept up to date pod by pod (what `compiler._Pods` builds whole)."""

    def __init__(self) -> None:
        self.by_key: dict[PodKey, Workload] = {}
        self.by_ip = _UniqueOwners()
        self._by_label: dict[tuple[str, str, str], dict[PodKey, dict]] = {}

    def selected(self, namespace: str, selector: dict[str, str]) -> list[dict]:
        if not selector:
            return []
        found = [self._by_label.get((namespace, k, v), {}) for k, v in selector.items()]
        return list(min(found, key=len).values())

    def add(self, key: PodKey, entry: _PodEntry) -> None:
        for label, value in _labels(entry.pod).items():
            self._by_label.setdefault((key[0], label, value), {})[key] = entry.pod
        if entry.workload is None:
            return
        self.by_key[key] = entry.workload
        if not (entry.pod.get("spec") or {}).get("hostNetwork"):
            self.by_ip.add(key, entry.workload)

    def remove(self, key: PodKey, entry: _PodEntry) -> None:
        for label, value in _labels(entry.pod).items():
            pods = self._by_label.get((key[0], label, value))
            if pods is not None:
                pods.pop(key, None)
                if not pods:
                    del self._by_label[(key[0], label, value)]
        if entry.workload is None:
            return
        self.by_key.pop(key, None)
        if not (entry.pod.get("spec") or {}).get("hostNetwork"):
            self.by_ip.remove(key, entry.workload)


@dataclass
class _ServiceEntry:
    svc: dict
    slices: list[dict] | None
    service: Service
    json: str
    # what a pod change must touch to concern it: the selector's pods (no slices), or the
    # pods its slices name and the addresses they list without naming a pod
    selector: dict[str, str]
    refs: frozenset[PodKey]
    ips: frozenset[str]

    def concerns(self, key: PodKey, entries: tuple[_PodEntry | None, ...]) -> bool:
        """Whether a pod's change (its entries before and after) may change this Service: it
        is or was among its endpoints' pods and what its endpoint is read from changed (a
        label or annotation that no selector reads changes no endpoint)."""
        if self.slices is None:
            if key[0] != self.service.namespace:
                return False
            return len({_selected_inputs(e, self.selector) for e in entries}) > 1
        if key not in self.refs and not any(
            e is not None and e.workload is not None and not self.ips.isdisjoint(e.workload.ips)
            for e in entries
        ):
            return False
        return len({_sliced_inputs(e) for e in entries}) > 1


def _selected_inputs(entry: _PodEntry | None, selector: dict[str, str]) -> str | None:
    """What `compiler._selector_candidates` reads of a pod its selector matches (None: not
    matched), as one comparable string."""
    if entry is None or entry.workload is None:
        return None
    if not (_matches(selector, _labels(entry.pod)) and _matches(selector, entry.workload.labels)):
        return None
    w, pod = entry.workload, entry.pod
    deleting = _meta(pod).get("deletionTimestamp")
    read = [w.uid, w.node, w.ips, deleting, pod.get("spec"), pod.get("status")]
    return json.dumps(read, sort_keys=True, default=str)


def _sliced_inputs(entry: _PodEntry | None) -> str | None:
    """What `compiler._slice_candidates` reads of a pod its slices name or list by address
    (the pod lookup: its workload's uid, node and addresses, and hostNetwork, which keeps a
    pod out of the by-address lookup)."""
    if entry is None or entry.workload is None:
        return None
    w = entry.workload
    host = (entry.pod.get("spec") or {}).get("hostNetwork")
    return json.dumps([w.uid, w.node, w.ips, host], default=str)


def _slice_dependencies(slices: list[dict], namespace: str) -> tuple[set[PodKey], set[str]]:
    """The pods a Service's slices name and the addresses they list without a targetRef (more
    than `compiler._slice_candidates` may look up, never fewer)."""
    refs: set[PodKey] = set()
    ips: set[str] = set()
    for eps in slices:
        for ep in eps.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            if ref.get("kind") == "Pod" and ref.get("name"):
                refs.add((ref.get("namespace") or namespace, ref["name"]))
            elif not ref:
                ips.update((ep.get("addresses") or [])[:1])
    return refs, ips


class IncrementalCompiler:
    """One per push server: `compile(model, trust_bundle)` after each model change."""

    def __init__(self) -> None:
        self._pods: dict[PodKey, _PodEntry] = {}
        self._namespaces: dict[str, dict] = {}
        self._order: list[PodKey] = []  # keys of the pods with a workload, sorted
        self._index = _PodIndex()
        self._services: dict[PodKey, _ServiceEntry] = {}
        self._rest_key: tuple | None = None
        self._rest: dict[str, Any] = {}
        self._rest_json: dict[str, str] = {}
        self._needs = L7Needs()  # what the Istio resources need per request (l7level.py)
        self._result: SharedSnapshot | None = None
        self._endpoints: set[str] | None = None  # workload uids behind a Service
        self._seen: tuple[ClusterModel, int] | None = None  # the model and generation compiled
        # the last result's workload lists (shared, their JSON, node-local) and each shared
        # pod's place in them, patched in place of a pass over every pod when few changed
        self._lists: tuple[list[Workload], list[str], dict[str, list[Workload]]] | None = None
        self._slots: dict[PodKey, int] = {}

    def compile(self, model: ClusterModel, trust_bundle: str | None = None) -> SharedSnapshot:
        changed = self._update_pods(model)
        services_changed = self._update_services(model, changed)
        rest_changed = self._update_rest(model, trust_bundle)
        if self._result is not None and not (changed or services_changed or rest_changed):
            return self._result
        self._result = self._assemble(services_changed or rest_changed, changed)
        return self._result

    # -- pods --------------------------------------------------------------------------------

    def _update_pods(self, model: ClusterModel) -> dict[PodKey, tuple[_PodEntry | None, ...]]:
        """Bring the kept workloads up to the model; returns the changed pods' entries
        (before, after; None for absent). Only the pods the model says changed since the last
        compile are looked at, when it can say (`ClusterModel.changed_since`)."""
        namespaces = {_meta(n).get("name", ""): n for n in model.objects("Namespace")}
        moved = {
            name
            for name in namespaces.keys() | self._namespaces.keys()
            if not _same(namespaces.get(name), self._namespaces.get(name))
        }
        self._namespaces = namespaces
        seen, self._seen = self._seen, (model, model.generation)
        keys = None
        if seen is not None and seen[0] is model and not moved:
            keys = model.changed_since("Pod", seen[1])
        if keys is not None and all(ns and name for ns, name in keys):
            changed = {}
            for key in keys:
                pod = model.get("Pod", *key)
                if pod is None:
                    if key in self._pods:
                        changed[key] = (self._pods[key], None)
                    continue
                change = self._look(key, pod, namespaces, moved)
                if change is not None:
                    changed[key] = change
            return self._apply_pods(changed)
        changed = {}
        seen_pods = 0
        for pod in model.objects("Pod"):
            meta = _meta(pod)
            key = (meta.get("namespace", "default"), meta.get("name"))
            seen_pods += 1
            change = self._look(key, pod, namespaces, moved)
            if change is not None:
                changed[key] = change
        added = sum(1 for old, _new in changed.values() if old is None)
        if seen_pods - added < len(self._pods):  # some kept pods are gone from the model
            present = {
                (_meta(p).get("namespace", "default"), _meta(p).get("name"))
                for p in model.objects("Pod")
            }
            for key in self._pods.keys() - present:
                changed[key] = (self._pods[key], None)
        return self._apply_pods(changed)

    def _look(
        self, key: PodKey, pod: dict, namespaces: dict[str, dict], moved: set[str]
    ) -> tuple[_PodEntry | None, _PodEntry] | None:
        """The pod's entries (before, after) if its workload must be remade, else None."""
        old = self._pods.get(key)
        if old is not None and key[0] not in moved:
            if old.pod is pod:
                return None
            if old.pod == pod:
                old.pod = pod  # an equal copy: the next look is an identity check
                return None
        namespace = namespaces.get(key[0])
        workload = compile_workload(pod, namespace)
        return old, _PodEntry(pod, namespace, workload, _json(workload) if workload else "")

    def _apply_pods(
        self, changed: dict[PodKey, tuple[_PodEntry | None, ...]]
    ) -> dict[PodKey, tuple[_PodEntry | None, ...]]:
        """Move the kept pods, their index and order to the changed entries."""
        for key, (old, _new) in changed.items():
            if old is not None:
                self._index.remove(key, old)
                if old.workload is not None:
                    del self._order[bisect.bisect_left(self._order, key)]
                del self._pods[key]
        for key, (_old, new) in changed.items():
            if new is not None:
                self._pods[key] = new
                self._index.add(key, new)
                if new.workload is not None:
                    bisect.insort(self._order, key)
        return changed

    # -- services ----------------------------------------------------------------------------

    def _update_services(
        self, model: ClusterModel, changed: dict[PodKey, tuple[_PodEntry | None, ...]]
    ) -> bool:
        slices = _slices_by_service(model)
        everything = len(changed) > MANY_PODS
        kept: dict[PodKey, _ServiceEntry] = {}
        remade = False
        for svc in model.objects("Service"):
            meta = _meta(svc)
            key = (meta.get("namespace", "default"), meta["name"])
            own = slices.get(key)
            entry = self._services.get(key)
            if (
                entry is None
                or everything
                or not _same(entry.svc, svc)
                or not _same(entry.slices, own)
                or any(entry.concerns(k, pods) for k, pods in changed.items())
            ):
                fresh = self._compile_service(svc, own, key[0])
                if entry is not None and fresh.service == entry.service:
                    fresh.service, fresh.json = entry.service, entry.json  # same content
                    # its `meshagent.io/l7` annotation is not in the Service but sets its level
                    remade = remade or forced_levels([svc]) != forced_levels([entry.svc])
                else:
                    remade = True
                entry = fresh
            kept[key] = entry
        remade = remade or kept.keys() != self._services.keys()
        self._services = kept
        return remade

    def _compile_service(self, svc: dict, own: list[dict] | None, namespace: str) -> _ServiceEntry:
        service = compile_service(svc, own, self._index)
        selector = {
            str(k): str(v) for k, v in ((svc.get("spec") or {}).get("selector") or {}).items()
        }
        refs, ips = _slice_dependencies(own, namespace) if own is not None else (set(), set())
        return _ServiceEntry(
            svc, own, service, _json(service), selector, frozenset(refs), frozenset(ips)
        )

    # -- the rest ----------------------------------------------------------------------------

    def _update_rest(self, model: ClusterModel, trust_bundle: str | None) -> bool:
        key = (
            trust_bundle,
            tuple(
                (kind, tuple(model.objects(kind)))
                for kind in sorted(model.kinds())
                if kind not in _OWN_KINDS
            ),
        )
        if self._rest_key is not None and key == self._rest_key:
            return False
        self._rest_key = key
        rest = {
            "nodes": compile_nodes(model),
            "entries": compile_entries(model_entries(model), resolved_names(model)),
            "trust_bundle": trust_bundle,
            "istio_resources": compile_istio(model),
            "telemetry": compile_telemetry(model),
            "jwks": compile_jwks(model),
        }
        self._rest = rest
        self._needs = needs_of_manifests(rest["istio_resources"], model_entry_hosts(model))
        self._rest_json = {
            field: _json_list([_json(x) for x in value])
            if isinstance(value, list)
            else _json(value)
            for field, value in rest.items()
        }
        return True

    # -- the result ----------------------------------------------------------------------------

    def _assemble(
        self, services_changed: bool, changed: dict[PodKey, tuple[_PodEntry | None, ...]]
    ) -> SharedSnapshot:
        entries = [self._services[k] for k in sorted(self._services)]
        services = [e.service for e in entries] + self._rest["entries"]
        endpoints_before = self._endpoints
        if services_changed or self._endpoints is None:
            self._endpoints = {e.workload_uid for s in services for e in s.endpoints}
        endpoints = self._endpoints
        lists = None
        if endpoints_before is not None and endpoints == endpoints_before:
            lists = self._patched(changed, endpoints)  # the same pods shared, fewer changed
        if lists is None:
            lists = self._split(endpoints)
        self._lists = lists
        shared, shared_json, local = lists
        fields = {k: v for k, v in self._rest.items() if k != "entries"}
        # the levels depend on Services, their endpoints' workloads and the Istio resources:
        # recomputed on every change (a pass over the Services' ports, cheap)
        forced = forced_levels(e.svc for e in entries)
        levels = compile_levels(services, forced, self._needs, shared)
        snapshot = Snapshot(
            node="", workloads=shared, services=services, l7_levels=levels, **fields
        )
        pieces = {k: v for k, v in self._rest_json.items() if k != "entries"}
        pieces["workloads"] = _json_list(shared_json)
        service_json = [e.json for e in entries]
        if self._rest["entries"]:
            service_json.append(self._rest_json["entries"][1:-1])
        pieces["services"] = _json_list(service_json)
        return SharedSnapshot(snapshot, _digest(snapshot, pieces), local)

    def _split(
        self, endpoints: set[str]
    ) -> tuple[list[Workload], list[str], dict[str, list[Workload]]]:
        """Every pod's workload into the shared list (meshed, or behind a Service) or its
        node's local one, in the compiler's order."""
        shared: list[Workload] = []
        shared_json: list[str] = []
        local: dict[str, list[Workload]] = {}
        self._slots = {}
        for key in self._order:
            pod = self._pods[key]
            w = pod.workload
            assert w is not None
            if w.meshed or w.uid in endpoints:
                self._slots[key] = len(shared)
                shared.append(w)
                shared_json.append(pod.json)
            else:
                local.setdefault(w.node, []).append(w)
        return shared, shared_json, local

    def _patched(
        self, changed: dict[PodKey, tuple[_PodEntry | None, ...]], endpoints: set[str]
    ) -> tuple[list[Workload], list[str], dict[str, list[Workload]]] | None:
        """The last lists with the changed pods' workloads put in their places (new lists:
        the last result keeps its own), or None when a pod came, went, or moved between the
        shared list and a node's (`_split` then)."""
        if self._lists is None:
            return None
        shared, shared_json, local = self._lists
        shared, shared_json, local = list(shared), list(shared_json), dict(local)
        copied: set[str] = set()
        for key, (old, new) in changed.items():
            was = old.workload if old is not None else None
            w = new.workload if new is not None else None
            if was is None or w is None or new is None:
                return None
            slot = self._slots.get(key)
            if slot is not None:
                if not (w.meshed or w.uid in endpoints):
                    return None
                shared[slot], shared_json[slot] = w, new.json
                continue
            if w.meshed or w.uid in endpoints or w.node != was.node:
                return None
            if w.node not in copied:
                local[w.node] = list(local[w.node])
                copied.add(w.node)
            mine = local[w.node]
            mine[next(i for i, x in enumerate(mine) if x is was)] = w
        return shared, shared_json, local


def _digest(snapshot: Snapshot, pieces: dict[str, str]) -> str:
    """`snapshot.body_digest()` from the kept JSON pieces (a field without one, such as one
    added to Snapshot later, is written here)."""
    parts = []
    for field in sorted(type(snapshot).model_fields.keys() - _NOT_SHARED):
        piece = pieces.get(field)
        if piece is None:
            piece = _json(snapshot.model_dump(mode="json", include={field})[field])
        parts.append(f"{json.dumps(field)}: {piece}")
    return hashlib.sha256(("{" + ", ".join(parts) + "}").encode()).hexdigest()

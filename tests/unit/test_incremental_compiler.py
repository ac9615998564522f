"""The incremental compiler gives, after every change, exactly what a compile from scratch
gives: the shared snapshot, its digest (so every node's version) and the node-local pods."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st
from meshagent.controller.compiler import compile_shared
from meshagent.controller.incremental import IncrementalCompiler
from meshagent.controller.model import ClusterModel

NAMESPACES = ["a", "b"]
PODS = ["p0", "p1", "p2"]
SERVICES = ["s0", "s1"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2"]


def _maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


def _labels(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if v is not None}


namespaces = st.builds(
    lambda name, mesh, mode: {
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": _labels({"meshagent.io/mesh": mesh, "meshagent.io/fail-mode": mode}),
        },
    },
    st.sampled_from(NAMESPACES),
    _maybe(st.sampled_from(["enabled", "disabled"])),
    _maybe(st.sampled_from(["open", "closed", "typo"])),
)

pods = st.builds(
    lambda ns, name, app, tier, mesh, node, ips, host, phase, ready, leaving, port, uid: {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": _labels({"app": app, "tier": tier, "meshagent.io/mesh": mesh}),
            **({"uid": uid} if uid else {}),
            **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if leaving else {}),
        },
        "spec": {
            **({"nodeName": node} if node else {}),
            "hostNetwork": host,
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}],
        },
        "status": {
            "phase": phase,
            "podIPs": [{"ip": ip} for ip in ips],
            **({"conditions": [{"type": "Ready", "status": ready}]} if ready else {}),
        },
    },
    st.sampled_from(NAMESPACES),
    st.sampled_from(PODS),
    st.sampled_from([None, "x", "x", "y"]),
    _maybe(st.sampled_from(["1", "2"])),
    _maybe(st.just("disabled")),
    st.sampled_from([None, "n1", "n1", "n2"]),
    st.lists(st.sampled_from(IPS), min_size=1, max_size=2, unique=True),
    st.booleans(),
    st.sampled_from(["Running", "Running", "Pending"]),
    st.sampled_from([None, "True", "True", "False"]),
    st.sampled_from([False, False, True]),
    st.sampled_from([80, 81]),
    _maybe(st.sampled_from(["u1", "u2"])),
)

services = st.builds(
    lambda ns, name, selector, target, cluster_ip, port_name, l7: {
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ns,
            **({"annotations": {"meshagent.io/l7": l7}} if l7 else {}),
        },
        "spec": {
            "clusterIP": cluster_ip,
            "selector": selector,
            "ports": [{"name": port_name, "port": 80, "targetPort": target}],
        },
    },
    st.sampled_from(NAMESPACES),
    st.sampled_from(SERVICES),
    st.sampled_from([{}, {"app": "x"}, {"app": "y", "tier": "1"}, {"tier": "2"}]),
    st.sampled_from(["http", 8080]),
    st.sampled_from(["10.96.0.1", "None", "fd00::10"]),
    st.sampled_from(["http", "http", "tcp-db", "grpc"]),
    st.sampled_from([None, None, "off", "full", "observe"]),
)

# Istio resources that move a Service port's L7 level (controller/l7level.py): a change to
# one must re-mark the Services it names or whose pods it selects.
virtual_services = st.builds(
    lambda ns, host, http: {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "vs", "namespace": ns},
        "spec": {
            "hosts": [host],
            **(
                {"http": [{"route": [{"destination": {"host": host}}]}]}
                if http
                else {"tcp": [{"route": [{"destination": {"host": host}}]}]}
            ),
        },
    },
    st.sampled_from(NAMESPACES),
    st.sampled_from(SERVICES),
    st.booleans(),
)
authorization_policies = st.builds(
    lambda ns, labels, http: {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "ap", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": labels},
            "rules": [{"to": [{"operation": {"paths": ["/x"]} if http else {"ports": ["80"]}}]}],
        },
    },
    st.sampled_from(NAMESPACES),
    st.sampled_from([{"app": "x"}, {"tier": "1"}]),
    st.booleans(),
)

slice_endpoints = st.builds(
    lambda ip, ref, ref_ns, ready: {
        "addresses": [ip],
        **({"targetRef": {"kind": "Pod", "name": ref, "namespace": ref_ns}} if ref else {}),
        "conditions": {"ready": ready},
    },
    st.sampled_from(IPS),
    st.sampled_from([None, *PODS]),
    st.sampled_from(NAMESPACES),
    st.sampled_from([True, True, False]),
)

slices = st.builds(
    lambda ns, service, suffix, family, endpoints: {
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{suffix}",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    },
    st.sampled_from(NAMESPACES),
    st.sampled_from(SERVICES),
    st.sampled_from(["1", "2"]),
    st.sampled_from(["IPv4", "IPv6"]),
    st.lists(slice_endpoints, max_size=3),
)

nodes = st.builds(
    lambda name, address: {
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    },
    st.sampled_from(["n1", "n2"]),
    st.sampled_from(["192.168.0.1", "192.168.0.2"]),
)

# One field of an existing pod changed (the rest kept): a change that concerns a Service's
# endpoints must remake it, one that does not (a label no selector reads, an annotation)
# may keep it.
TWEAKS = [
    ("label", "app", "x"),
    ("label", "app", "y"),
    ("label", "tier", "1"),
    ("label", "round", "1"),
    ("label", "round", "2"),
    ("annotation", "note", "1"),
    ("ready", None, "False"),
    ("ready", None, "True"),
    ("phase", None, "Pending"),
    ("phase", None, "Running"),
    ("leaving", None, "2026-01-01T00:00:00Z"),
    ("port", None, 81),
    ("node", None, "n2"),
    ("ips", None, ["10.0.0.3"]),
    ("ips", None, ["fd00::2", "10.0.0.1"]),
    ("host", None, True),
    ("host", None, False),
]
tweaks = st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(PODS), st.sampled_from(TWEAKS))


def _name_of(obj: dict) -> tuple[str | None, str | None]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace"), meta.get("name")


def _tweaked(pod: dict, what: str, key: str | None, value: object) -> dict:
    pod = copy.deepcopy(pod)
    meta, spec = pod.setdefault("metadata", {}), pod.setdefault("spec", {})
    status = pod.setdefault("status", {})
    if what == "label":
        meta.setdefault("labels", {})[key] = value
    elif what == "annotation":
        meta.setdefault("annotations", {})[key] = value
    elif what == "ready":
        status["conditions"] = [{"type": "Ready", "status": value}]
    elif what == "phase":
        status["phase"] = value
    elif what == "leaving":
        meta["deletionTimestamp"] = value
    elif what == "port":
        spec["containers"] = [{"name": "c", "ports": [{"name": "http", "containerPort": value}]}]
    elif what == "node":
        spec["nodeName"] = value
    elif what == "ips":
        status["podIPs"] = [{"ip": ip} for ip in value]  # type: ignore[attr-defined]
        status.pop("podIP", None)
    else:
        spec["hostNetwork"] = value
    return pod


changes = st.one_of(
    st.tuples(st.just("upsert"), st.one_of(namespaces, pods, services, slices, nodes)),
    st.tuples(st.just("upsert"), st.one_of(virtual_services, authorization_policies)),
    st.tuples(st.just("upsert"), pods),  # pods change most, as in a cluster
    st.tuples(
        st.just("delete"),
        st.fixed_dictionaries(
            {
                "kind": st.sampled_from(
                    [
                        "Namespace",
                        "Pod",
                        "Service",
                        "EndpointSlice",
                        "Node",
                        "VirtualService",
                        "AuthorizationPolicy",
                    ]
                ),
                "metadata": st.fixed_dictionaries(
                    {
                        "namespace": st.sampled_from(NAMESPACES),
                        "name": st.sampled_from(
                            [*PODS, *SERVICES, "s0-1", "s1-2", "a", "n1", "vs", "ap"]
                        ),
                    }
                ),
            }
        ),
    ),
    st.tuples(st.just("relist"), st.sampled_from(["Pod", "Service", "EndpointSlice"])),
    st.tuples(st.just("tweak"), tweaks),
    st.tuples(st.just("tweak"), tweaks),  # one field of a pod, as most pod updates are
)


def _apply(model: ClusterModel, change: tuple[str, object]) -> None:
    what, obj = change
    if what == "tweak":
        assert isinstance(obj, tuple)
        ns, name, (field, key, value) = obj
        named = [p for p in model.objects("Pod") if _name_of(p) == (ns, name)]
        if named:
            model.upsert("Pod", _tweaked(named[0], field, key, value))
    elif what == "relist":  # equal copies of every object of the kind, as after a relist
        assert isinstance(obj, str)
        model.replace(obj, [copy.deepcopy(o) for o in model.objects(obj)])
    elif what == "upsert":
        assert isinstance(obj, dict)
        model.upsert(obj["kind"], obj)
    else:
        assert isinstance(obj, dict)
        kind = obj["kind"]
        if kind in ("Namespace", "Node"):  # cluster-scoped
            obj = {"metadata": {"name": obj["metadata"]["name"]}}
        model.delete(kind, obj)


def _check(sequence: list, every: int = 1) -> None:
    model = ClusterModel()
    compiler = IncrementalCompiler()
    for i, change in enumerate(sequence):
        _apply(model, change)
        if (i + 1) % every and i < len(sequence) - 1:
            continue  # several changes between two compiles, as the push server coalesces
        kept = compiler.compile(model, "bundle")
        scratch = compile_shared(model, "bundle")
        assert kept.snapshot == scratch.snapshot
        assert kept.digest == scratch.digest == scratch.snapshot.body_digest()
        assert kept.local == scratch.local
        for node in ("n1", "n2", "n3"):
            assert kept.for_node(node).version == scratch.for_node(node).version


@settings(max_examples=500, deadline=None)
@given(st.lists(changes, min_size=10, max_size=40))
def test_incremental_compile_equals_a_compile_from_scratch(sequence: list) -> None:
    _check(sequence)


@settings(max_examples=200, deadline=None)
@given(st.lists(changes, min_size=10, max_size=40), st.integers(2, 5))
def test_a_compile_after_several_changes_equals_a_compile_from_scratch(
    sequence: list, every: int
) -> None:
    """The compiler looks only at the pods the model says changed since its last compile,
    and patches the last workload lists when no pod came, went or moved between them."""
    _check(sequence, every)


def _pod(name: str, ip: str, node: str = "n1", ns: str = "a") -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "x"}},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "podIP": ip},
    }


def _sliced(*endpoints: dict) -> list:
    service = {
        "kind": "Service",
        "metadata": {"name": "s0", "namespace": "a"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]},
    }
    eps = {
        "kind": "EndpointSlice",
        "metadata": {
            "name": "s0-1",
            "namespace": "a",
            "labels": {"kubernetes.io/service-name": "s0"},
        },
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080}],
    }
    return [("upsert", service), ("upsert", eps)]


def test_an_address_only_endpoint_follows_the_pod_that_owns_the_address() -> None:
    """A slice endpoint without targetRef is the pod with its address while only one has it:
    the Service changes when that pod moves, or when a second pod takes the address."""
    _check(
        [
            ("upsert", _pod("p0", "10.0.0.1")),
            *_sliced({"addresses": ["10.0.0.1"]}),
            ("upsert", _pod("p0", "10.0.0.1", node="n2")),
            ("upsert", _pod("p1", "10.0.0.1", ns="b")),
            ("delete", _pod("p1", "10.0.0.1", ns="b")),
        ]
    )


def test_a_named_endpoint_follows_its_pod() -> None:
    ref = {"kind": "Pod", "name": "p0", "namespace": "b"}
    _check(
        [
            *_sliced({"addresses": ["10.0.0.1"], "targetRef": ref}),
            ("upsert", _pod("p0", "10.0.0.2", ns="b")),
            ("upsert", _pod("p0", "10.0.0.2", node="n2", ns="b")),
        ]
    )


def test_an_unchanged_model_gives_the_same_result_object() -> None:
    """Nothing changed: the kept result itself comes back (push's delta cache keys on it)."""
    model = ClusterModel()
    model.upsert("Namespace", {"metadata": {"name": "a"}})
    compiler = IncrementalCompiler()
    first = compiler.compile(model)
    assert compiler.compile(model) is first
    address = {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}
    model.upsert("Node", {"metadata": {"name": "n1"}, "status": address})
    assert compiler.compile(model) is not first


def _ready_pod(name: str, ip: str) -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "a", "labels": {"app": "x"}},
        "spec": {
            "nodeName": "n1",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}],
        },
        "status": {
            "phase": "Running",
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_each_pod_field_an_endpoint_is_read_from_remakes_its_service() -> None:
    """A Service is kept when a pod change leaves what its endpoints read unchanged (a label
    no selector reads): every field they do read, changed alone, must still remake it. s1
    selects every pod (named target port), s0's slice names p1 and lists p2's address."""
    selected = {
        "kind": "Service",
        "metadata": {"name": "s1", "namespace": "a"},
        "spec": {
            "clusterIP": "10.96.0.2",
            "selector": {"app": "x"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }
    sliced = [
        {"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "name": "p1", "namespace": "a"}},
        {"addresses": ["10.0.0.3"]},
    ]
    base = [
        ("upsert", _ready_pod("p0", "10.0.0.1")),
        ("upsert", _ready_pod("p1", "10.0.0.2")),
        ("upsert", _ready_pod("p2", "10.0.0.3")),
        ("upsert", selected),
        *_sliced(*sliced),
    ]
    for field, key, value in TWEAKS:
        for name in PODS:
            _check([*base, ("tweak", ("a", name, (field, key, value)))])


def test_a_label_no_selector_reads_keeps_the_services() -> None:
    model = ClusterModel()
    compiler = IncrementalCompiler()
    for name, ip in (("p0", "10.0.0.1"), ("p1", "10.0.0.2")):
        model.upsert("Pod", _ready_pod(name, ip))
    model.upsert(
        "Service",
        {
            "kind": "Service",
            "metadata": {"name": "s1", "namespace": "a"},
            "spec": {"clusterIP": "10.96.0.2", "selector": {"app": "x"}, "ports": [{"port": 80}]},
        },
    )
    before = compiler.compile(model).snapshot.services
    model.upsert("Pod", _tweaked(_ready_pod("p0", "10.0.0.1"), "label", "round", "7"))
    after = compiler.compile(model)
    assert after.snapshot.services[0] is before[0]  # not remade
    assert after.snapshot == compile_shared(model).snapshot  # and the pod's labels moved

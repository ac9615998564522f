"""The L7 level of a Service port (controller/l7level.py): `full` only where a resource needs a
decision per request, `observe` on other HTTP/1.1 ports, `l4` on the rest; the Service's
`meshagent.io/l7` annotation forces it."""

from __future__ import annotations

import pytest
from meshagent.controller.compiler import compile_shared
from meshagent.controller.model import ClusterModel


def _service(
    port_name: str = "http-web", annotation: str | None = None, label: str | None = None
) -> dict:
    meta: dict = {"name": "web", "namespace": "shop"}
    if annotation is not None:
        meta["annotations"] = {"meshagent.io/l7": annotation}
    if label is not None:
        meta["labels"] = {"meshagent.io/l7": label}
    return {
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "10.96.0.9",
            "selector": {"app": "web"},
            "ports": [{"name": port_name, "port": 80, "targetPort": 8080}],
        },
    }


POD = {
    "kind": "Pod",
    "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {"nodeName": "n1"},
    "status": {"phase": "Running", "podIP": "10.0.0.5"},
}


def _vs(http: bool = True) -> dict:
    route = [{"route": [{"destination": {"host": "web"}}]}]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"hosts": ["web"], **({"http": route} if http else {"tcp": route})},
    }


def _dr(policy: dict, port_level: bool = False) -> dict:
    tp = {"portLevelSettings": [{"port": {"number": 80}, **policy}]} if port_level else policy
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"host": "web.shop.svc.cluster.local", "trafficPolicy": tp},
    }


def _ap(rule: dict, *, namespace: str = "shop", labels: dict | None = None, **extra) -> dict:
    spec: dict = {"rules": [rule], **extra}
    if labels is not None:
        spec["selector"] = {"matchLabels": labels}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "ap", "namespace": namespace},
        "spec": spec,
    }


REQUEST_AUTH = {
    "apiVersion": "security.istio.io/v1",
    "kind": "RequestAuthentication",
    "metadata": {"name": "jwt", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "jwtRules": [{"issuer": "me", "jwksUri": "https://keys.example/jwks"}],
    },
}


def _level(*objects: dict) -> str:
    model = ClusterModel()
    for obj in objects:
        model.upsert(obj["kind"], obj)
    snapshot = compile_shared(model).snapshot
    return snapshot.l7_levels["shop/web:80"]


@pytest.mark.parametrize(
    ("objects", "level"),
    [
        # by protocol, with nothing else
        ((_service("http-web"),), "observe"),
        ((_service("tcp-db"),), "l4"),
        ((_service("unnamed"),), "l4"),
        ((_service("grpc-api"),), "full"),
        ((_service("http2-web"),), "full"),
        # resources that need a per-request decision
        ((_service(), _vs()), "full"),
        ((_service(), _vs(http=False)), "observe"),
        ((_service(), _dr({"connectionPool": {"http": {"http1MaxPendingRequests": 1}}})), "full"),
        ((_service(), _dr({"connectionPool": {"tcp": {"maxConnections": 5}}})), "observe"),
        # h2UpgradePolicy UPGRADE: only the engine can send HTTP/1.1 requests as HTTP/2
        ((_service(), _dr({"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}})), "full"),
        (
            (
                _service(),
                _dr({"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}),
            ),
            "full",
        ),
        (
            (_service(), _dr({"loadBalancer": {"consistentHash": {"useSourceIp": True}}})),
            "observe",
        ),
        ((_service(), _dr({"loadBalancer": {"simple": "ROUND_ROBIN"}})), "full"),
        (
            (
                _service(),
                _dr({"loadBalancer": {"localityLbSetting": {"enabled": True}}}),
            ),
            "observe",
        ),
        ((_service(), _dr({"outlierDetection": {"consecutive5xxErrors": 3}})), "full"),
        ((_service(), _dr({"tls": {"mode": "SIMPLE"}})), "full"),
        ((_service(), _dr({"tls": {"mode": "DISABLE"}})), "full"),
        ((_service(), _dr({"tls": {"mode": "ISTIO_MUTUAL"}})), "observe"),
        (
            (_service(), _dr({"outlierDetection": {"consecutive5xxErrors": 3}}, port_level=True)),
            "full",
        ),
        ((_service(), POD, _ap({"to": [{"operation": {"paths": ["/a"]}}]})), "full"),
        # any policy: a denial on an HTTP port is a 403 per request
        ((_service(), POD, _ap({"to": [{"operation": {"ports": ["8080"]}}]})), "full"),
        (
            (_service(), POD, _ap({"to": [{"operation": {"methods": ["GET"]}}]}, labels={})),
            "full",
        ),
        (
            (
                _service(),
                POD,
                _ap({"to": [{"operation": {"paths": ["/a"]}}]}, labels={"app": "other"}),
            ),
            "observe",
        ),
        (
            (
                _service(),
                POD,
                _ap({"to": [{"operation": {"paths": ["/a"]}}]}, namespace="istio-system"),
            ),
            "full",
        ),
        (
            (_service(), POD, _ap({"to": [{"operation": {"paths": ["/a"]}}]}, namespace="other")),
            "observe",
        ),
        (
            (_service(), POD, _ap({}, action="CUSTOM", provider={"name": "authz"})),
            "full",
        ),
        (
            (_service(), POD, _ap({"when": [{"key": "request.headers[x]", "values": ["1"]}]})),
            "full",
        ),
        ((_service(), POD, REQUEST_AUTH), "full"),
        # the annotation wins over everything but the port's protocol
        ((_service(annotation="off"), _vs()), "l4"),
        ((_service(annotation="observe"), _vs()), "observe"),
        ((_service(annotation="full"),), "full"),
        ((_service(annotation="FULL"),), "full"),
        ((_service("grpc", annotation="observe"),), "full"),  # no HTTP/2 parser in observe
        ((_service("grpc", annotation="off"),), "l4"),
        ((_service("tcp", annotation="full"),), "l4"),
        ((_service(annotation="typo"), _vs()), "full"),  # ignored
        ((_service(label="off"), _vs()), "l4"),  # a label of the same name serves too
        ((_service(annotation="full", label="off"),), "full"),  # the annotation wins
    ],
)
def test_level_decision_table(objects: tuple[dict, ...], level: str) -> None:
    assert _level(*objects) == level


def test_every_tcp_port_is_marked_and_udp_is_not() -> None:
    svc = _service()
    svc["spec"]["ports"] = [
        {"name": "http", "port": 80},
        {"name": "tcp-x", "port": 81},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    model = ClusterModel()
    model.upsert("Service", svc)
    assert compile_shared(model).snapshot.l7_levels == {
        "shop/web:80": "observe",
        "shop/web:81": "l4",
    }


def _levels(*objects: dict) -> dict[str, str]:
    model = ClusterModel()
    for obj in objects:
        model.upsert(obj["kind"], obj)
    return dict(compile_shared(model).snapshot.l7_levels)


@pytest.mark.parametrize(
    ("objects", "at_pods"),
    [
        # the source's decisions alone: its pods' node only observes
        ((_service(), POD, _vs()), "observe"),
        ((_service(), POD, _dr({"outlierDetection": {"consecutive5xxErrors": 3}})), "observe"),
        ((_service(), POD, _vs(), _dr({"loadBalancer": {"simple": "ROUND_ROBIN"}})), "observe"),
        # a decision at the pods (authorization, request authentication) keeps them at full
        ((_service(), POD, _vs(), _ap({"to": [{"operation": {"paths": ["/a"]}}]})), None),
        ((_service(), POD, _vs(), REQUEST_AUTH), None),
        # the annotation and HTTP/2 hold at both ends
        ((_service(annotation="full"), POD, _vs()), None),
        ((_service("grpc-api"), POD, _vs()), None),
        # nothing lower to say
        ((_service(), POD), None),
        ((_service(annotation="off"), POD, _vs()), None),
    ],
)
def test_the_pods_node_serves_a_service_full_only_for_its_routes_at_observe(
    objects: tuple[dict, ...], at_pods: str | None
) -> None:
    """A VirtualService's routes and a DestinationRule's settings are decided by the source's
    proxy; the pods' own node needs the engine only for what it decides (authorization, request
    authentication) or what holds at both ends (the annotation, HTTP/2). The pods' level is
    marked only where it is lower than the port's."""
    levels = _levels(*objects)
    assert levels.get("shop/web:80@pods") == at_pods
    if at_pods is not None:
        assert levels["shop/web:80"] == "full"


def test_the_destination_serves_a_pod_port_at_the_highest_of_its_services_pods_levels() -> None:
    from meshagent.agent.proxy.observing import level_of_endpoint
    from meshagent.controller.compiler import compile_shared as compile_

    other = _service()
    other["metadata"] = {"name": "web-api", "namespace": "shop"}
    model = ClusterModel()
    for obj in (_service(), other, POD, _vs()):
        model.upsert(obj["kind"], obj)
    snapshot = compile_(model).snapshot
    assert snapshot.l7_levels["shop/web:80"] == "full"  # the source routes per request
    assert level_of_endpoint(snapshot, "10.0.0.5", 8080) == "observe"
    model.upsert("AuthorizationPolicy", _ap({"to": [{"operation": {"paths": ["/a"]}}]}))
    assert level_of_endpoint(compile_(model).snapshot, "10.0.0.5", 8080) == "full"

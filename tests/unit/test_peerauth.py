"""PeerAuthentication precedence, as Istio documents it."""

from __future__ import annotations

import pytest
from meshagent.agent.policy.peerauth import resolve
from meshagent.common.istio.resource import parse_resource


def pa(ns, name, mode=None, selector=None, ports=None):
    spec: dict = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
    return parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


MESH_STRICT = pa("istio-system", "default", "STRICT")
SHOP_PERMISSIVE = pa("shop", "default", "PERMISSIVE")
REVIEWS_DISABLE = pa("shop", "reviews", "DISABLE", {"app": "reviews"})
REVIEWS_UNSET_PORT = pa("shop", "reviews", "UNSET", {"app": "reviews"}, {9080: "STRICT"})


@pytest.mark.parametrize(
    ("policies", "ns", "labels", "mode", "port_9080"),
    [
        ([], "shop", {}, "PERMISSIVE", "PERMISSIVE"),
        ([MESH_STRICT], "shop", {}, "STRICT", "STRICT"),
        ([MESH_STRICT, SHOP_PERMISSIVE], "shop", {}, "PERMISSIVE", "PERMISSIVE"),
        ([MESH_STRICT, SHOP_PERMISSIVE], "other", {}, "STRICT", "STRICT"),
        ([MESH_STRICT, REVIEWS_DISABLE], "shop", {"app": "reviews"}, "DISABLE", "DISABLE"),
        ([MESH_STRICT, REVIEWS_DISABLE], "shop", {"app": "ratings"}, "STRICT", "STRICT"),
        ([SHOP_PERMISSIVE, REVIEWS_UNSET_PORT], "shop", {"app": "reviews"}, "PERMISSIVE", "STRICT"),
        ([pa("shop", "x", "UNSET"), MESH_STRICT], "shop", {}, "STRICT", "STRICT"),
        # a selector policy in another namespace does not apply
        (
            [pa("other", "r", "DISABLE", {"app": "reviews"})],
            "shop",
            {"app": "reviews"},
            "PERMISSIVE",
            "PERMISSIVE",
        ),
    ],
    ids=[
        "default",
        "mesh",
        "ns-overrides-mesh",
        "other-ns-gets-mesh",
        "workload-overrides",
        "selector-miss",
        "port-level",
        "unset-inherits",
        "selector-other-ns",
    ],
)
def test_mode_precedence(policies, ns, labels, mode, port_9080):
    result = resolve(policies, ns, labels)
    assert result.mode == mode
    assert result.mode_for(9080) == port_9080

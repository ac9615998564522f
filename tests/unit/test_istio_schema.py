"""The Istio resource schemas: what parses, and how refusals name the resource and the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from meshagent.common.istio import (
    SUPPORTED_KINDS,
    ResourceError,
    parse_documents,
    parse_duration,
    parse_resource,
)
from meshagent.common.istio.networking import DestinationRule, VirtualService
from meshagent.common.istio.security import AuthorizationPolicy, PeerAuthentication

AUTHZ_YAML = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-viewer
  namespace: shop
  annotations:
    istio.io/dry-run: "true"
spec:
  selector:
    matchLabels: {app: reviews}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend"]
        notNamespaces: ["test"]
        ipBlocks: ["10.0.0.0/8", "192.168.1.7"]
    to:
    - operation:
        ports: ["9080", 9443]
        methods: ["GET", "HEAD"]
        notPaths: ["/admin*"]
        hosts: ["reviews.shop.svc.cluster.local"]
    when:
    - key: request.headers[X-Env]
      values: ["prod"]
    - key: destination.port
      notValues: ["15020"]
    - key: source.ip
      values: ["10.1.0.0/16"]
"""

PEER_YAML = """
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: reviews-strict
  namespace: shop
spec:
  selector:
    matchLabels: {app: reviews}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    "9090": {mode: DISABLE}
"""

VS_TLS_ROUTE = [{"destination": {"host": "reviews"}}]
VS_YAML = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts: [reviews]
  gateways: [mesh]
  http:
  - name: jason
    match:
    - headers:
        End-User: {exact: jason}
      uri: {prefix: /reviews}
      method: {regex: "GET|HEAD"}
      port: 9080
    route:
    - destination: {host: reviews, subset: v2}
    timeout: 500ms
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,reset,503"}
    fault:
      delay: {fixedDelay: 1.5s, percentage: {value: 10}}
      abort: {httpStatus: 503, percentage: {value: 0.5}}
  - route:
    - destination: {host: reviews, subset: v1, port: {number: 9080}}
      weight: 75
    - destination: {host: reviews, subset: v3}
      weight: 25
  tcp:
  - match: [{port: 27017}]
    route:
    - destination: {host: mongo}
"""

DR_YAML = """
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 30ms}
      http: {http1MaxPendingRequests: 10, maxRequestsPerConnection: 1, h2UpgradePolicy: DEFAULT}
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 3
      interval: 1m30s
      baseEjectionTime: 15m
      maxEjectionPercent: 50
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
"""


def load(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


# --- valid resources -------------------------------------------------------------------------


def test_authorization_policy_parses_to_typed_snake_case_model():
    policy = parse_resource(load(AUTHZ_YAML))

    assert isinstance(policy, AuthorizationPolicy)
    assert (policy.kind, policy.namespace, policy.name) == (
        "AuthorizationPolicy",
        "shop",
        "reviews-viewer",
    )
    assert policy.dry_run is True
    rule = policy.spec.rules[0]
    assert rule.from_[0].source.not_namespaces == ("test",)
    assert rule.to[0].operation.ports == (9080, 9443)  # numeric strings become ints
    assert rule.when[0].key == "request.headers[X-Env]"
    assert rule.uses_http_fields


def test_authorization_policy_defaults_allow_nothing_and_not_dry_run():
    policy = parse_resource(
        {
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-nothing", "namespace": "shop"},
            "spec": {},
        }
    )

    assert policy.spec.action == "ALLOW"
    assert policy.spec.rules is None
    assert policy.dry_run is False


def test_peer_authentication_parses_port_level_modes_with_int_keys():
    peer = parse_resource(load(PEER_YAML))

    assert isinstance(peer, PeerAuthentication)
    assert peer.mode == "STRICT"
    assert {port: m.mode for port, m in peer.spec.port_level_mtls.items()} == {
        8080: "PERMISSIVE",
        9090: "DISABLE",
    }


def test_virtual_service_parses_routes_durations_and_retries():
    vs = parse_resource(load(VS_YAML))

    assert isinstance(vs, VirtualService)
    first, second = vs.spec.http
    assert first.timeout == 0.5
    assert first.retries.per_try_timeout == 2.0
    assert first.retries.retry_on == ("5xx", "reset", "503")
    assert first.retries.retriable_status_codes == {503}
    assert first.fault.delay.fixed_delay == 1.5
    assert first.fault.abort.http_status == 503
    assert "end-user" in first.match[0].headers  # header names are case-insensitive
    assert [r.weight for r in second.route] == [75, 25]
    assert second.route[0].destination.port.number == 9080
    assert vs.spec.tcp[0].match[0].port == 27017


@pytest.mark.parametrize(
    ("http", "upgrade"),
    [
        ({"useClientProtocol": True}, False),  # as the client spoke
        ({"useClientProtocol": False}, False),  # Istio's default, as when unwritten
        ({"h2UpgradePolicy": "UPGRADE"}, True),  # HTTP/1.1 requests go to the pod as HTTP/2
        ({"h2UpgradePolicy": "UPGRADE", "useClientProtocol": False}, True),
        ({"h2UpgradePolicy": "UPGRADE", "useClientProtocol": True}, False),  # made ineffective
        ({"h2UpgradePolicy": "DO_NOT_UPGRADE"}, False),
        ({"h2UpgradePolicy": "DEFAULT"}, False),  # the mesh's default: DO_NOT_UPGRADE
    ],
)
def test_connection_pool_client_protocol_settings(http, upgrade):
    doc = yaml.safe_load(DR_YAML)
    doc["spec"]["trafficPolicy"]["connectionPool"]["http"] = http
    pool = parse_resource(doc).spec.traffic_policy.connection_pool.http
    assert pool.use_client_protocol is http.get("useClientProtocol")
    assert pool.h2_upgrade is upgrade


def test_destination_rule_parses_policies_and_subsets():
    dr = parse_resource(load(DR_YAML))

    assert isinstance(dr, DestinationRule)
    policy = dr.spec.traffic_policy
    assert policy.load_balancer.simple == "LEAST_REQUEST"
    assert policy.connection_pool.tcp.connect_timeout == pytest.approx(0.03)
    assert policy.outlier_detection.consecutive_5xx_errors == 7
    assert policy.outlier_detection.interval == 90.0
    assert policy.outlier_detection.base_ejection_time == 900.0
    assert policy.port_level_settings[0].port.number == 9080
    assert [s.name for s in dr.spec.subsets] == ["v1", "v2"]


def test_missing_namespace_takes_the_default():
    doc = load(DR_YAML)
    del doc["metadata"]["namespace"]

    assert parse_resource(doc, default_namespace="lab").namespace == "lab"


def test_resources_read_from_kubernetes_keep_parsing():
    doc = load(DR_YAML)
    doc["metadata"].update(
        uid="1234",
        resourceVersion="77",
        generation=2,
        creationTimestamp="2024-01-01T00:00:00Z",
        managedFields=[{"manager": "kubectl"}],
    )
    doc["status"] = {"observedGeneration": "2"}

    assert parse_resource(doc).name == "reviews"


def test_supported_kinds():
    assert {
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
        "VirtualService",
        "DestinationRule",
        "ServiceEntry",
        "Telemetry",
    } == SUPPORTED_KINDS


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("0.5s", 0.5),
        (".25s", 0.25),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1.5", "s", "-1s", "1d", "1 s", "1.5.5s"])
def test_parse_duration_refuses_bad_text(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


# --- refused resources: each names kind, namespace/name and the exact field path -------------


def edit(text: str, change) -> dict[str, Any]:
    doc = load(text)
    change(doc)
    return doc


def set_at(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set a value at a dotted path where integer parts index lists."""
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value


def delete_at(doc: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    del node[last]


REFUSALS = [
    # (id, base yaml, edit, expected path, fragment of the message)
    (
        "authz-provider-without-custom",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.provider", {"name": "ext"}),
        "spec",
        "`provider` is only allowed with action CUSTOM",
    ),
    (
        "authz-unsupported-targetRef",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.targetRef", {"kind": "Service"}),
        "spec.targetRef",
        "not supported",
    ),
    (  # the decision (README): a node proxy cannot verify which Service a client addressed
        "authz-targetRefs-to-a-service",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.targetRefs", [{"kind": "Service", "group": "", "name": "r"}]),
        "spec.targetRefs",
        "cannot verify which Service a client addressed: select the Service's pods with "
        "`selector` instead",
    ),
    (
        "authz-bad-remoteIpBlocks",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.from.0.source.remoteIpBlocks", ["10.0.0.0/33"]),
        "spec.rules[0].from[0].source.remoteIpBlocks[0]",
        "10.0.0.0/33",
    ),
    (
        "authz-custom-without-provider",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.action", "CUSTOM"),
        "spec",
        "action CUSTOM needs `provider.name`",
    ),
    (
        "authz-unknown-action",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.action", "LOG"),
        "spec.action",
        "'LOG'",
    ),
    (
        "authz-bad-cidr",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.from.0.source.ipBlocks.1", "10.0.0.0/33"),
        "spec.rules[0].from[0].source.ipBlocks[1]",
        "'10.0.0.0/33' is not an IP address or CIDR block",
    ),
    (
        "authz-bad-condition-ip",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.when.2.values", ["10.1.0.0/99"]),
        "spec.rules[0].when[2].values",
        "not an IP address or CIDR block",
    ),
    (
        "authz-bad-condition-port",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.when.1.notValues", ["http"]),
        "spec.rules[0].when[1].notValues",
        "port numbers",
    ),
    (
        "authz-unsupported-condition-key",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.when.0.key", "request.auth.claims"),
        "spec.rules[0].when[0].key",
        "condition key 'request.auth.claims' is not supported",
    ),
    (
        "authz-condition-without-values",
        AUTHZ_YAML,
        lambda d: delete_at(d, "spec.rules.0.when.0.values"),
        "spec.rules[0].when[0]",
        "at least one of values or notValues",
    ),
    (
        "authz-bad-port",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.to.0.operation.ports", ["http"]),
        "spec.rules[0].to[0].operation.ports[0]",
        "port must be a number from 1 to 65535",
    ),
    (
        "authz-empty-source",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.from.0.source", {}),
        "spec.rules[0].from[0].source",
        "source must set at least one of",
    ),
    (
        "authz-empty-to-list",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.to", []),
        "spec.rules[0].to",
        "must not be an empty list",
    ),
    (
        "authz-path-template-not-last",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.rules.0.to.0.operation.notPaths", ["/{**}/a/{*}"]),
        "spec.rules[0].to[0].operation.notPaths",
        "{**} must be the last operator",
    ),
    (
        "authz-deny-without-rules",
        AUTHZ_YAML,
        lambda d: (set_at(d, "spec.action", "DENY"), delete_at(d, "spec.rules")),
        "spec.rules",
        "a DENY policy without rules never matches",
    ),
    (
        "authz-bad-dry-run-value",
        AUTHZ_YAML,
        lambda d: set_at(d, "metadata.annotations", {"istio.io/dry-run": "yes"}),
        "metadata",
        "must be 'true' or 'false'",
    ),
    (
        "authz-dry-run-on-audit",
        AUTHZ_YAML,
        lambda d: set_at(d, "spec.action", "AUDIT"),
        "",
        "only supports actions ALLOW and DENY",
    ),
    (
        "authz-bad-api-version",
        AUTHZ_YAML,
        lambda d: set_at(d, "apiVersion", "security.istio.io/v2"),
        "apiVersion",
        "not supported for AuthorizationPolicy",
    ),
    (
        "peer-bad-mode",
        PEER_YAML,
        lambda d: set_at(d, "spec.mtls.mode", "ON"),
        "spec.mtls.mode",
        "'STRICT'",
    ),
    (
        "peer-port-level-without-selector",
        PEER_YAML,
        lambda d: delete_at(d, "spec.selector"),
        "spec.portLevelMtls",
        "needs a workload selector",
    ),
    (
        "peer-dry-run-annotation",
        PEER_YAML,
        lambda d: set_at(d, "metadata.annotations", {"istio.io/dry-run": "true"}),
        "metadata",
        "only supported on AuthorizationPolicy",
    ),
    (
        "vs-weight-sum",
        VS_YAML,
        lambda d: set_at(d, "spec.http.1.route.1.weight", 20),
        "spec.http[1].route",
        "sum to 95; with several routes they must sum to 100",
    ),
    (
        "vs-weight-range",
        VS_YAML,
        lambda d: set_at(d, "spec.http.1.route.1.weight", 150),
        "spec.http[1].route[1].weight",
        "less than or equal to 100",
    ),
    (
        "vs-weight-not-int",
        VS_YAML,
        lambda d: set_at(d, "spec.http.1.route.1.weight", "25"),
        "spec.http[1].route[1].weight",
        "valid integer",
    ),
    (
        "vs-tcp-weight-sum",
        VS_YAML,
        lambda d: set_at(
            d,
            "spec.tcp.0.route",
            [
                {"destination": {"host": "a"}, "weight": 60},
                {"destination": {"host": "b"}, "weight": 60},
            ],
        ),
        "spec.tcp[0].route",
        "sum to 120",
    ),
    (
        "vs-bad-uri-regex",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.match.0.uri", {"regex": "(unclosed"}),
        "spec.http[0].match[0].uri.regex",
        "invalid regex '(unclosed'",
    ),
    (
        "vs-bad-header-regex",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.match.0.headers", {"x-user": {"regex": "[a-"}}),
        "spec.http[0].match[0].headers.x-user.regex",
        "invalid regex '[a-'",
    ),
    (
        "vs-two-match-forms",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.match.0.uri", {"exact": "/a", "prefix": "/b"}),
        "spec.http[0].match[0].uri",
        "exactly one of exact, prefix or regex",
    ),
    (
        "vs-bad-timeout",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.timeout", "2 seconds"),
        "spec.http[0].timeout",
        "invalid duration '2 seconds'",
    ),
    (
        "vs-zero-timeout",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.timeout", "0s"),
        "spec.http[0].timeout",
        "at least 1ms",
    ),
    (
        "vs-numeric-timeout",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.timeout", 5),
        "spec.http[0].timeout",
        "invalid duration 5",
    ),
    (
        "vs-bad-per-try-timeout",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.retries.perTryTimeout", "2"),
        "spec.http[0].retries.perTryTimeout",
        "invalid duration '2'",
    ),
    (
        "vs-bad-retry-on",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.retries.retryOn", "5xx,sometimes"),
        "spec.http[0].retries.retryOn",
        "'sometimes' is not a supported retryOn condition",
    ),
    (
        "vs-retries-without-attempts",
        VS_YAML,
        lambda d: delete_at(d, "spec.http.0.retries.attempts"),
        "spec.http[0].retries",
        "attempts is 0",
    ),
    (
        "vs-abort-status-range",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.fault.abort.httpStatus", 700),
        "spec.http[0].fault.abort.httpStatus",
        "less than or equal to 599",
    ),
    (
        "vs-fault-percentage-range",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.fault.delay.percentage.value", 101),
        "spec.http[0].fault.delay.percentage.value",
        "less than or equal to 100",
    ),
    (
        "vs-direct-response-and-route",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.directResponse", {"status": 503}),
        "spec.http[0]",
        "one of route, redirect or directResponse",
    ),
    (
        "vs-direct-response-status",
        VS_YAML,
        lambda d: (
            delete_at(d, "spec.http.0.route"),
            set_at(d, "spec.http.0.directResponse", {"status": 700}),
        ),
        "spec.http[0].directResponse.status",
        "less than or equal to 599",
    ),
    (
        "vs-redirect-and-route",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.redirect", {"uri": "/new"}),
        "spec.http[0]",
        "route or redirect, not both",
    ),
    (
        "vs-redirect-code",
        VS_YAML,
        lambda d: (
            delete_at(d, "spec.http.0.route"),
            set_at(d, "spec.http.0.redirect", {"uri": "/new", "redirectCode": 305}),
        ),
        "spec.http[0].redirect",
        "redirectCode 305 is not supported",
    ),
    (
        "vs-mirror-and-mirrors",
        VS_YAML,
        lambda d: (
            set_at(d, "spec.http.0.mirror", {"host": "x"}),
            set_at(d, "spec.http.0.mirrors", [{"destination": {"host": "y"}}]),
        ),
        "spec.http[0]",
        "mirror or mirrors, not both",
    ),
    (
        "vs-mirror-percentage-range",
        VS_YAML,
        lambda d: (
            set_at(d, "spec.http.0.mirror", {"host": "x"}),
            set_at(d, "spec.http.0.mirrorPercentage", {"value": 101}),
        ),
        "spec.http[0].mirrorPercentage.value",
        "less than or equal to 100",
    ),
    (
        "vs-rewrite-empty",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.rewrite", {}),
        "spec.http[0].rewrite",
        "rewrite must set uri, authority or uriRegexRewrite",
    ),
    (
        "vs-rewrite-regex-re2",
        VS_YAML,
        lambda d: set_at(
            d, "spec.http.0.rewrite", {"uriRegexRewrite": {"match": "(?=a)", "rewrite": "/"}}
        ),
        "spec.http[0].rewrite.uriRegexRewrite.match",
        "RE2",
    ),
    (
        "vs-header-operation-host",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.headers", {"request": {"set": {"Host": "x"}}}),
        "spec.http[0].headers.request.set.Host (key)",
        "cannot be changed by a header operation",
    ),
    (
        "vs-header-value-envoy-variable",
        VS_YAML,
        lambda d: set_at(
            d, "spec.http.0.headers", {"request": {"add": {"x-ip": "%DOWNSTREAM_REMOTE_ADDRESS%"}}}
        ),
        "spec.http[0].headers.request.add.x-ip",
        "%VARIABLE% substitution",
    ),
    (
        "vs-tls-sni-outside-hosts",
        VS_YAML,
        lambda d: set_at(
            d,
            "spec.tls",
            [{"match": [{"sniHosts": ["x.example.com"]}], "route": VS_TLS_ROUTE}],
        ),
        "spec",
        "tls[0].match[0].sniHosts[0]: 'x.example.com' is not a subset of any",
    ),
    (
        "vs-tls-without-sni",
        VS_YAML,
        lambda d: set_at(d, "spec.tls", [{"match": [{"port": 443}], "route": VS_TLS_ROUTE}]),
        "spec.tls[0].match[0].sniHosts",
        "required",
    ),
    (
        "vs-gateway",
        VS_YAML,
        lambda d: set_at(d, "spec.gateways", ["istio-system/ingress"]),
        "spec.gateways",
        "not applied",
    ),
    (
        "vs-no-route",
        VS_YAML,
        lambda d: delete_at(d, "spec.http.0.route"),
        "spec.http[0]",
        "needs route (destinations), redirect, directResponse or delegate",
    ),
    (
        "vs-delegate-with-gateways",
        VS_YAML,
        lambda d: (set_at(d, "spec.hosts", []), delete_at(d, "spec.tcp")),
        "spec",
        "a delegate VirtualService (no hosts) has no gateways",
    ),
    (
        "vs-delegate-delegates-again",
        VS_YAML,
        lambda d: (
            set_at(d, "spec.hosts", []),
            delete_at(d, "spec.tcp"),
            delete_at(d, "spec.gateways"),
            delete_at(d, "spec.http.0.route"),
            set_at(d, "spec.http.0.delegate", {"name": "deeper"}),
        ),
        "spec",
        "http[0].delegate: a delegate VirtualService (no hosts) cannot delegate again",
    ),
    (
        "vs-delegate-beside-route",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.delegate", {"name": "other", "namespace": "x"}),
        "spec.http[0]",
        "an http rule with delegate has no route",
    ),
    (
        "vs-wildcard-host",
        VS_YAML,
        lambda d: set_at(d, "spec.hosts", ["*"]),
        "spec.hosts[0]",
        "host '*'",
    ),
    (
        "vs-bad-subset-name",
        VS_YAML,
        lambda d: set_at(d, "spec.http.0.route.0.destination.subset", "V_2"),
        "spec.http[0].route[0].destination.subset",
        "not a valid name",
    ),
    (
        "dr-h2-upgrade-unknown",
        DR_YAML,
        lambda d: set_at(d, "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy", "ALWAYS"),
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
        "'DEFAULT', 'DO_NOT_UPGRADE' or 'UPGRADE'",
    ),
    (
        "dr-passthrough",
        DR_YAML,
        lambda d: set_at(d, "spec.trafficPolicy.loadBalancer.simple", "PASSTHROUGH"),
        "spec.trafficPolicy.loadBalancer.simple",
        "PASSTHROUGH is not supported",
    ),
    (
        "dr-bad-interval",
        DR_YAML,
        lambda d: set_at(d, "spec.trafficPolicy.outlierDetection.interval", "often"),
        "spec.trafficPolicy.outlierDetection.interval",
        "invalid duration 'often'",
    ),
    (
        "dr-tls-credential-name",
        DR_YAML,
        lambda d: set_at(d, "spec.trafficPolicy.tls", {"mode": "SIMPLE", "credentialName": "c"}),
        "spec.trafficPolicy.tls.credentialName",
        "Istio itself applies at gateways, and at sidecars only with a workloadSelector",
    ),
    (
        "dr-tls-mutual-needs-files",
        DR_YAML,
        lambda d: set_at(d, "spec.trafficPolicy.tls", {"mode": "MUTUAL"}),
        "spec.trafficPolicy.tls",
        "MUTUAL needs clientCertificate and privateKey",
    ),
    (
        "dr-port-level-needs-port",
        DR_YAML,
        lambda d: delete_at(d, "spec.trafficPolicy.portLevelSettings.0.port"),
        "spec.trafficPolicy.portLevelSettings[0].port",
        "required field is missing",
    ),
    (
        "dr-empty-connection-pool",
        DR_YAML,
        lambda d: set_at(d, "spec.trafficPolicy.connectionPool", {}),
        "spec.trafficPolicy.connectionPool",
        "must set tcp, http, or both",
    ),
    (
        "dr-duplicate-subset",
        DR_YAML,
        lambda d: set_at(d, "spec.subsets.1.name", "v1"),
        "spec.subsets",
        "subset name 'v1' is defined more than once",
    ),
    (
        "dr-ejection-percent-range",
        DR_YAML,
        lambda d: set_at(d, "spec.trafficPolicy.outlierDetection.maxEjectionPercent", 120),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "less than or equal to 100",
    ),
]


@pytest.mark.parametrize(
    ("text", "change", "path", "fragment"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refusal_names_resource_and_field(text, change, path, fragment):
    doc = edit(text, change)
    kind, namespace, name = doc["kind"], doc["metadata"]["namespace"], doc["metadata"]["name"]

    with pytest.raises(ResourceError) as caught:
        parse_resource(doc)

    error = caught.value
    assert (error.kind, error.namespace, error.name, error.path) == (kind, namespace, name, path)
    assert fragment in error.message
    prefix = f"{kind} {namespace}/{name}: " + (f"{path}: " if path else "")
    assert str(error).startswith(prefix + error.message)


def test_every_problem_of_a_resource_is_reported():
    doc = load(VS_YAML)
    doc["spec"]["http"][0]["timeout"] = "soon"
    doc["spec"]["http"][1]["route"][1]["weight"] = 5
    doc["spec"]["sourceNamespace"] = "x"

    with pytest.raises(ResourceError) as caught:
        parse_resource(doc)

    paths = [path for path, _ in caught.value.problems]
    assert sorted(paths) == ["spec.http[0].timeout", "spec.http[1].route", "spec.sourceNamespace"]
    for path in paths:
        assert path in str(caught.value)


def test_unsupported_kind_is_refused_naming_the_kind():
    with pytest.raises(ResourceError) as caught:
        parse_resource(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "ingress", "namespace": "istio-system"},
            }
        )

    assert str(caught.value).startswith(
        "Gateway istio-system/ingress: kind: kind 'Gateway' is not supported"
    )


def test_non_mapping_document_is_refused():
    with pytest.raises(ResourceError, match="a resource must be a mapping, got list"):
        parse_resource([1, 2])  # type: ignore[arg-type]


def test_missing_name_is_reported_at_metadata_name():
    doc = load(DR_YAML)
    del doc["metadata"]["name"]

    with pytest.raises(ResourceError) as caught:
        parse_resource(doc)

    assert caught.value.name == "<unnamed>"
    assert caught.value.path == "metadata.name"


def test_parse_documents_keeps_going_past_bad_documents():
    bad_vs = edit(VS_YAML, lambda d: set_at(d, "spec.http.0.timeout", "never"))
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews"}}
    stream = "---\n".join(
        [AUTHZ_YAML, yaml.safe_dump(bad_vs), "", DR_YAML, yaml.safe_dump(service), PEER_YAML]
    )

    resources, errors = parse_documents(yaml.safe_load_all(stream), default_namespace="shop")

    assert [r.kind for r in resources] == [
        "AuthorizationPolicy",
        "DestinationRule",
        "PeerAuthentication",
    ]
    assert [(e.kind, e.name, e.path) for e in errors] == [
        ("VirtualService", "reviews", "spec.http[0].timeout"),
        ("Service", "reviews", "kind"),
    ]
    assert errors[1].namespace == "shop"


def test_models_are_immutable():
    policy = parse_resource(load(AUTHZ_YAML))

    with pytest.raises(ValueError):
        policy.spec.action = "DENY"  # type: ignore[misc]
    assert copy.deepcopy(policy) == policy


# --- fuzzing: whatever comes in, the only failure is a ResourceError with a message ----------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
VALID = {text: load(text) for text in (AUTHZ_YAML, PEER_YAML, VS_YAML, DR_YAML)}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [prefix]
    return [prefix, *(p for key, child in items for p in _paths(child, (*prefix, key)))]


@given(data=st.data(), base=st.sampled_from(sorted(VALID)), garbage=JSON)
@settings(max_examples=300, deadline=None)
def test_any_corruption_of_a_valid_resource_is_refused_cleanly(data, base, garbage):
    doc = copy.deepcopy(VALID[base])
    where = data.draw(st.sampled_from(_paths(doc)[1:]))
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = garbage

    try:
        parse_resource(doc)
    except ResourceError as error:
        assert error.message and str(error).startswith(f"{error.kind} ")

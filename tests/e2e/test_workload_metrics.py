"""Issue #22 item 1: metrics that scale with the node, in the lab on the real kube-apiserver.

- pods of each owner kind, made by kube-controller-manager from objects applied with kubectl
  (a Deployment's 2 replicas, a StatefulSet's 2, a Job's pod, a DaemonSet's pod on each of the
  2 nodes), each call the reviews Service once; in ``istio_requests_total`` every owner's pods
  share one ``source_workload``, the owner's name, as in Istio;
- a `Telemetry` in their namespace that removes ``request_protocol`` from REQUEST_COUNT: within
  a deadline the requests made after it are counted in series without that label, while
  ``istio_request_duration_milliseconds`` keeps it.
"""

from __future__ import annotations

import shutil

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import EXAMPLES, meshlab
from tests.e2e.test_kube_lab import kubectl, kubectl_apply
from tests.waiting import wait_until

OWNERS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: callers, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: callers}}
  template:
    metadata: {labels: {app: callers, owner-test: "yes"}}
    spec:
      containers: [{name: c, image: debian, command: [sleep, infinity]}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: ledger, namespace: shop}
spec:
  replicas: 2
  serviceName: ledger
  selector: {matchLabels: {app: ledger}}
  template:
    metadata: {labels: {app: ledger, owner-test: "yes"}}
    spec:
      containers: [{name: c, image: debian, command: [sleep, infinity]}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: nightly, namespace: shop}
spec:
  template:
    metadata: {labels: {owner-test: "yes"}}
    spec:
      restartPolicy: Never
      containers: [{name: c, image: debian, command: [sleep, infinity]}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: watchers, namespace: shop}
spec:
  selector: {matchLabels: {app: watchers}}
  template:
    metadata: {labels: {app: watchers, owner-test: "yes"}}
    spec:
      containers: [{name: c, image: debian, command: [sleep, infinity]}]
"""
# owner -> how many pods it makes (the DaemonSet: one on each of the lab's 2 nodes)
EXPECTED_PODS = {"callers": 2, "ledger": 2, "nightly": 1, "watchers": 2}
TRIM = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: trim-protocol, namespace: shop}
spec:
  metrics:
    - providers: [{name: prometheus}]
      overrides:
        - match: {metric: REQUEST_COUNT, mode: CLIENT_AND_SERVER}
          tagOverrides:
            request_protocol: {operation: REMOVE}
"""
SERVICE_URL = "http://reviews.shop:9080/"


@pytest.fixture(scope="module")
def owners_lab(lab_factory):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian: kubernetes-client)")
    lab = lab_factory(EXAMPLES / "demo.yaml", nodes=2)
    kubectl_apply(OWNERS)
    yield lab
    kubectl("delete", "-n", "shop", "telemetry/trim-protocol", "--ignore-not-found", check=False)
    for kind, name in (
        ("deployment", "callers"),
        ("statefulset", "ledger"),
        ("job", "nightly"),
        ("daemonset", "watchers"),
    ):
        kubectl("delete", "-n", "shop", f"{kind}/{name}", "--wait=false", check=False)


def _owned_pods() -> dict[str, tuple[str, str]]:
    """pod name -> (phase, node), for the pods the owners made."""
    out = kubectl(
        "get", "pods", "-n", "shop", "-l", "owner-test=yes", "--no-headers",
        "-o", "custom-columns=NAME:.metadata.name,PHASE:.status.phase,NODE:.spec.nodeName",
    )  # fmt: skip
    rows = (line.split() for line in out.splitlines() if line.strip())
    return {name: (phase, node) for name, phase, node in rows}


def _scrape_requests(*, reporter: str = "source") -> list:
    """The istio_requests_total samples of both nodes for requests to reviews, by `reporter`."""
    return [
        s
        for s in _samples("istio_requests_total")
        if s.labels.get("reporter") == reporter
        and s.labels.get("destination_service_name") == "reviews"
        and s.labels.get("source_workload_namespace") == "shop"
    ]


def _samples(name: str) -> list:
    """The samples called `name` on both nodes' /stats/prometheus."""
    out = []
    for node in ("node-1", "node-2"):
        page = meshlab(
            "exec", "--node", node, "--", "curl", "-s", "-f", "127.0.0.1:15020/stats/prometheus"
        ).stdout
        for family in text_string_to_metric_families(page):
            out += [s for s in family.samples if s.name == name]
    return out


def _per_workload(samples: list) -> dict[str, float]:
    totals: dict[str, float] = {}
    for s in samples:
        totals[s.labels["source_workload"]] = totals.get(s.labels["source_workload"], 0) + s.value
    return totals


def test_pods_of_each_owner_kind_share_one_source_workload(owners_lab):
    pods = wait_until(
        _owned_pods,
        lambda p: (
            len(p) == sum(EXPECTED_PODS.values())
            and {phase for phase, _ in p.values()} == {"Running"}
        ),
        what=f"the owners' {sum(EXPECTED_PODS.values())} pods running",
        timeout=90,
    )
    # the DaemonSet's: one on each node, as its controller pins them
    daemons = sorted(node for name, (_, node) in pods.items() if name.startswith("watchers-"))
    assert daemons == ["node-1", "node-2"], pods
    for pod in sorted(pods):
        owners_lab.wait_answer(
            f"shop/{pod}", SERVICE_URL, what=f"{pod} reaches reviews through the mesh"
        )
    for reporter in ("source", "destination"):
        totals = wait_until(
            lambda reporter=reporter: _per_workload(_scrape_requests(reporter=reporter)),
            lambda t: all(t.get(owner, 0) >= n for owner, n in EXPECTED_PODS.items()),
            what=f"reporter={reporter} counts every owner's requests",
        )
        # one source_workload per owner, the owner's name: no pod name among them
        assert set(totals) <= {*EXPECTED_PODS, "frontend", "batch", "intruder"}, totals
        assert not set(totals) & set(pods), totals
        for owner, count in EXPECTED_PODS.items():
            assert totals[owner] == count, (reporter, totals)


def test_a_telemetry_override_removes_a_label_from_the_series(owners_lab):
    pods = wait_until(
        _owned_pods,
        lambda p: any(name.startswith("callers-") for name in p),
        what="a callers pod",
        timeout=90,
    )
    caller = sorted(name for name in pods if name.startswith("callers-"))[0]
    kubectl_apply(TRIM)

    def trimmed_series() -> list:
        code, _ = owners_lab.curl(f"shop/{caller}", SERVICE_URL)
        assert code == "200"
        return [
            s
            for s in _scrape_requests()
            if s.labels["source_workload"] == "callers" and not s.labels.get("request_protocol")
        ]

    trimmed = wait_until(
        trimmed_series, what="a callers series without request_protocol", timeout=60, interval=1
    )
    assert trimmed[0].value >= 1
    # the other metrics keep the label: the override named REQUEST_COUNT only
    durations = [
        s
        for s in _samples("istio_request_duration_milliseconds_count")
        if s.labels.get("source_workload") == "callers"
    ]
    assert durations and all(s.labels["request_protocol"] == "http" for s in durations)

"""Issue #5: AuthorizationPolicy enforced by the destination's node proxy, cross-node (in the
HBONE inbound) and same-node (in the local path alike), counted and logged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from meshagent.lab.paths import RUN_DIR
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import meshlab

MANIFESTS = Path(__file__).parent / "manifests"
FRONTEND = "cluster.local/ns/shop/sa/frontend"


@pytest.fixture(scope="module")
def authz_lab(lab_factory):
    return lab_factory(MANIFESTS / "authz.yaml", nodes=2)


def _apply(tmp_path: Path, doc: dict) -> None:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    meshlab("apply", "-f", str(path))


def _delete(tmp_path: Path, doc: dict) -> None:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    meshlab("delete", "-f", str(path))


ALLOW_FRONTEND = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "allow-frontend", "namespace": "shop"},
    "spec": {
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"principals": [FRONTEND]}}],
                "to": [{"operation": {"ports": ["9080"]}}],
            }
        ],
    },
}


def _eventually(predicate, what: str, seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("service", ["reviews", "ratings"], ids=["cross-node", "same-node"])
def test_allow_policy_admits_only_the_named_principal(authz_lab, tmp_path, service):
    url = f"http://{service}.shop:9080/"
    assert authz_lab.curl("shop/intruder", url)[0] == "200"  # no policy yet: allowed
    _apply(tmp_path, ALLOW_FRONTEND)
    try:
        _eventually(
            lambda: authz_lab.curl("shop/intruder", url, timeout=2)[0] != "200",
            "the intruder is refused once the policy is in",
        )
        assert authz_lab.curl("shop/frontend", url)[0] == "200"
        node = "node-2" if service == "reviews" else "node-1"
        status = authz_lab.status(node)["agent"]
        denials = status["authz"]["recent_denials"]
        # no ALLOW policy matched: the denial names the policies that were checked
        assert any(
            d["source"].endswith("/sa/intruder") and "shop/allow-frontend" in d["reason"]
            for d in denials
        ), denials
    finally:
        _delete(tmp_path, ALLOW_FRONTEND)


def test_dry_run_deny_changes_nothing_but_is_counted(authz_lab, tmp_path):
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": "deny-all-dry",
            "namespace": "shop",
            "annotations": {"istio.io/dry-run": "true"},
        },
        "spec": {"action": "DENY", "rules": [{}]},
    }
    before = authz_lab.status("node-2")["agent"]["authz"]["dry_run_denied"]
    _apply(tmp_path, deny)
    try:
        time.sleep(1.0)
        assert authz_lab.curl("shop/frontend", "http://reviews.shop:9080/")[0] == "200"
        after = authz_lab.status("node-2")["agent"]["authz"]["dry_run_denied"]
        assert after > before
    finally:
        _delete(tmp_path, deny)


DENY_ADMIN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin", "namespace": "shop"},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
}


@pytest.mark.parametrize("service", ["reviews", "ratings"], ids=["cross-node", "same-node"])
def test_deny_on_paths_gives_403_per_request_on_one_connection(authz_lab, tmp_path, service):
    _apply(tmp_path, DENY_ADMIN)
    try:
        base = f"http://{service}.shop:9080"

        def two_requests() -> list[tuple[str, str, str]]:
            # one curl, two requests on one keep-alive connection; body of the first kept
            body = tmp_path / "admin.txt"
            proc = meshlab(
                "exec",
                "shop/frontend",
                "--",
                "curl",
                "-s",
                "--max-time",
                "5",
                "-w",
                "%{http_code} %{num_connects}\\n",
                "-o",
                str(body),
                f"{base}/admin/x",
                "-o",
                "/dev/null",
                f"{base}/",
                check=False,
            )
            lines = [line.split() for line in proc.stdout.splitlines()]
            return [
                (code, connects, body.read_text() if i == 0 and body.exists() else "")
                for i, (code, connects) in enumerate(lines)
            ]

        deadline = time.monotonic() + 3
        results = two_requests()
        while results[0][0] != "403" and time.monotonic() < deadline:
            time.sleep(0.2)
            results = two_requests()
        (admin_code, _, admin_body), (root_code, root_connects, _) = results
        assert admin_code == "403"
        assert admin_body == "RBAC: access denied"
        assert root_code == "200"
        assert root_connects == "0"  # the same connection carried on after the denial
        node = "node-2" if service == "reviews" else "node-1"
        denials = authz_lab.status(node)["agent"]["authz"]["recent_denials"]
        assert any(d["policy"] == "shop/deny-admin" for d in denials), denials
        # counted with source and destination labels, and logged with the policy's name
        scrape = meshlab("exec", "--node", node, "--", "curl", "-s", "127.0.0.1:15020/metrics")
        denied = [
            s
            for family in text_string_to_metric_families(scrape.stdout)
            if family.name == "istio_requests"
            for s in family.samples
            if s.name == "istio_requests_total"
            and s.labels["reporter"] == "destination"
            and s.labels["response_code"] == "403"
            and s.labels["source_workload"] == "frontend"
            and s.labels["destination_workload"] == service
        ]
        assert denied and denied[0].value >= 1, scrape.stdout[-2000:]
        log = (RUN_DIR / "logs" / f"agent-{node}.log").read_text().splitlines()
        entries = [json.loads(line) for line in log if line.startswith("{")]
        assert any(
            e["response_code"] == 403
            and e["policy"] == "shop/deny-admin"
            and e["path"] == "/admin/x"
            for e in entries
        )
    finally:
        _delete(tmp_path, DENY_ADMIN)


def test_explain_command_evaluates_the_current_policies(authz_lab, tmp_path):
    _apply(tmp_path, DENY_ADMIN)
    try:
        args = [
            "exec",
            "--node",
            "node-1",
            "--",
            "meshctl",
            "authz",
            "check",
            "--from",
            "shop/frontend",
            "--to",
            "shop/reviews:9080",
        ]
        deadline = time.monotonic() + 3
        while True:
            denied = meshlab(*args, "--method", "GET", "--path", "/admin/x", check=False)
            if denied.returncode == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert denied.returncode == 3, denied.stdout + denied.stderr
        assert "DENY: GET /admin/x from shop/frontend to shop/reviews:9080" in denied.stdout
        assert "decided by: shop/deny-admin, rule 0" in denied.stdout
        allowed = meshlab(*args, "--method", "GET", "--path", "/", check=False)
        assert allowed.returncode == 0 and allowed.stdout.startswith("ALLOW")
    finally:
        _delete(tmp_path, DENY_ADMIN)

"""Issue #5: AuthorizationPolicy enforced by the destination's node proxy, cross-node (in the
HBONE inbound) and same-node (in the local path alike), counted and logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from meshagent.lab.paths import RUN_DIR
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import lab_env, meshlab
from tests.waiting import wait_until

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


def _denials(lab, node: str) -> list[dict]:
    """The node's recent denials, as its proxy workers last reported them (every second)."""
    return lab.status(node)["agent"]["authz"]["recent_denials"]


@pytest.mark.parametrize("service", ["reviews", "ratings"], ids=["cross-node", "same-node"])
def test_allow_policy_admits_only_the_named_principal(authz_lab, tmp_path, service):
    url = f"http://{service}.shop:9080/"
    assert authz_lab.curl("shop/intruder", url)[0] == "200"  # no policy yet: allowed
    _apply(tmp_path, ALLOW_FRONTEND)
    try:
        wait_until(
            lambda: authz_lab.curl("shop/intruder", url, timeout=2)[0],
            lambda code: code != "200",
            what="the intruder is refused once the policy is in",
        )
        assert authz_lab.curl("shop/frontend", url)[0] == "200"
        node = "node-2" if service == "reviews" else "node-1"
        # no ALLOW policy matched: the denial names the policies that were checked
        wait_until(
            lambda: _denials(authz_lab, node),
            lambda denials: any(
                d["source"].endswith("/sa/intruder") and "shop/allow-frontend" in d["reason"]
                for d in denials
            ),
            what=f"{node} lists the intruder's denial naming shop/allow-frontend",
        )
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

    def dry_run_denied() -> int:
        return authz_lab.status("node-2")["agent"]["authz"]["dry_run_denied"]

    before = dry_run_denied()
    _apply(tmp_path, deny)
    try:
        # every request is served; once the policy is in, node-2 counts what it would deny

        def served_then_counted() -> int:
            code = authz_lab.curl("shop/frontend", "http://reviews.shop:9080/")[0]
            assert code == "200", f"a dry-run policy refused a request: {code}"
            return dry_run_denied()

        wait_until(
            served_then_counted,
            lambda after: after > before,
            what=f"node-2 counts dry-run denials (before: {before})",
        )
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

        results = wait_until(
            two_requests,
            lambda results: bool(results) and results[0][0] == "403",
            what="/admin/x refused once deny-admin is in",
        )
        (admin_code, _, admin_body), (root_code, root_connects, _) = results
        assert admin_code == "403"
        assert admin_body == "RBAC: access denied"
        assert root_code == "200"
        assert root_connects == "0"  # the same connection carried on after the denial
        node = "node-2" if service == "reviews" else "node-1"
        # the workers report every second: the denial shows up in status within a report
        wait_until(
            lambda: _denials(authz_lab, node),
            lambda denials: any(d["policy"] == "shop/deny-admin" for d in denials),
            what=f"{node} lists a denial by shop/deny-admin",
        )

        # counted with source and destination labels, and logged with the policy's name
        def denied_requests() -> list:
            scrape = meshlab("exec", "--node", node, "--", "curl", "-s", "127.0.0.1:15020/metrics")
            return [
                s
                for family in text_string_to_metric_families(scrape.stdout)
                if family.name == "istio_requests"
                for s in family.samples
                if s.name == "istio_requests_total" and s.labels["response_code"] == "403"
            ]

        wait_until(
            denied_requests,
            lambda samples: any(
                s.labels["reporter"] == "destination"
                and s.labels["source_workload"] == "frontend"
                and s.labels["destination_workload"] == service
                and s.value >= 1
                for s in samples
            ),
            what=f"{node} counts the 403 from frontend to {service} as the destination",
        )

        def logged_denials() -> list[dict]:
            log = (RUN_DIR / "logs" / f"agent-{node}.log").read_text().splitlines()
            entries = [json.loads(line) for line in log if line.startswith("{")]
            return [e for e in entries if e["response_code"] == 403]

        wait_until(
            logged_denials,
            lambda entries: any(
                e["policy"] == "shop/deny-admin" and e["path"] == "/admin/x" for e in entries
            ),
            what=f"{node}'s access log has the 403 for /admin/x by shop/deny-admin",
            retry_on=(ValueError,),  # a line read while it was being written
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
        denied = wait_until(
            lambda: meshlab(*args, "--method", "GET", "--path", "/admin/x", check=False),
            lambda proc: proc.returncode == 3,
            what="meshctl authz check denies /admin/x (exit 3) once deny-admin is in",
        )
        assert "DENY: GET /admin/x from shop/frontend to shop/reviews:9080" in denied.stdout
        assert "decided by: shop/deny-admin, rule 0" in denied.stdout
        allowed = meshlab(*args, "--method", "GET", "--path", "/", check=False)
        assert allowed.returncode == 0 and allowed.stdout.startswith("ALLOW")
    finally:
        _delete(tmp_path, DENY_ADMIN)


@pytest.mark.parametrize("service", ["reviews", "ratings"], ids=["cross-node", "same-node"])
def test_remote_ip_blocks_are_the_clients_own_address(authz_lab, tmp_path, service):
    """Issue #21: remoteIpBlocks, with no trusted proxy hop in front (Istio's default
    numTrustedProxies 0), match the client's own address: a DENY on the intruder's address
    holds whatever X-Forwarded-For it sends, and frontend sending the intruder's address in
    X-Forwarded-For is not denied."""

    def pod_ip(pod: str) -> str:
        return meshlab("exec", pod, "--", "printenv", "POD_IP").stdout.strip()

    intruder, frontend = pod_ip("shop/intruder"), pod_ip("shop/frontend")
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-remote", "namespace": "shop"},
        "spec": {
            "action": "DENY",
            "rules": [{"from": [{"source": {"remoteIpBlocks": [f"{intruder}/32"]}}]}],
        },
    }
    url = f"http://{service}.shop:9080/"
    _apply(tmp_path, deny)
    try:
        wait_until(
            lambda: authz_lab.curl("shop/intruder", url, timeout=2)[0],
            lambda code: code == "403",
            what="the intruder's address is denied once the policy is in",
        )
        spoofed = authz_lab.curl("shop/intruder", url, "-H", f"X-Forwarded-For: {frontend}")
        assert spoofed == ("403", "RBAC: access denied")
        named = authz_lab.curl("shop/frontend", url, "-H", f"X-Forwarded-For: {intruder}")
        assert named[0] == "200"
    finally:
        _delete(tmp_path, deny)


def _restart_agent(node: str, settings: dict | None) -> None:
    """Restart `node`'s agent with these extra agent settings (None: the defaults)."""
    with lab_env("MESHLAB_AGENT_SETTINGS", json.dumps(settings or {})):
        meshlab("agent", "stop", node)
        meshlab("agent", "start", node)


def test_a_policy_for_an_old_trust_domain_admits_once_it_is_an_alias(authz_lab, tmp_path):
    """Issue #21, Istio's trust-domain migration: a policy written for `old-td` does not admit
    frontend (`cluster.local/ns/shop/sa/frontend`) until the destination node's agent has
    `trust_domain_aliases: ["old-td"]` (Istio's meshConfig.trustDomainAliases); then it does,
    and still refuses the intruder."""
    old = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-old-td", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "reviews"}},
            "rules": [{"from": [{"source": {"principals": ["old-td/ns/shop/sa/frontend"]}}]}],
        },
    }
    url = "http://reviews.shop:9080/"
    check = ["exec", "--node", "node-1", "--", "meshctl", "authz", "check"]
    check += ["--from", "shop/frontend", "--to", "shop/reviews:9080"]
    _apply(tmp_path, old)
    try:
        wait_until(
            lambda: authz_lab.curl("shop/frontend", url, timeout=2)[0],
            lambda code: code == "403",
            what="frontend refused by a policy naming only old-td, without the alias",
        )
        assert meshlab(*check, check=False).returncode == 3
        assert meshlab(*check, "--trust-domain-alias", "old-td", check=False).returncode == 0
        _restart_agent("node-2", {"trust_domain_aliases": ["old-td"]})
        wait_until(
            lambda: authz_lab.curl("shop/frontend", url, timeout=2)[0],
            lambda code: code == "200",
            what="frontend admitted once old-td is an alias of node-2's mesh trust domain",
        )
        assert authz_lab.curl("shop/intruder", url, timeout=2)[0] == "403"
    finally:
        _delete(tmp_path, old)
        _restart_agent("node-2", None)

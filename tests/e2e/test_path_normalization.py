"""Issue #21: a DENY on `/admin*` holds whatever spelling of the path the client sends.

The proxies normalize each request's path (DECODE_AND_MERGE_SLASHES by default) before the
destination evaluates its AuthorizationPolicies, so `curl --path-as-is` of `/./admin/x`,
`/public/../admin/x`, `//admin/x` and `/%61dmin/x` get the same 403 as `/admin/x`, cross-node
(HBONE inbound) and same-node alike, while other paths still reach the server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import meshlab
from tests.waiting import wait_until

MANIFESTS = Path(__file__).parent / "manifests"

DENY_ADMIN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin-paths", "namespace": "shop"},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
}
BYPASSES = ["/./admin/x", "/public/../admin/x", "//admin/x", "/%61dmin/x", "/admin%2Fx"]


@pytest.fixture(scope="module")
def deny_lab(lab_factory, tmp_path_factory):
    lab = lab_factory(MANIFESTS / "authz.yaml", nodes=2)
    policy = tmp_path_factory.mktemp("policy") / "deny-admin-paths.yaml"
    policy.write_text(yaml.safe_dump(DENY_ADMIN))
    meshlab("apply", "-f", str(policy))
    for service in ("reviews", "ratings"):
        wait_until(
            lambda service=service: lab.curl(
                "shop/frontend", f"http://{service}.shop:9080/admin/x"
            ),
            lambda reply: reply[0] == "403",
            what=f"{service}: /admin/x is denied once the policy is in",
        )
    return lab


@pytest.mark.parametrize("service", ["reviews", "ratings"], ids=["cross-node", "same-node"])
@pytest.mark.parametrize("path", BYPASSES)
def test_every_spelling_of_admin_is_denied(deny_lab, service, path):
    code, body = deny_lab.curl("shop/frontend", f"http://{service}.shop:9080{path}", "--path-as-is")
    assert (code, body) == ("403", "RBAC: access denied"), f"{path} reached the server"


@pytest.mark.parametrize("service", ["reviews", "ratings"], ids=["cross-node", "same-node"])
def test_other_paths_still_reach_the_server(deny_lab, service):
    # python3 -m http.server answers itself: 404 "File not found" for a path it does not have
    code, body = deny_lab.curl("shop/frontend", f"http://{service}.shop:9080/public/x")
    assert code == "404" and "File not found" in body
    # normalized too: the server is asked for /public/x, and the query goes through as sent
    code, body = deny_lab.curl(
        "shop/frontend", f"http://{service}.shop:9080/public//./x?next=/admin", "--path-as-is"
    )
    assert code == "404" and "File not found" in body
    code, _ = deny_lab.curl("shop/frontend", f"http://{service}.shop:9080/")
    assert code == "200"


def test_a_path_that_cannot_be_normalized_is_400(deny_lab):
    code, body = deny_lab.curl(
        "shop/frontend", "http://reviews.shop:9080/%zz/admin", "--path-as-is"
    )
    assert code == "400" and "invalid percent-encoding" in body


def _policy(name: str, app: str, action: str, paths: list[str]) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "action": action,
            "rules": [{"to": [{"operation": {"paths": paths}}]}],
        },
    }


def test_path_templates_decide_per_request(deny_lab, tmp_path):
    """Istio 1.19+ templates: `{*}` is one segment, `{**}` anything; matched on the normalized
    path. An ALLOW on reviews (cross-node), a DENY on ratings (same-node)."""
    templates = tmp_path / "path-templates.yaml"
    templates.write_text(
        yaml.safe_dump_all(
            [
                _policy("reviews-templates", "reviews", "ALLOW", ["/foo/{*}/bar", "/pub/{**}"]),
                _policy("ratings-template", "ratings", "DENY", ["/foo/{*}/bar"]),
            ]
        )
    )
    meshlab("apply", "-f", str(templates))
    try:

        def code(service: str, path: str) -> str:
            url = f"http://{service}.shop:9080{path}"
            return deny_lab.curl("shop/frontend", url, "--path-as-is")[0]

        # 404: allowed, the server has no such file; 403: the policy refused it
        wait_until(
            lambda: (code("reviews", "/other"), code("ratings", "/foo/x/bar")),
            lambda codes: codes == ("403", "403"),
            what="the template policies are in force on both nodes",
        )
        expected = {
            ("reviews", "/foo/x/bar"): "404",
            ("reviews", "/foo/x/bar?q=/y"): "404",
            ("reviews", "/foo//x/./bar"): "404",  # normalized to /foo/x/bar first
            ("reviews", "/foo/x/y/bar"): "403",  # `{*}` is a single segment
            ("reviews", "/foo/bar"): "403",
            ("reviews", "/pub/a/b/c"): "404",
            ("reviews", "/other"): "403",
            ("ratings", "/foo/x/bar"): "403",
            ("ratings", "/foo/%78/bar"): "403",  # %78 is `x`, decoded before matching
            ("ratings", "/foo/x/y/bar"): "404",
            ("ratings", "/foo/bar"): "404",
        }
        got = {key: code(*key) for key in expected}
        assert got == expected
    finally:
        meshlab("delete", "-f", str(templates))

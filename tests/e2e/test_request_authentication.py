"""Issue #21: RequestAuthentication + AuthorizationPolicy `requestPrincipals` in the lab. Real
curl from a pod through the mesh, tokens signed by a key this test generates: a valid token is
admitted, none gets 403 (the policy), a bad signature 401 (RequestAuthentication itself). Keys
inline (cross-node) and from a jwksUri the controller fetches from a loopback HTTP server in
its own network namespace (same-node); an unreachable jwksUri refuses valid tokens."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from meshagent.lab.lab import UNDERLAY_NETNS_PATH

from tests.e2e.conftest import meshlab
from tests.e2e.nginx import write_conf
from tests.e2e.test_grpc_l7 import NGINX_HTTP
from tests.waiting import wait_until

MANIFESTS = Path(__file__).parent / "manifests"
ISSUER = "https://issuer.meshagent.test"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WRONG_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = json.dumps(
    {"keys": [{**json.loads(RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "lab", "use": "sig"}]}
)


@pytest.fixture(scope="module")
def authz_lab(lab_factory):
    return lab_factory(MANIFESTS / "authz.yaml", nodes=2)


def _token(key: rsa.RSAPrivateKey = KEY, **claims: object) -> str:
    body = {"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "lab"})


def _bearer(token: str) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {token}")


def _documents(app: str, rule: dict) -> list[dict]:
    return [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": f"{app}-jwt", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": app}}, "jwtRules": [rule]},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"{app}-require-jwt", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": app}},
                "rules": [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/alice"]}}]}],
            },
        },
    ]


def _meshlab_docs(verb: str, tmp_path: Path, docs: list[dict]) -> None:
    path = tmp_path / f"{docs[0]['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    meshlab(verb, "-f", str(path))


@pytest.fixture
def own_folder() -> Iterator[Path]:
    """A folder for files a lab process reads while the test runs: outside pytest's basetemp,
    which other pytest sessions on the machine prune (keeping their last 3)."""
    with tempfile.TemporaryDirectory(prefix="meshagent-jwt-") as name:
        folder = Path(name)
        folder.chmod(0o755)
        yield folder


@pytest.fixture
def jwks_server(own_folder) -> Iterator[str]:
    """A loopback HTTP server in the controller's network namespace (the lab's underlay),
    serving the test's JWKS; yields its URL."""
    folder = own_folder
    (folder / "jwks.json").write_text(JWKS)
    argv = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        ["nsenter", f"--net={UNDERLAY_NETNS_PATH}", "--", *argv, "--directory", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "the JWKS server did not start"
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
        port = int(line.split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}/jwks.json"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _check_tokens(lab, url: str) -> None:
    """Valid token 200; none 403 from the policy; bad signature / expired 401 from the
    RequestAuthentication, with Envoy's reasons."""
    wait_until(
        lambda: lab.curl("shop/frontend", url, *_bearer(_token()), timeout=2)[0],
        lambda code: code == "200",
        what="a request with a valid token is admitted",
    )
    assert lab.curl("shop/frontend", url) == ("403", "RBAC: access denied")
    bad = lab.curl("shop/frontend", url, *_bearer(_token(WRONG_KEY)))
    assert bad == ("401", "Jwt verification fails")
    expired = lab.curl("shop/frontend", url, *_bearer(_token(exp=int(time.time()) - 600)))
    assert expired == ("401", "Jwt is expired")
    other = lab.curl("shop/frontend", url, *_bearer(_token(sub="bob")))
    assert other == ("403", "RBAC: access denied")  # valid, but not the principal allowed


def test_inline_jwks_cross_node(authz_lab, tmp_path):
    url = "http://reviews.shop:9080/"
    # before any policy, a token is not looked at (the lab is fresh: wait for reviews to serve)
    wait_until(
        lambda: authz_lab.curl("shop/frontend", url, *_bearer(_token(WRONG_KEY)), timeout=2)[0],
        lambda code: code == "200",
        what="reviews answers a request carrying a bad token before any policy",
    )
    docs = _documents("reviews", {"issuer": ISSUER, "jwks": JWKS})
    _meshlab_docs("apply", tmp_path, docs)
    try:
        wait_until(
            lambda: authz_lab.curl("shop/frontend", url, timeout=2)[0],
            lambda code: code == "403",
            what="a request without a token is refused once the policy is in",
        )
        _check_tokens(authz_lab, url)
    finally:
        _meshlab_docs("delete", tmp_path, docs)


def test_jwks_uri_fetched_by_the_controller_same_node(authz_lab, tmp_path, jwks_server):
    url = "http://ratings.shop:9080/"
    docs = _documents("ratings", {"issuer": ISSUER, "jwksUri": jwks_server})
    _meshlab_docs("apply", tmp_path, docs)
    try:
        _check_tokens(authz_lab, url)
        # keys from a jwksUri nobody serves: tokens of that issuer are refused (fail closed),
        # requests without one still reach the policy
        dead = jwks_server.rsplit(":", 1)[0] + ":1/jwks.json"
        docs[0]["spec"]["jwtRules"][0]["jwksUri"] = dead
        _meshlab_docs("apply", tmp_path, docs)
        wait_until(
            lambda: authz_lab.curl("shop/frontend", url, *_bearer(_token()), timeout=2)[0],
            lambda code: code == "401",
            what="a valid token is refused while its keys cannot be fetched",
        )
        assert authz_lab.curl("shop/frontend", url)[0] == "403"
    finally:
        _meshlab_docs("delete", tmp_path, docs)


def _h2c_server(folder: Path) -> list[dict]:
    """nginx speaking h2c only on an `http2` Service port (node-2), for the HTTP/2 engine."""
    write_conf(folder, "web", NGINX_HTTP.format(dir=folder, name="web"))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "nodeName": "node-2",
            "serviceAccountName": "web",
            "containers": [
                {
                    "name": "s",
                    "command": ["nginx", "-p", f"{folder}/", "-c", f"{folder}/web.conf"],
                    "readinessProbe": {"tcpSocket": {"port": 8082}},
                }
            ],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http2", "port": 8082}]},
    }
    return [pod, service]


def test_http2_engine_gives_the_same_verdicts(authz_lab, tmp_path, own_folder):
    """h2c from the client to an http2 port: the HTTP/2 engine runs the same request filter."""
    url = "http://web.shop:8082/"
    h2 = "--http2-prior-knowledge"
    server = _h2c_server(own_folder)
    (tmp_path / "server").mkdir()
    _meshlab_docs("apply", tmp_path / "server", server)
    docs = _documents("web", {"issuer": ISSUER, "jwks": JWKS})
    try:
        authz_lab.wait_answer(
            "shop/frontend", url, h2, what="nginx answers h2c through the mesh", timeout=60
        )
        _meshlab_docs("apply", tmp_path, docs)
        wait_until(
            lambda: authz_lab.curl("shop/frontend", url, h2, timeout=2)[0],
            lambda code: code == "403",
            what="an HTTP/2 request without a token is refused once the policy is in",
        )
        valid = authz_lab.curl("shop/frontend", url, h2, *_bearer(_token()))
        assert valid == ("200", "web\n")
        bad = authz_lab.curl("shop/frontend", url, h2, *_bearer(_token(WRONG_KEY)))
        assert bad == ("401", "Jwt verification fails")
    finally:
        _meshlab_docs("delete", tmp_path, docs)
        _meshlab_docs("delete", tmp_path / "server", server)

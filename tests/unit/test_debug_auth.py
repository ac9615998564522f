"""15014 serves /metrics to anyone and the controller's state (/status, /debug/config) only to
loopback or authenticated callers (controller/debugauth.py); `meshctl` sends a token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from meshagent.common.httpserve import Request, Response, http_get, serve_http
from meshagent.controller import cli
from meshagent.controller.debugauth import (
    DebugGuard,
    NamespaceTokenReviewAuthenticator,
    bearer_token,
    is_loopback,
)
from meshagent.controller.push import AuthenticationUnavailable
from meshagent.controller.signing import AuthenticationFailed


class Tokens:
    def __init__(self, good: str = "good", down: bool = False) -> None:
        self.good, self.down, self.seen = good, down, []

    async def authenticate(self, token: str) -> str:
        self.seen.append(token)
        if self.down:
            raise AuthenticationUnavailable("apiserver away")
        if token != self.good:
            raise AuthenticationFailed("no")
        return "system:serviceaccount:meshagent-system:meshagent"


def req(path: str, peer: str, authorization: str | None = None) -> Request:
    headers = {"authorization": authorization} if authorization else {}
    return Request("GET", path, "", headers, peer)


def guard_says(guard: DebugGuard, request: Request) -> int | None:
    response = trio.run(guard, request)
    return None if response is None else response.status


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"])
def test_loopback_callers_are_served(peer: str) -> None:
    assert is_loopback(peer)
    assert guard_says(DebugGuard(Tokens()), req("/debug/config", peer)) is None


@pytest.mark.parametrize("path", ["/status", "/debug/config"])
def test_a_caller_from_elsewhere_needs_a_token_that_passes(path: str) -> None:
    tokens = Tokens()
    guard = DebugGuard(tokens)
    refused = trio.run(guard, req(path, "10.244.1.7"))
    assert refused.status == 401
    assert ("www-authenticate", 'Bearer realm="meshctl"') in refused.headers
    assert guard_says(guard, req(path, "10.244.1.7", "Bearer nope")) == 403
    assert guard_says(guard, req(path, "10.244.1.7", "Basic Zm9vOmJhcg==")) == 401
    assert guard_says(guard, req(path, "10.244.1.7", "Bearer good")) is None
    assert tokens.seen == ["nope", "good"]
    assert guard.refused == 3


def test_metrics_are_public_and_an_unreachable_reviewer_is_503_not_a_pass() -> None:
    guard = DebugGuard(Tokens(down=True))
    assert guard_says(guard, req("/metrics", "10.244.1.7")) is None
    assert guard_says(guard, req("/status", "10.244.1.7", "Bearer good")) == 503
    assert guard_says(DebugGuard(None), req("/status", "10.244.1.7", "Bearer good")) == 401


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Bearer ") is None
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None


class FakeReviewClient:
    def __init__(self, username: str, audiences: list[str], authenticated: bool = True):
        self.username, self.audiences, self.authenticated = username, audiences, authenticated
        self.asked = []

    async def create(self, review):
        from lightkube.models.authentication_v1 import TokenReviewStatus, UserInfo

        self.asked.append(review.spec.audiences)
        review.status = TokenReviewStatus(
            authenticated=self.authenticated,
            audiences=self.audiences,
            user=UserInfo(username=self.username),
        )
        return review


@pytest.mark.parametrize(
    ("username", "audiences", "ok"),
    [
        ("system:serviceaccount:meshagent-system:meshagent", ["meshagent-controller"], True),
        ("system:serviceaccount:meshagent-system:meshctl", ["meshagent-controller"], True),
        ("system:serviceaccount:shop:frontend", ["meshagent-controller"], False),
        ("system:serviceaccount:meshagent-system-x:a", ["meshagent-controller"], False),
        ("system:serviceaccount:meshagent-system:meshagent", ["https://kubernetes.default"], False),
        ("admin", ["meshagent-controller"], False),
    ],
)
def test_token_review_admits_the_controllers_namespace_only(username, audiences, ok) -> None:
    client = FakeReviewClient(username, audiences)
    authenticator = NamespaceTokenReviewAuthenticator(client, "meshagent-system")
    if ok:
        assert trio.run(authenticator.authenticate, "t") == username
    else:
        with pytest.raises(AuthenticationFailed):
            trio.run(authenticator.authenticate, "t")
    assert client.asked == [["meshagent-controller"]]


def test_the_guard_runs_in_front_of_the_routes_on_a_real_socket() -> None:
    seen = []

    async def guard(request: Request) -> Response | None:
        seen.append((request.path, request.peer, request.headers.get("authorization")))
        return Response(403, b"no\n") if request.path == "/secret" else None

    async def ok(_query: str) -> Response:
        return Response(200, b"ok\n")

    async def main() -> list[tuple[int, bytes]]:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            await nursery.start(
                lambda task_status: serve_http(
                    listeners, {"/open": ok, "/secret": ok}, guard=guard, task_status=task_status
                )
            )
            out = [
                await http_get("127.0.0.1", port, "/open"),
                await http_get(
                    "127.0.0.1", port, "/secret", headers=[("authorization", "Bearer t")]
                ),
                await http_get("127.0.0.1", port, "/missing"),
            ]
            nursery.cancel_scope.cancel()
            return out

    assert trio.run(main) == [(200, b"ok\n"), (403, b"no\n"), (404, b"not found\n")]
    assert seen == [("/open", "127.0.0.1", None), ("/secret", "127.0.0.1", "Bearer t")]


def test_meshctl_sends_the_node_token_named_by_the_agent_config(tmp_path: Path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("node-1-secret\n")
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"node_name": "node-1", "token_file": str(token)}))
    monkeypatch.setenv("MESHAGENT_CONFIG", str(config))
    monkeypatch.delenv("MESHCTL_TOKEN_FILE", raising=False)
    sent = []

    async def fake_get(host, port, path, headers=()):
        sent.append(list(headers))
        return 200, json.dumps({"generation": 1, "agents": [], "rejected": []}).encode()

    monkeypatch.setattr(cli, "http_get", fake_get)
    assert CliRunner().invoke(cli.main, ["status"]).exit_code == 0
    explicit = tmp_path / "other"
    explicit.write_text("operator-token")
    assert CliRunner().invoke(cli.main, ["status", "--token-file", str(explicit)]).exit_code == 0
    assert sent == [
        [("authorization", "Bearer node-1-secret")],
        [("authorization", "Bearer operator-token")],
    ]


def test_meshctl_says_how_to_authenticate_when_refused(monkeypatch) -> None:
    monkeypatch.delenv("MESHAGENT_CONFIG", raising=False)

    async def fake_get(host, port, path, **_kw):
        return 401, b"authentication required\n"

    monkeypatch.setattr(cli, "http_get", fake_get)
    result = CliRunner().invoke(cli.main, ["status", "--controller", "10.0.0.1:15014"])
    assert result.exit_code == 1
    assert "refused /status (HTTP 401)" in result.output
    assert "--token-file" in result.output

"""The controller fetches RequestAuthentication keys (controller/jwks.py) from a real loopback
HTTP server and puts them in the snapshot; an unreachable jwksUri leaves its rule without keys
(tokens of that issuer refused) with one warning."""

from __future__ import annotations

import json
import logging

import httpx2
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from meshagent.common.httpserve import Response, json_response, serve_http
from meshagent.controller.compiler import compile_snapshot
from meshagent.controller.jwks import JwksFetcher
from meshagent.controller.model import ClusterModel

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = json.dumps({"keys": [{**json.loads(RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "k"}]})


def _ra(name: str, rule: dict) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"jwtRules": [rule]},
    }


async def _server(nursery: trio.Nursery) -> str:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def jwks(_query: str) -> Response:
        return json_response(JWKS)

    async def discovery(_query: str) -> Response:
        return json_response(json.dumps({"issuer": base, "jwks_uri": f"{base}/keys"}))

    async def junk(_query: str) -> Response:
        return Response(200, b"<html>")

    routes = {"/keys": jwks, "/.well-known/openid-configuration": discovery, "/junk": junk}
    await nursery.start(serve_http, listeners, routes)
    return base


async def test_keys_fetched_into_the_snapshot_and_failures_fail_closed(caplog):
    caplog.set_level(logging.WARNING, logger="meshagent.controller.jwks")
    async with trio.open_nursery() as nursery:
        base = await _server(nursery)
        with trio.socket.socket() as closed:  # a port nobody listens on
            await closed.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{closed.getsockname()[1]}/keys"
        model = ClusterModel()
        model.upsert(
            "RequestAuthentication", _ra("uri", {"issuer": "a", "jwksUri": f"{base}/keys"})
        )
        model.upsert("RequestAuthentication", _ra("discovery", {"issuer": base}))
        model.upsert("RequestAuthentication", _ra("dead", {"issuer": "c", "jwksUri": dead}))
        model.upsert(
            "RequestAuthentication", _ra("junk", {"issuer": "d", "jwksUri": f"{base}/junk"})
        )
        fetcher = JwksFetcher(model)
        async with httpx2.AsyncClient(timeout=5) as client:
            await fetcher.run_once(client)
            await fetcher.run_once(client)  # not due again: no second warning
            snap = compile_snapshot(model, "node-1")
            assert snap.jwks == {
                f"{base}/keys": JWKS,
                f"{base}/.well-known/openid-configuration": JWKS,
            }
            warnings = [r.getMessage() for r in caplog.records]
            assert len(warnings) == 2, warnings
            assert any(dead in w and "refused until it can be fetched" in w for w in warnings)
            assert any("/junk" in w and "not JSON" in w for w in warnings)
            # a rule no longer there: its keys leave the snapshot
            model.delete("RequestAuthentication", _ra("uri", {}))
            await fetcher.run_once(client)
            assert list(compile_snapshot(model, "node-1").jwks) == [
                f"{base}/.well-known/openid-configuration"
            ]
        nursery.cancel_scope.cancel()


def test_a_change_of_keys_travels_in_a_delta():
    """Delta pushes (common/snapshotdelta.py) carry the fetched keys: the agent rebuilds the
    controller's snapshot exactly (same content version) when only the keys changed."""
    from meshagent.common import snapshotdelta
    from meshagent.common.snapshot import Snapshot, wire_version

    before = Snapshot(node="n", jwks={"https://a/keys": "{}"}).with_version()
    after = Snapshot(node="n", jwks={"https://a/keys": JWKS}).with_version()
    changes = snapshotdelta.diff(before, after, snapshotdelta.SHARED_FIELDS)
    assert changes == {"jwks": {"https://a/keys": JWKS}}
    rebuilt = snapshotdelta.apply(before.model_dump(mode="json"), changes)
    assert wire_version({**rebuilt, "version": ""}) == after.version

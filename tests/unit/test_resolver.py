"""The controller resolves the names of ServiceEntries with resolution DNS (controller/
resolver.py) into the snapshot: every 60 s, retried every 5 s with one warning while a name
fails, the last addresses kept after a success, forgotten with the entry. Real resolution of
`localhost` and an IP literal by the system resolver; the rest with a scripted resolver."""

from __future__ import annotations

import logging

import pytest
import trio
from meshagent.controller.compiler import compile_snapshot
from meshagent.controller.model import ClusterModel
from meshagent.controller.resolver import RESOLVED_KIND, NameResolver, resolve_name


def _entry(name: str, hosts: list[str], **spec) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"hosts": hosts, "ports": [{"number": 80, "name": "http"}], **spec},
    }


def _endpoints(model: ClusterModel, host: str) -> set[str]:
    snap = compile_snapshot(model, "node-1")
    [service] = [s for s in snap.services if s.host == host]
    return {e.ip for e in service.endpoints}


async def test_the_system_resolver_answers_for_localhost_and_ip_literals():
    assert "127.0.0.1" in await resolve_name("localhost")
    assert await resolve_name("192.0.2.7") == ["192.0.2.7"]
    with pytest.raises(OSError):
        await resolve_name("no-such-host.invalid")


async def test_names_resolve_into_the_snapshot_refresh_and_fail_softly(autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="meshagent.controller.resolver")
    answers: dict[str, list[str] | OSError] = {
        "api.example.com": ["192.0.2.20", "192.0.2.21"],
        "db.example.net": OSError("Name or service not known"),
    }
    asked: list[str] = []

    async def resolve(name: str) -> list[str]:
        asked.append(name)
        answer = answers[name]
        if isinstance(answer, OSError):
            raise answer
        return answer

    model = ClusterModel()
    model.upsert("ServiceEntry", _entry("api", ["api.example.com"], resolution="DNS"))
    model.upsert(
        "ServiceEntry",
        _entry(
            "db", ["db.shop.example"], resolution="DNS", endpoints=[{"address": "db.example.net"}]
        ),
    )
    resolver = NameResolver(model, resolve=resolve, refresh=60, retry=5)
    await resolver.run_once()
    assert _endpoints(model, "api.example.com") == {"192.0.2.20", "192.0.2.21"}
    assert _endpoints(model, "db.shop.example") == set()  # not resolved: no endpoint yet
    await resolver.run_once()  # nothing due: not asked again, no second warning
    assert asked == ["api.example.com", "db.example.net"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "db.example.net" in warnings[0], warnings

    answers["db.example.net"] = ["198.51.100.7"]
    await trio.sleep(5)  # the retry
    await resolver.run_once()
    assert _endpoints(model, "db.shop.example") == {"198.51.100.7"}

    answers["api.example.com"] = OSError("timed out")
    await trio.sleep(60)  # the refresh fails: the last addresses stay
    await resolver.run_once()
    assert _endpoints(model, "api.example.com") == {"192.0.2.20", "192.0.2.21"}
    assert "keeping the addresses resolved before" in caplog.records[-1].getMessage()

    # a name that resolves to the node's own addresses gives no endpoint (the node proxy
    # would dial its own loopback, where the agent's admin port listens)
    answers["db.example.net"] = ["127.0.0.1", "::1"]
    await trio.sleep(60)
    await resolver.run_once()
    assert "the node's own addresses" in caplog.records[-1].getMessage()
    answers["db.example.net"] = ["127.0.0.1", "198.51.100.8"]
    await trio.sleep(5)
    await resolver.run_once()
    assert _endpoints(model, "db.shop.example") == {"198.51.100.8"}

    model.delete("ServiceEntry", _entry("api", []))
    await resolver.run_once()  # an entry gone: its name is forgotten
    assert [o["metadata"]["name"] for o in model.objects(RESOLVED_KIND)] == ["db.example.net"]

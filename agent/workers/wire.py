"""The messages between the agent and its proxy workers (newline-delimited JSON over a
private socket pair, `common.configwire.MessageStream`).

Agent to worker: ``snapshot`` (the snapshot in use, whole: to a worker that holds no
snapshot or not the one a delta starts from), ``delta`` (the changes from the version the
worker holds to the next, as the controller sent them: the worker builds its next view from
its own, as the agent did), ``certs`` (every current workload
certificate with its key: the whole set each time), ``accepting`` (on/off: hand-over),
``drain`` (SIGTERM or a replacement: stop accepting, hand plain same-node relays to the
processes listening at its ``handoff`` paths, finish the rest, exit). Worker to agent:
``ready`` once it listens, then ``status`` every second (its share of `meshagent status`,
with its ``view``: the snapshot version it serves and how many it applied whole and as
deltas), ``resync`` when it could not apply a delta (the agent sends the snapshot whole),
and ``drained`` (connections left open) when a drain ends.
The pair never leaves the node's agent pod; keys travel as they sit in the agent's memory.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from meshagent.agent.identity.manager import WorkloadCert
from meshagent.common.spiffe import Identity


def certs_message(certs: list[WorkloadCert]) -> dict[str, Any]:
    return {
        "type": "certs",
        "certs": [
            {
                "identity": c.identity.uri,
                "chain": c.cert_chain_pem.decode(),
                "key": c.key_pem.decode(),
                "not_before": c.not_before.isoformat(),
                "not_after": c.not_after.isoformat(),
            }
            for c in certs
        ],
    }


def parse_certs(message: dict[str, Any]) -> list[WorkloadCert]:
    """The certificates of a ``certs`` message; raises ValueError/KeyError if malformed."""
    return [
        WorkloadCert(
            identity=Identity.parse(c["identity"]),
            cert_chain_pem=c["chain"].encode(),
            key_pem=c["key"].encode(),
            not_before=datetime.fromisoformat(c["not_before"]),
            not_after=datetime.fromisoformat(c["not_after"]),
        )
        for c in message["certs"]
    ]


def snapshot_message(snapshot_json: str) -> bytes:
    """A ``snapshot`` message around the snapshot's own JSON (encoded once for all workers)."""
    return b'{"type":"snapshot","snapshot":' + snapshot_json.encode() + b"}"


def delta_message(base: str, version: str, changes: dict[str, Any]) -> bytes:
    """A ``delta`` message (encoded once for all workers)."""
    head = {"type": "delta", "base": base, "version": version}
    return json.dumps({**head, "changes": changes}, separators=(",", ":")).encode()


def merge_status(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One data-plane status from the workers' shares: numbers add up (also inside nested
    mappings such as per-destination counts), lists are joined, ``route_problems`` (the same
    snapshot in every worker) is taken once."""
    merged: dict[str, Any] = {}
    for part in parts:
        _add(merged, part)
    if "route_problems" in merged:
        merged["route_problems"] = sorted(set(merged["route_problems"]))
    if "authz" in merged and "recent_denials" in merged["authz"]:
        # each worker keeps its last 20: the node's last 20 are the newest of all of them
        denials = sorted(merged["authz"]["recent_denials"], key=lambda d: d.get("time", 0))
        merged["authz"]["recent_denials"] = denials[-20:]
    return merged


def _add(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        elif isinstance(value, list):
            into.setdefault(key, []).extend(value)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            into.setdefault(key, value)
        else:
            into[key] = into.get(key, 0) + value

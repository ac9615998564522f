"""What a restarted agent and its proxy workers import before they serve (issue #17 item 3:
a restart serves within a second, and Python imports are most of that time). The agent with
workers never proxies, so it does not import the proxy; a worker does not import what only a
rarely used feature needs (a gRPC ext-authz provider's protobuf messages)."""

from __future__ import annotations

import json
import subprocess
import sys


def _imported(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` a fresh interpreter holds after importing `module`."""
    code = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_agent_imports_no_proxy():
    proxy = (
        "meshagent.agent.dataplane",
        "meshagent.agent.proxy.outbound",
        "meshagent.agent.proxy.inbound",
        "meshagent.agent.proxy.http",
        "meshagent.agent.hbone.client",
        "h2",
    )
    assert _imported("meshagent.agent.run", proxy) == []


def test_a_worker_imports_no_grpc_ext_authz_client():
    names = ("meshagent.common.extauthz_grpc", "google.protobuf")
    assert _imported("meshagent.agent.workers.worker", names) == []
    # what it does import: the proxy it runs
    assert _imported("meshagent.agent.workers.worker", ("meshagent.agent.dataplane",)) == [
        "meshagent.agent.dataplane"
    ]

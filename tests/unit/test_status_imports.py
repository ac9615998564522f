"""`meshagent status` is mostly Python start-up (benchmarks.node: ~0.01 s of work at 101 pods
against ~0.3 s of imports on the loaded machine), so it must not import what it never uses:
the HBONE client and server with h2, the telemetry package, the agent's state `Tables` (every
Istio model, compiled routes), trio (one admin GET is plain http.client), and, unless the
agent is down and saved certificates are read, cryptography."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.test_cli_conventions import no_agent_config

CERTSTORE = "meshagent.agent.identity.certstore"
UNUSED = (
    "h2",
    "trio",
    "cryptography",
    "meshagent.agent.state",
    "meshagent.agent.proxy.routing",
    CERTSTORE,
    "meshagent.common.istio.resource",
    "meshagent.common.istio.security",
    "meshagent.agent.hbone.client",
    "meshagent.agent.hbone.server",
    "meshagent.agent.telemetry",
)


def test_the_status_command_imports_no_tunnel_client_or_server():
    code = (
        "import sys\n"
        "import meshagent.agent.cli\n"
        "from meshagent.agent import status\n"
        f"print(sorted(m for m in {UNUSED!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_report_from_a_saved_snapshot_loads_no_tables(tmp_path):
    """With the agent down, status reads the saved snapshot as JSON (savedview); only the
    saved certificates it then reads may load the identity package (cryptography, trio)."""
    config = no_agent_config(tmp_path, admin_port=9)  # discard: nothing answers
    (tmp_path / "state").mkdir()
    snapshot = {"node": "node-x", "version": "v1", "workloads": [], "services": []}
    (tmp_path / "state" / "snapshot.json").write_text(json.dumps(snapshot))
    heavy = tuple(m for m in UNUSED if m not in ("cryptography", "trio", CERTSTORE))
    code = (
        "import sys\n"
        "from meshagent.agent import status\n"
        "from pathlib import Path\n"
        "from meshagent.agent.config import load_config\n"
        f"report = status.gather(load_config(Path({str(config)!r})))\n"
        "assert report['snapshot'] == {'version': 'v1', 'source': 'saved'}, report['snapshot']\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_hbone_package_still_offers_its_names():
    import meshagent.agent.hbone as hbone
    from meshagent.agent.hbone import HboneError, TunnelPool, serve_hbone

    assert issubclass(HboneError, Exception) and TunnelPool and serve_hbone
    assert sorted(hbone.__all__) == sorted(hbone._WHERE)

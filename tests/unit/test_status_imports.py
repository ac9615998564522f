"""`meshagent status` is mostly Python start-up (benchmarks.node: ~0.01 s of work at 101 pods
against ~0.3 s of imports on the loaded machine), so it must not import what it never uses:
the HBONE client and server with h2 (the agent's state needs only `hbone.tls`), nor the
telemetry package they brought in."""

from __future__ import annotations

import subprocess
import sys

UNUSED = (
    "h2",
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


def test_the_hbone_package_still_offers_its_names():
    import meshagent.agent.hbone as hbone
    from meshagent.agent.hbone import HboneError, TunnelPool, serve_hbone

    assert issubclass(HboneError, Exception) and TunnelPool and serve_hbone
    assert sorted(hbone.__all__) == sorted(hbone._WHERE)

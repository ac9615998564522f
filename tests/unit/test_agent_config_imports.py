"""`meshagent run` reads its config before it starts its proxy workers: loading the config
must not import the proxy, the telemetry package, trio or every Istio model (~0.3 s of CPU
on a loaded node, measured with `python -X importtime -c 'import meshagent.agent.config'`)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "trio",
    "h11",
    "meshagent.agent.telemetry",
    "meshagent.agent.proxy.limits",
    "meshagent.common.extauthz",
    "meshagent.common.istio.resource",
)


def test_loading_a_config_with_an_extension_provider_stays_light():
    code = (
        "import sys\n"
        "from meshagent.agent.config import AgentConfig\n"
        "cfg = AgentConfig.model_validate({'node_name': 'n', 'extension_providers': [\n"
        "    {'name': 'authz', 'envoyExtAuthzHttp': {'service': 'a.b.svc', 'port': 80}}]})\n"
        "assert cfg.extension_providers[0].envoy_ext_authz_http.port == 80\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_istio_package_still_offers_its_names():
    from meshagent.common.istio import SUPPORTED_KINDS, parse_duration

    assert parse_duration("1.5s") == 1.5 and "AuthorizationPolicy" in SUPPORTED_KINDS

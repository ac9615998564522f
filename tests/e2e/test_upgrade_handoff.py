"""Issue #17 item 4: at an upgrade the old agent hands its plain same-node connections to the
new one (SCM_RIGHTS, agent/proxy/handoff.py) instead of holding them to its drain deadline.

shop/frontend (node-1) holds connections to echo-local (node-1, a tcp- Service port: a
same-node L4 relay, both proxy-side sockets plain TCP) and one to echo-remote (node-2:
HBONE, which cannot be handed and drains as before). After `meshlab agent upgrade node-1`
the new agent relays the same-node ones (its status and metrics count them taken); the old
agent holds only the cross-node one, exits as soon as that one ends, and the same-node
connections go on echoing through the new agent, their access-log lines counting every byte
from their start, and a DENY applied afterwards closes the handed ones it forbids (the policy
facts moved with them; its own module: one lab per module).
"""

from __future__ import annotations

import re
import time

import yaml
from meshagent.lab import cgroups
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import EXAMPLES, meshlab, render_manifest
from tests.e2e.test_status_accuracy import _tcp_log_lines
from tests.e2e.test_upgrade import _agent_lines, _agent_pods, _alive
from tests.e2e.test_upgrade_connections import CONNS_MANIFEST, ConnHolder
from tests.waiting import wait_until

NODE = "node-1"
LOCAL = 8  # same-node connections: handed over, then closed by the client
DOOMED = 2  # same-node connections: handed over, then closed by a DENY
ECHO_LOCAL = "echo-local.shop.svc.cluster.local"
DENY_FRONTEND = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-frontend", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "echo-local"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}],
    },
}


def node_counter(family: str, **labels: str) -> float:
    """A counter of node-1's 15020 /metrics summed over ``labels`` (the newest agent's: it
    alone listens once the old one handed the node over)."""
    page = meshlab("exec", "--node", NODE, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    return sum(
        s.value
        for f in text_string_to_metric_families(page)
        if f.name == family
        for s in f.samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_same_node_connections_move_to_the_new_agent_and_the_old_one_exits_early(
    lab_factory, tmp_path
):
    since = time.time() - 1
    lab = lab_factory(EXAMPLES / "demo.yaml", render_manifest(CONNS_MANIFEST, tmp_path), nodes=2)
    old = _agent_pods(NODE)[-1]
    local = ConnHolder(LOCAL, ("echo-local",))
    doomed = ConnHolder(DOOMED, ("echo-local",))
    remote = ConnHolder(1, ("echo-remote",))
    deny = tmp_path / "deny.yaml"
    try:
        assert local.connected() == {"connected": LOCAL, "failures": []}
        assert doomed.connected() == {"connected": DOOMED, "failures": []}
        assert remote.connected() == {"connected": 1, "failures": []}
        before = local.report()
        assert before["open"] == before["echoed"] == LOCAL, before

        upgraded = meshlab("agent", "upgrade", NODE, timeout=240).stdout
        assert f"handed over to meshagent-{NODE}-2" in upgraded, upgraded
        # the new agent took every same-node connection: its status and its metrics say so
        taken = wait_until(
            lambda: lab.status(NODE)["connections"]["outbound"],
            lambda out: out["handed_in"] >= LOCAL + DOOMED,
            what="the new agent takes the same-node connections",
            timeout=60,
        )
        assert taken["handed_in"] == LOCAL + DOOMED, taken
        assert node_counter("meshagent_connections_handed", direction="in") == LOCAL + DOOMED
        old_log = "\n".join(_agent_lines(NODE, old["pid"]))
        drain = re.search(r"SIGTERM: draining (\d+) connection.*\((\d+) successor process", old_log)
        assert drain and int(drain[1]) >= LOCAL + DOOMED + 1 and int(drain[2]) >= 1, old_log[-3000:]
        # the old agent still runs: it holds the cross-node connection (HBONE drains)
        assert _alive(old["pid"])
        middle = local.report()
        assert middle["open"] == middle["echoed"] == LOCAL and middle["failures"] == [], middle
        far = remote.report()
        assert far["open"] == far["echoed"] == 1, far

        # the cross-node connection ends: the old agent holds nothing more and exits now,
        # not at its drain deadline (an hour)
        remote.close()
        wait_until(
            lambda: _alive(old["pid"]),
            lambda alive: not alive,
            what="the old agent exits once its last held connection ends",
            timeout=60,
        )
        wait_until(
            lambda: cgroups.pids(cgroups.system_cgroup(f"retired-{NODE}")),
            lambda pids: not pids,
            what="the watcher leaves once the old agent is gone",
        )
        old_log = "\n".join(_agent_lines(NODE, old["pid"]))
        assert "drained, 0 connection(s) left open" in old_log, old_log[-3000:]

        # the same-node connections live in the new agent: they echo with the old one gone
        after = local.report()
        assert after["open"] == after["echoed"] == LOCAL and after["failures"] == [], after
        assert after["rounds"] > middle["rounds"]
        closed = local.close()
        assert closed.get("closed") == LOCAL, closed
        # each one's access-log line (the new agent's, at its close) counts every byte both
        # ways from its start, the old agent's share included
        entries = wait_until(
            lambda: _tcp_log_lines(NODE, ECHO_LOCAL, since),
            lambda lines: len(lines) >= LOCAL,
            what="an access-log line for each same-node connection",
            timeout=30,
        )
        assert len(entries) == LOCAL, entries
        assert sorted((e["bytes_sent"], e["bytes_received"]) for e in entries) == sorted(
            (n, n) for n in closed["bytes"].values()
        ), (entries, closed)
        assert all(n > 0 for n in closed["bytes"].values())

        # a DENY applied now closes the handed connections it forbids, in the new agent
        denied_before = node_counter("meshagent_connections_closed_by_policy", kind="denied")
        deny.write_text(yaml.safe_dump(DENY_FRONTEND))
        meshlab("apply", "-f", str(deny))
        ended = wait_until(
            doomed.report,
            lambda r: r["open"] == 0,
            what="the DENY closes the handed connections it forbids",
            timeout=30,
            interval=0.5,
        )
        assert len(ended["failures"]) == DOOMED, ended
        closed_by_policy = node_counter("meshagent_connections_closed_by_policy", kind="denied")
        assert closed_by_policy - denied_before == DOOMED
    finally:
        remote.close()
        local.close()
        doomed.close()
        meshlab("delete", "-f", str(deny), check=False)

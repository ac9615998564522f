"""Issue #17 item 4: long-lived connections survive a DaemonSet rolling upgrade of the agents.

The old agent serves the connections it holds for up to its drain deadline (an hour) after
SIGTERM and exits after the last; `meshlab agent upgrade` returns once it got SIGTERM, as a
rollout moves on. 20 echo connections (same node and across nodes) and steady HTTP load go
on while both nodes' agents are upgraded in turn (its own module: one lab per module).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

from meshagent.lab import cgroups

from tests.e2e.conftest import APPS, BIN, EXAMPLES, meshlab, render_manifest
from tests.e2e.test_upgrade import CLIENT, _agent_lines, _agent_pods, _alive
from tests.waiting import wait_until

CONNS_MANIFEST = Path(__file__).parent / "manifests" / "upgrade_conns.yaml"
HELD = 20  # half to echo-local (node-1, same node as the client), half to echo-remote (node-2)
HOLD_SECONDS = 600  # bounded: the holder exits by itself
LOAD_SECONDS = 400  # bounded; ends early at the stop file
OLD_DRAIN_S = 25  # the drain deadline was 20 s: connections held past it were cut then


class ConnHolder:
    """`conn_holder.py` in shop/frontend: ``held`` connections round-robin over ``targets``,
    a report per line we send."""

    def __init__(
        self, held: int = HELD, targets: tuple[str, ...] = ("echo-local", "echo-remote")
    ) -> None:
        self.proc = subprocess.Popen(
            [
                str(BIN / "meshlab"),
                *("exec", "shop/frontend", "--", "/usr/bin/python3"),
                str(APPS / "conn_holder.py"),
                *(str(HOLD_SECONDS), str(held)),
                *(f"{target}.shop:7000" for target in targets),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def _json(self) -> list[dict]:
        return [json.loads(x) for x in self.lines if x.startswith("{")]

    def connected(self) -> dict:
        return wait_until(self._json, what="the holder connected", timeout=60)[0]

    def report(self) -> dict:
        before = len(self._json())
        assert self.proc.stdin is not None
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return wait_until(
            self._json, lambda r: len(r) > before, what="a holder report", timeout=60
        )[-1]

    def close(self) -> dict:
        """Close its connections; what it says of them (`conn_holder.py`), {} if nothing."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)  # its last line read
        return next((r for r in self._json() if "closed" in r), {})


def test_long_lived_connections_survive_both_agents_upgrades(lab_factory, tmp_path):
    """Steady HTTP load (new and keep-alive connections, cross-node) and 20 echo connections
    (10 same-node, 10 cross-node) while node-1's then node-2's agent is upgraded the
    kubelet's way: no request fails, all 20 still echo afterwards; the old agents serve them
    meanwhile (draining, not killed) and each exits as soon as its last connection ends."""
    manifest = render_manifest(CONNS_MANIFEST, tmp_path)
    lab = lab_factory(EXAMPLES / "demo.yaml", manifest, nodes=2)
    old = {node: _agent_pods(node)[-1] for node in ("node-1", "node-2")}
    stop = tmp_path / "stop-load"
    load = subprocess.Popen(
        [
            str(BIN / "meshlab"),
            *("exec", "shop/frontend", "--", "python3", "-c", CLIENT),
            *("reviews.shop", str(LOAD_SECONDS), str(stop)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    holder = ConnHolder()
    try:
        assert holder.connected() == {"connected": HELD, "failures": []}
        first = holder.report()
        assert first["open"] == HELD and first["echoed"] == HELD, first

        sigterm: dict[str, float] = {}
        for node in ("node-1", "node-2"):
            upgraded = meshlab("agent", "upgrade", node, timeout=240).stdout
            sigterm[node] = time.monotonic()
            assert f"handed over to meshagent-{node}-2" in upgraded, upgraded
            assert "SIGTERM sent" in upgraded, upgraded
            # the old agent drains: it still runs, holding connections, and says so (node-1's
            # holds the client side of all 20, node-2's the server side of the cross-node ones)
            log = wait_until(
                lambda node=node: "\n".join(_agent_lines(node, old[node]["pid"])),
                lambda log: re.search(r"SIGTERM: draining \d+ connection", log),
                what=f"the old {node} agent drains the connections it holds",
                timeout=30,
            )
            held = int(re.search(r"SIGTERM: draining (\d+) connection", log).group(1))
            assert held >= (HELD if node == "node-1" else 1), log[-3000:]
            assert _alive(old[node]["pid"])
            # the kubelet's SIGKILL at the grace deadline: a watcher waits beside it
            assert cgroups.pids(cgroups.system_cgroup(f"retired-{node}")), node
            # `meshagent status` on the node lists the draining old agent beside the new one
            pods = lab.status(node)["datapath"]["agent_pods"]
            assert [p["name"] for p in pods] == [old[node]["name"], f"meshagent-{node}-2"]
            middle = holder.report()
            assert middle["open"] == HELD and middle["echoed"] == HELD, middle

        # past the old 20 s drain of both agents, every connection still echoes each round
        wait_until(
            holder.report,
            lambda r: r["open"] < HELD or time.monotonic() - sigterm["node-2"] > OLD_DRAIN_S,
            what=f"{OLD_DRAIN_S} s since the last SIGTERM, or a connection lost",
            timeout=OLD_DRAIN_S + 60,
            interval=1.0,
        )
        after = holder.report()
        assert after["open"] == HELD and after["echoed"] == HELD, after
        assert after["failures"] == [], after
        assert all(_alive(old[node]["pid"]) for node in old), "an old agent was cut short"
        # the new agents own the nodes
        for node in ("node-1", "node-2"):
            view = lab.status(node)
            assert view["agent"]["phase"] == "owner", view["agent"]
            assert [p["name"] for p in _agent_pods(node)] == [f"meshagent-{node}-2"]

        stop.touch()
        out, err = load.communicate(timeout=120)
    finally:
        stop.touch()
        holder.close()
        if load.poll() is None:
            load.kill()
            load.wait()
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err}
    assert result.get("failures") == [], result
    assert result["ok"] > 100, result

    # the holder closed its connections: each old agent exits at once, not at its deadline
    for node in ("node-1", "node-2"):
        wait_until(
            lambda node=node: _alive(old[node]["pid"]),
            lambda alive: not alive,
            what=f"the old {node} agent exits after its last connection",
            timeout=60,
        )
        wait_until(
            lambda node=node: cgroups.pids(cgroups.system_cgroup(f"retired-{node}")),
            lambda pids: not pids,
            what=f"the {node} watcher leaves once the old agent is gone",
        )
        old_log = "\n".join(_agent_lines(node, old[node]["pid"]))
        assert "drained, 0 connection(s) left open" in old_log, old_log[-3000:]
    code, _ = lab.curl("shop/frontend", "http://reviews.shop:9080/")
    assert code == "200"

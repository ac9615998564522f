"""Issue #8: a DaemonSet rolling upgrade (maxSurge 1) of the agents loses no request.

The lab runs each node's agent as a DaemonSet pod would (POD_UID, the hand-over registry);
`meshlab agent surge/retire/upgrade` does what the kubelet does: the new agent starts next
to the old one and binds the same ports (SO_REUSEPORT), the old one hands the node over
(stops accepting and writing the maps, keeps relaying what it has), then gets its preStop
hook and SIGTERM and drains. A client in a meshed pod keeps making requests throughout, on
new connections and on one keep-alive connection.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from meshagent.lab.paths import RUN_DIR

from tests.e2e.conftest import BIN, DATAPATH_PROGRAMS, EXAMPLES, meshlab
from tests.waiting import wait_until

PROBE_SECONDS = 30  # bounded: the client stops by itself
TARGET = ("reviews.shop", str(PROBE_SECONDS))

# New connection per request, and one keep-alive connection. A server may close a
# keep-alive connection while it is idle (HTTP/1.1 8.1.4; clients retry then); any other
# error, any non-200, is a failed request.
CLIENT = r"""
import http.client, json, os, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
stop = sys.argv[3] if len(sys.argv) > 3 else None  # ends early once this file exists
out = {"ok": 0, "kept_ok": 0, "kept_connections": 1, "idle_closes": 0, "failures": []}
IDLE_CLOSED = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
kept = http.client.HTTPConnection(host, 9080, timeout=5)
end = time.monotonic() + seconds
while time.monotonic() < end and not (stop and os.path.exists(stop)):
    for how in ("new", "kept"):
        conn = kept if how == "kept" else http.client.HTTPConnection(host, 9080, timeout=5)
        for attempt in (1, 2):
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
            except IDLE_CLOSED as exc:
                if how == "kept" and attempt == 1:  # closed while idle: reconnect, retry once
                    out["idle_closes"] += 1
                    conn = kept = http.client.HTTPConnection(host, 9080, timeout=5)
                    out["kept_connections"] += 1
                    continue
                out["failures"].append(f"{time.time():.2f} {how}: {exc!r}")
            except Exception as exc:
                out["failures"].append(f"{time.time():.2f} {how}: {exc!r}")
            else:
                if response.status == 200:
                    out["ok"] += 1
                    out["kept_ok"] += how == "kept"
                else:
                    out["failures"].append(f"{time.time():.2f} {how}: HTTP {response.status}")
                if how == "kept" and response.getheader("connection", "").lower() == "close":
                    conn = kept = http.client.HTTPConnection(host, 9080, timeout=5)
                    out["kept_connections"] += 1
            break
        if how == "new":
            conn.close()
    time.sleep(0.02)
print(json.dumps(out))
"""


def _agent_lines(node: str, pid: int) -> list[str]:
    log = (RUN_DIR / "logs" / f"agent-{node}.log").read_text().splitlines()
    return [line for line in log if f"[{pid}]" in line]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _agent_pods(node: str) -> list[dict]:
    return json.loads((RUN_DIR / node / "agent-pods.json").read_text())


def test_rolling_upgrade_of_both_agents_loses_no_request(lab_factory):
    lab = lab_factory(EXAMPLES / "demo.yaml", nodes=2)
    before = {node: lab.status(node) for node in ("node-1", "node-2")}
    old = {node: _agent_pods(node)[-1] for node in ("node-1", "node-2")}
    client = subprocess.Popen(
        [str(BIN / "meshlab"), "exec", "shop/frontend", "--", "python3", "-c", CLIENT, *TARGET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # node-1 holds the client's outbound side, node-2 the server's inbound (HBONE) side
        surged = meshlab("agent", "surge", "node-1", timeout=90)
        assert "serves on node-1" in surged.stdout
        new_pid = _agent_pods("node-1")[-1]["pid"]
        # both agents run; the old one has handed the node over: the new one answers status
        view = lab.status("node-1")
        assert view["agent"]["running"] and view["agent"]["phase"] == "owner", view
        assert view["agent"]["datapath_reused"] is True

        retired = meshlab("agent", "retire", "--wait", "node-1", timeout=90).stdout
        name = old["node-1"]["name"]
        assert f"{name}: preStop: handed over to meshagent-node-1-2; datapath left in" in retired
        assert f"{name}: exited" in retired, retired

        # the rollout moves on once the old agent got SIGTERM; it exits after its last
        # connection (the client's keep-alive one, closed as idle)
        upgraded = meshlab("agent", "upgrade", "node-2", timeout=120).stdout
        assert "handed over to meshagent-node-2-2" in upgraded, upgraded
        assert "SIGTERM sent" in upgraded, upgraded
        wait_until(
            lambda: _alive(old["node-2"]["pid"]),
            lambda alive: not alive,
            what="the old node-2 agent exits once drained",
            timeout=60,
        )
        out, err = client.communicate(timeout=PROBE_SECONDS + 60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err}
    assert result.get("failures") == [], result
    assert result["ok"] > 200 and result["kept_ok"] > 100, result

    for node in ("node-1", "node-2"):
        # the old agent yielded, drained and left the datapath; the new one owns the node
        old_log = "\n".join(_agent_lines(node, old[node]["pid"]))
        assert "hand-over: owner -> successor-starting" in old_log, old_log[-3000:]
        assert "-> handed-over" in old_log, old_log[-3000:]
        assert re.search(r"SIGTERM: draining \d+ connection", old_log), old_log[-3000:]
        # idle keep-alive connections were closed and peers moved their tunnels: nothing
        # was left for the drain timeout to cut
        assert "drained, 0 connection(s) left open" in old_log, old_log[-3000:]
        view = lab.status(node)
        programs = {p["name"] for p in view["datapath"]["programs"]}
        assert programs == DATAPATH_PROGRAMS
        assert programs == {p["name"] for p in before[node]["datapath"]["programs"]}
        live = view["agent"]
        assert live["phase"] == "owner" and live["ready"] and live["datapath_reused"]
        assert [p["name"] for p in _agent_pods(node)] == [f"meshagent-{node}-2"]
    assert _agent_lines("node-1", new_pid), "the new agent logs under its own pid"

    # and the mesh still works through the new agents, with mTLS across nodes
    code, _ = lab.curl("shop/frontend", "http://reviews.shop:9080/")
    assert code == "200"

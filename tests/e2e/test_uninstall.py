"""Issue #8: the uninstall path leaves pods' traffic flowing directly within 2 seconds, and
`meshagent uninstall --unless-handed-over` (the DaemonSet's preStop hook) leaves the datapath
to a newer live agent on the node, removing it only when there is none.

The lab has no kube-proxy, so without the mesh a Service VIP leads nowhere: "directly" is
checked on a meshed pod's connections to a pod IP.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

from meshagent.agent.handover import newer_live_agent
from meshagent.lab.paths import POD_NET_OCTET, RUN_DIR, STATE_FILE

from tests.e2e.conftest import BIN, DATAPATH_PROGRAMS, meshlab
from tests.waiting import wait_until

REVIEWS = f"10.{POD_NET_OCTET}.2.10"  # demo.yaml: reviews-v1, first pod on node-2
DEADLINE = 2.0
PROGRAMS = DATAPATH_PROGRAMS

PROBER = """
import pathlib, socket, sys, time
tried = pathlib.Path(sys.argv[2])
while True:
    try:
        with socket.create_connection((sys.argv[1], 9080), timeout=0.2) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            if s.recv(12).endswith(b"200"):
                print(time.time(), flush=True)
                break
    except OSError:
        tried.touch()  # the test waits for a first failure before it uninstalls
    time.sleep(0.05)
"""


def _pod_ip(key: str) -> str:
    pods = json.loads(STATE_FILE.read_text())["pods"]
    return next(p["ip"] for p in pods if f"{p['namespace']}/{p['name']}" == key)


def _program_names(lab, node: str) -> set[str]:
    return {p["name"] for p in lab.status(node)["datapath"]["programs"]}


def test_uninstall_lets_meshed_traffic_flow_directly_within_2s(demo_lab, tmp_path):
    url = f"http://{REVIEWS}:9080/"
    before = demo_lab.counters("node-1")
    assert demo_lab.curl("shop/frontend", url)[0] == "200"
    assert demo_lab.counters("node-1")["redirected"] == before["redirected"] + 1

    # with the agent gone the redirect stays (pinned) and leads to no proxy: fails closed
    meshlab("agent", "stop", "node-1")
    assert _program_names(demo_lab, "node-1") == PROGRAMS
    assert demo_lab.curl("shop/frontend", url, timeout=1)[0] == "000"

    # a prober in the pod tries a request every 50 ms and prints the wall time of the first 200
    tried = tmp_path / "prober-tried"
    prober = subprocess.Popen(
        [
            str(BIN / "meshlab"),
            "exec",
            "shop/frontend",
            "--",
            "python3",
            "-c",
            PROBER,
            REVIEWS,
            str(tried),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # it is trying (and failing) before the uninstall starts
        wait_until(tried.exists, what="the prober has failed a first attempt")
        assert prober.poll() is None, "reached the server before the uninstall"
        # timed from the start of `meshagent uninstall` on the node, not of the meshlab wrapper
        proc = meshlab(
            "exec", "--node", "node-1", "--", "sh", "-c", "date +%s.%N; exec meshagent uninstall"
        )
        start = float(proc.stdout.split()[0])
        out, _ = prober.communicate(timeout=DEADLINE + 5)
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait()
    elapsed = float(out.split()[-1]) - start
    assert elapsed < DEADLINE, f"direct {elapsed:.2f}s after the uninstall started"
    print(f"direct {elapsed:.2f}s after the uninstall started", file=sys.stderr)
    assert "detached mesh_" in proc.stdout, proc.stdout

    # the server saw the frontend's own address: no proxy, no tunnel in between (through the
    # mesh, requests come from node-2's proxy address; the log may also hold tracebacks of
    # pooled mesh connections closed when node-1's agent went away)
    log = (RUN_DIR / "logs" / "pod-shop-reviews-v1.log").read_text().splitlines()
    direct = [line for line in log if line.startswith(_pod_ip("shop/frontend") + " ")]
    assert any('"GET / ' in line for line in direct), log[-10:]

    status = demo_lab.status("node-1")
    assert status["agent"]["running"] is False
    assert status["datapath"]["programs"] == []
    assert "counters" not in status["datapath"] and "maps_error" in status["datapath"]
    text = meshlab("exec", "--node", "node-1", "--", "meshagent", "status").stdout
    assert "Programs attached:\n  (none)" in text, text
    assert not (RUN_DIR / "node-1" / "state" / "snapshot.json").exists()

    # idempotent: a second run finds nothing and succeeds
    again = meshlab("exec", "--node", "node-1", "--", "meshagent", "uninstall")
    assert "no programs of ours attached" in again.stdout and "no pins" in again.stdout


def _register(registry, uid: str, name: str, registered_ns: int) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    doc = {"pod_uid": uid, "pod_name": name, "registered_ns": registered_ns, "serving": True}
    (registry / f"{uid}.json").write_text(json.dumps(doc))


def _pre_stop(pod_uid: str | None):
    env = ["env", f"POD_UID={pod_uid}"] if pod_uid else ["env", "-u", "POD_UID"]
    return meshlab(
        "exec",
        "--node",
        "node-2",
        "--",
        *env,
        "meshagent",
        "uninstall",
        "--unless-handed-over",
        check=False,
    )


def test_pre_stop_hook_leaves_the_datapath_to_a_newer_live_agent(demo_lab):
    registry = RUN_DIR / "node-2" / "state" / "agents"
    assert _program_names(demo_lab, "node-2") == PROGRAMS

    refused = _pre_stop(None)
    assert refused.returncode != 0 and "POD_UID" in refused.stderr, refused.stderr
    assert _program_names(demo_lab, "node-2") == PROGRAMS

    # an older agent (us) and a newer one that is alive: it holds its lock
    _register(registry, "old-uid", "meshagent-old", time.time_ns())
    _register(registry, "new-uid", "meshagent-new", time.time_ns() + 1)
    lock = os.open(registry / "new-uid.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        upgrade = _pre_stop("old-uid")
        assert upgrade.returncode == 0, upgrade.stderr
        assert upgrade.stdout.strip() == "handed over to meshagent-new; datapath left in place"
        assert _program_names(demo_lab, "node-2") == PROGRAMS
        assert (registry / "new-uid.json").exists()  # another pod's files are never touched
        # the newer agent's own hook would not hand over to the older one
        assert newer_live_agent(registry, "new-uid") is None
    finally:
        os.close(lock)  # the newer agent is gone

    removal = _pre_stop("old-uid")
    assert removal.returncode == 0, removal.stderr
    assert "detached mesh_" in removal.stdout, removal.stdout
    assert _program_names(demo_lab, "node-2") == set()
    assert not registry.exists()
    # several old agents may run the hook: the next one finds nothing to do
    assert _pre_stop("older-uid").returncode == 0

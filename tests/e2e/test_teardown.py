"""Issue #2: `meshlab down` leaves nothing behind, also after the lab was killed with -9."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from meshagent.lab.paths import BPFFS_DIR, ETC_NETNS, NETNS_PREFIX, RUN_DIR, lab_cgroup

from tests.e2e.conftest import BIN, EXAMPLES, _require_root, meshlab
from tests.waiting import wait_until


def _left_on_machine() -> list[str]:
    """Look with the system's own tools, not the lab's bookkeeping."""
    left = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left += [
        f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith(NETNS_PREFIX)
    ]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [
        f"link {line.split()[1]}"
        for line in links.splitlines()
        if " vp" in line or "ul-node" in line
    ]
    if lab_cgroup().exists():
        left.append(f"cgroup {lab_cgroup()}")
    if BPFFS_DIR.exists():
        left.append(f"pins {BPFFS_DIR}")
    left += [str(p) for p in ETC_NETNS.glob(NETNS_PREFIX + "*")] if ETC_NETNS.exists() else []
    if RUN_DIR.exists():
        left.append(str(RUN_DIR))
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"{RUN_DIR}/" in cmdline or NETNS_PREFIX in cmdline:
            left.append(f"process {proc.name}: {cmdline[:80]}")
    return left


def test_down_removes_everything():
    _require_root()
    meshlab("down", check=False)
    meshlab("up", "-f", str(EXAMPLES / "demo.yaml"))
    assert _left_on_machine(), "the lab should exist while up"
    meshlab("down")
    assert _left_on_machine() == []


def test_down_after_the_lab_was_killed_mid_build():
    _require_root()
    meshlab("down", check=False)
    up = subprocess.Popen(
        [str(BIN / "meshlab"), "up", "-f", str(EXAMPLES / "demo.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # wait until it has built namespaces and started daemons, then crash it
        wait_until(
            (RUN_DIR / "logs" / "agent-node-2.log").exists,
            what="`meshlab up` has started node-2's agent (its log exists)",
            timeout=30,
            interval=0.05,
        )
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait()
    assert _left_on_machine()
    meshlab("down")
    assert _left_on_machine() == []
    meshlab("down")  # and again: nothing to do, no error
    assert _left_on_machine() == []


def test_down_after_a_running_lab_had_its_daemons_killed():
    _require_root()
    meshlab("down", check=False)
    meshlab("up", "-f", str(EXAMPLES / "demo.yaml"))
    # kill -9 every process of the lab, as an OOM killer or a crash would
    subprocess.run(["sh", "-c", f"echo 1 > {lab_cgroup()}/cgroup.kill"], check=True)
    meshlab("down")
    assert _left_on_machine() == []

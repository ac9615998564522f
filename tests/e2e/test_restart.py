"""Restart on the pins (issue #17 item 3): an agent killed with -9 and started again reuses
the pinned programs and maps (no compile) and serves again within about a second of its
start, by its own figure; pins built from anything else (another key) are built again,
never reused stale; `meshlab down` removes every pin, the key folder with them. The build
runs in a helper process, so the agent never holds bcc.

The start-to-ready figure is the agent's own (``ready_after_s`` in `meshagent status`, from
its process start to 15001/15008 accepting, logged at ready); this test asserts that the
pins were reused and shows the figures rather than asserting a bound on them (the machine
running the suite is shared and loaded: the figure is a product feature, not a test clock).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshagent.agent.datapath import bpfsys
from meshagent.lab.lab import agent_pods
from meshagent.lab.paths import BPFFS_DIR, LOG_DIR

from tests.e2e.conftest import APPS, BIN, DATAPATH_PROGRAMS, meshlab
from tests.e2e.test_fail_mode import SYSTEM_PYTHON, Probe
from tests.waiting import wait_until

NODES = ("node-1", "node-2")
REVIEWS = "http://reviews.shop:9080/"  # frontend (node-1) -> reviews-v1 (node-2): 15001, 15008


def keys(status: dict) -> list[str]:
    return sorted(p.name for p in Path(status["datapath"]["pin_dir"]).glob("key-*"))


def program_ids(status: dict) -> set[int]:
    assert {p["name"] for p in status["datapath"]["programs"]} == DATAPATH_PROGRAMS
    return {p["id"] for p in status["datapath"]["programs"]}


def ready_line(node: str) -> str:
    """The agent's last 'agent ready' log line."""
    lines = (LOG_DIR / f"agent-{node}.log").read_text(errors="replace").splitlines()
    return [line for line in lines if "agent ready on node" in line][-1]


def restart(lab, node: str) -> dict:
    """kill -9 every process of the node's agent, start it again (returns once it is ready)
    and give its status."""
    meshlab("agent", "stop", node)
    meshlab("agent", "start", node)
    return lab.status(node)


def test_an_agent_that_built_its_datapath_holds_no_bcc(demo_lab):
    """Each agent built its datapath at the lab's start, in a short-lived helper process: the
    long-lived agent never mapped bcc or LLVM."""
    for node in NODES:
        assert demo_lab.status(node)["agent"]["datapath_reused"] is False
        pid = agent_pods(node)[-1]["pid"]
        mapped = Path(f"/proc/{pid}/maps").read_text()
        assert "meshagent" in Path(f"/proc/{pid}/cmdline").read_text()
        assert "libbcc" not in mapped and "libLLVM" not in mapped, node


def test_a_killed_agent_serves_again_on_its_pinned_datapath(demo_lab):
    before = {node: demo_lab.status(node) for node in NODES}
    for status in before.values():
        assert len(keys(status)) == 1, keys(status)  # the first start built and keyed it
        assert status["agent"]["datapath_reused"] is False
    redirected = demo_lab.counters("node-1")["redirected"]

    figures = {}
    for node in NODES:
        after = restart(demo_lab, node)
        agent = after["agent"]
        assert agent["running"] and agent["datapath_reused"] is True, agent
        assert program_ids(after) == program_ids(before[node])  # the very same programs
        assert keys(after) == keys(before[node])
        figure = agent["ready_after_s"]
        assert isinstance(figure, float) and figure > 0, agent
        line = ready_line(node)
        assert f"{figure:.3f} s after its start (reused pinned datapath)" in line, line
        screen = meshlab("exec", "--node", node, "--", "meshagent", "status").stdout
        assert f"ready {figure:.2f} s after start (reused the pinned datapath)" in screen
        figures[node] = figure
    print(f"start to ready after kill -9, on the pins: {figures}")

    # Serving again: node-1's connect program redirects to its 15001, which tunnels to
    # node-2's 15008.
    code, body = demo_lab.curl("shop/frontend", REVIEWS)
    assert code == "200", body
    assert demo_lab.counters("node-1")["redirected"] > redirected


def test_pins_of_another_build_are_built_again_not_reused(demo_lab):
    """What the key stands for (other sources, options or kernel; unit-tested in
    tests/unit/test_datapath_key.py) is simulated by renaming the key folder: the restarted
    agent replaces every program rather than reusing one built from something else."""
    before = demo_lab.status("node-1")
    (ours,) = keys(before)
    pin_dir = Path(before["datapath"]["pin_dir"])
    (pin_dir / ours).rename(pin_dir / ("key-" + "0" * 64))

    after = restart(demo_lab, "node-1")
    assert after["agent"]["datapath_reused"] is False
    assert keys(after) == [ours]
    assert not program_ids(after) & program_ids(before)  # none of the old ones stays attached
    log = (LOG_DIR / "agent-node-1.log").read_text(errors="replace")
    assert "were built from other sources, options or kernel (key 000000000000" in log
    assert "(built the datapath)" in ready_line("node-1")
    wait_until(
        lambda: demo_lab.status("node-1")["datapath"]["meshed_netns"],
        lambda netns: [p["pod"] for p in netns] == ["shop/frontend"],
        what="node-1 fills the fresh maps with its meshed pod",
    )
    redirected = demo_lab.counters("node-1")["redirected"]
    code, body = demo_lab.curl("shop/frontend", REVIEWS)
    assert code == "200", body
    assert demo_lab.counters("node-1")["redirected"] > redirected

    # And restarted once more, it reuses what it built.
    again = restart(demo_lab, "node-1")
    assert again["agent"]["datapath_reused"] is True
    assert program_ids(again) == program_ids(after)


def pod_ip(lab, node: str, pod: str) -> str:
    (ip,) = [p["ip"] for p in lab.status(node)["pods"] if f"{p['namespace']}/{p['name']}" == pod]
    return ip


@pytest.fixture
def prober(demo_lab) -> Iterator[tuple[Probe, str]]:
    """(a probe dialling from the fail-closed shop/frontend without pause, the client's IP):
    the server on node-2 answers with the address each connection came from (node-2's proxy
    when meshed, the client pod's own IP when not)."""
    server = subprocess.Popen(
        [str(BIN / "meshlab"), "exec", "shop/intruder", "--", SYSTEM_PYTHON,
         str(APPS / "client_ip.py"), "8080"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = None
    try:
        client = pod_ip(demo_lab, "node-1", "shop/frontend")
        target = f"{pod_ip(demo_lab, 'node-2', 'shop/intruder')}:8080"
        probe = Probe("shop/frontend", target, duration=90)
        wait_until(
            lambda: probe.attempts,
            lambda a: any(meshed(x, client) for x in a),
            what="shop/frontend reaches the server on node-2 through the mesh",
            timeout=30,
        )
        yield probe, client
    finally:
        if probe is not None:
            probe.stop()
        server.kill()
        server.wait(timeout=10)


def meshed(attempt: dict, client: str) -> bool:
    return attempt["ok"] and attempt["body"] not in ("", client)


def foreign_key(status: dict) -> str:
    """Rename the key folder as another build's would be; returns the real key's name."""
    (ours,) = keys(status)
    pin_dir = Path(status["datapath"]["pin_dir"])
    (pin_dir / ours).rename(pin_dir / ("key-" + "1" * 64))
    return ours


def swap_line() -> str:
    log = (LOG_DIR / "agent-node-1.log").read_text(errors="replace")
    return [x for x in log.splitlines() if "in place of the previous ones" in x][-1]


def assert_one_program_per_hook(before: dict, after: dict, key: str) -> None:
    """Exactly one program per hook, each the newly pinned one; no staging folder left."""
    programs = after["datapath"]["programs"]
    assert set(Counter(p["attach_type"] for p in programs).values()) == {1}, programs
    assert {p["name"] for p in programs} == DATAPATH_PROGRAMS
    assert len(programs) == len(DATAPATH_PROGRAMS) and all(p["pinned"] for p in programs)
    assert not program_ids(after) & program_ids(before)
    pin_dir = Path(after["datapath"]["pin_dir"])
    assert keys(after) == [key] and not (pin_dir / "staging").exists()
    if shutil.which("bpftool"):  # the kernel's own view, where the tool exists
        shown = subprocess.run(
            ["bpftool", "cgroup", "show", programs[0]["cgroup"]],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert sum(name in shown for name in DATAPATH_PROGRAMS) == len(DATAPATH_PROGRAMS)


def test_a_rebuild_swaps_programs_in_place_a_fail_closed_pod_never_goes_direct(demo_lab, prober):
    """Issue #17 (restarts and upgrades that cut nothing): a restarted agent that must build
    its datapath again (another key) attaches the new programs in place of the old ones, one
    step per hook, with the new maps already holding the meshed pods and fail modes. A
    fail-closed pod dialling without pause all through the rebuild never reaches its
    destination past the mesh; afterwards exactly one program of ours is attached per hook
    and the pod is served through the mesh again."""
    probe, client = prober
    before = demo_lab.status("node-1")
    ours = foreign_key(before)

    stopped_at = time.time()
    after = restart(demo_lab, "node-1")
    restarted_at = time.time()
    assert after["agent"]["datapath_reused"] is False
    wait_until(
        lambda: probe.since(restarted_at),
        lambda a: any(meshed(x, client) for x in a),
        what="shop/frontend is served through the mesh again after the rebuild",
        timeout=30,
    )
    during = probe.since(stopped_at)
    direct = [a for a in during if a["ok"] and a["body"] == client]
    assert not direct, f"{len(direct)} of {len(during)} connects went direct: {direct[:3]}"
    assert len(during) >= 10, during  # it did dial all through
    assert_one_program_per_hook(before, after, ours)
    line = swap_line()
    assert f"{len(DATAPATH_PROGRAMS)} of them in place of the previous ones" in line, line
    assert "mesh_netns 1" in line and "heartbeat 1" in line, line


def test_a_swap_cut_short_is_finished_by_the_next_start(demo_lab):
    """A staging folder left by a crash in the middle of a swap (here: a staged pin of a
    program that is attached, as after a crash between a replace and the renames) makes the
    next start build again rather than reuse, and that build leaves one program per hook and
    no staging folder."""
    before = demo_lab.status("node-1")
    (key,) = keys(before)
    pin_dir = Path(before["datapath"]["pin_dir"])
    (pin_dir / "staging").mkdir()
    fd = bpfsys.obj_get(str(pin_dir / "prog_mesh_connect4"))
    try:
        bpfsys.obj_pin(fd, str(pin_dir / "staging" / "prog_mesh_connect4"))
    finally:
        os.close(fd)

    after = restart(demo_lab, "node-1")
    assert after["agent"]["datapath_reused"] is False
    assert_one_program_per_hook(before, after, key)
    code, body = demo_lab.curl("shop/frontend", REVIEWS)
    assert code == "200", body


def test_a_surge_upgrade_that_rebuilds_cuts_nothing(demo_lab, prober):
    """A new agent started next to the serving one (a DaemonSet surge) with another key swaps
    the datapath under the old agent, which follows the pins (its beats and its proxy's
    original-destination lookups move to the new maps): the fail-closed pod is served
    through the mesh at every attempt, before, during and after."""
    probe, client = prober
    before = demo_lab.status("node-1")
    ours = foreign_key(before)

    surged_at = time.time()
    surged = meshlab("agent", "surge", "node-1", timeout=90)
    assert "serves on node-1" in surged.stdout
    after = demo_lab.status("node-1")
    assert after["agent"]["datapath_reused"] is False
    done_at = time.time()
    wait_until(
        lambda: probe.since(done_at),
        lambda a: len(a) >= 5,
        what="shop/frontend keeps dialling after the surge",
        timeout=30,
    )
    meshlab("agent", "retire", "--wait", "node-1", timeout=90)
    during = probe.since(surged_at)
    failed = [a for a in during if not meshed(a, client)]
    assert not failed, f"{len(failed)} of {len(during)} attempts not meshed: {failed[:3]}"
    assert_one_program_per_hook(before, after, ours)
    assert f"{len(DATAPATH_PROGRAMS)} of them in place of the previous ones" in swap_line()


def test_down_removes_every_pin_and_key(demo_lab):
    assert list(BPFFS_DIR.glob("node-*/key-*"))
    meshlab("down")
    assert not BPFFS_DIR.exists()

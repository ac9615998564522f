"""`meshlab exec`'s light path: which arguments it takes itself (the rest go to click), and the
command it becomes for a pod or a node."""

from __future__ import annotations

import pytest
from meshagent.lab import podexec
from meshagent.lab.paths import NETNS_PREFIX
from meshagent.lab.topology import LabPlan, PlanError, PodPlan, make_nodes


@pytest.mark.parametrize(
    ("args", "parsed"),
    [
        (["shop/a", "--", "curl", "-s", "x"], (None, "shop/a", ["curl", "-s", "x"])),
        (["shop/a", "true"], (None, "shop/a", ["true"])),
        (["shop/a", "--", "--", "x"], (None, "shop/a", ["--", "x"])),  # only the first -- goes
        (
            ["--node", "node-1", "--", "meshagent", "status"],
            ("node-1", None, ["meshagent", "status"]),
        ),
        (["--node=node-2", "meshctl", "status"], ("node-2", None, ["meshctl", "status"])),
        (["-h"], None),
        (["--help"], None),
        (["shop/a"], None),  # no command: click says so
        (["shop/a", "--"], None),
        (["--node", "node-1"], None),
        ([], None),
        (["--bogus", "x", "y"], None),
    ],
)
def test_plain_forms_are_taken_and_the_rest_left_to_click(args, parsed):
    assert podexec.parse_exec_args(args) == parsed


def plan() -> LabPlan:
    p = LabPlan(nodes=make_nodes(2))
    manifest = {"spec": {"containers": [{"env": [{"name": "MODE", "value": "x"}]}]}}
    pod = PodPlan("shop", "a", "node-2", "10.244.2.10", manifest)
    p.pods[pod.key] = pod
    return p


def test_a_pod_command_enters_its_netns_and_cgroup_with_its_environment():
    argv, env, cgroup = podexec.pod_command(plan(), "shop/a", ["curl", "x"])
    assert argv == ["ip", "netns", "exec", f"{NETNS_PREFIX}pod-shop-a", "curl", "x"]
    assert env["POD_IP"] == "10.244.2.10" and env["MODE"] == "x"
    assert cgroup.parts[-2:] == ("node-2", "pod-shop-a")


def test_a_node_command_gets_the_agent_config_and_the_controller_address():
    argv, env = podexec.node_command(plan(), "node-1", ["meshagent", "status"])
    assert argv[0] == "nsenter" and argv[1].endswith(f"{NETNS_PREFIX}node-1")
    assert argv[-2:] == ["meshagent", "status"]
    assert env["MESHAGENT_CONFIG"].endswith("node-1/agent.json")
    assert env["PATH"].startswith(str(podexec.BIN_DIR))


def test_unknown_pods_and_nodes_are_named():
    with pytest.raises(podexec.LabError, match=r"no pod 'shop/b'.*shop/a"):
        podexec.pod_command(plan(), "shop/b", ["true"])
    with pytest.raises(PlanError, match="no node 'node-9'"):
        podexec.node_command(plan(), "node-9", ["true"])

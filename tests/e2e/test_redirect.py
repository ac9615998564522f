"""Issue #2: meshed pods' connections are redirected through the node proxy; others are not;
the datapath outlives a killed agent."""

from __future__ import annotations

from meshagent.lab.paths import POD_NET_OCTET

from tests.e2e.conftest import DATAPATH_PROGRAMS, meshlab
from tests.waiting import wait_until

# demo.yaml pins reviews-v1 to node-2: the first pod IP there
POD_IP_REVIEWS = f"10.{POD_NET_OCTET}.2.10"


def _vip(lab, pod: str, name: str) -> str:
    proc = meshlab("exec", pod, "--", "getent", "hosts", name)
    return proc.stdout.split()[0]


def test_meshed_curl_reaches_service_by_vip_and_name_through_the_proxy(demo_lab):
    vip = _vip(demo_lab, "shop/frontend", "reviews.shop")
    assert vip.startswith("10.96.")
    before = demo_lab.status("node-1")
    urls = (
        f"http://{vip}:9080/",
        "http://reviews.shop:9080/",
        "http://reviews.shop.svc.cluster.local:9080/",
    )
    for url in urls:
        code, body = demo_lab.curl("shop/frontend", url)
        assert code == "200", (url, body)
        assert "Directory listing" in body  # python http.server's page, served on node-2
    p0 = before["agent"]["proxy"]
    # the datapath counters are read from the kernel; the proxy's figures are what its
    # workers last reported (every second): wait for the report that has the three
    after = wait_until(
        lambda: demo_lab.status("node-1"),
        lambda status: (
            status["agent"]["proxy"]["accepted_connections"] - p0["accepted_connections"]
            >= len(urls)
        ),
        what=f"node-1's proxy reports the {len(urls)} connections accepted",
    )
    c0, c1 = before["datapath"]["counters"], after["datapath"]["counters"]
    assert c1["redirected"] - c0["redirected"] == len(urls)
    assert c1["established"] - c0["established"] == len(urls)
    p1 = after["agent"]["proxy"]
    assert p1["accepted_connections"] - p0["accepted_connections"] == len(urls)
    backend = f"{POD_IP_REVIEWS}:9080"
    sent_to_backend = p1["by_destination"].get(backend, 0) - p0["by_destination"].get(backend, 0)
    assert sent_to_backend == len(urls)
    assert p1["orig_dst_misses"] == p0["orig_dst_misses"]
    # every original-destination entry was consumed by the proxy
    assert after["datapath"]["orig_dst_pending"] == 0


def test_unmeshed_pods_connect_directly(demo_lab):
    before = demo_lab.counters("node-1")
    for pod in ("legacy/client", "shop/batch"):
        code, body = demo_lab.curl(pod, f"http://{POD_IP_REVIEWS}:9080/")
        assert code == "200", (pod, body)
    after = demo_lab.counters("node-1")
    assert after["redirected"] == before["redirected"]
    assert after["established"] == before["established"]


def test_datapath_outlives_a_killed_agent(demo_lab):
    running = demo_lab.status("node-1")
    programs = {p["id"] for p in running["datapath"]["programs"]}
    assert {p["name"] for p in running["datapath"]["programs"]} == DATAPATH_PROGRAMS

    meshlab("agent", "stop", "node-1")
    down = demo_lab.status("node-1")
    assert down["agent"]["running"] is False
    assert {p["id"] for p in down["datapath"]["programs"]} == programs
    assert [p["pod"] for p in down["datapath"]["meshed_netns"]] == ["shop/frontend"]
    text = meshlab("exec", "--node", "node-1", "--", "meshagent", "status").stdout
    assert "DOWN" in text and "mesh_connect4" in text and "shop/frontend" in text

    meshlab("agent", "start", "node-1")
    code, _ = demo_lab.curl("shop/frontend", "http://reviews.shop:9080/")
    assert code == "200"
    back = demo_lab.status("node-1")
    assert back["agent"]["running"] is True
    assert back["agent"]["datapath_reused"] is True
    # the very same programs: never detached and re-attached in between
    assert {p["id"] for p in back["datapath"]["programs"]} == programs

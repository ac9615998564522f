"""`meshagent status`: the report joins agent, kernel and saved snapshot; the screen shows every
section, says plainly when the agent is down; --watch refreshes a bounded number of times."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from meshagent.agent import cli
from meshagent.agent import status as status_mod
from meshagent.agent.savedview import SavedView
from meshagent.agent.status import REPORT_FIELDS, assemble, heartbeat_view, render, watch
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC).timestamp()
IN_2H = "2026-01-01T14:00:00+00:00"
REVIEWS_ID = "spiffe://cluster.local/ns/shop/sa/reviews"

STRICT_REVIEWS = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "reviews"}},
        "mtls": {"mode": "STRICT"},
        "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}},
    },
}


def snapshot() -> Snapshot:
    return Snapshot(
        node="node-2",
        version="v7",
        workloads=[
            Workload(
                uid="u1",
                namespace="shop",
                name="reviews-v1",
                node="node-2",
                ips=["10.0.2.10"],
                service_account="reviews",
                labels={"app": "reviews"},
                meshed=True,
            ),
            Workload(
                uid="u2",
                namespace="shop",
                name="ratings",
                node="node-2",
                ips=["10.0.2.11"],
                service_account="ratings",
                meshed=True,
            ),
        ],
        services=[
            Service(
                namespace="shop",
                name="reviews",
                vips=["10.96.0.20"],
                ports=[ServicePort(name="http", port=9080, target_port=9080)],
                endpoints=[
                    Endpoint(ip="10.0.2.10", node="node-2", workload_uid="u1", ports={9080: 9080})
                ],
            ),
            Service(namespace="shop", name="idle", vips=["10.96.0.21"], ports=[]),
        ],
        istio_resources=[STRICT_REVIEWS],
    )


def tables() -> SavedView:
    """The saved snapshot as status reads it (the document the agent saves)."""
    return SavedView.from_document(snapshot().model_dump(mode="json"))


def kernel() -> dict:
    return {
        "pin_dir": "/sys/fs/bpf/x",
        "cgroup": "/sys/fs/cgroup/x",
        "programs": [
            {
                "id": 7,
                "type": "cgroup_sock_addr",
                "name": "mesh_connect4",
                "attach_type": "cgroup_inet4_connect",
                "cgroup": "/sys/fs/cgroup/x",
                "pinned": True,
            }
        ],
        "meshed_netns": [
            {"netns_cookie": 12, "ip": "10.0.2.11", "fail_mode": "open"},
            {"netns_cookie": 11, "ip": "10.0.2.10", "fail_mode": "closed"},
        ],
        "counters": {"redirected": 5, "established": 5, "excluded": 1, "strict_dropped": 2},
        "peer_auth": [{"ip": "10.0.2.10", "port": 0, "mode": "STRICT"}],
        "heartbeat": heartbeat_view(0.2, 1.0),
    }


def live_agent() -> dict:
    return {
        "version": "0.1.0",
        "uptime_s": 3725.0,
        "controller": {
            "address": "ctl:15012",
            "connected": True,
            "tls": True,
            "last_error": "",
        },
        "snapshot_version": "v7",
        "meshed_pods": [],
        "certificates": [
            {"identity": REVIEWS_ID, "state": "ready", "not_after": IN_2H},
        ],
        "proxy": {
            "active_connections": 2,
            "accepted_connections": 40,
            "http_requests": 31,
            "mutual_tls": 9,
        },
        "inbound": {"active": 1, "accepted": 17},
        "tunnels": [
            {
                "source": "spiffe://cluster.local/ns/shop/sa/frontend",
                "destination": REVIEWS_ID,
                "node": "172.30.0.12:15008",
                "connections": 1,
                "streams": 3,
            }
        ],
        "outlier_ejections": [
            {
                "cluster": "outbound|9080||reviews.shop.svc.cluster.local",
                "address": "10.0.2.10:9080",
                "until": NOW + 30,
                "ejections": 1,
            }
        ],
        "authz": {
            "recent_denials": [
                {
                    "source": "spiffe://cluster.local/ns/shop/sa/intruder",
                    "destination": "shop/reviews-v1:9080",
                    "policy": "shop/allow-frontend",
                    "reason": "no ALLOW policy matched",
                }
            ]
        },
    }


def running_report() -> dict:
    return assemble(
        "node-2", live_agent(), "", kernel(), tables(), trust_domain="cluster.local", now=NOW
    )


def down_report(saved_certificates=None) -> dict:
    return assemble(
        "node-2",
        None,
        "connection refused",
        kernel(),
        tables(),
        trust_domain="cluster.local",
        saved_certificates=saved_certificates,
        now=NOW,
    )


def test_report_joins_pods_with_identity_certificate_and_mtls_mode():
    report = running_report()
    assert list(report) == list(REPORT_FIELDS)
    reviews, ratings = report["pods"]  # sorted by IP
    assert reviews == {
        "namespace": "shop",
        "name": "reviews-v1",
        "ip": "10.0.2.10",
        "netns_cookie": 11,
        "identity": REVIEWS_ID,
        "mtls_mode": "STRICT",
        "mtls_ports": {"9090": "PERMISSIVE"},
        "fail_mode": "closed",
        "in_force": "meshed",
        "certificate": {"state": "ready", "not_after": IN_2H, "expires_in_s": 7200.0},
    }
    assert ratings["fail_mode"] == "open"
    assert ratings["identity"] == "spiffe://cluster.local/ns/shop/sa/ratings"
    assert ratings["mtls_mode"] == "PERMISSIVE"
    assert ratings["certificate"] == {"state": "missing", "not_after": None, "expires_in_s": None}
    assert report["datapath"]["meshed_netns"][1]["pod"] == "shop/reviews-v1"


def test_report_carries_live_sections_and_survives_json():
    report = json.loads(json.dumps(running_report()))
    assert report["snapshot"] == {"version": "v7", "source": "agent"}
    assert report["agent"]["controller"]["connected"] is True
    assert report["connections"] == {
        "outbound": {
            "active": 2,
            "accepted": 40,
            "kernel_joined": 0,
            "handed_out": 0,
            "handed_in": 0,
        },
        "inbound": {"active": 1, "accepted": 17},
        "http_requests": 31,
        "mutual_tls": 9,
    }
    assert report["tunnels"][0]["streams"] == 3
    assert report["ejected_endpoints"][0]["address"] == "10.0.2.10:9080"
    assert report["recent_denials"][0]["policy"] == "shop/allow-frontend"


def test_agent_down_report_uses_saved_state_and_nulls_live_sections():
    saved = [{"identity": REVIEWS_ID, "state": "saved", "not_after": IN_2H}]
    report = down_report(saved)
    assert report["agent"] == {"running": False, "error": "connection refused"}
    assert report["snapshot"] == {"version": "v7", "source": "saved"}
    assert report["pods"][0]["certificate"]["state"] == "saved"
    for live_only in ("connections", "tunnels", "ejected_endpoints", "recent_denials"):
        assert report[live_only] is None


def test_services_list_the_endpoints_the_proxy_balances_over():
    report = json.loads(json.dumps(down_report(None)))  # from the saved snapshot, agent or not
    idle, reviews = report["services"]
    assert reviews["endpoints"] == [{"ip": "10.0.2.10", "node": "node-2", "ports": {"9080": 9080}}]
    assert reviews["vips"] == ["10.96.0.20"] and reviews["ports"][0]["port"] == 9080
    assert idle["endpoints"] == []
    screen = render(running_report(), now=NOW, services=True)
    assert "shop/reviews" in screen and "10.0.2.10" in screen and "(none)" in screen
    assert "Services:" not in render(running_report(), now=NOW)


def test_services_show_the_l7_level_in_force_per_port():
    doc = snapshot().model_dump(mode="json")
    # a snapshot without levels (an older controller): served as before, full on HTTP ports
    [reviews] = [s for s in SavedView.from_document(doc).services if s["name"] == "reviews"]
    assert reviews["ports"][0]["l7"] == "full"
    doc["l7_levels"] = {"shop/reviews:9080": "observe"}
    view = SavedView.from_document(doc)
    [reviews] = [s for s in view.services if s["name"] == "reviews"]
    assert reviews["ports"][0]["l7"] == "observe"
    report = {**running_report(), "services": view.services}
    assert "9080/observe" in render(report, now=NOW, services=True)
    assert "l7_pods" not in reviews["ports"][0]
    # full for its routes at the source, observed at its pods' node
    doc["l7_levels"] = {"shop/reviews:9080": "full", "shop/reviews:9080@pods": "observe"}
    [reviews] = [s for s in SavedView.from_document(doc).services if s["name"] == "reviews"]
    assert (reviews["ports"][0]["l7"], reviews["ports"][0]["l7_pods"]) == ("full", "observe")
    report = {**running_report(), "services": [reviews]}
    assert "9080/full(pods:observe)" in render(report, now=NOW, services=True)


def test_no_saved_snapshot_leaves_pods_unnamed():
    report = assemble(
        "node-2", None, "refused", kernel(), None, trust_domain="cluster.local", now=NOW
    )
    assert report["snapshot"] == {"version": None, "source": None}
    assert [p["identity"] for p in report["pods"]] == [None, None]
    assert "?" in render(report)


def test_screen_shows_every_section():
    screen = render(running_report(), now=NOW)
    for expected in (
        "Node:        node-2",
        "running (version 0.1.0, up 1h 2m)",
        "ctl:15012 connected (TLS)",
        "Snapshot:    v7",
        "mesh_connect4",
        "shop/reviews-v1",
        REVIEWS_ID,
        "expires in 2h 0m (ready)",
        "STRICT 9090:PERMISSIVE",
        "outbound 2 open / 40 accepted (31 HTTP requests, 9 via mTLS tunnels)",
        "inbound 1 open / 17 accepted",
        "172.30.0.12:15008",
        "back in 30s",
        "no ALLOW policy matched",
    ):
        assert expected in screen, expected


def test_screen_when_agent_is_down_says_so_and_what_is_unknown():
    screen = render(down_report())
    assert "DOWN (connection refused)" in screen
    assert "Controller:  unknown (agent down)" in screen
    assert "Snapshot:    v7 (saved on disk)" in screen
    assert "Connections, tunnels, ejections, denials: unknown (agent down)" in screen
    assert "shop/reviews-v1" in screen  # pods still listed, from the kernel and the snapshot


def test_screen_shows_disconnected_controller_and_expired_certificate():
    agent = live_agent()
    agent["controller"] = {"address": "ctl:15012", "connected": False, "last_error": "refused"}
    agent["certificates"][0]["not_after"] = "2026-01-01T11:00:00+00:00"
    agent["certificates"][0]["state"] = "expired"
    report = assemble("n", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW)
    screen = render(report, now=NOW)
    assert "DISCONNECTED (refused)" in screen
    assert "expired 1h 0m ago (expired)" in screen


def test_screen_shows_how_fast_the_agent_served_and_whether_it_reused_the_pins():
    assert "Started:" not in render(running_report(), now=NOW)  # not ready yet
    agent = {**live_agent(), "ready_after_s": 0.4261, "datapath_reused": True}
    report = assemble("n", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW)
    assert "Started:     ready 0.43 s after start (reused the pinned datapath)" in render(report)
    agent["datapath_reused"] = False
    report = assemble("n", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW)
    assert "ready 0.43 s after start (built it)" in render(report)


def test_watch_shows_count_reports_sleeping_between():
    shown, slept = [], []
    reads = iter(range(10))
    n = watch(lambda: {"n": next(reads)}, shown.append, interval=2.5, count=3, sleep=slept.append)
    assert n == 3
    assert shown == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert slept == [2.5, 2.5]


@pytest.mark.parametrize(("interval", "count"), [(0, 1), (-1, None), (1, 0)])
def test_watch_refuses_nonsense(interval, count):
    with pytest.raises(ValueError, match="watch"):
        watch(dict, print, interval=interval, count=count)


def test_cli_watch_json_prints_one_line_per_refresh(monkeypatch):
    reports = iter([running_report(), down_report()])
    monkeypatch.setattr(status_mod, "gather", lambda config: next(reports))
    result = CliRunner().invoke(
        cli.main, ["status", "--watch", "0.1", "--count", "2", "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [json.loads(line)["agent"]["running"] for line in lines] == [True, False]


def test_cli_count_without_watch_is_a_usage_error():
    result = CliRunner().invoke(cli.main, ["status", "--count", "2"])
    assert result.exit_code == 2
    assert "--count needs --watch" in result.output


def _full_node(count: int) -> dict:
    """A node with `count` meshed pods, 10.0.2.1 .. 10.0.2.<count>, under two identities."""
    workloads = [
        Workload(
            uid=f"u{i}",
            namespace="shop",
            name=f"client-{i}",
            node="node-2",
            ips=[f"10.0.2.{i}"],
            service_account="client" if i % 2 else "batch",
            meshed=True,
        )
        for i in range(1, count + 1)
    ]
    doc = Snapshot(node="node-2", version="v9", workloads=workloads).model_dump(mode="json")
    snap = SavedView.from_document(doc)
    k = kernel()
    k["meshed_netns"] = [{"netns_cookie": i, "ip": f"10.0.2.{i}"} for i in range(count, 0, -1)]
    return assemble("node-2", live_agent(), "", k, snap, trust_domain="cluster.local", now=NOW)


def test_pods_are_sorted_by_ip_numerically_and_summarized():
    report = _full_node(12)
    assert [p["ip"] for p in report["pods"]][:3] == ["10.0.2.1", "10.0.2.2", "10.0.2.3"]
    assert [p["ip"] for p in report["pods"]][-3:] == ["10.0.2.10", "10.0.2.11", "10.0.2.12"]
    summary = report["pods_summary"]
    assert summary["meshed"] == 12
    assert summary["by_identity"] == {
        "spiffe://cluster.local/ns/shop/sa/batch": 6,
        "spiffe://cluster.local/ns/shop/sa/client": 6,
    }
    assert summary["by_mtls_mode"] == {"PERMISSIVE": 12}
    assert json.loads(json.dumps(report))["pods_summary"] == summary


def test_a_full_node_shows_the_summary_and_the_pod_table_only_with_pods():
    report = _full_node(100)
    screen = render(report, now=NOW)
    assert "Meshed pods: 100" in screen
    assert "spiffe://cluster.local/ns/shop/sa/client 50" in screen
    assert "PERMISSIVE 100" in screen
    assert "shop/client-7 " not in screen and "meshagent status --pods" in screen
    full = render(report, now=NOW, pods=True)
    rows = [line for line in full.splitlines() if "shop/client-" in line]
    assert len(rows) == 100
    assert rows[0].split()[1] == "10.0.2.1" and rows[9].split()[1] == "10.0.2.10"


def test_tunnels_show_peer_node_and_worker():
    agent = live_agent()
    agent["tunnels"] = [
        {**agent["tunnels"][0], "node": "172.30.0.13:15008", "worker": 1},
        {**agent["tunnels"][0], "worker": 1},
        {**agent["tunnels"][0], "worker": 0},
    ]
    report = assemble(
        "node-2", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW
    )
    lines = render(report, now=NOW).splitlines()
    start = lines.index("Tunnels:")
    assert lines[start + 1].split()[:2] == ["PEER", "NODE"]
    rows = [line.split()[:2] for line in lines[start + 2 : start + 5]]
    assert rows == [
        ["172.30.0.12:15008", "0"],
        ["172.30.0.12:15008", "1"],
        ["172.30.0.13:15008", "1"],
    ]


def test_fail_mode_in_force_follows_the_heartbeat():
    """While the agent beats, pods are meshed whatever their fail mode; once the beat is older
    than the timeout (or never came), each pod's mode is in force, and the screen says so."""
    assert heartbeat_view(0.3, 1.0)["agent_alive"] is True
    assert heartbeat_view(1.5, 1.0)["agent_alive"] is False
    assert heartbeat_view(None, 1.0) == {"age_s": None, "timeout_s": 1.0, "agent_alive": False}
    k = kernel()
    k["heartbeat"] = heartbeat_view(4.2, 1.0)
    report = assemble(
        "node-2", None, "connection refused", k, tables(), trust_domain="cluster.local", now=NOW
    )
    modes = {p["name"]: (p["fail_mode"], p["in_force"]) for p in report["pods"]}
    assert modes == {
        "reviews-v1": ("closed", "closed: refused"),
        "ratings": ("open", "open: direct"),
    }
    screen = render(report, now=NOW)
    assert "Heartbeat:   STALE, 4s old (timeout 1s)" in screen
    assert "open (IN FORCE: open: direct)" in screen
    assert "closed (IN FORCE: closed: refused)" in screen
    live = render(running_report(), now=NOW)
    assert "Heartbeat:   0.20s old (timeout 1s): pods are meshed" in live
    assert "FAIL MODE" in live and "IN FORCE" not in live


def test_screen_lists_the_agent_pods_only_while_more_than_one_is_alive():
    report = running_report()
    report["datapath"]["agent_pods"] = [{"name": "meshagent-node-2-1", "serving": True}]
    assert "Agent pods:" not in render(report, now=NOW)
    report["datapath"]["agent_pods"].append({"name": "meshagent-node-2-2", "serving": True})
    screen = render(report, now=NOW)
    assert "Agent pods:  meshagent-node-2-2 (newest, owns the node)" in screen
    assert "meshagent-node-2-1 (OLDER: handed over, serves only the connections it holds" in screen


def test_the_saved_view_resolves_pods_and_services_as_the_agent_does() -> None:
    """status reads the saved document without the agent's Tables: same identities, fail
    modes, mTLS modes (PeerAuthentication precedence, port overrides) and Services."""
    from meshagent.agent.state import Tables

    built = Tables.build(snapshot())
    view = tables()
    assert view.version == built.snapshot.version
    assert sorted(view.pods_by_ip) == sorted(built.workload_by_ip)
    for ip, workload in built.workload_by_ip.items():
        pod, mtls = view.pods_by_ip[ip], built.mtls_for(workload)
        assert (pod.namespace, pod.name, pod.service_account, pod.fail_mode) == (
            workload.namespace,
            workload.name,
            workload.service_account,
            workload.fail_mode,
        )
        assert (pod.mtls_mode, pod.mtls_ports) == (mtls.mode, dict(mtls.ports))
    assert view.pods_by_ip["10.0.2.10"].mtls_ports == {9090: "PERMISSIVE"}
    assert [(s["namespace"], s["name"]) for s in view.services] == [
        ("shop", "idle"),
        ("shop", "reviews"),
    ]


def test_a_saved_snapshot_of_another_node_or_unreadable_is_none(tmp_path) -> None:
    from meshagent.agent import savedview

    assert savedview.load(tmp_path, "node-2") is None  # none saved
    (tmp_path / savedview.SNAPSHOT_FILE).write_text(snapshot().model_dump_json())
    assert savedview.load(tmp_path, "node-2").version == "v7"
    assert savedview.load(tmp_path, "node-3") is None
    (tmp_path / savedview.SNAPSHOT_FILE).write_text('{"node": "node-2"}')
    assert savedview.load(tmp_path, "node-2") is None


def test_screen_shows_each_process_memory_and_the_pss_total():
    """One line per process, PSS first; the headline adds up PSS, not RSS (the fork server and
    the workers are forks of the agent: RSS counts the pages they share in each)."""
    mib = 2**20
    agent = {
        **live_agent(),
        "processes": [
            {"role": "agent", "pid": 100, "rss_bytes": 60 * mib, "pss_bytes": 28 * mib},
            {"role": "fork server", "pid": 101, "rss_bytes": 49 * mib, "pss_bytes": 23 * mib},
            {"role": "worker 0", "pid": 102, "rss_bytes": 52 * mib, "pss_bytes": 23.5 * mib},
        ],
    }
    report = assemble("n", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW)
    screen = render(report, now=NOW).splitlines()
    at = screen.index("Memory:      74.5 MiB (PSS: shared pages split between the processes)")
    assert screen[at + 1].split() == [
        "agent",
        "pid",
        "100",
        "PSS",
        "28.0",
        "MiB",
        "RSS",
        "60.0",
        "MiB",
    ]
    assert screen[at + 2].split()[:3] == ["fork", "server", "pid"]
    assert screen[at + 3].split()[-2:] == ["52.0", "MiB"]
    assert json.loads(json.dumps(report))["agent"]["processes"][2]["pid"] == 102
    assert not any(line.startswith("Memory:") for line in render(running_report()).splitlines())


def test_screen_says_how_many_workers_were_replaced_and_are_draining():
    agent = live_agent()
    agent["workers"] = [
        {"index": 0, "pid": 101, "restarts": 0, "recycled": 0, "retiring_pids": []},
        {"index": 1, "pid": 102, "restarts": 1, "recycled": 0, "retiring_pids": []},
    ]
    report = assemble("n", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW)
    assert "Proxy:       2 workers (pids 101, 102; 1 restarts)\n" in render(report, now=NOW)
    agent["workers"][0].update(recycled=3, retiring_pids=[99])
    report = assemble("n", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW)
    screen = render(report, now=NOW)
    assert "(pids 101, 102; 1 restarts; 3 replaced by a fresh one, 1 draining)\n" in screen


def test_screen_says_how_many_connections_were_handed_over_only_when_some_were():
    assert "Handed over:" not in render(running_report(), now=NOW)
    agent = live_agent()
    agent["proxy"] = {**agent["proxy"], "handed_in": 8, "handed_out": 0}
    report = assemble(
        "node-2", agent, "", kernel(), tables(), trust_domain="cluster.local", now=NOW
    )
    screen = render(report, now=NOW)
    assert "Handed over: 8 connection(s) taken from a previous proxy process" in screen

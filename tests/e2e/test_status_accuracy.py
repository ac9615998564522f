"""Issue #17 item 7: status that matches the machine, with stock tools through the mesh.

`sa/client` (node-1) loads nginx on both nodes with wrk (HTTP: node-1's proxy pools upstream
connections, a same-node pair to `web-local` and HBONE tunnel streams to `web-remote`), h2load
(h2c), a wrk killed mid-run and requests the destination denies (403); nginx closes idle
keep-alive connections after 1 s. Once they end, `meshagent status` on both nodes must come
back to 0 open connections (outbound, inbound) and 0 tunnel streams, and no socket of the node
agents stay in CLOSE-WAIT (the server closed it, the proxy did not). iperf3 through a `tcp-*`
port, both ways, and a client that ends its connection with a reset: the bytes appear in
`istio_tcp_received_bytes_total` / `istio_tcp_sent_bytes_total` of both reporters (and the
access log), which used to count a connection ending in a reset as 0 bytes; a long transfer
shows in them while it goes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from meshagent.lab.paths import LOG_DIR

from tests.e2e.conftest import APPS, BIN, Lab, meshlab, render_manifest
from tests.e2e.nginx import write_conf
from tests.e2e.test_observability import _value
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

MANIFEST = Path(__file__).resolve().parent / "manifests" / "status-accuracy.yaml"
NODES = ("node-1", "node-2")
REPORTERS = (("node-1", "source"), ("node-2", "destination"))
IPERF = "iperf.sa.svc.cluster.local"
ECHO = "echo.sa.svc.cluster.local"
IPERF_BYTES = "1G"  # large enough that what is in flight when iperf3 ends is far below 1 %
RESET_BYTES = 3_000_000
NGINX_HTTP = """\
  access_log off;
  keepalive_timeout 1s;
  client_header_timeout 1s;
  server {{ listen 8080; listen 8082 http2; location / {{ return 200 "{name}\\n"; }} }}
"""


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory) -> Lab:
    folder = tmp_path_factory.mktemp("status-accuracy")
    for name in ("web-local", "web-remote"):
        write_conf(folder, name, NGINX_HTTP.format(dir=folder, name=name))
    lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=2)
    for service in ("web-local", "web-remote"):
        url = f"http://{service}.sa:8080/"
        lab.wait_answer("sa/client", url, what=f"{service} answers through the mesh")
    return lab


def _open_counts(lab: Lab) -> dict[str, dict[str, int]]:
    """What `meshagent status` says is open on each node."""
    counts = {}
    for node in NODES:
        report = lab.status(node)
        conns = report["connections"]
        counts[node] = {
            "outbound": conns["outbound"]["active"],
            "inbound": conns["inbound"]["active"],
            "tunnel streams": sum(t["streams"] for t in report["tunnels"]),
        }
    return counts


def _wait_nothing_open(lab: Lab, after: str) -> None:
    wait_until(
        lambda: _open_counts(lab),
        lambda counts: not any(n for node in counts.values() for n in node.values()),
        what=f"meshagent status shows nothing open on either node after {after}",
        timeout=30,
    )


def _close_wait(node: str) -> list[str]:
    """The node network namespace's TCP sockets in CLOSE-WAIT (only the agent has sockets
    there), with their processes."""
    out = meshlab("exec", "--node", node, "--", "ss", "-Htanp", "state", "close-wait").stdout
    return out.splitlines()


def _wrk(service: str, *extra: str, check: bool = True) -> str:
    return meshlab(
        "exec",
        "sa/client",
        "--",
        *extra,
        "wrk",
        "-t2",
        "-c50",
        "-d3s",
        "--timeout",
        "5s",
        f"http://{service}.sa:8080/",
        check=check,
        timeout=60,
    ).stdout


def _wait_all_clear(lab: Lab, after: str) -> None:
    _wait_nothing_open(lab, after)
    wait_until(
        lambda: {node: _close_wait(node) for node in NODES},
        lambda sockets: not any(sockets.values()),
        what=f"no socket of either node's agent left in CLOSE-WAIT after {after}",
        timeout=30,
    )


def test_after_wrk_status_counts_return_to_zero_and_no_socket_stays_in_close_wait(lab):
    for service in ("web-local", "web-remote"):
        out = _wrk(service)
        served = re.search(r"(\d+) requests in", out)
        assert served and int(served.group(1)) > 0, out
        assert "Non-2xx" not in out and "Socket errors" not in out, out
        out = meshlab(
            "exec",
            "sa/client",
            "--",
            "h2load",
            "-n",
            "2000",
            "-c",
            "20",
            "-m",
            "10",
            f"http://{service}.sa:8082/",
            timeout=60,
        ).stdout
        assert "2000 succeeded" in out, out
        # killed mid-run: its connections end abruptly, requests in flight
        _wrk(service, "timeout", "-s", "KILL", "2", check=False)
    _wait_all_clear(lab, "the load ended")
    # Denied by the destination on a fresh tunnel (nothing pooled is left): answered without
    # the pod connection dialled for it, which nginx closes after 1 s.
    for service in ("web-local", "web-remote"):
        assert lab.curl("sa/client", f"http://{service}.sa:8080/denied")[0] == "403"
    _wait_all_clear(lab, "denied requests")
    # A POST right after a denial, on the same client connection, is served (the denied
    # tunnel said it closes: the source does not reuse it).
    for service in ("web-local", "web-remote"):
        url = f"http://{service}.sa:8080/"
        once = ("-s", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n")
        codes = meshlab(
            "exec",
            "sa/client",
            "--",
            "curl",
            *once,
            f"{url}denied",
            "--next",
            *once,
            "-X",
            "POST",
            "-d",
            "x",
            url,
        ).stdout.split()
        assert codes == ["403", "1", "200", "0"], codes  # 0: the same connection went on
    _wait_all_clear(lab, "a denial and a POST")
    # the pooled connections that were closed are not reused: requests still pass
    for service in ("web-local", "web-remote"):
        assert lab.curl("sa/client", f"http://{service}.sa:8080/")[0] == "200"


def _tcp(node: str, reporter: str, service: str) -> dict[str, float]:
    labels = {"reporter": reporter, "destination_service": service}
    return {
        name: _value(node, f"istio_tcp_{name}_total", **labels)
        for name in ("connections_opened", "connections_closed", "received_bytes", "sent_bytes")
    }


def _wait_closed(before: dict, service: str, connections: int) -> dict[str, dict[str, float]]:
    """Each reporter's counters once `connections` more connections to `service` closed; the
    change since `before`."""
    changes = {}
    for node, reporter in REPORTERS:
        now = wait_until(
            lambda node=node, reporter=reporter: _tcp(node, reporter, service),
            lambda c, r=reporter: (
                c["connections_closed"] - before[r]["connections_closed"] >= connections
            ),
            what=f"the {reporter} reporter counts {connections} closed connections to {service}",
        )
        changes[reporter] = {k: now[k] - before[reporter][k] for k in now}
        assert changes[reporter]["connections_opened"] == connections, (reporter, changes)
    return changes


def _iperf3(*extra: str) -> dict:
    out = meshlab(
        "exec",
        "sa/client",
        "--",
        "iperf3",
        "-c",
        "iperf.sa",
        "-p",
        "5201",
        "-n",
        IPERF_BYTES,
        "-J",
        *extra,
        timeout=120,
    ).stdout
    return json.loads(out)["end"]


def test_iperf3_bytes_both_ways_appear_in_the_tcp_byte_counters_within_one_percent(lab):
    before = {r: _tcp(node, r, IPERF) for node, r in REPORTERS}
    upload = _iperf3()  # client -> server
    download = _iperf3("-R")  # server -> client
    # iperf3 ends each data connection abruptly: what reached the far end is what counts
    uploaded = upload["sum_received"]["bytes"]
    downloaded = download["sum_received"]["bytes"]
    assert uploaded > 0.9 * upload["sum_sent"]["bytes"], upload["sum_sent"]
    assert downloaded > 0.9 * download["sum_sent"]["bytes"], download["sum_sent"]
    changes = _wait_closed(before, IPERF, connections=4)  # a control and a data one each run
    for reporter, change in changes.items():
        # received = from the client (request direction), sent = to the client
        assert change["received_bytes"] == pytest.approx(uploaded, rel=0.01), (reporter, change)
        assert change["sent_bytes"] == pytest.approx(downloaded, rel=0.01), (reporter, change)
    _wait_nothing_open(lab, "iperf3 ended")


def test_a_long_transfer_shows_in_the_byte_counters_while_it_goes(lab):
    """Bytes are counted as they flow: a dashboard sees a long transfer before it ends."""
    before = {r: _tcp(node, r, IPERF)["received_bytes"] for node, r in REPORTERS}
    iperf = subprocess.Popen(
        [str(BIN / "meshlab"), "exec", "sa/client", "--", "iperf3", "-c", "iperf.sa", "-t", "15"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for node, reporter in REPORTERS:
            wait_until(
                lambda node=node, reporter=reporter: (
                    _tcp(node, reporter, IPERF)["received_bytes"] - before[reporter]
                ),
                lambda grown: grown > 1_000_000,  # beyond the control connection's few bytes
                what=f"the {reporter} reporter counts iperf3's bytes while they flow",
                timeout=12,
            )
        assert iperf.poll() is None, "iperf3 ended before its bytes were counted"
        assert iperf.wait(timeout=60) == 0
    finally:
        if iperf.poll() is None:
            iperf.kill()
            iperf.wait()
    _wait_nothing_open(lab, "the long iperf3 run")


def _tcp_log_lines(node: str, service: str, since: float) -> list[dict]:
    lines = []
    for line in (LOG_DIR / f"agent-{node}.log").read_text().splitlines():
        if not line.startswith('{"start_time"'):
            continue
        entry = json.loads(line)
        if (
            entry["kind"] == "tcp"
            and entry["destination_service"] == service
            and datetime.fromisoformat(entry["start_time"]).timestamp() >= since
        ):
            lines.append(entry)
    return lines


def test_a_connection_the_client_resets_is_counted_with_every_byte_it_carried(lab):
    before = {r: _tcp(node, r, ECHO) for node, r in REPORTERS}
    since = time.time() - 1
    out = meshlab(
        "exec",
        "sa/client",
        "--",
        "python3",
        str(APPS / "reset_client.py"),
        "echo.sa:9000",
        str(RESET_BYTES),
    ).stdout
    assert out.split() == [str(RESET_BYTES)] * 2, out  # all echoed back, then the RST
    changes = _wait_closed(before, ECHO, connections=1)
    for reporter, change in changes.items():
        assert (change["received_bytes"], change["sent_bytes"]) == (RESET_BYTES, RESET_BYTES), (
            reporter,
            change,
        )
    for node, _ in REPORTERS:  # the access log says the same (it is flushed about every second)
        (entry,) = wait_until(
            lambda node=node: _tcp_log_lines(node, ECHO, since),
            what=f"{node}'s access log has the reset echo connection",
        )
        assert (entry["bytes_received"], entry["bytes_sent"]) == (RESET_BYTES, RESET_BYTES), entry
    _wait_nothing_open(lab, "the reset")


def _memory_mismatches(lab: Lab, node: str) -> list[str]:
    """Where a node's status memory differs from what /proc says now (empty: none)."""
    from meshagent.common.procmem import read_memory

    report = lab.status(node)["agent"]
    processes = report["processes"]
    workers = [f"worker {w['index']}" for w in report["workers"]]
    out = []
    if [p["role"] for p in processes] != ["agent", "fork server", *workers]:
        out.append(f"roles {[p['role'] for p in processes]}, workers {workers}")
    if {p["pid"] for p in processes[2:]} != {w["pid"] for w in report["workers"]}:
        out.append(f"worker pids {processes[2:]} against {report['workers']}")
    for p in processes:
        try:
            now = read_memory(p["pid"])  # the lab's processes share this machine's /proc
        except OSError as exc:
            out.append(f"{p}: {exc}")
            continue
        if abs(now.pss - p["pss_bytes"]) > 0.1 * now.pss:
            out.append(f"{p} but PSS {now.pss} in /proc")
        if not 0 < p["uss_bytes"] < p["pss_bytes"] < p["rss_bytes"]:
            out.append(f"{p}: not USS < PSS < RSS")
    if sum(p["pss_bytes"] for p in processes) >= 0.75 * sum(p["rss_bytes"] for p in processes):
        out.append(f"PSS adds up to more than 3/4 of RSS summed: {processes}")
    return out


def test_status_shows_each_proxy_process_memory_as_proc_has_it(lab):
    """Issue 18 item 4: `meshagent status` lists the agent, its workers' fork server and every
    worker with RSS and PSS; the figures are the kernel's (smaps_rollup, read here too), and the
    PSS add up to well under the RSS summed (the forks share pages)."""
    for node in NODES:
        wait_until(
            lambda node=node: _memory_mismatches(lab, node),
            lambda mismatches: not mismatches,
            what=f"{node}'s status memory as /proc has it",
            timeout=30,
        )
        screen = meshlab("exec", "--node", node, "--", "meshagent", "status").stdout
        assert "fork server" in screen and "Memory:" in screen, screen

"""Issue #6: traffic management end to end, with real pods and unmodified clients.

What flows through: a python http.client load generator in `shop/client` (node-1) sends
requests to Services of tests/e2e/manifests/traffic.yaml, whose backends answer with their pod
name (some slowly, one always 503); node-1's proxy routes and balances them as the
VirtualServices and DestinationRules of manifests/traffic-*.yaml say, applied with
`meshlab apply -f`. Results are counted by which backend answered, the backends' own request
logs, `meshagent status --json`, the node's /metrics and the agent's access log.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from meshagent.lab import cgroups
from meshagent.lab.paths import LOG_DIR

from tests.e2e.conftest import BIN, Lab, meshlab, proxy_workers
from tests.waiting import wait_until

MANIFESTS = Path(__file__).parent / "manifests"
CLIENT = "shop/client"
NODE = "node-1"  # the client's node: its proxy routes and balances
PUSH_DEADLINE = 10.0  # seconds for an applied resource to reach node-1's proxy

# The load generator, run in the client pod: `total` GETs shared by `workers` threads, each on
# its own keep-alive connection (or a new connection per request). Prints a JSON list of
# [start (wall clock), status (0: no response), body or error].
LOAD = r"""
import http.client, json, sys, threading, time
host, port, path, total, workers, fresh, headers = sys.argv[1:8]
port, left, fresh, headers = int(port), [int(total)], fresh == "1", json.loads(headers)
if fresh:
    headers["connection"] = "close"
results, lock = [], threading.Lock()

def worker():
    conn = None
    while True:
        with lock:
            if not left[0]:
                return
            left[0] -= 1
        start = time.time()
        try:
            conn = conn or http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            row = [start, resp.status, resp.read().decode(errors="replace")[:100]]
            if fresh or resp.will_close:
                conn.close()
                conn = None
        except Exception as exc:
            row = [start, 0, repr(exc)[:100]]
            if conn is not None:
                conn.close()
            conn = None
        with lock:
            results.append(row)

threads = [threading.Thread(target=worker) for _ in range(int(workers))]
for t in threads:
    t.start()
for t in threads:
    t.join()
json.dump(results, sys.stdout)
"""


def _load_argv(url: str, total: int, workers: int, headers: dict | None, fresh: bool) -> list[str]:
    host, _, rest = url.partition(":")
    port, _, path = rest.partition("/")
    return [
        str(BIN / "meshlab"),
        "exec",
        CLIENT,
        "--",
        "python3",
        "-c",
        LOAD,
        host,
        port,
        "/" + path,
        str(total),
        str(workers),
        "1" if fresh else "0",
        json.dumps(headers or {}),
    ]


def load(
    url: str,
    total: int,
    workers: int = 4,
    headers: dict | None = None,
    fresh: bool = False,
    timeout: float = 120,
) -> list[tuple[float, int, str]]:
    """Send `total` GETs to `url` (host:port/path) from the client pod; [(start, status, body)]."""
    proc = subprocess.run(
        _load_argv(url, total, workers, headers, fresh),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout)]


def answered_by(results) -> Counter:
    """How many 200s each backend (pod name in the body) gave."""
    return Counter(body for _, status, body in results if status == 200)


def statuses(results) -> Counter:
    return Counter(status for _, status, _ in results)


def agent(lab: Lab) -> dict:
    return lab.status(NODE)["agent"]


@contextmanager
def applied(lab: Lab, name: str) -> Iterator[None]:
    """`meshlab apply -f manifests/<name>.yaml` until the block ends; waits until node-1
    runs a snapshot that has it (and, at the end, one without it)."""
    path = MANIFESTS / f"{name}.yaml"
    _change(lab, "apply", path)
    try:
        yield
    finally:
        _change(lab, "delete", path)


def _change(lab: Lab, verb: str, path: Path) -> None:
    before = agent(lab)["snapshot_version"]
    meshlab(verb, "-f", str(path))
    status = wait_until(
        lambda: agent(lab),
        lambda status: status["snapshot_version"] != before,
        what=f"{verb} {path.name}: node-1 runs a snapshot other than {before}",
        timeout=PUSH_DEADLINE,
    )
    assert not status["route_problems"], status["route_problems"]


def pod_ip(pod: str) -> str:
    return meshlab("exec", pod, "--", "printenv", "POD_IP").stdout.strip()


def served(pod: str) -> int:
    """Requests a backend pod received (http.server logs one line per request)."""
    path = LOG_DIR / f"pod-{pod.replace('/', '-')}.log"
    return sum(1 for line in path.read_text().splitlines() if '"GET ' in line)


def metric(lab: Lab, name: str, **labels: str) -> float | None:
    """One sample of node-1's 15020 /metrics, as a user would scrape it."""
    text = meshlab("exec", "--node", NODE, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def access_log(since: float) -> list[dict]:
    """node-1's access-log lines for HTTP requests that started at or after `since`."""
    entries = []
    for line in (LOG_DIR / f"agent-{NODE}.log").read_text().splitlines():
        if not line.startswith('{"start_time"'):
            continue
        entry = json.loads(line)
        if (
            entry["kind"] == "http"
            and datetime.fromisoformat(entry["start_time"]).timestamp() >= since
        ):
            entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def lab(lab_factory) -> Lab:
    # One proxy process per node: balancer, circuit-breaker and outlier-detection state is per
    # worker process (as each Linkerd proxy keeps its own), and these tests count exactly what
    # one balancer does. tests/e2e/test_workers.py covers several workers.
    with proxy_workers(1):
        return lab_factory(MANIFESTS / "traffic.yaml", nodes=2)


# -- routing -----------------------------------------------------------------------------------


def test_weighted_split_80_20_over_keep_alive_connections(lab):
    before = agent(lab)["proxy"]["http_connections"]
    with applied(lab, "traffic-split"):
        results = load("web.shop:8080/", 1000, workers=4)
        connections = agent(lab)["proxy"]["http_connections"] - before
    assert statuses(results) == {200: 1000}
    share = answered_by(results)
    assert set(share) == {"web-v1", "web-v2"}, share
    assert 750 <= share["web-v1"] <= 850, share  # 80 % +- 5 points
    assert connections <= 4 + 2, f"{connections} client connections for 1000 requests"


def test_canary_header_goes_to_v2_and_the_rest_to_v1(lab):
    with applied(lab, "traffic-canary"):
        canary = load("web.shop:8080/", 100, headers={"x-canary": "1"})
        rest = load("web.shop:8080/", 100, headers={"x-canary": "0"})
        plain = load("web.shop:8080/", 100)
    assert answered_by(canary) == {"web-v2": 100}
    assert answered_by(rest) == {"web-v1": 100}
    assert answered_by(plain) == {"web-v1": 100}


# -- load balancing ----------------------------------------------------------------------------


def test_least_request_sends_fewer_requests_to_the_slow_backend(lab):
    with applied(lab, "traffic-least-request"):
        share = answered_by(load("lb.shop:8080/", 300, workers=6))
    assert sum(share.values()) == 300, share
    fast = min(share["lb-fast-1"], share["lb-fast-2"])
    # an even spread would give it a third; power of two choices gives it about a sixth
    assert share["lb-slow"] < 0.7 * fast, share


def test_round_robin_spreads_evenly(lab):
    with applied(lab, "traffic-round-robin"):
        share = answered_by(load("lb.shop:8080/", 150, workers=6))
    assert sum(share.values()) == 150, share
    assert all(45 <= share[pod] <= 55 for pod in ("lb-fast-1", "lb-fast-2", "lb-slow")), share


# -- retries and outlier detection --------------------------------------------------------------


def test_retries_hide_the_backend_that_answers_503(lab):
    with applied(lab, "traffic-no-retries"):
        results = load("flaky.shop:8080/", 150, workers=3)
    failed = [body for _, status, body in results if status != 200]
    assert failed and set(failed) == {"flaky-bad"}, statuses(results)

    tried = served("shop/flaky-bad")
    with applied(lab, "traffic-retries"):
        results = load("flaky.shop:8080/", 300, workers=3)
    assert statuses(results) == {200: 300}
    assert served("shop/flaky-bad") > tried  # it was still tried: the retries hid it


def test_outlier_detection_ejects_the_failing_backend_and_lets_it_back(lab):
    bad = f"{pod_ip('shop/flaky-bad')}:8080"
    cluster = "outbound|8080||flaky.shop.svc.cluster.local"
    with applied(lab, "traffic-retries"), applied(lab, "traffic-outlier"):
        ejection = None
        for _ in range(10):
            assert statuses(load("flaky.shop:8080/", 20, workers=2)) == {200: 20}
            ejection = next(
                (e for e in agent(lab)["outlier_ejections"] if e["address"] == bad), None
            )
            if ejection:
                break
        assert ejection is not None, "the 503 backend was never ejected"
        assert ejection["cluster"] == cluster
        assert metric(lab, "meshagent_outlier_ejected_endpoints", cluster=cluster) == 1.0

        # While ejected, it gets nothing (only requests that end well before its return count).
        tried, sent = served("shop/flaky-bad"), 0
        while sent < 60 and time.time() < ejection["until"] - 1.0:
            assert statuses(load("flaky.shop:8080/", 10, workers=2)) == {200: 10}
            sent += 10
        assert sent >= 10, "the ejection ended before it could be observed"
        assert served("shop/flaky-bad") == tried

        # After baseEjectionTime it is back in the balancer (and soon ejected again).
        wait_until(
            lambda: agent(lab)["outlier_ejections"],
            lambda ejections: not any(e["address"] == bad for e in ejections),
            what=f"the backend {bad} let back",
            timeout=ejection["until"] + 10 - time.time(),
            interval=0.2,
        )
        assert time.time() >= ejection["until"] - 0.5  # not before its time was up
        assert metric(lab, "meshagent_outlier_ejected_endpoints", cluster=cluster) == 0.0
        tried = served("shop/flaky-bad")
        for _ in range(10):
            assert statuses(load("flaky.shop:8080/", 10, workers=2)) == {200: 10}
            if served("shop/flaky-bad") > tried:
                break
        assert served("shop/flaky-bad") > tried, "the returned backend got no request"


def test_killing_a_backend_under_load_fails_no_new_connection(lab):
    """HTTP clients (keep-alive) and L4 clients (a new connection per request) run while
    kill-1's process is killed: whatever starts after the kill succeeds (the proxy retries
    the failed connect on another backend)."""
    failures_before = agent(lab)["proxy"]["upstream_failures"]
    http = subprocess.Popen(
        _load_argv("kill.shop:8080/", 900, 3, None, fresh=False),
        stdout=subprocess.PIPE,
        text=True,
    )
    tcp = subprocess.Popen(
        _load_argv("kill.shop:9000/", 600, 2, None, fresh=True), stdout=subprocess.PIPE, text=True
    )
    try:

        def served_while_loading() -> int:
            assert http.poll() is None and tcp.poll() is None, "load ended before the kill"
            return served("shop/kill-1")

        # under load, and kill-1 takes its share
        wait_until(
            served_while_loading,
            lambda requests: requests >= 60,
            what="load reached kill-1 (60 requests)",
            timeout=30,
        )
        killing = time.time()
        cgroups.kill_tree(cgroups.pod_cgroup("node-2", "shop", "kill-1"))
        killed = time.time()
        http_out, _ = http.communicate(timeout=120)
        tcp_out, _ = tcp.communicate(timeout=120)
    finally:
        for proc in (http, tcp):
            if proc.poll() is None:
                proc.kill()
    for name, out, workers in (("http", http_out, 3), ("tcp", tcp_out, 2)):
        results = json.loads(out)
        after = [r for r in results if r[0] > killed]
        assert len(after) >= 50, f"{name}: only {len(after)} requests after the kill"
        assert all(status == 200 for _, status, _ in after), (name, statuses(after))
        assert "kill-1" not in answered_by(after), name
        # of what started before the kill, only what was in flight may have failed (a request
        # that starts while kill-1 dies may meet it too: neither is counted after `killed`)
        before = [r for r in results if r[0] < killing]
        assert sum(1 for _, status, _ in before if status != 200) <= workers, statuses(results)
    # new L4 connections did meet the dead backend, and went on to another one (the workers
    # report every second: wait for the report that has it)
    wait_until(
        lambda: agent(lab)["proxy"]["upstream_failures"],
        lambda failures: failures > failures_before,
        what=f"the proxy reports upstream failures (before: {failures_before})",
    )


# -- timeouts, faults, circuit breaking ----------------------------------------------------------


def test_route_timeout_answers_504_in_about_half_a_second(lab):
    with applied(lab, "traffic-timeout"):
        for _ in range(3):
            proc = meshlab(
                "exec",
                CLIENT,
                "--",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "-w",
                "%{http_code} %{time_total}",
                "http://slow.shop:8080/",
                check=False,
            )
            code, seconds = proc.stdout.split()
            assert code == "504"
            assert 0.3 <= float(seconds) <= 1.5, seconds


def test_fault_abort_answers_about_half_the_requests_503(lab):
    with applied(lab, "traffic-abort"):
        results = load("web.shop:8080/", 400, workers=4)
    counts = statuses(results)
    assert set(counts) == {200, 503}, counts
    assert 160 <= counts[503] <= 240, counts  # 50 % +- 10 points (4 standard deviations)
    assert {body for _, status, body in results if status == 503} == {"fault filter abort"}


def test_circuit_breaker_overflow_is_503_with_flag_uo(lab):
    with applied(lab, "traffic-circuit-breaker"):
        assert statuses(load("cb.shop:8080/", 4, workers=1)) == {200: 4}  # one at a time: fine
        since = time.time()
        results = load("cb.shop:8080/", 30, workers=6)
    counts = statuses(results)
    assert set(counts) == {200, 503} and counts[503] >= 5, counts
    assert all("overflow" in body for _, status, body in results if status == 503)

    def flags() -> Counter:
        logged = [
            e for e in access_log(since) if e["destination_service"] == "cb.shop.svc.cluster.local"
        ]
        return Counter((e["response_code"], e["response_flags"]) for e in logged)

    # the access log is flushed about every second
    logged = wait_until(
        flags,
        lambda flags: flags[(503, "UO")] >= counts[503],
        what=f"{counts[503]} overflows (503, UO) in node-1's access log",
        retry_on=(ValueError,),  # a line read while it was being written
    )
    assert logged[(503, "UO")] == counts[503], logged


def test_http2_max_requests_bounds_requests_in_flight(lab):
    """Issue #21: `http.http2MaxRequests: 2` and six clients at once against a backend that
    answers in 0.3 s: no connection limit applies, yet only two requests are in flight to
    it and the others get 503 overflow; one client at a time is never refused."""
    with applied(lab, "traffic-max-requests"):
        assert statuses(load("cb.shop:8080/", 4, workers=1)) == {200: 4}
        results = load("cb.shop:8080/", 30, workers=6)
    counts = statuses(results)
    assert set(counts) == {200, 503} and counts[503] >= 5, counts
    assert all("overflow" in body for _, status, body in results if status == 503)


def test_http_idle_timeout_closes_the_idle_upstream_connection(lab):
    """Issue #21: `http.idleTimeout: 3s`: once the requests are done, the pooled upstream
    connection to cb is closed within a pool sweep (5 s) after 3 s idle, and with it node-2's
    connection to the pod (it would stay 300 s without the rule)."""
    cb = pod_ip("shop/cb")

    def pod_connections() -> int:
        out = meshlab(
            "exec",
            "--node",
            "node-2",
            "--",
            "ss",
            "-Htn",
            "state",
            "established",
            "dst",
            f"{cb}:8080",
        ).stdout
        return len(out.splitlines())

    with applied(lab, "traffic-idle"):
        assert statuses(load("cb.shop:8080/", 4, workers=1)) == {200: 4}
        assert pod_connections() >= 1  # pooled, idle: kept for now
        wait_until(
            pod_connections,
            lambda n: n == 0,
            what="the idle connection to cb's pod is closed",
            timeout=20,
        )

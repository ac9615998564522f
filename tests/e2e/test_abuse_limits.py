"""Issue #17 item 5: slow, garbled, greedy and many connections through one node proxy.

Every pod is on node-1, an nginx behind an `http-` Service port among them, so node-1's proxy
serves each connection (its HTTP/1.1 engine on 15001). The lab's agents run with a 2 s request
header timeout (MESHLAB_AGENT_SETTINGS). Shown with stock clients and `apps/conn_flood.py`:
a slowloris (1 byte/s) gets 408 after the header timeout while another pod is served; bytes
that are not HTTP get 400, the connection closed and counted, and the proxy serves on; many
concurrent keep-alive connections held open with a slowloris and a garbage client beside them
all complete, and the proxy workers' memory is back within 10 % of where it was before them
once they closed (the agent replaces a worker a burst left grown; the old one drains); a
source over its connection limit is refused with a 503 saying why, counted, while another pod
is served; a source with more requests in flight than its limit (to a server that answers
late) gets 503 flag UO for the excess, which never reaches the server, counted, while another
pod is served by the same server; a plain TCP connection (a `tcp-` port) kept busy past the
TCP idle timeout (3 s here) stays open, then idle that long is closed by the proxy and counted.

The issue's 5,000 connections held for 60 s are the default: MESHLAB_ABUSE_CONNECTIONS (5,000)
held MESHLAB_ABUSE_HOLD_S (60) seconds; a smaller hold (MESHLAB_ABUSE_HOLD_S=10) gives a quicker
run while working on the proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from meshagent.agent.proxy.http.pool import DEFAULT_MAX_IDLE as MAX_IDLE
from meshagent.agent.proxy.limits import SOURCE_PENDING_REQUESTS
from meshagent.lab.paths import LOG_DIR

from tests.e2e.conftest import APPS, BIN, lab_env, meshlab, render_manifest
from tests.e2e.test_grpc_l7 import _requests
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "abuse-limits.yaml"
VENV_PYTHON = sys.executable
FLOOD = str(APPS / "conn_flood.py")
TARGET = ("web.abl", "8080")
URL = f"http://{TARGET[0]}:{TARGET[1]}/"
HEADER_TIMEOUT_S = 2
TCP_IDLE_TIMEOUT_S = 3
CONNECTIONS = int(os.environ.get("MESHLAB_ABUSE_CONNECTIONS", "5000"))
HOLD_S = float(os.environ.get("MESHLAB_ABUSE_HOLD_S", "60"))
SOURCE_LIMIT = 20  # connections per source, in the connection limit test
PENDING_LIMIT = 4  # requests in flight per source, in the pending request limit test
SLOW_URL = "http://slowweb.abl:8080/slow?seconds="  # apps/graceful_server.py: answers late

NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {dir}/web.pid;
error_log stderr;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 100000;
  server {{ listen 8080; location / {{ return 200 "web\\n"; }} }}
}}
"""


def _agent_settings(**settings) -> contextlib.AbstractContextManager[None]:
    """Agents (re)started inside get these settings (lab.agent_config)."""
    return lab_env("MESHLAB_AGENT_SETTINGS", json.dumps(settings))


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("abuse-limits")
    (folder / "web.conf").write_text(NGINX_CONF.format(dir=folder))
    with _agent_settings(
        http_request_headers_timeout_s=HEADER_TIMEOUT_S, tcp_idle_timeout_s=TCP_IDLE_TIMEOUT_S
    ):
        lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=1)
    lab.wait_answer("abl/client", URL, what="web answers through the mesh")
    return lab


def _refused(reason: str, listener: str = "pod") -> float:
    return _requests("node-1", "meshagent_proxy_refused_total", listener=listener, reason=reason)


# One plain TCP connection (stdlib, in a pod): a request every 0.5 s for `busy` s, each
# answered, then nothing; prints how many were answered and whether the proxy then closed it
# (EOF) before the 60 s socket timeout.
IDLE_PROBE = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
answered, until = 0, time.monotonic() + float(sys.argv[3])
while time.monotonic() < until:
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n")
    if s.recv(65536).startswith(b"HTTP/1.1 200"):
        answered += 1
    time.sleep(0.5)
try:
    closed = s.recv(65536) == b""
except TimeoutError:
    closed = False
print(json.dumps({"answered": answered, "closed": closed}))
"""


# COUNT requests at once from one pod, each on its own connection (stdlib, in a pod); prints
# each answer's [status, body] (status 0: no answer).
AT_ONCE = """
import http.client, json, sys, threading
host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
answers = []
def one(i):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", f"{path}&n={i}")
        response = conn.getresponse()
        answers.append([response.status, response.read().decode(errors="replace").strip()])
    except OSError as exc:
        answers.append([0, repr(exc)])
    finally:
        conn.close()
threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(answers))
"""


def _flood(pod: str, *args: str) -> subprocess.Popen:
    """`conn_flood.py` in `pod`, running beside the test (read it with `_result`)."""
    return subprocess.Popen(
        [str(BIN / "meshlab"), "exec", pod, "--", VENV_PYTHON, FLOOD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"conn_flood still running after {timeout} s: {out}{err}") from None
    assert proc.returncode == 0, f"conn_flood failed ({proc.returncode}): {out}{err}"
    return json.loads(out.strip().splitlines()[-1])


def _rss_kib(pid: int) -> int:
    """KiB resident in `pid`; 0 once it has exited (a retiring worker that status still lists
    between its exit and its reaping is a zombie, whose status has no VmRSS, or gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    assert "zombie" in state or "dead" in state, f"no VmRSS for live pid {pid}: {state}"
    return 0


def _settled(lab) -> None:
    """Until node-1's proxy holds no client connection, and of the upstream connections a
    burst left idle only what its pools keep (DEFAULT_MAX_IDLE per source and worker: here
    each is a same-node hop, counted as an inbound connection)."""
    workers = len(lab.status("node-1")["agent"].get("workers") or [1])
    wait_until(
        lambda: lab.status("node-1")["connections"],
        lambda c: c["outbound"]["active"] == 0 and c["inbound"]["active"] <= workers * MAX_IDLE,
        what="node-1's proxy holds no client connection and no more idle upstream ones",
        timeout=30,
    )


def _a_slowloris_gets_408(lab, service: str, level: str) -> None:
    """Once node-1's status shows `service`'s port 8080 at `level`: a slowloris to it gets
    408 (counted) after the header timeout, another pod is served meanwhile and after."""
    target = (f"{service}.abl", "8080")
    url = f"http://{target[0]}:{target[1]}/"
    wait_until(
        lambda: [
            p.get("l7")
            for svc in lab.status("node-1")["services"]
            if (svc["namespace"], svc["name"]) == ("abl", service)
            for p in svc["ports"]
            if p["port"] == 8080
        ],
        lambda levels: levels == [level],
        what=f"node-1's status shows {service}:8080 at {level}",
        timeout=30,
    )
    counted = _refused("header_timeout")
    slow = _flood("abl/slow", "slowloris", *target)
    try:
        for _ in range(5):  # served while the slowloris trickles
            assert lab.curl("abl/client", url)[0] == "200"
    finally:
        result = _result(slow, timeout=90)
    assert result["status_line"].startswith("HTTP/1.1 408 "), result
    assert "request header timeout" in result["body"], result
    wait_until(lambda: _refused("header_timeout"), lambda n: n == counted + 1, what="408 counted")
    assert lab.curl("abl/client", url)[0] == "200"


def test_a_slowloris_gets_408_after_the_header_timeout_while_others_are_served(lab):
    """`web` is at `full`: the HTTP engine answers 408 itself."""
    _a_slowloris_gets_408(lab, "web", "full")


def test_a_slowloris_at_the_default_observe_level_gets_408_while_others_are_served(lab):
    """The Service `webobs` has no level of its own: `observe`, the bytes relayed while the
    observer watches; the proxy still answers 408 on the engine's header timeout (the pod,
    nginx, would wait 60 s) and counts it as the engine does."""
    _a_slowloris_gets_408(lab, "webobs", "observe")


def test_garbage_is_answered_400_closed_and_counted_and_the_proxy_serves_on(lab):
    counted = _refused("bad_request")
    result = _result(_flood("abl/junk", "garbage", *TARGET), timeout=90)
    assert result["closed"], result
    assert result["status_line"].startswith("HTTP/1.1 400 "), result
    wait_until(lambda: _refused("bad_request"), lambda n: n == counted + 1, what="400 counted")
    assert lab.curl("abl/client", URL)[0] == "200"


def test_a_plain_tcp_connection_idle_for_the_idle_timeout_is_closed_and_counted(lab):
    def closed() -> float:
        return sum(_refused("idle_timeout", listener) for listener in ("pod", "hbone"))

    counted = closed()
    busy = 2 * TCP_IDLE_TIMEOUT_S  # longer than the timeout, never idle that long
    probe = subprocess.run(
        [
            str(BIN / "meshlab"),
            "exec",
            "abl/client",
            "--",
            VENV_PYTHON,
            "-c",
            IDLE_PROBE,
            TARGET[0],
            "8081",
            str(busy),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["answered"] >= busy, result  # busy: kept open (a request every 0.5 s)
    assert result["closed"], result  # then idle: closed by the proxy (nginx waits 60 s)
    wait_until(closed, lambda n: n >= counted + 1, what="the idle close counted")


def _workers_rss_by_pid(lab) -> dict[int, int]:
    """KiB resident in each of node-1's proxy workers, those a fresh one replaced and still
    draining included."""
    workers = lab.status("node-1")["agent"].get("workers") or []
    pids = [w["pid"] for w in workers] + [p for w in workers for p in w.get("retiring_pids", [])]
    assert workers and all(pids), workers
    return {pid: _rss_kib(pid) for pid in pids}


def _workers_rss(lab) -> int:
    return sum(_workers_rss_by_pid(lab).values())


def _recycled() -> float:
    return _requests("node-1", "meshagent_worker_recycled_total", reason="memory")


def test_many_connections_beside_a_slowloris_and_garbage_all_complete_and_memory_returns(lab):
    # What a burst leaves in a worker's heap does not come back (agent/workers/recycle.py:
    # +46-57 % of a fresh worker after 5,000 connections, whatever the allocator): the agent
    # replaces a worker more than 10 % over where it stood before the burst once the burst is
    # over, and the old one drains. The figure to return to is the workers' as this test
    # starts (no burst through them yet; what they took when they first served included).
    fresh_by_pid = _workers_rss_by_pid(lab)
    fresh = sum(fresh_by_pid.values())
    recycled = _recycled()
    slow = _flood("abl/slow", "slowloris", *TARGET)
    junk = _flood("abl/junk", "garbage", *TARGET)
    many = _flood("abl/client", "hold", *TARGET, str(CONNECTIONS), str(HOLD_S))
    result = _result(many, timeout=HOLD_S + 240)
    refused = {r: _refused(r) for r in ("source_pending_requests", "source_connections")}
    assert result["ok"] == CONNECTIONS, (result, refused)  # every well-behaved one completed
    assert _result(slow, timeout=90)["status_line"].startswith("HTTP/1.1 408 ")
    assert _result(junk, timeout=90)["status_line"].startswith("HTTP/1.1 400 ")
    peak = _workers_rss(lab)
    _settled(lab)
    wait_until(
        lambda: _workers_rss_by_pid(lab),
        lambda now: sum(now.values()) <= fresh * 1.10,
        what=f"node-1's workers' RSS within 10 % of {fresh} KiB (fresh: {fresh_by_pid}) after"
        f" {CONNECTIONS} connections (after them: {peak} KiB)",
        timeout=120,
        interval=1.0,
    )
    assert _recycled() > recycled  # by replacing grown workers, not by chance
    assert lab.curl("abl/client", URL)[0] == "200"


def test_a_source_over_its_connection_limit_is_refused_while_others_are_served(lab):
    with _agent_settings(
        http_request_headers_timeout_s=HEADER_TIMEOUT_S,
        max_connections_per_source=SOURCE_LIMIT,
        proxy_workers=1,  # one process: the limit is the node's
    ):
        meshlab("agent", "stop", "node-1")
        meshlab("agent", "start", "node-1")
    wait_until(
        lambda: lab.curl("abl/client", URL)[0],
        lambda code: code == "200",
        what="node-1's restarted agent serves",
        timeout=30,
    )
    counted = _refused("source_connections")
    hog = _flood("abl/hog", "hold", *TARGET, str(SOURCE_LIMIT + 10), "5")
    for _ in range(3):  # another source is served meanwhile
        assert lab.curl("abl/client", URL)[0] == "200"
    result = _result(hog, timeout=120)
    assert result["ok"] == SOURCE_LIMIT, result
    assert result["first"] == {"200": SOURCE_LIMIT, "503": 10}, result
    wait_until(
        lambda: _refused("source_connections"),
        lambda n: n == counted + 10,
        what="the refusals counted",
    )
    code, body = lab.curl("abl/client", URL)
    assert code == "200", body


def _slow_started(tag: str) -> int:
    """Requests whose path holds `tag` that reached slowweb (its log: one line as each starts)."""
    lines = (LOG_DIR / "pod-abl-slowweb.log").read_text(errors="replace").splitlines()
    return sum("slow request started" in line and tag in line for line in lines)


def test_a_source_over_its_pending_request_limit_gets_503_uo_while_others_are_served(lab):
    """abl/hog sends PENDING_LIMIT + 3 requests at once to a server that answers each after
    12 s: PENDING_LIMIT reach the server and get 200, the 3 over the limit get 503 flag UO at
    once without reaching it, counted; abl/client is served by the same server meanwhile."""
    excess, seconds = 3, 12
    with _agent_settings(
        http_request_headers_timeout_s=HEADER_TIMEOUT_S,
        max_pending_requests_per_source=PENDING_LIMIT,
        proxy_workers=1,  # one process: the limit is the node's
    ):
        meshlab("agent", "stop", "node-1")
        meshlab("agent", "start", "node-1")
    lab.wait_answer("abl/client", SLOW_URL + "0", what="node-1's restarted agent serves slowweb")
    refused = _refused(SOURCE_PENDING_REQUESTS)
    overflowed = _requests("node-1", response_code="503", response_flags="UO")
    reached = _slow_started("from=hog")
    hog = subprocess.Popen(
        [str(BIN / "meshlab"), "exec", "abl/hog", "--", VENV_PYTHON, "-c", AT_ONCE,
         "slowweb.abl", "8080", f"/slow?seconds={seconds}&from=hog", str(PENDING_LIMIT + excess)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: _slow_started("from=hog"),
            lambda n: n >= reached + PENDING_LIMIT,
            what=f"{PENDING_LIMIT} of abl/hog's requests reached slowweb",
            timeout=30,
        )
        # While the hog's requests are in flight, another source is served by the same
        # server through the same proxy process.
        for _ in range(2):
            code, body = lab.curl("abl/client", SLOW_URL + "0&from=client")
            assert code == "200", body
        assert hog.poll() is None, "abl/hog's requests ended before abl/client was served"
        out, err = hog.communicate(timeout=seconds + 60)
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()
    assert hog.returncode == 0, err
    answers = json.loads(out.strip().splitlines()[-1])
    assert Counter(status for status, _ in answers) == {200: PENDING_LIMIT, 503: excess}, answers
    refusal = "too many requests in flight from this source"
    assert all(body == refusal for status, body in answers if status == 503), answers
    assert _slow_started("from=hog") == reached + PENDING_LIMIT  # the excess never got there
    wait_until(
        lambda: (
            _refused(SOURCE_PENDING_REQUESTS),
            _requests("node-1", response_code="503", response_flags="UO"),
        ),
        lambda now: now == (refused + excess, overflowed + excess),
        what="the refusals counted (refused_total, and istio_requests_total 503 UO)",
    )

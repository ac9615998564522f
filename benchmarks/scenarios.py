"""The scenarios: one measurement of one path in, figures ({metric id: value}) out. Each runs
its load tool in the path's client pod for a bounded time (every call has a timeout) and reads
the proxies' CPU and memory from /proc around it.

Needs the running bench lab (labsetup.running_lab).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import configs, parse, procstat, report
from benchmarks.labsetup import (
    BenchPath,
    LabFailed,
    meshlab,
    popen_in_pod,
    python_tool,
    run_in_pod,
)

HERE = Path(__file__).resolve().parent
WRK_REPORT = str(HERE / "wrk_report.lua")
WRK_PACED = str(HERE / "wrk_paced.lua")
TOOL_SLACK = 30.0  # seconds a tool may take beyond its own duration before it is killed
SETTLE_POLL = 0.5  # idle connections: seconds between memory samples while it settles
SETTLE_MAX = 15.0


@dataclass(frozen=True)
class Settings:
    """How long and how much: the full run, or the smoke run the test suite runs."""

    mode: str
    runs: int
    tcp_seconds: int
    tcp_omit: int  # seconds of TCP slow start left out of iperf3's figure
    http_seconds: int
    latency_seconds: int
    rate: int  # requests per second in the fixed-rate scenario
    rate_seconds: int
    rate_connections: int
    newconn_seconds: int
    idle_connections: int
    h2_seconds: int  # h2load -D, and the gRPC client's run
    h2_connections: int
    h2_streams: int  # concurrent streams per h2load connection
    grpc_concurrency: int  # calls in flight on the one gRPC channel


FULL = Settings("full", 3, 4, 1, 4, 3, 1000, 5, 16, 3, 5000, 5, 10, 10, 10)
SMOKE = Settings("smoke", 1, 1, 0, 1, 1, 1000, 1, 16, 1, 50, 1, 10, 10, 10)
SYSTEM_PYTHON = "/usr/bin/python3"  # the one Debian's python3-grpcio is installed for


def _url(path: BenchPath, route: str) -> str:
    host, port = path.http
    return f"http://{host}:{port}{route}"


def bulk_tcp(path: BenchPath, s: Settings, streams: int) -> dict[str, float]:
    """iperf3 from the client to the path's iperf3 server: Gbit/s received."""
    host, port = path.iperf
    argv = ["iperf3", "-J", "-c", host, "-p", str(port), "-P", str(streams)]
    argv += ["-t", str(s.tcp_seconds), "-O", str(s.tcp_omit)]
    timeout = s.tcp_seconds + s.tcp_omit + TOOL_SLACK
    try:
        out = run_in_pod(path.client, argv, timeout)
    except LabFailed:
        time.sleep(1)  # iperf3 -s serves one test at a time: give a stuck one a moment, once
        out = run_in_pod(path.client, argv, timeout)
    return {f"tcp_{streams}_gbps": parse.iperf3_gbps(out)}


def _wrk(path: BenchPath, argv: list[str], seconds: int) -> parse.WrkResult:
    out = run_in_pod(path.client, argv, seconds + TOOL_SLACK)
    result = parse.wrk_result(out)
    if result.requests == 0:
        raise parse.ToolOutputError(f"wrk: no request completed ({result.errors})")
    return result


def http_keepalive(path: BenchPath, s: Settings, connections: int) -> dict[str, float]:
    """wrk, small responses, `connections` keep-alive connections each with one request in
    flight: req/s and latency percentiles (closed loop)."""
    seconds = s.latency_seconds if connections == 1 else s.http_seconds
    threads = min(2, connections)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"]
    argv += ["--timeout", "5s", "-s", WRK_REPORT, _url(path, configs.SMALL_PATH)]
    r = _wrk(path, argv, seconds)
    key = f"http_c{connections}"
    out = {f"{key}_rps": r.req_per_s, f"{key}_p50_ms": r.p50_ms, f"{key}_p99_ms": r.p99_ms}
    if connections > 1:
        out[f"{key}_p999_ms"] = r.p999_ms
    out[f"{key}_errors"] = r.error_count
    return out


def new_connections(path: BenchPath, s: Settings) -> dict[str, float]:
    """wrk with `Connection: close`: every request on a new connection (16 at a time)."""
    argv = ["wrk", "-t", "2", "-c", "16", "-d", f"{s.newconn_seconds}s", "--timeout", "5s"]
    argv += ["-H", "Connection: close", "-s", WRK_REPORT, _url(path, configs.SMALL_PATH)]
    r = _wrk(path, argv, s.newconn_seconds)
    return {"newconn_rps": r.req_per_s, "newconn_errors": r.error_count}


def _with_proxy_cpu(path: BenchPath, argv: list[str], timeout: float) -> tuple[str, float | None]:
    """Run a load tool in the client pod: its output, and the cores the path's proxies used
    meanwhile (None without proxies). The window includes the tool's start and its warm-up
    call, a few milliseconds of a run of seconds."""
    if not path.proxies:
        return run_in_pod(path.client, argv, timeout), None
    t0, before = time.monotonic(), procstat.sample(path.proxies)
    out = run_in_pod(path.client, argv, timeout)
    t1, after = time.monotonic(), procstat.sample(path.proxies)
    return out, (after.cpu_s - before.cpu_s) / (t1 - t0)


def h2_keepalive(path: BenchPath, s: Settings) -> dict[str, float]:
    """h2load, h2c with prior knowledge: `h2_connections` connections each with `h2_streams`
    requests in flight, for a fixed duration (closed loop): req/s, mean latency, and the
    proxies' CPU per 1,000 req/s."""
    host, port = path.h2
    argv = ["h2load", "-c", str(s.h2_connections), "-m", str(s.h2_streams)]
    argv += ["-D", str(s.h2_seconds), f"http://{host}:{port}{configs.SMALL_PATH}"]
    out, cores = _with_proxy_cpu(path, argv, s.h2_seconds + TOOL_SLACK)
    r = parse.h2load_result(out)
    if r.succeeded == 0:
        raise parse.ToolOutputError(f"h2load: no request succeeded ({r})")
    figures = {
        "h2_rps": r.req_per_s,
        "h2_mean_ms": r.mean_ms,
        "h2_errors": r.error_count(s.h2_connections * s.h2_streams),
    }
    if cores is not None:
        figures["h2_cpu_per_krps"] = cores / (r.req_per_s / 1000)
    return figures


def grpc_unary(path: BenchPath, s: Settings) -> dict[str, float]:
    """benchmarks/grpc_load.py: unary calls over one channel, `grpc_concurrency` in flight, for
    `h2_seconds`: calls/s, latency percentiles, and the proxies' CPU per 1,000 calls/s."""
    host, port = path.grpc
    argv = ["env", "GRPC_DNS_RESOLVER=native", SYSTEM_PYTHON, "-m", "benchmarks.grpc_load"]
    argv += [f"{host}:{port}", configs.GRPC_METHOD]
    argv += ["--concurrency", str(s.grpc_concurrency), "--seconds", str(s.h2_seconds)]
    out, cores = _with_proxy_cpu(path, argv, s.h2_seconds + TOOL_SLACK)
    r = parse.grpc_result(out)
    figures = {
        "grpc_cps": r.calls_per_s,
        "grpc_p50_ms": r.p50_ms,
        "grpc_p99_ms": r.p99_ms,
        "grpc_errors": sum(r.errors.values()),
    }
    if cores is not None:
        figures["grpc_cpu_per_kcalls"] = cores / (r.calls_per_s / 1000)
    return figures


class _Lines:
    """A process's stdout lines as they come, with a deadline on each wait."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {prefix!r} line within {timeout:.0f}s") from None
            if line is None:
                raise LabFailed(f"ended before a {prefix!r} line: {''.join(self.seen)[-600:]}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line


def _finish(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_fixed_rate(path: BenchPath, s: Settings) -> dict[str, float]:
    """wrk paced to a fixed rate (1,000 req/s), 1 KiB responses over 16 keep-alive connections:
    latency percentiles, and the proxies' CPU (cores per 1,000 req/s, sampled over exactly the
    loaded window: wrk's first and last lines) and resident memory."""
    argv = ["stdbuf", "-oL", "wrk", "-t", "1", "-c", str(s.rate_connections)]
    argv += ["-d", f"{s.rate_seconds}s", "--timeout", "5s", "-s", WRK_PACED]
    argv += [_url(path, configs.KIB_PATH), "--", str(s.rate)]
    proc = popen_in_pod(path.client, argv)
    try:
        lines = _Lines(proc)
        lines.wait_for("Running", TOOL_SLACK)
        t0, before = time.monotonic(), procstat.sample(path.proxies)
        last = lines.wait_for(parse.WRK_MARKER, s.rate_seconds + TOOL_SLACK)
        t1, after = time.monotonic(), procstat.sample(path.proxies)
    finally:
        _finish(proc, TOOL_SLACK)
    r = parse.wrk_result(last)
    if r.requests == 0:
        raise parse.ToolOutputError(f"wrk: no request completed ({r.errors})")
    out = {
        "fixed_rps": r.req_per_s,
        "fixed_p50_ms": r.p50_ms,
        "fixed_p90_ms": r.p90_ms,
        "fixed_p99_ms": r.p99_ms,
        "fixed_errors": r.error_count,
    }
    if path.proxies:
        cores = (after.cpu_s - before.cpu_s) / (t1 - t0)
        out["fixed_cpu_per_krps"] = cores / (r.req_per_s / 1000)
        out["fixed_proxy_rss_mib"] = after.rss_bytes / 2**20
        out.update(proxy_memory(path.proxies))
    return out


def proxy_memory(proxies: tuple[Path, ...]) -> dict[str, float]:
    """The proxies' memory now (MiB): PSS of all (shared pages split between the processes
    that share them: the agent's fork server and workers are its forks), and per node (the
    path's proxies are node-1's, then node-2's) its total and its split by role (the agent,
    its workers' fork server, the workers; HAProxy's master and workers)."""
    out, total = {}, 0.0
    for node, cgroup in enumerate(proxies, start=1):
        split = procstat.memory_by_role(cgroup)
        node_total = sum(m.pss for m in split.values()) / 2**20
        out[report.node_memory_id(node, None)], total = node_total, total + node_total
        for role, memory in split.items():
            if memory.rss:  # a role the proxy has (HAProxy has no fork server)
                out[report.node_memory_id(node, role)] = memory.pss / 2**20
    out["fixed_proxy_pss_mib"] = total
    return out


def _settled_rss(proxies: tuple[Path, ...]) -> int:
    """Resident memory once it stops moving (the proxy may still be accepting the last ones)."""
    deadline = time.monotonic() + SETTLE_MAX
    last = procstat.sample(proxies).rss_bytes
    while time.monotonic() < deadline:
        time.sleep(SETTLE_POLL)
        now = procstat.sample(proxies).rss_bytes
        if abs(now - last) <= 0.002 * last:
            return now
        last = now
    return last


RESTART_TIMEOUT = 90.0


def _reload_haproxy(cgroup: Path) -> None:
    """HAProxy in master-worker mode (-W): SIGUSR2 makes the master start a new worker and the
    old one leave (it has no connection left), so the new one starts with empty memory pools."""
    pids = procstat.cgroup_pids(cgroup)
    parents = {pid: procstat.parent_pid(pid) for pid in pids}
    masters = [pid for pid, ppid in parents.items() if ppid not in parents]
    if len(masters) != 1:
        raise LabFailed(f"expected one HAProxy master in {cgroup}, found {masters}")
    old = set(pids) - set(masters)
    os.kill(masters[0], signal.SIGUSR2)
    deadline = time.monotonic() + RESTART_TIMEOUT
    while time.monotonic() < deadline:
        now = set(procstat.cgroup_pids(cgroup))
        if not now & old and now - set(masters):
            return
        time.sleep(0.1)
    raise LabFailed(f"HAProxy in {cgroup} did not reload within {RESTART_TIMEOUT:.0f}s")


def fresh_proxies(proxies: tuple[Path, ...]) -> None:
    """Restart proxies, so that memory grown by earlier scenarios (or runs) cannot be reused
    and hide what the next one costs: node agents with `meshlab agent stop/start` (the datapath
    stays attached meanwhile), HAProxy by a reload."""
    for cgroup in proxies:
        if cgroup.parent.name == "system" and cgroup.name.startswith("agent-"):
            node = cgroup.name.removeprefix("agent-")
            for action in ("stop", "start"):
                proc = meshlab("agent", action, node, timeout=RESTART_TIMEOUT)
                if proc.returncode != 0:
                    raise LabFailed(f"meshlab agent {action} {node}: {proc.stderr.strip()}")
        else:
            _reload_haproxy(cgroup)


# The share of the idle connections held first: what they cost includes what the proxies,
# restarted just before, take on first use (imports, caches, the heap's first growth).
FIRST_BATCH = 5


def idle_connections(path: BenchPath, s: Settings) -> dict[str, float]:
    """Hold N idle connections through the path's proxies, restarted just before, in two
    batches: a fifth, then the rest. Per connection of the rest (KiB): what one more idle
    connection costs; of the first fifth: that plus the proxies' first-use growth spread over
    them (until issue 18 the N were held at once, and that growth was a part of the figure).
    Paths without a proxy have no such figure."""
    if not path.proxies:
        return {}
    fresh_proxies(path.proxies)
    host, port = path.idle
    first = max(1, s.idle_connections // FIRST_BATCH)
    counts = (first, s.idle_connections - first)
    rss = [_settled_rss(path.proxies)]
    held: list[int] = []
    procs: list[tuple[subprocess.Popen, _Lines]] = []
    try:
        for count in counts:
            argv = python_tool("holdconns", host, str(port), "--count", str(count))
            proc = popen_in_pod(path.client, argv)
            lines = _Lines(proc)
            procs.append((proc, lines))
            _, ok, failed = lines.wait_for("HELD", 60 + count / 100).split()
            if int(ok) == 0:
                raise LabFailed(f"no idle connection could be opened ({failed} failed)")
            held.append(int(ok))
            rss.append(_settled_rss(path.proxies))
        for proc, lines in procs:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            lines.wait_for("RELEASED", TOOL_SLACK)
    finally:
        for proc, _ in procs:
            _finish(proc, TOOL_SLACK)
    return {
        "idle_kib_first_batch": (rss[1] - rss[0]) / held[0] / 1024,
        "idle_kib_per_conn": (rss[2] - rss[1]) / held[1] / 1024,
    }


SCENARIOS = {
    "tcp-1": lambda p, s: bulk_tcp(p, s, 1),
    "tcp-4": lambda p, s: bulk_tcp(p, s, 4),
    "http-c1": lambda p, s: http_keepalive(p, s, 1),
    "http-c16": lambda p, s: http_keepalive(p, s, 16),
    "http-fixed-rate": http_fixed_rate,
    "new-connections": new_connections,
    "idle-connections": idle_connections,
    "h2-keepalive": h2_keepalive,
    "grpc-unary": grpc_unary,
}
# `--only h2` selects these: HTTP/2 and gRPC (issue 15), written to results/h2.md and h2.json
GROUPS = {"h2": ("h2-keepalive", "grpc-unary")}

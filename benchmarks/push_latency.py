"""Push latency: from a change in the controller's model to the ACK of every agent.

One controller push server runs in this process on loopback (real TLS with its own stream
certificate, node bootstrap tokens, the real compiler); a second process (or
--agent-processes of them) runs the simulated agents, one real TLS connection each,
authenticating with its node's token and ACKing every snapshot or delta it receives (after
parsing it; a stream that fails is opened again), so agents and controller do not share a
CPU. Each round changes one pod's label (which changes every node's snapshot, since each lists all
workloads), then waits, polling every millisecond, until every session has ACKed its node's
new version. Prints p50/p99 over the rounds and writes them as JSON.

With --churn, the model instead changes at a steady rate (one pod's label, cycling over the
pods) for --duration seconds, and each change's latency is the time until every agent holds
a snapshot of that change or a later one (`AgentSession.acked_generation`), whatever the
controller's coalescing merged. It also reports the controller's CPU time and peak memory
(this process), and whether the backlog grew (the last tenth of the changes against the
first, and each change's latency by the 10 s of the run it was made in).

With --agent-view, one node's agent is not simulated: a process of its own runs the config
client's apply path (agent/configclient.py, agent/state.py: every snapshot and delta
validated, its data-plane view built, saved to disk, then ACKed) and reports its memory
(RSS before connecting, after the first snapshot, through the run). Under --churn its
latency is reported apart (`agent_view_latency`); the headline figures are the simulated
agents', as without it.

  python -m benchmarks.push_latency                  # 100 agents, 20 rounds
  python -m benchmarks.push_latency --agents 200 --rounds 50
  python -m benchmarks.push_latency --agents 100 --pods-per-node 10 --churn 50 --duration 60
  python -m benchmarks.push_latency --agents 1000 --pods-per-node 30 --churn 50 --duration 60 \
      --agent-view --connect-timeout 600
  python -m benchmarks.push_latency --smoke          # 5 agents, 3 rounds (a unit test runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import resource
import ssl
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
from meshagent.agent.configclient import ControllerLink, _receive_loop
from meshagent.agent.state import SnapshotStore
from meshagent.common.configwire import MessageStream, WireError
from meshagent.controller.ca import CertificateAuthority
from meshagent.controller.gcfreeze import HeapKeeper
from meshagent.controller.model import ClusterModel
from meshagent.controller.push import (
    PushServer,
    StreamCertificate,
    TokenFileAuthenticator,
    controller_identity,
)
from meshagent.controller.signing import NodeTokenAuthenticator

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "push_latency.json"
PODS_PER_NODE = 2  # the default; --pods-per-node
SERVICES = 10
CONNECT_TIMEOUT = 60.0
ROUND_TIMEOUT = 60.0
POLL = 0.001
CHURN_POLL = 0.002  # how often the churn mode looks at every session's acked generation
LAG_BIN = 10.0  # seconds of the run per line of the churn's lag report
VIEW_SAMPLE = 5.0  # how often the agent-view process writes its memory figures
STALL_TICK = 0.01  # the loop watch's sleep: how late it wakes is how long the loop stalled


# -- the cluster ---------------------------------------------------------------------------


def node_name(i: int) -> str:
    return f"node-{i:03d}"


def cluster(nodes: int, pods_per_node: int = PODS_PER_NODE) -> dict[str, list[dict]]:
    """A meshed namespace with `pods_per_node` pods on each node and SERVICES services."""
    out: dict[str, list[dict]] = {
        "Namespace": [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "bench", "labels": {"meshagent.io/mesh": "enabled"}},
            }
        ],
        "Node": [],
        "Pod": [],
        "Service": [],
    }
    for n in range(nodes):
        out["Node"].append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node_name(n)},
                "status": {"addresses": [{"type": "InternalIP", "address": f"10.0.{n}.1"}]},
            }
        )
        for p in range(pods_per_node):
            out["Pod"].append(pod(n, p, round_=0, pods_per_node=pods_per_node))
    for s in range(SERVICES):
        out["Service"].append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": "bench"},
                "spec": {
                    "clusterIP": f"10.96.0.{10 + s}",
                    "selector": {"app": f"app-{s}"},
                    "ports": [{"port": 8080}],
                },
            }
        )
    return out


def pod(node: int, index: int, round_: int, pods_per_node: int = PODS_PER_NODE) -> dict:
    ordinal = node * pods_per_node + index
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{ordinal}",
            "namespace": "bench",
            "labels": {"app": f"app-{ordinal % SERVICES}", "round": str(round_)},
        },
        "spec": {"nodeName": node_name(node), "serviceAccountName": f"sa-{ordinal % SERVICES}"},
        "status": {
            "phase": "Running",
            "podIP": f"10.1.{ordinal // 250}.{ordinal % 250 + 2}",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


# -- the simulated agents (their own process) ------------------------------------------------


# What ends a stream the agent opens again, as a real agent's config client does: on a busy
# machine a thousand handshakes at once can outlast the controller's hello timeout.
_STREAM_ENDS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, WireError)
RECONNECT_AFTER = 1.0


async def run_agents(port: int, root: Path, tokens: dict[str, str]) -> None:
    context = ssl.create_default_context(cafile=str(root))

    async def agent(node: str, token: str) -> None:
        while True:
            with contextlib.suppress(*_STREAM_ENDS):
                await session(node, token)
            await trio.sleep(RECONNECT_AFTER * (1 + random.random()))

    async def session(node: str, token: str) -> None:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
        async with stream:
            wire = MessageStream(stream)
            await wire.send({"type": "hello", "node": node, "token": token, "version": ""})
            while (message := await wire.receive()) is not None:
                if message["type"] not in ("snapshot", "delta"):
                    raise SystemExit(f"{node}: unexpected {message}")
                version = message["version"]
                # parsed, then dropped: a thousand parsed whole snapshots (30,000 pods each)
                # would not fit in one process, and a real agent runs on its own node
                message = None
                await wire.send({"type": "ack", "version": version})

    async with trio.open_nursery() as nursery:
        for node, token in tokens.items():
            nursery.start_soon(agent, node, token)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def run_view(port: int, root: Path, node: str, token: str, stats: Path) -> None:
    """One real agent's config client for `node`: the store applies (and saves) every
    snapshot and delta, building its view, before the ACK; writes its memory to `stats`."""
    figures: dict = {"node": node, "rss_before_connect_mib": round(_rss_mib(), 1)}
    samples: list[dict] = []

    def write() -> None:
        figures.update(
            rss_mib=round(_rss_mib(), 1),
            peak_rss_mib=round(
                max(_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), 1
            ),
            version=store.version,
            applied=link.snapshots_received,
            samples=samples,
        )
        part = stats.with_suffix(".part")
        part.write_text(json.dumps(figures) + "\n")
        part.replace(stats)

    context = ssl.create_default_context(cafile=str(root))
    # the store saves into the benchmark's folder, which the benchmark removes (this process
    # is terminated, so a folder of its own would stay behind)
    state = stats.parent / "view-state"
    state.mkdir(exist_ok=True)
    store = SnapshotStore(node, state)
    link = ControllerLink(address=f"127.0.0.1:{port}", tls=True)

    async def stream() -> None:  # again on failure, from the version held
        while True:
            with contextlib.suppress(*_STREAM_ENDS):
                tls = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
                async with tls:
                    wire = MessageStream(tls)
                    hello = {"type": "hello", "node": node, "token": token}
                    await wire.send({**hello, "version": store.version})
                    await _receive_loop(wire, store, link, None)
            await trio.sleep(RECONNECT_AFTER)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream)
        started = time.monotonic()
        while True:
            await trio.sleep(VIEW_SAMPLE)
            if link.snapshots_received and "rss_first_snapshot_mib" not in figures:
                figures["rss_first_snapshot_mib"] = round(_rss_mib(), 1)
            elapsed = round(time.monotonic() - started)
            samples.append({"s": elapsed, "rss_mib": round(_rss_mib(), 1)})
            write()


# -- the controller and the measurement -------------------------------------------------------


class LoopWatch:
    """Where the controller's loop stops: each garbage collection's pause (by generation,
    from `gc.callbacks`) and how late a `STALL_TICK` sleep wakes (a long synchronous step, a
    collection, or a starved CPU), over the span measured."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.stalls: list[float] = []
        self._began = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._began)

    async def watch(self) -> None:
        gc.callbacks.append(self._on_gc)
        try:
            while True:
                asleep = time.perf_counter()
                await trio.sleep(STALL_TICK)
                self.stalls.append(time.perf_counter() - asleep - STALL_TICK)
        finally:
            gc.callbacks.remove(self._on_gc)

    def report(self) -> dict:
        stalls = sorted(self.stalls) or [0.0]
        return {
            "gc": {
                f"gen{g}": {
                    "count": len(p),
                    "total_ms": round(sum(p) * 1000, 1),
                    "max_ms": round(max(p, default=0.0) * 1000, 1),
                }
                for g, p in self.pauses.items()
            },
            "loop_stall_ms": {
                "p99": round(stalls[int(len(stalls) * 0.99)] * 1000, 1),
                "max": round(stalls[-1] * 1000, 1),
                "over_100ms": sum(1 for s in stalls if s > 0.1),
            },
        }


def all_acked(server: PushServer, nodes: list[str]) -> bool:
    sessions = server.sessions  # built per call: once per poll, not once per node
    for node in nodes:
        session = sessions.get(node)
        if session is None or session.acked_version != server.snapshot_for(node).version:
            return False
    return True


async def wait_all_acked(server: PushServer, nodes: list[str], timeout: float) -> None:
    with trio.fail_after(timeout):
        while not all_acked(server, nodes):
            await trio.sleep(POLL)


async def measure(
    agents: int,
    rounds: int,
    folder: Path,
    *,
    pods_per_node: int = PODS_PER_NODE,
    churn: float = 0.0,
    duration: float = 0.0,
    connect_timeout: float = CONNECT_TIMEOUT,
    agent_view: bool = False,
    agent_processes: int = 1,
) -> tuple[list[float], float, float, dict]:
    """Latencies in milliseconds (one per round, or with `churn` one per change), the bytes
    the controller sent per change and agent once every agent was connected, this process's
    CPU seconds per change over the same span (the controller's, with the benchmark's own
    polling), and extra figures: with `churn` the lag by 10 s of the run, with
    `agent_view` the real agent's memory."""
    ca_file = folder / "ca.pem"
    ca = CertificateAuthority.load_or_create(ca_file)
    root = folder / "root.pem"
    root.write_text(ca.trust_bundle_pem)
    issuer = NodeTokenAuthenticator(folder / "node-tokens.json")
    nodes = [node_name(i) for i in range(agents)]
    tokens = {node: issuer.issue(node) for node in nodes}
    viewed = nodes[0] if agent_view else None
    token_file = folder / "agent-tokens.json"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    shares = []  # the simulated agents' tokens, one file per agents process
    for i in range(agent_processes):
        share = folder / f"simulated-tokens-{i}.json"
        share.write_text(
            json.dumps({n: tokens[n] for n in nodes[i::agent_processes] if n != viewed})
        )
        shares.append(share)

    model = ClusterModel()
    for kind, objects in cluster(agents, pods_per_node).items():
        model.replace(kind, objects)
    identity = controller_identity(ca.trust_domain, "meshagent-system")
    certificate = StreamCertificate(ca_file.read_bytes(), identity, ["127.0.0.1"])
    server = PushServer(
        model,
        authenticator=TokenFileAuthenticator(folder / "node-tokens.json"),
        ca=ca,
        tls=certificate.context,
        heap=HeapKeeper(),  # as the controller runs it (controller/app.py)
    )
    latencies: list[float] = []
    extra: dict = {}
    view_stats = folder / "view.json"
    async with trio.open_nursery() as nursery:
        sockets = await nursery.start(server.serve, "127.0.0.1", 0)
        port = sockets[0].socket.getsockname()[1]
        common = [sys.executable, "-m", "benchmarks.push_latency"]
        where = ["--port", str(port), "--root", str(root), "--tokens", str(token_file)]
        argvs = [[*common, "agents", *where[:4], "--tokens", str(share)] for share in shares]
        if viewed is not None:
            argvs.append([*common, "view", *where, "--node", viewed, "--stats", str(view_stats)])
        processes = [
            await nursery.start(
                lambda task_status, argv=argv: trio.run_process(
                    argv, cwd=REPO, task_status=task_status
                )
            )
            for argv in argvs
        ]
        try:
            synced = time.monotonic()
            await wait_all_acked(server, nodes, connect_timeout)
            print(  # a profiler can start here: what follows is the measured span
                f"every agent holds its first snapshot ({time.monotonic() - synced:.0f} s);"
                " measuring",
                file=sys.stderr,
                flush=True,
            )
            sessions = server.sessions
            sent_before = sum(sessions[node].bytes_sent for node in nodes)
            cpu_before = time.process_time()
            watch = LoopWatch()
            nursery.start_soon(watch.watch)
            if churn:
                groups = {"simulated": [n for n in nodes if n != viewed]}
                if viewed is not None:
                    groups["view"] = [viewed]
                made, by_group = await _churn(server, model, groups, pods_per_node, churn, duration)
                latencies = by_group["simulated"]
                extra["lag_by_10s"] = lag_report(made, latencies)
                if viewed is not None:
                    view = by_group["view"]
                    extra["agent_view_latency"] = {
                        "p50_ms": round(statistics.median(view), 1),
                        "p99_ms": round(statistics.quantiles(view, n=100)[98], 1),
                        "max_ms": round(max(view), 1),
                        "lag_by_10s": lag_report(made, view),
                    }
            else:
                for round_ in range(1, rounds + 1):
                    changed = pod(round_ % agents, 0, round_, pods_per_node)
                    started = time.perf_counter()
                    model.upsert("Pod", changed)
                    await wait_all_acked(server, nodes, ROUND_TIMEOUT)
                    latencies.append((time.perf_counter() - started) * 1000)
            cpu = time.process_time() - cpu_before
            extra.update(watch.report())
            sessions = server.sessions
            sent = sum(sessions[node].bytes_sent for node in nodes) - sent_before
            if viewed is not None:
                await trio.sleep(VIEW_SAMPLE + 1)  # one more sample, after the last change
                extra["agent_view"] = json.loads(view_stats.read_text())
        finally:
            for process in processes:
                process.terminate()
            nursery.cancel_scope.cancel()
    return latencies, sent / (len(latencies) * agents), cpu / len(latencies), extra


async def _churn(
    server: PushServer,
    model: ClusterModel,
    groups: dict[str, list[str]],
    pods_per_node: int,
    rate: float,
    duration: float,
) -> tuple[list[float], dict[str, list[float]]]:
    """Change one pod every 1/rate s for `duration` s; a change's latency for a group of
    nodes is when every one of their sessions' acked generation reaches the generation that
    change made. Returns when each change was made (seconds into the run) and, per group,
    each change's latency (milliseconds), in order."""
    made: list[tuple[int, float]] = []  # (generation, when), in order
    latencies: dict[str, list[float]] = {group: [] for group in groups}
    total_pods = sum(len(nodes) for nodes in groups.values()) * pods_per_node
    count = int(rate * duration)
    began = time.perf_counter()

    async def changes() -> None:
        for i in range(1, count + 1):
            await trio.sleep_until(
                trio.current_time() + max(0.0, began + i / rate - time.perf_counter())
            )
            ordinal = i % total_pods
            model.upsert(
                "Pod", pod(ordinal // pods_per_node, ordinal % pods_per_node, i, pods_per_node)
            )
            made.append((model.generation, time.perf_counter()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(changes)
        deadline = trio.current_time() + duration + ROUND_TIMEOUT
        sessions: dict[str, list] = {}
        while trio.current_time() < deadline:
            await trio.sleep(CHURN_POLL)
            if not sessions or not all(s.connected for g in sessions.values() for s in g):
                by_node = server.sessions  # again only after a reconnect (O(agents) each)
                sessions = {g: [by_node.get(n) for n in nodes] for g, nodes in groups.items()}
                if any(s is None for g in sessions.values() for s in g):
                    sessions = {}
                    continue
            now = time.perf_counter()
            for group, members in sessions.items():
                reached = min(s.acked_generation for s in members)
                done = latencies[group]
                while len(done) < len(made) and made[len(done)][0] <= reached:
                    done.append((now - made[len(done)][1]) * 1000)
            if all(len(done) >= count for done in latencies.values()):
                break
        behind = {group: count - len(done) for group, done in latencies.items()}
        if any(behind.values()):
            raise TimeoutError(f"changes not acked by every agent in time: {behind}")
    return [when - began for _, when in made], latencies


def lag_report(made: list[float], latencies: list[float]) -> list[dict]:
    """Per `LAG_BIN` seconds of the run, the changes made in it and their p50/max latency: a
    backlog that grows shows as latencies that grow from one line to the next."""
    bins: dict[int, list[float]] = {}
    for when, latency in zip(made, latencies, strict=True):
        bins.setdefault(int(when // LAG_BIN), []).append(latency)
    return [
        {
            "from_s": int(b * LAG_BIN),
            "changes": len(values),
            "p50_ms": round(statistics.median(values), 1),
            "max_ms": round(max(values), 1),
        }
        for b, values in sorted(bins.items())
    ]


def summary(
    latencies: list[float],
    agents: int,
    *,
    pods_per_node: int = PODS_PER_NODE,
    churn: float = 0.0,
    duration: float = 0.0,
    cpu_s: float | None = None,
    cpu_per_change_s: float | None = None,
    bytes_per_change: float | None = None,
    extra: dict | None = None,
) -> dict:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    tenth = max(1, len(latencies) // 10)
    return {
        "benchmark": "push_latency",
        "what": "model change to ACK of every agent, milliseconds",
        "agents": agents,
        "pods": agents * pods_per_node,
        "mode": f"churn {churn:g}/s for {duration:g} s" if churn else "one change per round",
        "rounds": len(latencies),
        "first_tenth_p50_ms": round(statistics.median(latencies[:tenth]), 2),
        "last_tenth_p50_ms": round(statistics.median(latencies[-tenth:]), 2),
        "controller_cpu_s": None if cpu_s is None else round(cpu_s, 2),
        "controller_cpu_per_change_s": (
            None if cpu_per_change_s is None else round(cpu_per_change_s, 4)
        ),
        "bytes_per_change_per_agent": None if bytes_per_change is None else round(bytes_per_change),
        # ru_maxrss is in KiB on Linux; this process is the controller (agents run apart)
        "controller_max_rss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
        "p50_ms": round(cuts[49], 2),
        "p99_ms": round(cuts[98], 2),
        "min_ms": round(min(latencies), 2),
        "max_ms": round(max(latencies), 2),
        **(extra or {}),
        "samples_ms": [round(x, 2) for x in latencies],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    agents_cmd = sub.add_parser("agents", help="(internal) run the simulated agents")
    agents_cmd.add_argument("--port", type=int, required=True)
    agents_cmd.add_argument("--root", type=Path, required=True)
    agents_cmd.add_argument("--tokens", type=Path, required=True)
    view_cmd = sub.add_parser("view", help="(internal) run one real agent's config client")
    view_cmd.add_argument("--port", type=int, required=True)
    view_cmd.add_argument("--root", type=Path, required=True)
    view_cmd.add_argument("--tokens", type=Path, required=True)
    view_cmd.add_argument("--node", required=True)
    view_cmd.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pods-per-node", type=int, default=PODS_PER_NODE)
    parser.add_argument("--churn", type=float, default=0.0, help="pod changes per second")
    parser.add_argument("--duration", type=float, default=60.0, help="with --churn: seconds")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        help="seconds for every agent to connect and ACK its first whole snapshot",
    )
    parser.add_argument(
        "--agent-view",
        action="store_true",
        help="one node's agent applies every message through the real config client and"
        " store (its view built and kept) and reports its memory",
    )
    parser.add_argument(
        "--agent-processes",
        type=int,
        default=1,
        help="processes the simulated agents are spread over (the first sync parses a whole"
        " snapshot per agent: at 1,000 x 30 pods one process takes minutes)",
    )
    parser.add_argument("--smoke", action="store_true", help="5 agents, 3 rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")
    args = parser.parse_args(argv)

    if args.command == "agents":
        trio.run(run_agents, args.port, args.root, json.loads(args.tokens.read_text()))
        return 0
    if args.command == "view":
        token = json.loads(args.tokens.read_text())[args.node]
        trio.run(run_view, args.port, args.root, args.node, token, args.stats)
        return 0
    agents, rounds = (5, 3) if args.smoke else (args.agents, args.rounds)
    if agents < 1 or rounds < 2 or args.pods_per_node < 1 or args.agent_processes < 1:
        parser.error("need at least 1 agent, 1 pod per node, 2 rounds and 1 agents process")
    if args.churn and (args.churn * args.duration < 2):
        parser.error("--churn RATE --duration S must make at least 2 changes")
    churn = {"pods_per_node": args.pods_per_node, "churn": args.churn, "duration": args.duration}
    cpu_before = time.process_time()
    with tempfile.TemporaryDirectory(prefix="push-latency-") as folder:
        run = partial(
            measure,
            agents,
            rounds,
            Path(folder),
            connect_timeout=args.connect_timeout,
            agent_view=args.agent_view,
            agent_processes=args.agent_processes,
            **churn,
        )
        latencies, per_change, cpu_per_change, extra = trio.run(run)
    cpu_s = time.process_time() - cpu_before
    result = summary(
        latencies,
        agents,
        cpu_s=cpu_s,
        cpu_per_change_s=cpu_per_change,
        bytes_per_change=per_change,
        extra=extra,
        **churn,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"push latency, {agents} agents, {result['pods']} pods, {result['mode']}:"
        f" p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
        f" (min {result['min_ms']:.1f}, max {result['max_ms']:.1f}; first/last tenth p50"
        f" {result['first_tenth_p50_ms']:.1f}/{result['last_tenth_p50_ms']:.1f} ms);"
        f" {result['bytes_per_change_per_agent']} bytes per change and agent;"
        f" controller CPU {result['controller_cpu_s']} s"
        f" ({result['controller_cpu_per_change_s']} s per change), peak RSS"
        f" {result['controller_max_rss_mib']} MiB; written to {args.out}"
    )
    if "gc" in result:
        pauses = ", ".join(
            f"{g} {v['count']} ({v['total_ms']:.0f} ms, max {v['max_ms']:.0f})"
            for g, v in result["gc"].items()
        )
        stall = result["loop_stall_ms"]
        print(
            f"  controller loop: gc pauses {pauses}; stalls p99 {stall['p99']:.0f} ms,"
            f" max {stall['max']:.0f} ms, {stall['over_100ms']} over 100 ms"
        )
    for line in result.get("lag_by_10s", []):
        print(
            f"  changes made from {line['from_s']} s: {line['changes']},"
            f" p50 {line['p50_ms']:.0f} ms, max {line['max_ms']:.0f} ms"
        )
    view = result.get("agent_view")
    if view:
        print(
            f"  agent view ({view['node']}, config client + store): RSS"
            f" {view['rss_before_connect_mib']} MiB before connecting,"
            f" {view.get('rss_first_snapshot_mib')} MiB after the first snapshot,"
            f" {view['rss_mib']} MiB at the end (peak {view['peak_rss_mib']});"
            f" {view['applied']} snapshots and deltas applied"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

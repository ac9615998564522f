"""Push latency: from a change in the controller's model to the ACK of every agent.

One controller push server runs in this process on loopback (real TLS with its own stream
certificate, node bootstrap tokens, the real compiler); a second process runs the simulated
agents, one real TLS connection each, authenticating with its node's token and ACKing every
snapshot or delta it receives (after parsing it), so agents and controller do not share a
CPU. Each
round changes one pod's label (which changes every node's snapshot, since each lists all
workloads), then waits, polling every millisecond, until every session has ACKed its node's
new version. Prints p50/p99 over the rounds and writes them as JSON.

With --churn, the model instead changes at a steady rate (one pod's label, cycling over the
pods) for --duration seconds, and each change's latency is the time until every agent holds
a snapshot of that change or a later one (`AgentSession.acked_generation`), whatever the
controller's coalescing merged. It also reports the controller's CPU time and peak memory
(this process), and whether the backlog grew (the last tenth of the changes against the
first).

  python -m benchmarks.push_latency                  # 100 agents, 20 rounds
  python -m benchmarks.push_latency --agents 200 --rounds 50
  python -m benchmarks.push_latency --agents 100 --pods-per-node 10 --churn 50 --duration 60
  python -m benchmarks.push_latency --smoke          # 5 agents, 3 rounds (a unit test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import ssl
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
from meshagent.common.configwire import MessageStream
from meshagent.controller.ca import CertificateAuthority
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


async def run_agents(port: int, root: Path, tokens: dict[str, str]) -> None:
    context = ssl.create_default_context(cafile=str(root))

    async def agent(node: str, token: str) -> None:
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


# -- the controller and the measurement -------------------------------------------------------


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
) -> tuple[list[float], float, float]:
    """Latencies in milliseconds (one per round, or with `churn` one per change), the bytes
    the controller sent per change and agent once every agent was connected, and this
    process's CPU seconds per change over the same span (the controller's, with the
    benchmark's own polling)."""
    ca_file = folder / "ca.pem"
    ca = CertificateAuthority.load_or_create(ca_file)
    root = folder / "root.pem"
    root.write_text(ca.trust_bundle_pem)
    issuer = NodeTokenAuthenticator(folder / "node-tokens.json")
    nodes = [node_name(i) for i in range(agents)]
    tokens = {node: issuer.issue(node) for node in nodes}
    token_file = folder / "agent-tokens.json"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)

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
    )
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        sockets = await nursery.start(server.serve, "127.0.0.1", 0)
        port = sockets[0].socket.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "benchmarks.push_latency",
            "agents",
            "--port",
            str(port),
            "--root",
            str(root),
            "--tokens",
            str(token_file),
        ]
        process = await nursery.start(
            lambda task_status: trio.run_process(argv, cwd=REPO, task_status=task_status)
        )
        try:
            await wait_all_acked(server, nodes, connect_timeout)
            sessions = server.sessions
            sent_before = sum(sessions[node].bytes_sent for node in nodes)
            cpu_before = time.process_time()
            if churn:
                latencies = await _churn(server, model, nodes, pods_per_node, churn, duration)
            else:
                for round_ in range(1, rounds + 1):
                    changed = pod(round_ % agents, 0, round_, pods_per_node)
                    started = time.perf_counter()
                    model.upsert("Pod", changed)
                    await wait_all_acked(server, nodes, ROUND_TIMEOUT)
                    latencies.append((time.perf_counter() - started) * 1000)
            cpu = time.process_time() - cpu_before
            sessions = server.sessions
            sent = sum(sessions[node].bytes_sent for node in nodes) - sent_before
        finally:
            process.terminate()
            nursery.cancel_scope.cancel()
    return latencies, sent / (len(latencies) * agents), cpu / len(latencies)


async def _churn(
    server: PushServer,
    model: ClusterModel,
    nodes: list[str],
    pods_per_node: int,
    rate: float,
    duration: float,
) -> list[float]:
    """Change one pod every 1/rate s for `duration` s; each change's latency is when every
    session's acked generation reaches the generation that change made."""
    pending: list[tuple[int, float]] = []  # (generation, when), in order
    latencies: list[float] = []
    total_pods = len(nodes) * pods_per_node

    async def changes() -> None:
        start = time.perf_counter()
        for i in range(1, int(rate * duration) + 1):
            await trio.sleep_until(
                trio.current_time() + max(0.0, start + i / rate - time.perf_counter())
            )
            ordinal = i % total_pods
            model.upsert(
                "Pod", pod(ordinal // pods_per_node, ordinal % pods_per_node, i, pods_per_node)
            )
            pending.append((model.generation, time.perf_counter()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(changes)
        deadline = trio.current_time() + duration + ROUND_TIMEOUT
        while trio.current_time() < deadline:
            await trio.sleep(CHURN_POLL)
            by_node = server.sessions
            sessions = [by_node.get(node) for node in nodes]
            if any(s is None for s in sessions):
                continue
            reached = min(s.acked_generation for s in sessions)
            now = time.perf_counter()
            while pending and pending[0][0] <= reached:
                latencies.append((now - pending.pop(0)[1]) * 1000)
            if not pending and len(latencies) >= int(rate * duration):
                break
        if pending:
            raise TimeoutError(f"{len(pending)} changes not acked by every agent in time")
    return latencies


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
    parser.add_argument("--smoke", action="store_true", help="5 agents, 3 rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")
    args = parser.parse_args(argv)

    if args.command == "agents":
        trio.run(run_agents, args.port, args.root, json.loads(args.tokens.read_text()))
        return 0
    agents, rounds = (5, 3) if args.smoke else (args.agents, args.rounds)
    if agents < 1 or rounds < 2 or args.pods_per_node < 1:
        parser.error("need at least 1 agent, 1 pod per node and 2 rounds")
    if args.churn and (args.churn * args.duration < 2):
        parser.error("--churn RATE --duration S must make at least 2 changes")
    churn = {"pods_per_node": args.pods_per_node, "churn": args.churn, "duration": args.duration}
    cpu_before = time.process_time()
    with tempfile.TemporaryDirectory(prefix="push-latency-") as folder:
        run = partial(
            measure, agents, rounds, Path(folder), connect_timeout=args.connect_timeout, **churn
        )
        latencies, per_change, cpu_per_change = trio.run(run)
    cpu_s = time.process_time() - cpu_before
    result = summary(
        latencies,
        agents,
        cpu_s=cpu_s,
        cpu_per_change_s=cpu_per_change,
        bytes_per_change=per_change,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

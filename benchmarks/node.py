"""A full node (issue #22): metrics page, agent memory, `meshagent status` and the lab itself
at 60+ client pods per node, measured in a real 2-node lab on the real kube-apiserver.

`meshlab up` brings up 2 nodes with one server pod each behind the Service `server.load`;
`meshlab apply` then adds `--deployments` Deployments whose ReplicaSets (made by
kube-controller-manager, placed by the lab kubelet on the least loaded node) give
`--clients` client pods; every client calls the Service once (`meshlab exec`, in parallel).
Measured, as an operator would see them:

- `/stats/prometheus` of each node: bytes, time to serve one scrape (curl's time_total in the
  node's namespace; median of `--scrapes`), the agent's CPU per scrape (from /proc);
- agent and proxy-worker RSS, and the node's PSS (what they hold together: they are forks of
  one another and share pages), before the first scrape and after the last;
- the time from `meshlab up` to the servers ready, and from `meshlab apply` to every client
  running and meshed (in `meshagent status` of its node);
- after scaling the Deployments to `--status-pods` pods per node: `meshagent status` and
  `meshagent status --pods` (median of 5), and the time to mesh the added pods;
- `meshlab exec POD -- true`: median of 20 one after another, and 20 at once (wall time).

Written to benchmarks/results/node.json and node.md with the commit, the load average and the
issue's targets. The machine is shared: the load average is part of the result.

  MESHLAB_INSTANCE=hm python -m benchmarks.node           # 2 x 60 clients, 10 Deployments
  MESHLAB_INSTANCE=hm python -m benchmarks.node --commit HEAD   # HEAD's code, not the tree
  MESHLAB_INSTANCE=hm python -m benchmarks.node --smoke   # 4 clients, 2 scrapes (an e2e test)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SMOKE_OUT = Path("/tmp/meshbench-node-smoke")  # so that a smoke run never overwrites results/
DEFAULT_INSTANCE = "fullnode"
NAMESPACE = "load"
NODES = ("node-1", "node-2")
SCRAPE_URL = "http://127.0.0.1:15020/stats/prometheus"
SERVICE_URL = f"http://server.{NAMESPACE}:8080/"
MESHED_TIMEOUT = 600.0
PARALLEL = 20  # clients calling the Service at once
MB = 1_000_000


@dataclass(frozen=True)
class Settings:
    mode: str
    deployments: int
    clients: int  # client pods in all, spread over both nodes
    status_pods: int  # pods per node when `meshagent status` is timed
    scrapes: int
    exec_runs: int
    status_runs: int


FULL = Settings("full", 10, 120, 100, 10, 20, 5)
SMOKE = Settings("smoke", 2, 2, 2, 2, 3, 2)


# -- the workload -----------------------------------------------------------------------------


def servers_manifest() -> str:
    """The meshed namespace, the Service and one server pod per node."""
    docs = [
        f"""apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}, labels: {{meshagent.io/mesh: enabled}}}}""",
        f"""apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {NAMESPACE}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: 8080}}]""",
    ]
    for node in NODES:
        docs.append(
            f"""apiVersion: v1
kind: Pod
metadata: {{name: server-{node}, namespace: {NAMESPACE}, labels: {{app: server}}}}
spec:
  nodeName: {node}
  containers:
    - name: server
      command: [python3, -m, http.server, "8080"]
      readinessProbe: {{tcpSocket: {{port: 8080}}}}"""
        )
    return "\n---\n".join(docs) + "\n"


def clients_manifest(deployments: int, replicas: int) -> str:
    """`deployments` Deployments of `replicas` idle client pods, one service account each."""
    docs = []
    for d in range(deployments):
        docs.append(
            f"""apiVersion: v1
kind: ServiceAccount
metadata: {{name: client-{d}, namespace: {NAMESPACE}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client-{d}, namespace: {NAMESPACE}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: client-{d}}}}}
  template:
    metadata: {{labels: {{app: client-{d}, role: client}}}}
    spec:
      serviceAccountName: client-{d}
      terminationGracePeriodSeconds: 1
      containers: [{{name: c, image: debian, command: [sleep, infinity]}}]"""
        )
    return "\n---\n".join(docs) + "\n"


# -- the lab ----------------------------------------------------------------------------------


def _timed(argv: list[str], timeout: float = 60.0) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, proc


def _meshlab_argv(*args: str) -> list[str]:
    from benchmarks import labsetup

    return [str(labsetup.MESHLAB), *args]


def _checked(proc: subprocess.CompletedProcess, what: str) -> str:
    from benchmarks.labsetup import LabFailed

    if proc.returncode != 0:
        raise LabFailed(f"{what} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    return proc.stdout


def kubectl(*args: str) -> str:
    from benchmarks import labsetup

    config = _checked(labsetup.meshlab("kubeconfig", timeout=30), "meshlab kubeconfig").strip()
    argv = ["kubectl", "--kubeconfig", config, "--request-timeout=30s", *args]
    return _checked(subprocess.run(argv, capture_output=True, text=True, timeout=90), "kubectl")


def client_pods() -> dict[str, tuple[str, str]]:
    """Client pod name -> (phase, node)."""
    out = kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", "role=client", "--no-headers",
        "-o", "custom-columns=NAME:.metadata.name,PHASE:.status.phase,NODE:.spec.nodeName",
    )  # fmt: skip
    rows = (line.split() for line in out.splitlines() if line.strip())
    return {row[0]: (row[1], row[2] if len(row) > 2 else "") for row in rows}


def status_json(node: str) -> dict:
    argv = _meshlab_argv("exec", "--node", node, "--", "meshagent", "status", "--json")
    return json.loads(_checked(_timed(argv)[1], f"meshagent status on {node}"))


def meshed_in(node: str) -> int:
    """Pods of the benchmark's namespace that `meshagent status` of `node` lists as meshed."""
    return sum(1 for p in status_json(node)["pods"] if p.get("namespace") == NAMESPACE)


def wait_meshed(clients: int, per_node: int | None = None) -> float:
    """Seconds until `clients` client pods run and every node's status lists its pods (or at
    least `per_node` of them)."""
    start = time.perf_counter()
    deadline = start + MESHED_TIMEOUT
    while True:
        pods = client_pods()
        running = [node for phase, node in pods.values() if phase == "Running"]
        if len(running) >= clients:
            wanted = {n: per_node or running.count(n) + 1 for n in NODES}  # + its server
            if all(meshed_in(n) >= wanted[n] for n in NODES):
                return time.perf_counter() - start
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(running)}/{clients} clients running and meshed")
        time.sleep(1.0)


def call_once(pod: str) -> bool:
    """One request from `pod` to the Service (retried while the pod is new to its node)."""
    argv = _meshlab_argv(
        "exec", f"{NAMESPACE}/{pod}", "--", "curl", "-s", "-o", "/dev/null",
        "-w", "%{http_code}", "-m", "10", SERVICE_URL,
    )  # fmt: skip
    for _ in range(5):
        if _timed(argv, timeout=30)[1].stdout.strip() == "200":
            return True
        time.sleep(1.0)
    return False


# -- the node agents --------------------------------------------------------------------------


def agent_processes(node: str) -> tuple[int, list[int]]:
    """The agent's pid and its proxy workers' (the agent's cgroup holds both)."""
    from meshagent.lab import cgroups

    from benchmarks import procstat

    pids = procstat.cgroup_pids(cgroups.system_cgroup(f"agent-{node}"))
    roots = [p for p in pids if procstat.parent_pid(p) not in pids]
    if len(roots) != 1:
        raise RuntimeError(f"{node}: expected one agent process, found {roots} in {pids}")
    return roots[0], [p for p in pids if p != roots[0]]


def _rss_mb(pid: int) -> float:
    from benchmarks import procstat

    return procstat.parse_status_rss(Path(f"/proc/{pid}/status").read_text()) / 2**20


def _cpu_s(pid: int) -> float:
    from benchmarks import procstat

    ticks = procstat.parse_stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
    return ticks / procstat.CLOCK_TICKS


def memory(node: str) -> dict:
    """RSS of the agent and of each other process in its cgroup (its workers' fork server
    and the workers), and the node's PSS (procstat: the sum that counts the pages these forks
    share once)."""
    from meshagent.lab import cgroups

    from benchmarks import procstat

    agent, workers = agent_processes(node)
    split = procstat.memory_by_role(cgroups.system_cgroup(f"agent-{node}"))
    return {
        "agent_mb": round(_rss_mb(agent), 1),
        "workers_mb": [round(_rss_mb(w), 1) for w in workers],
        "node_pss_mb": round(sum(m.pss for m in split.values()) / 2**20, 1),
    }


def scrapes(node: str, count: int) -> dict:
    """`count` scrapes of the node's page in a row: bytes, curl's time, the agent's CPU, and the
    agent's and workers' RSS before the first and after the last."""
    agent, _ = agent_processes(node)
    before = memory(node)
    cpu_before = _cpu_s(agent)
    argv = _meshlab_argv(
        "exec", "--node", node, "--", "curl", "-s", "-f", "-o", "/dev/null",
        "-w", "%{size_download} %{time_total}", SCRAPE_URL,
    )  # fmt: skip
    sizes, times = [], []
    for _ in range(count):
        size, seconds = _checked(_timed(argv)[1], f"scrape of {node}").split()
        sizes.append(int(size))
        times.append(float(seconds))
    cpu = _cpu_s(agent) - cpu_before
    after = memory(node)
    return {
        "page_bytes": sizes[-1],
        "scrape_s": [round(t, 4) for t in times],
        "median_scrape_s": round(statistics.median(times), 4),
        "agent_cpu_per_scrape_s": round(cpu / count, 4),
        "rss_before": before,
        "rss_after": after,
        "agent_rss_growth_pct": round(100 * (after["agent_mb"] / before["agent_mb"] - 1), 1),
    }


# -- command timings --------------------------------------------------------------------------
# `meshagent status --pods` in two parts: Python importing the CLI and the status module, and
# the work itself (reading the agent, the kernel's maps and the saved snapshot, and rendering)
_STATUS_SPLIT = """
import time
start = time.perf_counter()
import meshagent.agent.cli
from meshagent.agent import status
from meshagent.agent.config import load_config
imported = time.perf_counter()
status.render(status.gather(load_config(None)), pods=True)
print(imported - start, time.perf_counter() - imported)
"""


def status_split(node: str, runs: int) -> dict:
    """Median seconds of the status command's imports and of its work."""
    argv = _meshlab_argv("exec", "--node", node, "--", sys.executable, "-c", _STATUS_SPLIT)
    parts = [map(float, _checked(_timed(argv)[1], "status split").split()) for _ in range(runs)]
    imports, work = zip(*parts, strict=True)
    return {
        "imports_s": round(statistics.median(imports), 4),
        "work_s": round(statistics.median(work), 4),
    }


def median_time(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        seconds, proc = _timed(argv)
        _checked(proc, " ".join(argv[-4:]))
        times.append(seconds)
    return round(statistics.median(times), 4)


def parallel_time(argv: list[str], runs: int) -> float:
    """Wall time of `runs` copies of a command started at once."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(runs)
    ]
    failed = [p.wait(timeout=120) for p in procs]
    if any(failed):
        raise RuntimeError(f"{' '.join(argv)}: exit codes {failed}")
    return round(time.perf_counter() - start, 4)


# -- the run ----------------------------------------------------------------------------------


def measure(settings: Settings, folder: Path) -> dict:
    from benchmarks import labsetup

    servers = folder / "servers.yaml"
    servers.write_text(servers_manifest())
    replicas = max(1, settings.clients // settings.deployments)
    clients = folder / "clients.yaml"
    clients.write_text(clients_manifest(settings.deployments, replicas))
    out: dict = {}

    start = time.perf_counter()
    proc = labsetup.meshlab("up", "--nodes", str(len(NODES)), "-f", str(servers), timeout=300)
    if proc.returncode != 0 and "already up" in proc.stderr:
        raise labsetup.LabBusy(proc.stderr.strip())
    try:
        _checked(proc, "meshlab up")
        out["meshlab_up_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        _checked(labsetup.meshlab("apply", "-f", str(clients), timeout=120), "meshlab apply")
        total = replicas * settings.deployments
        out["clients"] = total
        out["clients_meshed_s"] = round(time.perf_counter() - start + wait_meshed(total), 2)
        pods = client_pods()
        out["clients_per_node"] = {n: [v[1] for v in pods.values()].count(n) for n in NODES}
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            answered = sum(pool.map(call_once, sorted(pods)))
        out["clients_answered"] = answered
        out["nodes"] = {node: scrapes(node, settings.scrapes) for node in NODES}

        # `meshagent status` at `status_pods` pods per node
        per_node = settings.status_pods
        more = -(-(2 * per_node) // settings.deployments)  # replicas for per_node a node
        start = time.perf_counter()
        kubectl("scale", "deployment", "--all", "-n", NAMESPACE, f"--replicas={more}")
        out["scaled_clients"] = more * settings.deployments
        out["scaled_meshed_s"] = round(
            time.perf_counter() - start + wait_meshed(more * settings.deployments, per_node), 2
        )
        status = _meshlab_argv("exec", "--node", "node-1", "--", "meshagent", "status")
        out["status_pods"] = meshed_in("node-1")
        out["status_s"] = median_time(status, settings.status_runs)
        out["status_pods_s"] = median_time([*status, "--pods"], settings.status_runs)
        out["status_split"] = status_split("node-1", settings.status_runs)

        pod = sorted(client_pods())[0]
        true = _meshlab_argv("exec", f"{NAMESPACE}/{pod}", "--", "true")
        out["exec_true_s"] = median_time(true, settings.exec_runs)
        out["exec_true_parallel_s"] = parallel_time(true, settings.exec_runs)
    finally:
        labsetup.meshlab("down", timeout=300)
    return out


def targets(m: dict) -> list[dict]:
    """The issue's targets and where each stands."""
    nodes = m["nodes"].values()
    page = max(n["page_bytes"] for n in nodes)
    scrape = max(n["median_scrape_s"] for n in nodes)
    growth = max(n["agent_rss_growth_pct"] for n in nodes)
    status = max(m["status_s"], m["status_pods_s"])
    rows = [
        ("`/stats/prometheus` size, one node", "≤ 2 MB", f"{page / MB:.2f} MB", page <= 2 * MB),
        ("time to serve one scrape", "≤ 0.1 s", f"{scrape:.3f} s", scrape <= 0.1),
        ("agent RSS after the scrapes", "within 10 % of before", f"{growth:+.1f} %",
         abs(growth) <= 10),
        (f"`meshagent status` ({m['status_pods']} pods), summary / --pods", "≤ 0.3 s",
         f"{m['status_s']:.3f} / {m['status_pods_s']:.3f} s", status <= 0.3),
        ("`meshlab exec POD -- true`", "≤ 0.1 s", f"{m['exec_true_s']:.3f} s",
         m["exec_true_s"] <= 0.1),
    ]  # fmt: skip
    return [{"title": t, "target": g, "measured": v, "met": ok} for t, g, v, ok in rows]


def _pss(memory: dict) -> str:
    """The node's PSS, or a dash in results taken before it was recorded."""
    return f"{memory['node_pss_mb']:.1f}" if "node_pss_mb" in memory else "-"


def markdown(results: dict) -> str:
    m, info, s = results["measured"], results["machine"], results["settings"]
    lines = [
        "# A full node (issue 22)",
        "",
        f"Output of `{results['command']}` ({s['mode']} mode), {results['finished_at']}. "
        + (
            f"Code of commit `{info['commit']}` (git archive)"
            if str(info.get("code", "")).startswith("commit")
            else f"Working tree at commit `{info['commit']}`"
            + (" with uncommitted changes" if info["dirty"] else "")
        )
        + f"; {info['cores']} cores ({info['cpu_model']}), shared: load average "
        f"{info['loadavg_start']} at the start, {info['loadavg_end']} at the end"
        + (f"; other labs running: {', '.join(info['other_labs'])}" if info["other_labs"] else "")
        + ".",
        "",
        f"2 nodes, {m['clients']} client pods from {s['deployments']} Deployments "
        f"({', '.join(f'{n}: {c}' for n, c in m['clients_per_node'].items())}) and a server pod "
        f"per node; {m['clients_answered']}/{m['clients']} clients got 200 from the Service.",
        "",
        "| node | page | scrape (median of "
        f"{s['scrapes']}) | agent CPU per scrape | agent RSS before → after | "
        "fork server's and workers' RSS before → after | node PSS before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for node, n in m["nodes"].items():
        workers = " + ".join(f"{w:.0f}" for w in n["rss_before"]["workers_mb"])
        workers_after = " + ".join(f"{w:.0f}" for w in n["rss_after"]["workers_mb"])
        lines.append(
            f"| {node} | {n['page_bytes'] / MB:.2f} MB | {n['median_scrape_s']:.3f} s | "
            f"{n['agent_cpu_per_scrape_s'] * 1000:.0f} ms | {n['rss_before']['agent_mb']:.1f} → "
            f"{n['rss_after']['agent_mb']:.1f} MB ({n['agent_rss_growth_pct']:+.1f} %) | "
            f"{workers} → {workers_after} MB | {_pss(n['rss_before'])} → "
            f"{_pss(n['rss_after'])} MB |"
        )
    lines += [
        "",
        "| figure | measured |",
        "|---|---|",
        f"| `meshlab up`, 2 nodes and the servers | {m['meshlab_up_s']:.1f} s |",
        f"| `meshlab apply` to {m['clients']} clients running and meshed | "
        f"{m['clients_meshed_s']:.1f} s |",
        f"| scaled to {m['scaled_clients']} clients: all meshed | {m['scaled_meshed_s']:.1f} s |",
        f"| `meshagent status`, node-1 with {m['status_pods']} pods | {m['status_s']:.3f} s |",
        f"| `meshagent status --pods`, same | {m['status_pods_s']:.3f} s |",
        f"| of which Python imports / the work (gather and render) | "
        f"{m['status_split']['imports_s']:.3f} / {m['status_split']['work_s']:.3f} s |",
        f"| `meshlab exec POD -- true` (median of {s['exec_runs']}) | {m['exec_true_s']:.3f} s |",
        f"| {s['exec_runs']} x `meshlab exec POD -- true` at once (wall) | "
        f"{m['exec_true_parallel_s']:.3f} s |",
        "",
        "## Targets (issue 22)",
        "",
        "| target | goal | measured | status |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['title']} | {t['target']} | {t['measured']} | "
            f"{'met' if t['met'] else '**missed**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="4 clients, 2 scrapes")
    parser.add_argument(
        "--out", type=Path, help=f"output folder (default {RESULTS}; smoke: {SMOKE_OUT})"
    )
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="measure this commit's code (as benchmarks.run --commit) instead of the working tree",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MESHLAB_INSTANCE", DEFAULT_INSTANCE)
    from benchmarks.run import machine, use_commit

    code_dir = Path(f"/tmp/meshbench-{os.environ['MESHLAB_INSTANCE']}-code")
    measured_commit = use_commit(args.commit, code_dir) if args.commit else None  # daemonset/ too
    # only now: the lab's names depend on MESHLAB_INSTANCE, its code on --commit
    from benchmarks import labsetup

    if os.geteuid() != 0:
        parser.error("needs root (the lab builds network namespaces, cgroups and eBPF)")
    if shutil.which("kubectl") is None:
        parser.error("kubectl is not installed (Debian: kubernetes-client)")
    settings = SMOKE if args.smoke else FULL
    started = dt.datetime.now(dt.UTC)
    info = machine(os.environ["MESHLAB_INSTANCE"])
    if measured_commit:
        info.update(commit=measured_commit[:12], dirty=False, code=f"commit {args.commit}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-node-") as folder:
            measured = measure(settings, Path(folder))
    except labsetup.LabBusy as exc:
        print(f"lab instance already up (someone else's?): {exc}", file=sys.stderr)
        return 2
    except (labsetup.LabFailed, TimeoutError) as exc:
        print(f"benchmarks.node: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[0]
    results = {
        "benchmark": "node",
        "command": " ".join(
            ["python -m benchmarks.node", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "settings": asdict(settings),
        "measured": measured,
        "targets": targets(measured),
    }
    out = args.out or (SMOKE_OUT if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "node.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "node.md").write_text(markdown(results))
    print((out / "node.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

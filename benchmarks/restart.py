"""An agent's restart (issue #17 item 3): `kill -9` and start again, on its pinned datapath, N
times on a quiet machine and N times beside a one-core busy loop; the figure is the agent's own
``ready_after_s`` (`meshagent status`: from its process start to 15001/15008 accepting, every
proxy worker included).

`meshlab up` brings up the demo lab (2 nodes, lab/examples/demo.yaml); node-1's agent is killed
(`meshlab agent stop`, SIGKILL to every process of it) and started again (`meshlab agent start`,
which returns once it is ready), one restart after another. A restart that did not reuse the
pinned programs and maps is counted apart (it would have built them: another figure). The busy
loop is `sh -c 'while :; do :; done'` under `timeout`, on the host, started before the first
restart of that set and stopped after its last. After the last restart, a meshed pod on node-1
must still get 200 from its Service through both nodes' proxies.

Written to benchmarks/results/restart.json and restart.md with the commit and the load average.
The machine is shared: the load average is part of the result.

  MESHLAB_INSTANCE=rb python -m benchmarks.restart                  # 10 + 10 restarts
  MESHLAB_INSTANCE=rb python -m benchmarks.restart --commit HEAD    # HEAD's code, not the tree
  MESHLAB_INSTANCE=rb python -m benchmarks.restart --runs 3 --out /tmp/restart
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEMO = HERE.parent / "lab" / "examples" / "demo.yaml"
DEFAULT_INSTANCE = "restart"
NODE = "node-1"
SERVICE_POD, SERVICE_URL = "shop/frontend", "http://reviews.shop:9080/"  # node-1 -> node-2
TARGET_S = 1.0  # issue #17: serves again within 1 s of its start
BUSY_LIMIT_S = 600  # the busy loop ends by itself even if this process is killed
CONDITIONS = ("quiet", "busy")


def _checked(proc: subprocess.CompletedProcess, what: str) -> str:
    from benchmarks.labsetup import LabFailed

    if proc.returncode != 0:
        raise LabFailed(f"{what} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    return proc.stdout


@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """A shell spinning on one core for the duration (nothing when ``on`` is false)."""
    if not on:
        yield
        return
    loop = subprocess.Popen(["timeout", str(BUSY_LIMIT_S), "sh", "-c", "while :; do :; done"])
    try:
        yield
    finally:
        loop.terminate()  # timeout passes SIGTERM on to the shell
        loop.wait(timeout=10)


def restart_once() -> dict:
    """kill -9 node-1's agent, start it again; its own figures once it is ready."""
    from benchmarks import labsetup

    _checked(labsetup.meshlab("agent", "stop", NODE, timeout=60), "meshlab agent stop")
    _checked(labsetup.meshlab("agent", "start", NODE, timeout=120), "meshlab agent start")
    status = json.loads(
        _checked(
            labsetup.meshlab(
                "exec", "--node", NODE, "--", "meshagent", "status", "--json", timeout=60
            ),
            "meshagent status",
        )
    )
    agent = status["agent"]
    return {"ready_after_s": agent["ready_after_s"], "reused": agent["datapath_reused"]}


def summary(samples: list[dict]) -> dict:
    """p50 and max of ready_after_s over the restarts that reused the pins."""
    figures = sorted(s["ready_after_s"] for s in samples if s["reused"])
    if not figures:
        return {"reused": 0, "rebuilt": len(samples)}
    return {
        "reused": len(figures),
        "rebuilt": len(samples) - len(figures),
        "p50_s": round(figures[(len(figures) - 1) // 2], 3),  # the lower median: a real sample
        "max_s": round(figures[-1], 3),
        "within_target": sum(f < TARGET_S for f in figures),
    }


def measure(runs: int) -> dict:
    from benchmarks import labsetup

    proc = labsetup.meshlab("up", "--nodes", "2", "-f", str(DEMO), timeout=300)
    if proc.returncode != 0 and "already up" in proc.stderr:
        raise labsetup.LabBusy(proc.stderr.strip())
    out: dict = {}
    try:
        _checked(proc, "meshlab up")
        for condition in CONDITIONS:
            with busy_core(condition == "busy"):
                samples = [restart_once() for _ in range(runs)]
            out[condition] = {"samples": samples, **summary(samples)}
        answer = labsetup.meshlab(
            "exec", SERVICE_POD, "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            "--max-time", "10", SERVICE_URL, timeout=60,
        )  # fmt: skip
        out["served_after"] = answer.stdout.strip()
    finally:
        labsetup.meshlab("down", timeout=300)
    return out


def markdown(results: dict) -> str:
    info, m = results["machine"], results["measured"]
    code = (
        f"Code of commit `{info['commit']}` (git archive)"
        if str(info.get("code", "")).startswith("commit")
        else f"Working tree at commit `{info['commit']}`"
        + (" with uncommitted changes" if info["dirty"] else "")
    )
    lines = [
        "# An agent's restart on its pinned datapath (issue 17)",
        "",
        f"Output of `{results['command']}`, {results['started_at']}. {code}; "
        f"{info['cores']} cores ({info['cpu_model']}), shared: load average "
        f"{info['loadavg_start']} at the start, {info['loadavg_end']} at the end; other labs "
        f"running: {', '.join(info['other_labs']) or 'none'}.",
        "",
        f"node-1's agent (2 proxy workers) killed with SIGKILL and started again, "
        f"{results['runs']} times per row; the figure is the agent's own `ready_after_s` (process "
        "start to every listener accepting). After the last restart the demo's frontend got "
        f"`{m['served_after']}` from reviews on node-2.",
        "",
        "| machine | restarts on the pins | p50 | max | under 1 s | every figure (s) |",
        "|---|---|---|---|---|---|",
    ]
    for condition in CONDITIONS:
        c = m[condition]
        figures = ", ".join(f"{s['ready_after_s']:.2f}" for s in c["samples"])
        label = "quiet" if condition == "quiet" else "beside a one-core busy loop"
        if not c["reused"]:
            lines.append(f"| {label} | 0 of {len(c['samples'])} | - | - | - | {figures} |")
            continue
        lines.append(
            f"| {label} | {c['reused']} of {len(c['samples'])} | {c['p50_s']:.2f} s | "
            f"{c['max_s']:.2f} s | {c['within_target']} of {c['reused']} | {figures} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="restarts per condition (10)")
    parser.add_argument("--out", type=Path, help=f"output folder (default {RESULTS})")
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="measure this commit's code (as benchmarks.run --commit) instead of the working tree",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    os.environ.setdefault("MESHLAB_INSTANCE", DEFAULT_INSTANCE)
    from benchmarks.run import machine, use_commit

    code_dir = Path(f"/tmp/meshbench-{os.environ['MESHLAB_INSTANCE']}-code")
    measured_commit = use_commit(args.commit, code_dir) if args.commit else None
    from benchmarks import labsetup  # only now: the lab's names depend on MESHLAB_INSTANCE

    if os.geteuid() != 0:
        parser.error("needs root (the lab builds network namespaces, cgroups and eBPF)")
    started = dt.datetime.now(dt.UTC)
    info = machine(os.environ["MESHLAB_INSTANCE"])
    if measured_commit:
        info.update(commit=measured_commit[:12], dirty=False, code=f"commit {args.commit}")
    try:
        measured = measure(args.runs)
    except labsetup.LabBusy as exc:
        print(f"lab instance already up (someone else's?): {exc}", file=sys.stderr)
        return 2
    except (labsetup.LabFailed, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"benchmarks.restart: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[0]
    results = {
        "benchmark": "restart",
        "command": " ".join(
            ["python -m benchmarks.restart", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "runs": args.runs,
        "target_s": TARGET_S,
        "measured": measured,
    }
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "restart.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "restart.md").write_text(markdown(results))
    print((out / "restart.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark command: builds the 2-node bench lab, runs every scenario on every path,
interleaved and repeated, and writes results/latest.json, latest.md and latest.png.

    sudo .venv/bin/python -m benchmarks.run            # full: 3 runs, minutes
    sudo .venv/bin/python -m benchmarks.run --smoke    # seconds; writes to /tmp unless --out

Run from the repository root, as root (the lab needs it). The lab is a `meshlab` instance of
its own (MESHLAB_INSTANCE, default `bench`), taken down at the end whatever happens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SMOKE_OUT = Path("/tmp/meshbench-smoke")
PUSH_LATENCY = RESULTS / "push_latency.json"
DEFAULT_INSTANCE = "bench"
TOOLS = ("iperf3", "wrk", "haproxy", "nginx", "stdbuf", "h2load")
IDLE_WINDOW = {"full": 3.0, "smoke": 0.5}  # seconds of quiet to measure the proxies' idle CPU
COLORS = {
    "direct": (95, 95, 95),
    "mesh-same-node": (66, 133, 244),
    "mesh-cross-node": (15, 157, 88),
    "sidecar-pair": (219, 68, 55),
    # the L7 levels (issue 18): a lighter shade of the path for `l4`, a darker one for `full`
    "mesh-same-node-l4": (160, 194, 250),
    "mesh-same-node-full": (26, 72, 160),
    "mesh-cross-node-l4": (129, 201, 149),
    "mesh-cross-node-full": (13, 92, 52),
    "mesh-cross-node-routed": (52, 168, 83),
}


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
    return proc.stdout.strip()


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return ((proc.stdout or proc.stderr).strip().splitlines() or ["?"])[0]


PACKAGE_FOLDERS = ("agent", "bpf", "common", "controller", "lab")  # as setup.py maps them


def use_commit(rev: str, folder: Path) -> str:
    """Measure the code of a commit rather than the working tree: its packages are extracted
    (`git archive`) as `meshagent.*` into `folder`, which goes first on the import path of this
    process and of everything the lab starts (controller, agents, pods), ahead of the editable
    install. The lab also reads the commit's daemonset/ (CRDs, RBAC) beside its packages; the
    control plane's binaries stay where scripts/install.sh put them, in the repository.
    Returns the commit's full hash."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not commit:
        raise SystemExit(f"benchmarks: no commit {rev!r}")
    shutil.rmtree(folder, ignore_errors=True)
    package = folder / "meshagent"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    archive = subprocess.run(
        ["git", "archive", commit, *PACKAGE_FOLDERS, "daemonset"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive.stdout, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p
    )
    sys.path.insert(0, str(folder))
    os.environ.setdefault("MESHAGENT_KUBE_BIN", str(REPO / ".kube-bin"))
    return commit


def machine(instance: str) -> dict:
    """What the figures were measured on (recorded with them)."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ours = f"meshlab_{instance}-"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    others = sorted(
        {
            name.split("-", 1)[0]
            for name in (line.split()[0] for line in netns.stdout.splitlines() if line.strip())
            if name.startswith("meshlab") and not name.startswith(ours)
        }
    )
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "tools": {
            "haproxy": _first_line(["haproxy", "-v"]),
            "nginx": _first_line(["nginx", "-v"]),
            "iperf3": _first_line(["iperf3", "--version"]),
            "wrk": _first_line(["wrk", "-v"]),
            "h2load": _first_line(["h2load", "--version"]),
            "grpcio": _first_line(
                ["/usr/bin/python3", "-c", "import grpc; print(grpc.__version__)"]
            ),
        },
        "loadavg_start": Path("/proc/loadavg").read_text().split()[0],
        "other_labs": others,
    }


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _idle_cpu(paths: dict, seconds: float) -> dict[str, float]:
    """CPU the proxies burn doing nothing (cores), so per-request figures can be read against it."""
    from benchmarks import procstat

    groups = {"node agents (both nodes)": paths["mesh-cross-node"].proxies}
    groups["sidecar-pair HAProxy pair"] = paths["sidecar-pair"].proxies
    before = {k: procstat.sample(v).cpu_s for k, v in groups.items()}
    time.sleep(seconds)
    return {k: (procstat.sample(v).cpu_s - before[k]) / seconds for k, v in groups.items()}


def measure(settings, scenario_names: list[str], path_names: list[str], run_dir: Path) -> dict:
    """Bring the lab up, run the rounds, take it down; the raw samples and what went wrong."""
    from benchmarks import labsetup, scenarios

    manifest, paths = labsetup.prepare(run_dir)
    samples: dict[str, dict[str, list[float | None]]] = {}
    errors: list[dict] = []
    _log(f"meshlab up ({manifest})")
    logs = Path(f"{run_dir}-logs")
    with labsetup.running_lab(manifest, logs):
        levels, wrong = labsetup.levels_in_force([paths[n] for n in path_names])
        for path in wrong:  # measured under its name, it would show another level's figures
            error = f"node-1's status shows L7 level {levels[path.name]!r}, not {path.level}"
            errors.append({"round": 0, "scenario": "level", "path": path.name, "error": error})
            _log(f"{path.name}: {error}: not measured")
            path_names = [n for n in path_names if n != path.name]
        idle = _idle_cpu(paths, IDLE_WINDOW[settings.mode])
        every_proxy = tuple(dict.fromkeys(c for p in paths.values() for c in p.proxies))
        for rnd in range(settings.runs):
            # every run starts from freshly started proxies, so that memory figures do not
            # depend on what earlier runs left behind
            _log(f"run {rnd + 1}/{settings.runs}: restarting the proxies")
            try:
                scenarios.fresh_proxies(every_proxy)
            except (labsetup.LabFailed, subprocess.TimeoutExpired) as exc:
                errors.append(
                    {"round": rnd, "scenario": "restart", "path": "all", "error": str(exc)}
                )
                _log(f"run {rnd + 1}: restarting the proxies FAILED: {exc}")
            order = path_names[rnd % len(path_names) :] + path_names[: rnd % len(path_names)]
            for scenario in scenario_names:
                for name in order:
                    if not paths[name].runs(scenario):
                        continue
                    started = time.monotonic()
                    try:
                        figures = scenarios.SCENARIOS[scenario](paths[name], settings)
                    except (
                        labsetup.LabFailed,
                        scenarios.parse.ToolOutputError,
                        subprocess.TimeoutExpired,
                        TimeoutError,
                    ) as exc:
                        errors.append(
                            {"round": rnd, "scenario": scenario, "path": name, "error": str(exc)}
                        )
                        _log(f"run {rnd + 1} {scenario} {name}: FAILED: {exc}")
                        continue
                    for metric, value in figures.items():
                        per_path = samples.setdefault(metric, {})
                        per_path.setdefault(name, [None] * settings.runs)[rnd] = value
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in figures.items())
                    took = time.monotonic() - started
                    _log(f"run {rnd + 1}/{settings.runs} {scenario} {name} ({took:.1f}s): {shown}")
    if errors:
        _log(f"some measurements failed; the lab's logs are in {logs}")
    return {"samples": samples, "errors": errors, "idle_proxy_cpu_cores": idle, "levels": levels}


def chart(metrics: list[dict], settings) -> bytes:
    """Every scenario of the run in one picture: throughput, latency and cost, per path."""
    from benchmarks.chart import bar_chart

    measured = {path for m in metrics for path in m["paths"]}
    series = [p for p in COLORS if p in measured]  # no legend entry for a path not measured
    colors = ["#{:02x}{:02x}{:02x}".format(*COLORS[p]) for p in series]
    return bar_chart(chart_panels(metrics, settings), series, colors)


def chart_panels(metrics: list[dict], settings) -> list:
    """The chart's panels: each scenario's medians per path (None where not measured)."""
    from benchmarks.chart import Panel

    by_id = {m["id"]: m["paths"] for m in metrics}

    def groups(pairs: list[tuple[str, str]]) -> list[tuple[str, dict[str, float | None]]]:
        out = []
        for label, metric in pairs:
            values = by_id.get(metric, {})
            out.append((label, {p: values.get(p, {}).get("median") for p in COLORS}))
        return out

    latency = "latency, ms (medians)"
    panels = [
        Panel(
            "Bulk TCP (iperf3)",
            "Gbit/s",
            groups([("1 stream", "tcp_1_gbps"), ("4 streams", "tcp_4_gbps")]),
        ),
        Panel(
            "HTTP/1.1 requests per second",
            "req/s",
            groups(
                [
                    ("1 connection", "http_c1_rps"),
                    ("16 keep-alive", "http_c16_rps"),
                    ("new conn. each", "newconn_rps"),
                ]
            ),
        ),
        Panel(
            f"HTTP at {settings.rate:,} req/s, 1 KiB responses",
            latency,
            groups([("p50", "fixed_p50_ms"), ("p90", "fixed_p90_ms"), ("p99", "fixed_p99_ms")]),
            log_scale=True,
        ),
        Panel(
            "HTTP, 1 connection, one request at a time",
            latency,
            groups([("p50", "http_c1_p50_ms"), ("p99", "http_c1_p99_ms")]),
            log_scale=True,
        ),
        Panel(
            "HTTP keep-alive, 16 connections",
            latency,
            groups(
                [
                    ("p50", "http_c16_p50_ms"),
                    ("p99", "http_c16_p99_ms"),
                    ("p99.9", "http_c16_p999_ms"),
                ]
            ),
            log_scale=True,
        ),
        Panel(
            f"Added over direct at {settings.rate:,} req/s",
            "ms (medians)",
            groups(
                [
                    ("p50", "fixed_added_p50_ms"),
                    ("p90", "fixed_added_p90_ms"),
                    ("p99", "fixed_added_p99_ms"),
                ]
            ),
        ),
        Panel(
            f"Proxy CPU at {settings.rate:,} req/s, both nodes",
            "cores per 1,000 req/s",
            groups([("CPU", "fixed_cpu_per_krps")]),
        ),
        Panel(
            "Proxy memory, both nodes",
            "MiB at the fixed rate",
            groups([("PSS", "fixed_proxy_pss_mib"), ("RSS summed", "fixed_proxy_rss_mib")]),
        ),
        Panel(
            "Idle proxied connections",
            "KiB per connection",
            groups(
                [
                    (
                        f"each of the last {settings.idle_connections * 4 // 5:,}",
                        "idle_kib_per_conn",
                    ),
                    ("first fifth", "idle_kib_first_batch"),
                ]
            ),
        ),
    ]
    return panels


def write_outputs(results: dict, out: Path, settings, stem: str = "latest") -> list[Path]:
    """<stem>.json and .md; the latency chart only for the main table (`latest`)."""
    from benchmarks.report import markdown

    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}.json", out / f"{stem}.md"]
    files[0].write_text(json.dumps(results, indent=1) + "\n")
    files[1].write_text(markdown(results))
    if stem == "latest":
        files.append(out / "latest.png")
        files[2].write_bytes(chart(results["metrics"], settings))
    return files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Side-by-side benchmarks of the mesh, direct, and a sidecar pair (issue 9).",
        epilog="Examples: python -m benchmarks.run | python -m benchmarks.run --smoke "
        "--out /tmp/b | python -m benchmarks.run --runs 1 --only tcp-1,http-c16",
    )
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes: a check")
    parser.add_argument("--runs", type=int, help="repetitions of every figure (full: 3)")
    parser.add_argument("--out", type=Path, help=f"output folder (default {RESULTS}; smoke: "
                        f"{SMOKE_OUT})")  # fmt: skip
    parser.add_argument(
        "--only",
        help="comma-separated scenarios (default: all), or `h2` for the HTTP/2 and gRPC ones "
        "alone, written to h2.json and h2.md instead of latest.*",
    )
    parser.add_argument(
        "--paths",
        help="comma-separated paths (default: all; the L7 level paths, mesh-*-full and "
        "mesh-*-l4, run the HTTP/1.1 scenarios only)",
    )
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="measure this commit's code (e.g. HEAD) instead of the working tree, so that "
        "edits made during the run cannot change what is measured",
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("MESHLAB_INSTANCE", DEFAULT_INSTANCE)
    instance = os.environ["MESHLAB_INSTANCE"]
    code_dir = Path(f"/tmp/meshbench-{instance}-code")
    measured_commit = use_commit(args.commit, code_dir) if args.commit else None
    # only now: MESHLAB_INSTANCE and the code to measure are final
    from benchmarks import labsetup, report, scenarios

    if os.geteuid() != 0:
        parser.error("needs root (the lab builds network namespaces, cgroups and eBPF)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        parser.error(f"missing tools: {', '.join(missing)} (run scripts/install.sh)")
    settings = scenarios.SMOKE if args.smoke else scenarios.FULL
    if args.runs is not None:
        if args.runs < 1:
            parser.error("--runs must be at least 1")
        settings = replace(settings, runs=args.runs)
    scenario_names = list(scenarios.SCENARIOS)
    stem = "latest"
    if args.only in scenarios.GROUPS:
        scenario_names, stem = list(scenarios.GROUPS[args.only]), args.only
    elif args.only:
        scenario_names = [s.strip() for s in args.only.split(",")]
        unknown = set(scenario_names) - set(scenarios.SCENARIOS)
        if unknown:
            parser.error(f"unknown scenarios {sorted(unknown)}; known: {list(scenarios.SCENARIOS)}")
    path_names = list(labsetup.PATH_NAMES)
    if args.paths:
        path_names = [p.strip() for p in args.paths.split(",")]
        unknown = set(path_names) - set(labsetup.PATH_NAMES)
        if unknown:
            parser.error(f"unknown paths {sorted(unknown)}; known: {list(labsetup.PATH_NAMES)}")
    grpc_check = [scenarios.SYSTEM_PYTHON, "-c", "import grpc"]
    if "grpc-unary" in scenario_names and subprocess.run(grpc_check, timeout=30).returncode:
        parser.error(f"{scenarios.SYSTEM_PYTHON} cannot import grpc (python3-grpcio: install.sh)")
    out = args.out or (SMOKE_OUT if args.smoke else RESULTS)

    started = dt.datetime.now(dt.UTC)
    info = machine(instance)
    workers = os.environ.get("MESHLAB_PROXY_WORKERS", "0")
    info["proxy_workers"] = workers if workers != "0" else f"one per core ({os.cpu_count()})"
    if measured_commit:
        info.update(commit=measured_commit[:12], dirty=False, code=f"commit {args.commit}")
    else:
        info["code"] = "working tree"
    run_dir = Path(f"/tmp/meshbench-{instance}")
    try:
        measured = measure(settings, scenario_names, path_names, run_dir)
    except labsetup.LabBusy as exc:
        _log(f"lab instance {instance!r} is already up (someone else's run?): {exc}")
        return 2
    except labsetup.LabFailed as exc:
        _log(str(exc))
        return 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(code_dir, ignore_errors=True)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[0]
    samples = measured["samples"]
    report.derive_added(samples)
    sums = report.summaries(samples)
    push = json.loads(PUSH_LATENCY.read_text()) if PUSH_LATENCY.exists() else None
    finished = dt.datetime.now(dt.UTC)
    results = {
        "schema": 1,
        "command": "python -m benchmarks.run" + (f" {' '.join(argv)}" if argv else ""),
        "mode": settings.mode,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds(), 1),
        "machine": info,
        "settings": asdict(settings),
        "scenarios": scenario_names,
        "paths": {p: report.PATH_NOTES[p] for p in report.PATHS},
        "l7_levels": measured["levels"],
        "idle_proxy_cpu_cores": measured["idle_proxy_cpu_cores"],
        "metrics": report.metric_table(sums),
        "targets": report.evaluate_targets(sums, push) if stem == "latest" else [],
        "push_latency": push,
        "errors": measured["errors"],
        "samples": samples,
    }
    for path in write_outputs(results, out, settings, stem):
        _log(f"wrote {path}")
    return 1 if measured["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

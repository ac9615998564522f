"""Throughput and req/s of the mesh paths with 1 and with 2 proxy workers per node.

    sudo .venv/bin/python -m benchmarks.workers            # 3 runs of each, alternating
    sudo .venv/bin/python -m benchmarks.workers --runs 1

Each run brings the bench lab up once per worker count (MESHLAB_PROXY_WORKERS), measures
bulk TCP (1 stream) and HTTP keep-alive at 16 connections on mesh-same-node and
mesh-cross-node, and takes the lab down; worker counts alternate run by run so that drift
of the machine hits both alike. Writes results/workers.json and results/workers.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.run import DEFAULT_INSTANCE, RESULTS, _log, machine, measure, use_commit

SCENARIOS = ["tcp-1", "http-c16"]
PATHS = ["mesh-same-node", "mesh-cross-node"]
FIGURES = {  # metric id -> (label, unit)
    "tcp_1_gbps": ("bulk TCP, 1 stream", "Gbit/s"),
    "http_c16_rps": ("HTTP keep-alive, 16 connections", "req/s"),
}
WORKER_COUNTS = (1, 2)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def table(summary: dict) -> str:
    from benchmarks import stats

    lines = [
        "| figure | path | 1 worker | 2 workers | 2 / 1 |",
        "|---|---|---|---|---|",
    ]
    for metric, (label, unit) in FIGURES.items():
        for path in PATHS:
            cells = []
            medians = []
            for count in WORKER_COUNTS:
                values = [v for v in summary[str(count)].get(metric, {}).get(path, []) if v]
                if not values:
                    cells.append("—")
                    medians.append(None)
                    continue
                s = stats.summarize(values)
                medians.append(s.median)
                spread = f" ±{s.spread_pct / 2:.0f}%" if s.spread_pct is not None else ""
                cells.append(f"{_fmt(s.median)}{spread}")
            ratio = f"{medians[1] / medians[0]:.2f}x" if all(medians) else "—"
            lines.append(f"| {label} ({unit}) | {path} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--commit", metavar="REV", help="measure this commit's code")
    args = parser.parse_args(argv)
    os.environ.setdefault("MESHLAB_INSTANCE", DEFAULT_INSTANCE)
    instance = os.environ["MESHLAB_INSTANCE"]
    code_dir = Path(f"/tmp/meshbench-{instance}-code")
    commit = use_commit(args.commit, code_dir) if args.commit else None
    from benchmarks import scenarios

    settings = replace(scenarios.FULL, runs=1)
    info = machine(instance)
    if commit:
        info.update(commit=commit[:12], dirty=False)
    samples: dict[str, dict] = {str(c): {} for c in WORKER_COUNTS}
    errors: list[dict] = []
    run_dir = Path(f"/tmp/meshbench-{instance}")
    try:
        for rnd in range(args.runs):
            order = WORKER_COUNTS if rnd % 2 == 0 else tuple(reversed(WORKER_COUNTS))
            for count in order:
                os.environ["MESHLAB_PROXY_WORKERS"] = str(count)
                _log(f"run {rnd + 1}/{args.runs}: {count} proxy worker(s) per node")
                measured = measure(settings, SCENARIOS, PATHS, run_dir)
                errors += [{**e, "workers": count} for e in measured["errors"]]
                for metric, by_path in measured["samples"].items():
                    for path, values in by_path.items():
                        got = samples[str(count)].setdefault(metric, {}).setdefault(path, [])
                        got.extend(values)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(code_dir, ignore_errors=True)
    results = {
        "command": "python -m benchmarks.workers" + (f" {' '.join(argv)}" if argv else ""),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "runs": args.runs,
        "samples": samples,
        "errors": errors,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workers.json").write_text(json.dumps(results, indent=1) + "\n")
    text = (
        "# Proxy workers: 1 and 2 per node\n\n"
        f"Output of `{results['command']}`, {results['finished_at']}: medians of {args.runs} "
        "run(s), ± half the spread; worker counts alternate run by run.\n\n"
        f"Machine: {info.get('cores')} cores, kernel {info.get('kernel')}; code "
        f"`{info.get('commit', '?')}`. Clients, servers and both nodes' proxies share these "
        "cores, so a second worker can only help as far as a core is free.\n\n"
        + table(samples)
        + "\n"
        + (f"\n{len(errors)} measurement(s) failed: see workers.json.\n" if errors else "")
    )
    (args.out / "workers.md").write_text(text)
    _log(f"wrote {args.out / 'workers.md'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""The cost of one scrape of a full node's 15020, without a lab: page size, time to serve,
and the agent's resident memory before and after scrapes.

    .venv/bin/python -m benchmarks.scrape                      # 60 clients in 10 workloads
    .venv/bin/python -m benchmarks.scrape --workloads 224      # bare pods: one workload each

Proxy workers are real processes (spawned with ``PROMETHEUS_MULTIPROC_DIR``, as the agent
starts its workers) that report, through `ProxyMetrics`, one HTTP request and one TCP
connection for each client workload to each of `--services` Services, as the client's node
(reporter=source) and as the server's (reporter=destination), spread over `--workers`
processes. This process then builds `NodeMetrics` over their files, as the agent does, and
renders the page `--scrapes` times (`--reference`: with prometheus_client's collector and
generate_latest, as before issue #22). Printed as JSON: page bytes and lines, seconds per
scrape (first and median), this process's RSS before the first scrape, after it and after
the last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_WORKER = r"""
import sys
from meshagent.agent.telemetry.labels import ConnectionLabels, Peer, ServiceRef
from meshagent.agent.telemetry.metrics import ProxyMetrics

index, workers, workloads, services = map(int, sys.argv[1:5])
metrics = ProxyMetrics(None)
for w in range(index, workloads, workers):
    name = f"client-{w:03d}"
    src = Peer(name, "load", f"spiffe://cluster.local/ns/load/sa/sa-{w % 10}", name, "latest",
               name, "latest", "Kubernetes")
    for s in range(services):
        svc = f"server-{s}"
        dst = Peer(svc, "load", f"spiffe://cluster.local/ns/load/sa/{svc}", svc, "v1", svc,
                   "v1", "Kubernetes")
        ref = ServiceRef(f"{svc}.load.svc.cluster.local", svc, "load")
        for reporter in ("source", "destination"):
            http = ConnectionLabels(reporter, src, dst, ref, "http", "mutual_tls")
            metrics.http_request(http, 200, "-", 3.2, 120, 640)
            tcp = ConnectionLabels(reporter, src, dst, ref, "tcp", "mutual_tls")
            metrics.tcp_opened(tcp)
            metrics.tcp_closed(tcp, 640, 120)
"""


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(workloads: int, services: int, workers: int, scrapes: int, reference: bool) -> dict:
    from meshagent.agent.telemetry.exposition import MULTIPROC_ENV, render
    from meshagent.agent.telemetry.metrics import NodeMetrics
    from prometheus_client import generate_latest

    with tempfile.TemporaryDirectory(prefix="scrape-bench-") as folder:
        env = {**os.environ, MULTIPROC_ENV: folder}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER,
                    str(i),
                    str(workers),
                    str(workloads),
                    str(services),
                ],
                env=env,
            )
            for i in range(workers)
        ]
        for proc in procs:
            if proc.wait(timeout=300) != 0:
                raise SystemExit(f"a worker failed ({proc.returncode})")
        node = NodeMetrics(multiprocess_dir=Path(folder), include_default_registry=True)
        rss_before = _rss()
        times, rss, page = [], [], b""
        for _ in range(scrapes):
            start = time.perf_counter()
            # reference: prometheus_client's collector and generate_latest, as before #22
            page = generate_latest(node.registry) if reference else render(node.registry)[0]
            times.append(time.perf_counter() - start)
            rss.append(_rss())
        return {
            "way": "prometheus_client" if reference else "page",
            "workloads": workloads,
            "services": services,
            "workers": workers,
            "page_bytes": len(page),
            "page_lines": page.count(b"\n"),
            "first_scrape_s": round(times[0], 4),
            "median_scrape_s": round(statistics.median(times), 4),
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_after_first_mb": round(rss[0] / 2**20, 1),
            "rss_after_last_mb": round(rss[-1] / 2**20, 1),
            "rss_file_after_last_mb": round(_rss("RssFile") / 2**20, 1),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=10, help="client workloads")
    parser.add_argument("--services", type=int, default=2, help="Services each one calls")
    parser.add_argument("--workers", type=int, default=2, help="proxy worker processes")
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument(
        "--reference", action="store_true", help="prometheus_client's way (before issue #22)"
    )
    args = parser.parse_args(argv)
    figures = measure(args.workloads, args.services, args.workers, args.scrapes, args.reference)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""The node's page built from the workers' files incrementally (agent/telemetry/page.py): the
same samples prometheus_client's own collector and generate_latest give, scrape after scrape,
while workers add series and values."""

import os
import subprocess
import sys
import textwrap

from meshagent.agent.telemetry.exposition import (
    MergingCollector,
    multiprocess_collector,
    prepare_multiprocess_dir,
    render,
)
from meshagent.agent.telemetry.metrics import NodeMetrics
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import Counter, Gauge
    from meshagent.agent.telemetry.labels import ConnectionLabels, Peer, ServiceRef
    from meshagent.agent.telemetry.metrics import ProxyMetrics

    metrics = ProxyMetrics(None)
    shared = Counter("shared_things", "Counted by the agent and by workers.", ["kind"])
    ejected = Gauge("most_ejected", "livemax", ["cluster"], multiprocess_mode="livemax")
    service = ServiceRef("reviews.shop.svc.cluster.local", "reviews", "shop")
    for line in sys.stdin:
        name, n = line.split()
        labels = ConnectionLabels("source", Peer(workload=name), Peer(workload="reviews-v1"),
                                  service, "http", "mutual_tls")
        for i in range(int(n)):
            metrics.tcp_opened(labels)
            metrics.http_request(labels, 200, "-", 0.7 * i, 100 + i, 3000 * i)
            metrics.tcp_closed(labels, 1000, 100)
        shared.labels("x").inc(int(n))
        ejected.labels("c\\\\with \\"quotes\\"").set(int(n))
        print("done", flush=True)
    """
)


def _samples(body: bytes) -> set[tuple]:
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _reference(sources, folder) -> bytes:
    """What prometheus_client's own multiprocess collector and generate_latest give."""
    registry = CollectorRegistry()
    registry.register(MergingCollector([*sources, multiprocess_collector(folder)]))
    return generate_latest(registry)


def test_page_matches_prometheus_clients_scrape_as_workers_add_series(tmp_path):
    folder = tmp_path / "metrics"
    env = {**os.environ, **prepare_multiprocess_dir(folder)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]

    def report(worker, name, n):
        worker.stdin.write(f"{name} {n}\n")
        worker.stdin.flush()
        assert worker.stdout.readline().strip() == "done"

    try:
        node = NodeMetrics(multiprocess_dir=folder, include_default_registry=False)
        local_shared = Counter("shared_things", "Counted by the agent and by workers.", ["kind"],
                               registry=node.local_registry)  # fmt: skip
        local_shared.labels("x").inc(5)
        sources = [node.local_registry]
        assert _samples(render(node.registry)[0]) == _samples(_reference(sources, folder))
        report(workers[0], "frontend", 30)
        report(workers[1], "frontend", 12)
        first, _ = render(node.registry)
        assert _samples(first) == _samples(_reference(sources, folder))
        # new series in one worker, more of an old one in the other: the next scrape has both
        report(workers[0], "checkout", 7)
        report(workers[1], "frontend", 1)
        second, _ = render(node.registry)
        assert _samples(second) == _samples(_reference(sources, folder))
        totals = {
            (s[0], dict(s[1]).get("source_workload")): s[2]
            for s in _samples(second)
            if s[0] in ("istio_requests_total", "shared_things_total")
        }
        assert totals[("istio_requests_total", "frontend")] == 43
        assert totals[("istio_requests_total", "checkout")] == 7
        assert totals[("shared_things_total", None)] == 5 + 30 + 12 + 7 + 1
        # one HELP and TYPE per family
        types = [line for line in second.decode().splitlines() if line.startswith("# TYPE")]
        assert len(types) == len(set(types))
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait(timeout=30)


def test_a_corrupt_worker_file_is_left_out_and_the_rest_served(tmp_path, caplog):
    folder = tmp_path / "metrics"
    prepare_multiprocess_dir(folder)
    # used 16 bytes, then an entry of length -1; and one not JSON
    (folder / "counter_4242.db").write_bytes(b"\x10\0\0\0\0\0\0\0\xff\xff\xff\xff\0\0\0\0")
    entry = b"\x04\0\0\0" + b"{{{{" + b"\0" * 24
    (folder / "histogram_4243.db").write_bytes(
        (8 + len(entry)).to_bytes(4, "little") + b"\0" * 4 + entry
    )
    node = NodeMetrics(multiprocess_dir=folder, include_default_registry=False)
    node.set_proxy_workers(3)
    for _ in range(2):  # reported once, not at every scrape
        body, _ = render(node.registry)
        assert ("meshagent_proxy_workers", (), 3.0) in _samples(body)
    assert sum("is corrupt" in r.getMessage() for r in caplog.records) == 2
    (folder / "histogram_4243.db").write_bytes(b"stale")  # too short to say anything: empty
    assert ("meshagent_proxy_workers", (), 3.0) in _samples(render(node.registry)[0])

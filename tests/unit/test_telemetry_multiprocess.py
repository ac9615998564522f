"""Several proxy worker processes, one scrape: prometheus_client's multiprocess mode."""

import os
import subprocess
import sys
import textwrap

from meshagent.agent.telemetry.exposition import prepare_multiprocess_dir, render, worker_exited
from meshagent.agent.telemetry.metrics import NodeMetrics
from prometheus_client.parser import text_string_to_metric_families

WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry
    from meshagent.agent.telemetry.labels import ConnectionLabels, Peer, ServiceRef
    from meshagent.agent.telemetry.metrics import ProxyMetrics

    n, name = int(sys.argv[1]), sys.argv[2]
    try:
        ProxyMetrics(CollectorRegistry())
    except ValueError:
        pass
    else:
        sys.exit("a registry was accepted in multiprocess mode")
    metrics = ProxyMetrics(None)
    service = ServiceRef("reviews.shop.svc.cluster.local", "reviews", "shop")
    labels = ConnectionLabels("source", Peer(workload=name), Peer(workload="reviews-v1"), service,
                              "http", "mutual_tls")
    for i in range(n):
        metrics.tcp_opened(labels)
        metrics.http_request(labels, 200, "-", 4.0, 100, 1000)
        metrics.tcp_closed(labels, 1000, 100)
    metrics.tcp_opened(labels)  # still open while the agent scrapes
    metrics.set_tunnel_pool_connections(2)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def _scrape(registry):
    body, _ = render(registry)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _total(families, family, sample, **labels):
    return sum(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_two_worker_processes_aggregate_into_one_scrape(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_99999.db").write_bytes(b"stale")  # left by a previous agent
    env = {**os.environ, **prepare_multiprocess_dir(folder)}
    assert not (folder / "counter_99999.db").exists()

    counts = {"frontend": 25, "checkout": 40}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(n), name],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, n in counts.items()
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        node = NodeMetrics(multiprocess_dir=folder, include_default_registry=False)
        node.set_proxy_workers(len(workers))
        live = _scrape(node.registry)
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait(timeout=30)
    assert [w.returncode for w in workers] == [0, 0]

    requests = "istio_requests_total"
    assert _total(live, "istio_requests", requests) == sum(counts.values())
    for name, n in counts.items():
        assert _total(live, "istio_requests", requests, source_workload=name) == n
        assert (
            _total(live, "istio_tcp_sent_bytes", "istio_tcp_sent_bytes_total", source_workload=name)
            == 1000 * n
        )
        assert (
            _total(
                live,
                "istio_request_duration_milliseconds",
                "istio_request_duration_milliseconds_count",
                source_workload=name,
            )
            == n
        )
    opened = _total(live, "istio_tcp_connections_opened", "istio_tcp_connections_opened_total")
    assert opened == sum(counts.values()) + 2
    gauge = "meshagent_proxy_open_connections"
    assert _total(live, gauge, gauge, direction="outbound") == 2
    pool = "meshagent_tunnel_pool_connections"
    assert _total(live, pool, pool) == 4
    assert _total(live, "meshagent_proxy_workers", "meshagent_proxy_workers") == 2
    # every family appears once, so Prometheus' parser sees no duplicates
    body, _ = render(node.registry)
    type_lines = [line for line in body.decode().splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines))

    for worker in workers:
        worker_exited(worker.pid, folder)
    after = _scrape(node.registry)
    assert _total(after, "istio_requests", requests) == sum(counts.values())  # never backwards
    assert gauge not in after and pool not in after  # dead workers' live gauges are gone

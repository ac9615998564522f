"""One scrape of 15020 for the whole node: merging the agent's figures with its workers'.

What flows through: at scrape time, metric families from the agent's own registries and, when
proxy workers run in other processes, from prometheus_client's multiprocess files; out comes
one text exposition in which each family appears once.

Multiprocess mode (prometheus_client's, https://prometheus.github.io/client_python/multiprocess/):

1. At start, before any worker runs, the agent calls `prepare_multiprocess_dir(path)`: it creates
   the folder (private; a tmpfs such as ``/run/meshagent/metrics`` keeps it off disk) and
   removes files left by a previous run, then returns the environment to give workers.
2. Workers are started with that environment (``subprocess`` or multiprocessing's ``spawn``
   context, not ``fork``: prometheus_client picks its storage when it is first imported, from
   ``PROMETHEUS_MULTIPROC_DIR``). In a worker every metric, ours and any library's, writes its
   values to a per-process file there; workers build `ProxyMetrics(None)`.
3. The agent process itself does not set ``PROMETHEUS_MULTIPROC_DIR`` for itself (its own
   gauges are plain in-memory ones); it builds `NodeMetrics(multiprocess_dir=path)`, whose
   registry reads the workers' files at each scrape: incrementally, for the page
   (`meshagent.agent.telemetry.page`), or through prometheus_client's collector for
   ``collect()``.
4. When a worker exits the agent calls `worker_exited(pid, path)`, so that worker's live
   gauges (open connections, pool sizes) stop counting; its counters stay, so totals never go
   backwards.

Families that appear in several places (a library counter defined at import in the agent and
in every worker) are merged: samples with the same name and labels are summed, which is right
for counters, histograms and the ``livesum`` gauges we use. ``*_created`` samples are dropped:
they cannot be merged, multiprocess mode does not keep them and Istio does not emit them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.samples import Sample

if TYPE_CHECKING:
    from meshagent.common.httpserve import Handler
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

__all__ = [
    "MULTIPROC_ENV",
    "MergingCollector",
    "in_multiprocess_mode",
    "metrics_handler",
    "prepare_multiprocess_dir",
    "render",
    "worker_exited",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def in_multiprocess_mode() -> bool:
    """Whether this process's metrics are written to multiprocess files. prometheus_client
    decides once, when first imported, from ``PROMETHEUS_MULTIPROC_DIR``; this reads that
    decision, not the environment as it is now."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def prepare_multiprocess_dir(path: Path) -> dict[str, str]:
    """Create (mode 0700) or empty `path` for a new set of workers; returns the environment
    entries workers must be started with. Stale files from a previous agent would otherwise
    be summed into this run's counters."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    return {MULTIPROC_ENV: str(path)}


def worker_exited(pid: int, path: Path) -> None:
    """Forget a dead worker's live gauges; its counters and histograms stay in the totals."""
    mark_process_dead(pid, str(path))


class MergingCollector:
    """Collects several sources into one set of families, each name once (see module doc)."""

    def __init__(self, sources: Iterable[Collector | CollectorRegistry]) -> None:
        self._sources = list(sources)

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; reading the sources may be slow

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
        for source in self._sources:
            for family in source.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                    sums[family.name] = {}
                by_key = sums[family.name]
                for sample in family.samples:
                    if sample.name.endswith("_created") and family.type != "gauge":
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    seen = by_key.get(key)
                    if seen is None:
                        by_key[key] = sample
                    else:
                        by_key[key] = seen._replace(value=seen.value + sample.value)
        for name, family in families.items():
            family.samples = list(sums[name].values())
            yield family


def multiprocess_collector(path: Path) -> MultiProcessCollector:
    """Reads the workers' files in `path` (unregistered: a `MergingCollector` source)."""
    return MultiProcessCollector(None, path=str(path))


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition (format 0.0.4, as Envoy serves it) of `registry` and its content
    type, for the agent's ``/metrics`` and ``/stats/prometheus``; a node's registry
    (`meshagent.agent.telemetry.page.NodeRegistry`) builds it its own, cheaper way. Reads
    multiprocess files: call it off the event loop (`metrics_handler` does)."""
    render_page = getattr(registry, "render_page", None)
    if render_page is not None:
        return render_page(), CONTENT_TYPE_PLAIN_0_0_4
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """A `meshagent.common.httpserve` route handler serving `render(registry)`."""
    from meshagent.common.httpserve import Response

    async def handle(query: str) -> Response:
        body, content_type = await trio.to_thread.run_sync(render, registry)
        return Response(200, body, content_type)

    return handle

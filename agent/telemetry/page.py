"""The node's metrics page, built for a full node: the workers' files read incrementally and the
text written straight from their values.

What flows through: at each scrape, the families of the agent's own registries (small: its
gauges, the callables' collectors) and the values in the proxy workers' multiprocess files
(large: Istio's metrics for every workload pair); out comes one text exposition (format 0.0.4)
in which each family appears once, samples of the same name and labels summed.

Why not prometheus_client's MultiProcessCollector and generate_latest: at each scrape they
JSON-decode every entry of every worker file and build a Python object per sample, twice
(collector, then merge), then escape every label again: CPU and short-lived memory in
proportion to the page, which at 100 pods a node was seconds and hundreds of MB. Here:

- a worker file (prometheus_client's MmapedDict: entries appended, values updated in place,
  never moved) is mapped once; its new entries' keys are decoded once, when they appear, into
  a series id; a scrape reads only each entry's 8-byte value at its known offset;
- a series' labels are rendered once (sorted, escaped) and kept as that string, shared by all
  samples with the same labels (a histogram's buckets, the same labels in each worker): the
  lasting memory is about one line per label set;
- histogram buckets (stored per worker, not cumulative) are summed and made cumulative per
  label set, ``_count`` from them, as prometheus_client does;
- gauges follow their multiprocess mode (``livesum``/``sum`` summed, ``livemax``/``max``,
  ``livemin``/``min``, ``all``/``liveall`` per pid); a file that is gone (a dead worker's live
  gauges, `worker_exited`) drops out;
- lines are as generate_latest writes them (labels sorted, empty ones kept as Istio's proxy
  keeps ``grpc_response_status=""``), so what users parse does not change.

``*_created`` samples are dropped as before (they cannot be merged; Istio does not emit them).
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from meshagent.agent.telemetry.exposition import MergingCollector, multiprocess_collector
from meshagent.common.heap import trim_heap
from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["NodePage", "NodeRegistry", "WorkerFiles"]

log = logging.getLogger(__name__)

_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")
_TWO_DOUBLES = struct.Struct("dd")
_SUMMED_GAUGES = frozenset({"sum", "livesum"})
_MERGED_GAUGES = _SUMMED_GAUGES | {"max", "livemax", "min", "livemin"}
_LABEL_CACHE_LIMIT = 100_000
_CHUNK_LINES = 512


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Labels:
    """Rendered label sets, interned: labels (name -> value) to ``a="x",b="y"``."""

    def __init__(self) -> None:
        self._cache: dict[tuple[tuple[str, str], ...], str] = {}

    def render(self, labels: Iterable[tuple[str, str]]) -> str:
        key = tuple(sorted(labels))
        text = self._cache.get(key)
        if text is None:
            if len(self._cache) >= _LABEL_CACHE_LIMIT:
                self._cache.clear()  # bounded; strings in use stay referenced by series
            text = self._cache[key] = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
        return text


class _Series:
    """One entry of the worker files: the family it belongs to and the line it makes."""

    __slots__ = ("family", "kind", "labels", "le", "mode", "name")

    def __init__(
        self, family: str, kind: str, name: str, labels: str, le: float | None, mode: str
    ) -> None:
        self.family = family
        self.kind = kind
        self.name = name
        self.labels = labels
        self.le = le
        self.mode = mode


class _File:
    """One worker file, mapped once; `positions` and `series` grow as the worker adds
    series. `inode` tells a file made again under the same name (a reused pid)."""

    def __init__(self, path: Path, kind: str, mode: str, pid: str, inode: int) -> None:
        self.path, self.kind, self.mode, self.pid, self.inode = path, kind, mode, pid, inode
        self.offset = 8  # first entry; the file starts with its used size and padding
        self.positions: list[int] = []
        self.series: list[_Series] = []
        self._file = open(path, "rb")  # noqa: SIM115 - kept open while the file exists
        self._map: mmap.mmap | None = None

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()

    def _mapped(self) -> mmap.mmap | None:
        size = os.fstat(self._file.fileno()).st_size
        if self._map is None or len(self._map) < size:
            if self._map is not None:
                self._map.close()
            self._map = (
                mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ) if size else None
            )
        return self._map

    def refresh(self, decode) -> mmap.mmap | None:
        """Decode the entries added since the last scrape; the map to read values from."""
        data = self._mapped()
        if data is None:
            return None
        used = min(_INT.unpack_from(data, 0)[0], len(data))
        pos = self.offset
        while pos + 4 <= used:
            length = _INT.unpack_from(data, pos)[0]
            if length <= 0:
                raise ValueError(f"entry of length {length} at {pos}")
            start = pos + 4
            value_at = start + length + (8 - (length + 4) % 8)
            if value_at + 16 > used:
                break  # being written: next scrape
            series = decode(data[start : start + length].decode("utf-8"), self)
            self.positions.append(value_at)
            self.series.append(series)
            pos = self.offset = value_at + 16
        return data


class WorkerFiles:
    """The workers' files in `path`, read incrementally (module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, _File] = {}
        self._labels = _Labels()
        self._help: dict[str, str] = {}  # family -> help, as the workers defined it
        self._broken: set[str] = set()  # files reported corrupt (once each)

    def _decode(self, key: str, file: _File) -> _Series:
        family, name, labels, help_text = json.loads(key)
        self._help.setdefault(family, help_text)
        le = labels.pop("le", None)
        if file.kind == "gauge" and file.mode not in _MERGED_GAUGES:
            labels["pid"] = file.pid  # all / liveall / mostrecent: one series per worker
        return _Series(
            family,
            file.kind,
            name,
            self._labels.render(labels.items()),
            None if le is None else float(le),
            file.mode,
        )

    def read(self, page: _Page) -> None:
        """Add the current values of every worker file to `page`."""
        present = set()
        for entry in os.scandir(self.path):
            if not entry.name.endswith(".db"):
                continue
            present.add(entry.name)
            file = self._files.get(entry.name)
            try:
                inode = entry.inode()
                if file is not None and file.inode != inode:
                    self._files.pop(entry.name).close()
                    file = None
                if file is None:
                    parts = entry.name[:-3].split("_")
                    kind = parts[0]
                    mode = parts[1] if kind == "gauge" and len(parts) > 2 else ""
                    file = _File(Path(entry.path), kind, mode, parts[-1], inode)
                    self._files[entry.name] = file
                data = file.refresh(self._decode)
            except FileNotFoundError:
                continue  # a live gauge file removed since the listing
            except (ValueError, TypeError, struct.error) as exc:  # JSON and UTF-8 errors too
                if entry.name not in self._broken:
                    self._broken.add(entry.name)
                    log.warning("metrics file %s is corrupt, left out: %s", entry.path, exc)
                continue
            if data is None:
                continue
            for at, series in zip(file.positions, file.series, strict=True):
                if series.mode == "mostrecent" or series.mode == "livemostrecent":
                    value, stamp = _TWO_DOUBLES.unpack_from(data, at)
                    page.add_recent(series, value, stamp)
                else:
                    page.add_series(series, _DOUBLE.unpack_from(data, at)[0])
            # the pages stay in the page cache (the worker writes them); out of our RSS
            data.madvise(mmap.MADV_DONTNEED)
        for name in set(self._files) - present:
            self._files.pop(name).close()
        for family, help_text in self._help.items():
            page.help.setdefault(family, help_text)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


class _Page:
    """One scrape's families being merged."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.help: dict[str, str] = {}
        self.samples: dict[str, dict[tuple[str, str], float]] = {}
        self.buckets: dict[tuple[str, str], dict[float, float]] = {}
        self.recent: dict[tuple[str, str, str], tuple[float, float]] = {}

    def _family(self, family: str, kind: str) -> dict[tuple[str, str], float]:
        samples = self.samples.get(family)
        if samples is None:
            samples = self.samples[family] = {}
            self.types[family] = kind
        return samples

    def declare(self, family: str, kind: str) -> None:
        self._family(family, kind)

    def add(self, family: str, kind: str, name: str, labels: str, value: float) -> None:
        samples = self._family(family, kind)
        key = (name, labels)
        samples[key] = samples.get(key, 0.0) + value

    def add_series(self, s: _Series, value: float) -> None:
        samples = self._family(s.family, s.kind)
        key = (s.name, s.labels)
        if s.le is not None:  # a worker's bucket, not cumulative
            group = self.buckets.setdefault((s.family, s.labels), {})
            group[s.le] = group.get(s.le, 0.0) + value
            return
        if s.mode in ("max", "livemax"):
            samples[key] = max(samples.get(key, value), value)
        elif s.mode in ("min", "livemin"):
            samples[key] = min(samples.get(key, value), value)
        else:
            samples[key] = samples.get(key, 0.0) + value

    def add_recent(self, s: _Series, value: float, stamp: float) -> None:
        key = (s.family, s.name, s.labels)
        if key not in self.recent or self.recent[key][1] < stamp:
            self.recent[key] = (value, stamp)

    def text(self) -> bytes:
        for (family, name, labels), (value, _stamp) in self.recent.items():
            self._family(family, "gauge")[(name, labels)] = value
        for (family, labels), by_le in self.buckets.items():
            samples = self.samples[family]
            total = 0.0
            for le in sorted(by_le):
                total += by_le[le]
                key = (f"{family}_bucket", _with_le(labels, le))
                samples[key] = samples.get(key, 0.0) + total
            count = (f"{family}_count", labels)
            samples[count] = samples.get(count, 0.0) + total
        out = io.BytesIO()
        lines: list[str] = []
        for family, samples in self.samples.items():
            kind = self.types[family]
            shown, typ = _shown(family, kind)
            doc = self.help.get(family, "").replace("\\", r"\\").replace("\n", r"\n")
            lines.append(f"# HELP {shown} {doc}\n# TYPE {shown} {typ}\n")
            for (name, labels), value in samples.items():
                value_text = floatToGoString(value)
                lines.append(
                    f"{name}{{{labels}}} {value_text}\n" if labels else f"{name} {value_text}\n"
                )
                if len(lines) >= _CHUNK_LINES:  # a few lines at a time: no page-sized garbage
                    out.write("".join(lines).encode())
                    lines.clear()
        out.write("".join(lines).encode())
        return out.getvalue()


def _with_le(labels: str, le: float) -> str:
    # le sorts after every label Istio's metrics have; place it last, as prometheus_client does
    bound = f'le="{floatToGoString(le)}"'
    return f"{labels},{bound}" if labels else bound


def _shown(family: str, kind: str) -> tuple[str, str]:
    """The name and type the text format 0.0.4 gives a family (as generate_latest does)."""
    if kind == "counter":
        return f"{family}_total", "counter"
    if kind == "info":
        return f"{family}_info", "gauge"
    if kind in ("stateset",):
        return family, "gauge"
    if kind == "gaugehistogram":
        return family, "histogram"
    if kind == "unknown":
        return family, "untyped"
    return family, kind


class NodePage:
    """The page of one node: `sources` (the agent's registries) and the workers' files."""

    def __init__(self, sources: Iterable[Collector], worker_files: WorkerFiles | None) -> None:
        self._sources = list(sources)
        self._workers = worker_files
        self._labels = _Labels()

    def render(self) -> bytes:
        page = _Page()
        for source in self._sources:
            for family in source.collect():
                page.help.setdefault(family.name, family.documentation)
                page.declare(family.name, family.type)  # shown even without samples yet
                for s in family.samples:
                    if s.name.endswith("_created") and family.type != "gauge":
                        continue
                    le = s.labels.get("le")
                    if le is None:
                        labels = self._labels.render(s.labels.items())
                    else:  # le last, as the workers' buckets are written
                        rest = self._labels.render((k, v) for k, v in s.labels.items() if k != "le")
                        labels = _with_le(rest, float(le))
                    page.add(family.name, family.type, s.name, labels, s.value)
        if self._workers is not None:
            self._workers.read(page)
        return page.text()


class NodeRegistry(CollectorRegistry):
    """`NodeMetrics.registry`: `collect()` like any registry (the merged families, for tools and
    tests); `render_page()` the page, built as the module docstring says. Scrapes may come
    from several threads at once: one builds the page at a time."""

    def __init__(self, sources: Iterable[Collector], multiprocess_dir: Path | None) -> None:
        super().__init__()
        sources = list(sources)
        merged = [*sources]
        if multiprocess_dir is not None:
            merged.append(multiprocess_collector(multiprocess_dir))
        self.register(MergingCollector(merged))
        files = WorkerFiles(multiprocess_dir) if multiprocess_dir is not None else None
        self._page = NodePage(sources, files)
        self._lock = threading.Lock()

    def render_page(self) -> bytes:
        with self._lock:
            page = self._page.render()
            trim_heap()  # the heap a scrape freed (glibc would keep the largest's)
            return page

"""The proxy workers' metric values: prometheus_client's multiprocess files, written by one
thread of a forked process at a fraction of prometheus_client's cost per update.

Why not prometheus_client's own multiprocess value (``values.MultiProcessValue``): each update
takes a lock, asks the kernel for the pid (glibc no longer caches it), finds its key's offset
in a dict and packs the value, ~10 Python calls and a system call; a request reported at one
end updates seven values (a counter and three histograms, each its sum and a bucket), ~70 of
the ~480 Python calls a relayed request costs a node (benchmarks/README.md, "Python calls per
connection and per message, counted"). Here an update is an add and a 16-byte store at an
offset found at the value's first use.

The files are prometheus_client's format (its ``mmap_dict.MmapedDict``: a used size, then
entries appended and never moved: key length, UTF-8 key padded to 8 bytes, value and
timestamp as doubles; one file per kind and process, ``counter_<pid>.db``,
``gauge_livesum_<pid>.db``, ...), so the agent's page (`page.py`), prometheus_client's
``MultiProcessCollector`` and ``mark_process_dead`` read them as before
(tests/unit/test_worker_metric_store.py).

What a value relies on:

- **One thread.** A worker updates its metrics only from its trio thread, so nothing locks.
- **Forks.** A value is entered in its process's file when it is made, as prometheus_client
  does (a histogram shows all its buckets). A value made before a fork (the agent imports the
  workers' code, making their metrics, before it forks: ``forkserver.import_workers_code``)
  writes to the files of the process that updates it: a fork starts a new set of files in the
  child, opened at their first use, and a value's first update there counts from what that
  process's file holds for it (nothing, for a new process), as prometheus_client's does.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict, mmap_key

__all__ = ["workers_value_class"]

_INT = struct.Struct("i")
_TWO_DOUBLES = struct.Struct("dd")
_INITIAL_SIZE = 1 << 16
_FIRST_ENTRY = 8  # the used size (4 bytes) and padding


class _File:
    """One of a process's files, opened for writing: entries appended, values updated in
    place. A value keeps its entry's offset; `map` is replaced when the file grows."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a+b")  # noqa: SIM115 - kept open for the process's life
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            size = _INITIAL_SIZE
            self._file.truncate(size)
        self.map = mmap.mmap(self._file.fileno(), size)
        self._offsets: dict[str, int] = {}
        self._used = _INT.unpack_from(self.map, 0)[0]
        if self._used == 0:
            self._used = _FIRST_ENTRY
            self.map[0:4] = _INT.pack(self._used)
        else:  # a file a process with this pid left (pids are reused): go on from its values
            for key, _value, _stamp, at in MmapedDict.read_all_values_from_file(str(path)):
                self._offsets[key] = at

    def offset(self, key: str) -> int:
        """Where `key`'s value and timestamp are, appending an entry (zero) for a new key."""
        at = self._offsets.get(key)
        if at is None:
            encoded = key.encode("utf-8")
            padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
            entry = _INT.pack(len(encoded)) + padded + _TWO_DOUBLES.pack(0.0, 0.0)
            while self._used + len(entry) > len(self.map):
                size = 2 * len(self.map)
                self._file.truncate(size)
                self.map = mmap.mmap(self._file.fileno(), size)
            self.map[self._used : self._used + len(entry)] = entry
            self._used += len(entry)
            # a reader takes an entry only once the used size covers it: written last
            self.map[0:4] = _INT.pack(self._used)
            at = self._offsets[key] = self._used - 16
        return at

    def close(self) -> None:
        self.map.close()
        self._file.close()


class _Process:
    """The files of the process that updates values: made at the first update after a fork."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self.files: dict[str, _File] = {}

    def file(self, prefix: str) -> _File:
        file = self.files.get(prefix)
        if file is None:
            path = Path(self.directory, f"{prefix}_{self.pid}.db")
            file = self.files[prefix] = _File(path)
        return file

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files.clear()


class _Storage:
    """The values of one directory: the process whose files they write to now (its files
    opened at their first use)."""

    def __init__(self, directory: str) -> None:
        self.process = _Process(directory)
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.process.close()  # the parent's files, mapped in this child too
        self.process = _Process(self.process.directory)


def workers_value_class(directory: str) -> type:
    """A prometheus_client value class (what ``values.ValueClass`` holds when a metric is
    made) writing to `directory`'s multiprocess files; see the module docstring."""
    storage = _Storage(directory)

    class WorkerValue:
        _multiprocess = True  # what exposition.in_multiprocess_mode reads
        __slots__ = ("_at", "_file", "_key_parts", "_prefix", "_process", "_stamp", "_value")

        def __init__(
            self,
            typ: str,
            metric_name: str,
            name: str,
            labelnames,
            labelvalues,
            help_text: str,
            multiprocess_mode: str = "",
            **kwargs,
        ) -> None:
            self._prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
            self._key_parts = (metric_name, name, labelnames, labelvalues, help_text)
            # an entry now, as prometheus_client makes it: a histogram's buckets all appear
            # on the page once it has a child, not only those that were ever hit
            self._bind()

        def _bind(self) -> None:
            process = self._process = storage.process
            self._file = process.file(self._prefix)
            # prometheus_client's key: it names the series in every process's file
            self._at = self._file.offset(mmap_key(*self._key_parts))
            self._value, self._stamp = _TWO_DOUBLES.unpack_from(self._file.map, self._at)

        def inc(self, amount: float) -> None:
            if self._process is not storage.process:
                self._bind()
            value = self._value = self._value + amount
            at = self._at
            # a slice store, not pack_into (which zeroes the bytes first: a reader could see 0)
            self._file.map[at : at + 16] = _TWO_DOUBLES.pack(value, 0.0)

        def set(self, value: float, timestamp: float | None = None) -> None:
            if self._process is not storage.process:
                self._bind()
            self._value, self._stamp = value, timestamp or 0.0
            at = self._at
            self._file.map[at : at + 16] = _TWO_DOUBLES.pack(value, self._stamp)

        def get(self) -> float:
            if self._process is not storage.process:
                self._bind()
            return self._value

        def set_exemplar(self, exemplar) -> None:
            return  # prometheus_client keeps no exemplars in multiprocess mode either

        def get_exemplar(self) -> None:
            return None

    return WorkerValue

"""A directory of manifests as a cluster source (the lab's, or any GitOps folder).

The folder is polled for changed files; on a change every file is read again
and each kind is replaced whole in the model, so a deleted file or object
disappears too. A file that does not parse (not YAML, not UTF-8, not Kubernetes
objects) is reported in `errors` and logged once, and its previous content kept,
so a half-written edit never empties the cluster. Whether the objects in it are
valid Istio resources is the validator's business, not the source's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from meshagent.common.manifests import ManifestError, load_documents
from meshagent.controller.sources.sink import ClusterSink

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2
PATTERNS = ("*.yaml", "*.yml", "*.json")


def _fingerprint(folder: Path) -> dict[Path, tuple[int, int]]:
    out = {}
    for pattern in PATTERNS:
        for path in folder.glob(pattern):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out[path] = (st.st_mtime_ns, st.st_size)
    return out


class FileSource:
    def __init__(self, folder: Path, sink: ClusterSink) -> None:
        self.folder = folder
        self.sink = sink
        self._by_file: dict[Path, list[dict]] = {}
        self.errors: dict[str, str] = {}
        self._kinds_seen: set[str] = set()

    def load(self) -> None:
        """Read every file and replace each kind in the sink."""
        current = _fingerprint(self.folder)
        for path in list(self._by_file):
            if path not in current:
                del self._by_file[path]
        before, self.errors = self.errors, {}
        for path in sorted(current):
            try:
                self._by_file[path] = load_documents(path.read_text(), str(path))
            except (ManifestError, OSError, UnicodeDecodeError) as exc:
                self.errors[str(path)] = str(exc)
                if before.get(str(path)) != str(exc):  # once per problem, not once per poll
                    log.error("manifest rejected: %s", exc)
        by_kind: dict[str, list[dict]] = {}
        for objects in self._by_file.values():
            for obj in objects:
                by_kind.setdefault(obj["kind"], []).append(obj)
        for kind in set(by_kind) | self._kinds_seen:
            self.sink.replace(kind, by_kind.get(kind, []))
        self._kinds_seen = set(by_kind) | self._kinds_seen

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        seen = _fingerprint(self.folder)
        self.load()
        task_status.started()
        while True:
            await trio.sleep(POLL_INTERVAL)
            now = _fingerprint(self.folder)
            if now != seen:
                seen = now
                self.load()

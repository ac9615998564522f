"""The controller's one model of the cluster, fed by a source (files or Kubernetes).

Sources call replace/upsert/delete with plain Kubernetes object dicts; the
model keeps them by (kind, namespace, name) and bumps its generation, waking
whoever waits for a change (the push server). It does no parsing: the
compiler reads the objects when it builds snapshots.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds


def object_key(obj: dict) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", "") or "", meta.get("name", "") or ""


class ClusterModel:
    """Objects by kind; a generation counter and an event for changes."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[Key, dict]] = {}
        self.generation = 0
        self._changed = trio.Event()

    # -- the sink interface used by every source ----------------------------------------

    def replace(self, kind: str, objects: list[dict]) -> None:
        new = {object_key(o): o for o in objects}
        if self._objects.get(kind) != new:
            self._objects[kind] = new
            self._bump()

    def upsert(self, kind: str, obj: dict) -> None:
        by_key = self._objects.setdefault(kind, {})
        key = object_key(obj)
        if by_key.get(key) != obj:
            by_key[key] = obj
            self._bump()

    def delete(self, kind: str, obj: dict) -> None:
        if self._objects.get(kind, {}).pop(object_key(obj), None) is not None:
            self._bump()

    # -- readers ------------------------------------------------------------------------

    def objects(self, kind: str) -> Iterable[dict]:
        return self._objects.get(kind, {}).values()

    def kinds(self) -> list[str]:
        """The kinds the model has held objects of (some may have none now)."""
        return list(self._objects)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._objects.get(kind, {}).get((namespace, name))

    async def wait_changed(self, seen_generation: int) -> int:
        """Return the generation once it is newer than `seen_generation`."""
        while self.generation == seen_generation:
            await self._changed.wait()
        return self.generation

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()

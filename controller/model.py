"""The controller's one model of the cluster, fed by a source (files or Kubernetes).

Sources call replace/upsert/delete with plain Kubernetes object dicts; the
model keeps them by (kind, namespace, name) and bumps its generation, waking
whoever waits for a change (the push server). It does no parsing: the
compiler reads the objects when it builds snapshots.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import trio

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds
# How many changes the model remembers by key (`changed_since`): a reader further behind than
# this (or behind a `replace` of the kind) looks at every object of the kind instead.
JOURNAL = 4096


def object_key(obj: dict) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", "") or "", meta.get("name", "") or ""


class ClusterModel:
    """Objects by kind; a generation counter and an event for changes."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[Key, dict]] = {}
        self.generation = 0
        self._changed = trio.Event()
        # (generation, kind, key changed; None for a whole kind replaced), one per generation
        self._journal: deque[tuple[int, str, Key | None]] = deque(maxlen=JOURNAL)

    # -- the sink interface used by every source ----------------------------------------

    def replace(self, kind: str, objects: list[dict]) -> None:
        new = {object_key(o): o for o in objects}
        if self._objects.get(kind) != new:
            self._objects[kind] = new
            self._bump(kind, None)

    def upsert(self, kind: str, obj: dict) -> None:
        by_key = self._objects.setdefault(kind, {})
        key = object_key(obj)
        if by_key.get(key) != obj:
            by_key[key] = obj
            self._bump(kind, key)

    def delete(self, kind: str, obj: dict) -> None:
        key = object_key(obj)
        if self._objects.get(kind, {}).pop(key, None) is not None:
            self._bump(kind, key)

    # -- readers ------------------------------------------------------------------------

    def objects(self, kind: str) -> Iterable[dict]:
        return self._objects.get(kind, {}).values()

    def kinds(self) -> list[str]:
        """The kinds the model has held objects of (some may have none now)."""
        return list(self._objects)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._objects.get(kind, {}).get((namespace, name))

    def changed_since(self, kind: str, generation: int) -> set[Key] | None:
        """The keys of `kind` upserted or deleted after `generation`, so a reader can look at
        those objects only; None when the model cannot say (a `replace` of the kind, or more
        than `JOURNAL` changes since)."""
        if generation >= self.generation:
            return set()
        if not self._journal or self._journal[0][0] > generation + 1:
            return None
        keys: set[Key] = set()
        for changed, of_kind, key in reversed(self._journal):
            if changed <= generation:
                break
            if of_kind == kind:
                if key is None:
                    return None
                keys.add(key)
        return keys

    async def wait_changed(self, seen_generation: int) -> int:
        """Return the generation once it is newer than `seen_generation`."""
        while self.generation == seen_generation:
            await self._changed.wait()
        return self.generation

    def _bump(self, kind: str, key: Key | None) -> None:
        self.generation += 1
        self._journal.append((self.generation, kind, key))
        self._changed.set()
        self._changed = trio.Event()

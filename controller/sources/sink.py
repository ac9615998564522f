"""What every cluster source feeds: the controller's model implements this.

Objects are plain Kubernetes object dicts as in manifests (apiVersion, kind,
metadata, spec, status); `kind` is the Kind name ("Pod", "AuthorizationPolicy").
Calls are synchronous and cheap: the model records and schedules a recompile.
"""

from __future__ import annotations

from typing import Protocol


class ClusterSink(Protocol):
    def replace(self, kind: str, objects: list[dict]) -> None: ...  # full (re)list of one kind

    def upsert(self, kind: str, obj: dict) -> None: ...

    def delete(self, kind: str, obj: dict) -> None: ...

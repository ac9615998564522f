"""Entry point from raw documents to typed Istio resources.

Documents (dicts from YAML manifests or the Kubernetes API) flow in; typed models of the
supported kinds flow out, or a ResourceError saying which resource and which field (in the
YAML's own camelCase form, e.g. `spec.http[0].route[1].weight`) is wrong and why. Both the
controller (watching Kubernetes or reading manifest files) and offline tools (`meshctl`) parse
through here, so users get the same message wherever a resource is refused.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from meshagent.common.istio.networking import DestinationRule, VirtualService
from meshagent.common.istio.security import (
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
)
from meshagent.common.istio.serviceentry import ServiceEntry
from meshagent.common.istio.support import skip_reason, unsupported_hint
from meshagent.common.istio.telemetry import Telemetry
from pydantic import ValidationError

IstioResource = (
    AuthorizationPolicy
    | PeerAuthentication
    | RequestAuthentication
    | VirtualService
    | DestinationRule
    | ServiceEntry
    | Telemetry
)

_MODELS: dict[str, type[IstioResource]] = {
    "AuthorizationPolicy": AuthorizationPolicy,
    "PeerAuthentication": PeerAuthentication,
    "RequestAuthentication": RequestAuthentication,
    "VirtualService": VirtualService,
    "DestinationRule": DestinationRule,
    "ServiceEntry": ServiceEntry,
    "Telemetry": Telemetry,
}
SUPPORTED_KINDS: frozenset[str] = frozenset(_MODELS)

_UNNAMED = "<unnamed>"


class ResourceError(Exception):
    """A resource was refused. `path` is the field in YAML form ("" for the whole resource);
    `problems` lists every (path, message) found, the first being `path`/`message`."""

    def __init__(
        self,
        kind: str,
        namespace: str,
        name: str,
        path: str,
        message: str,
        more: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.path = path
        self.message = message
        self.problems: tuple[tuple[str, str], ...] = ((path, message), *more)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.kind} {self.namespace}/{self.name}"
        return f"{where}: " + "; ".join(
            f"{path}: {message}" if path else message for path, message in self.problems
        )


class ResourceSkipped(ResourceError):
    """A resource that does not concern meshagent (bound to gateways only, hidden by
    `exportTo`, or for hosts outside the cluster): not applied, reported as a warning, not an
    error. A ResourceError, so code that only applies accepted resources leaves it out."""


def format_path(loc: Iterable[int | str]) -> str:
    """Render a pydantic error location in YAML form: `spec.http[0].route[1].weight`.

    The models validate by alias, so locations already carry the camelCase wire names.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            out += f".{part}" if out else part
    return out


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        loc = error.get("loc") or ("",)
        return unsupported_hint(str(loc[-1]))
    if kind == "missing":
        return "required field is missing"
    if kind == "too_short":
        least = (error.get("ctx") or {}).get("min_length", 1)
        return "must not be empty" if least == 1 else f"needs at least {least} items"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    value = error.get("input")
    if isinstance(value, str | int | float | list | tuple):
        return f"{error['msg']} (got {value!r})"
    return str(error["msg"])


def _one_per_cause(errors: list[Any]) -> list[Any]:
    """Drop what follows from an unsupported field: with `redirect` instead of `route`, the
    missing `route` (or the object's own check) is noise beside the cause. Problems of other
    fields are kept: each is a cause of its own."""
    extra = [tuple(e["loc"][:-1]) for e in errors if e["type"] == "extra_forbidden"]
    if not extra:
        return errors
    kept, hints = [], set()
    for e in errors:
        loc = tuple(e["loc"])
        if any(loc == p or (loc[:-1] == p and e["type"] == "missing") for p in extra):
            continue
        if e["type"] == "extra_forbidden":
            cause = (loc[:-1], unsupported_hint(str(loc[-1])))
            if cause in hints:
                continue  # mirror + mirrorPercentage: one feature, one message
            hints.add(cause)
        kept.append(e)
    return kept


def _identity(doc: Mapping[str, Any], default_namespace: str) -> tuple[str, str, str]:
    kind = doc.get("kind")
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name")
    namespace = meta.get("namespace")
    return (
        kind if isinstance(kind, str) and kind else "resource",
        namespace if isinstance(namespace, str) and namespace else default_namespace,
        name if isinstance(name, str) and name else _UNNAMED,
    )


def parse_resource(
    doc: Mapping[str, Any], default_namespace: str = "default", entry_hosts: Collection[str] = ()
) -> IstioResource:
    """Validate one document into its typed model; `default_namespace` fills a missing
    `metadata.namespace` (as `kubectl apply` would); `entry_hosts` are the hosts accepted
    ServiceEntries declare (`serviceentry.entry_hosts`). Raises ResourceError."""
    if not isinstance(doc, Mapping):
        raise ResourceError(
            "resource",
            default_namespace,
            _UNNAMED,
            "",
            f"a resource must be a mapping, got {type(doc).__name__}",
        )
    kind, namespace, name = _identity(doc, default_namespace)
    raw_kind = doc.get("kind")
    model = _MODELS.get(raw_kind) if isinstance(raw_kind, str) else None
    if model is None:
        supported = ", ".join(sorted(SUPPORTED_KINDS))
        message = (
            f"kind {raw_kind!r} is not supported (supported: {supported})"
            if "kind" in doc
            else f"required field is missing (one of: {supported})"
        )
        raise ResourceError(kind, namespace, name, "kind", message)

    skip = skip_reason(doc, namespace, entry_hosts)
    if skip is not None:
        raise ResourceSkipped(kind, namespace, name, *skip)
    meta = doc.get("metadata")
    if isinstance(meta, Mapping) and not meta.get("namespace"):
        doc = {**doc, "metadata": {**meta, "namespace": default_namespace}}
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        errors = _one_per_cause(exc.errors())
        problems = [(format_path(err["loc"]), _message(err)) for err in errors]
        (path, message), *more = problems
        raise ResourceError(kind, namespace, name, path, message, more) from None


def parse_documents(
    docs: Iterable[Mapping[str, Any] | None], default_namespace: str = "default"
) -> tuple[list[IstioResource], list[ResourceError]]:
    """Parse every document, collecting the good ones and an error for each bad one; never
    stops at the first bad document. Empty documents (None, as yaml.safe_load_all yields for a
    bare `---`) are skipped; any other kind than the supported Istio kinds is an error."""
    resources: list[IstioResource] = []
    errors: list[ResourceError] = []
    for doc in docs:
        if doc is None:
            continue
        try:
            resources.append(parse_resource(doc, default_namespace))
        except ResourceError as exc:
            errors.append(exc)
    return resources, errors

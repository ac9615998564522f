"""The snapshot in force as the controller sent it, kept in pieces so a delta costs work in
proportion to what it changes (issue 19, item 1).

Each keyed collection (common/snapshotdelta.py `COLLECTIONS`) is kept item by item, in the
compiler's order: the item's JSON as received, written as the content version hashes it
(common/snapshot.py `wire_version`: sorted keys, default separators), and its validated model.
`HeldDocument.apply` validates only the upserted items and the changed scalars, reuses every
other item's model and JSON, and checks the content version from the kept pieces (one join and
one SHA-256: the same version as hashing the whole document, so an agent and a controller of
different releases agree on it as before). It leads to exactly what `snapshotdelta.apply`
followed by `Snapshot.model_validate` gives (tests/unit/test_view_delta.py). A held document
is never changed: `apply` returns a new one, so a failed delta leaves nothing changed.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshagent.common import snapshotdelta
from meshagent.common.snapshot import Snapshot, joined_version
from pydantic import BaseModel, ValidationError


class DeltaRefused(ValueError):
    """The delta cannot lead to a snapshot this agent serves; the message says why."""


# what `json.dumps(value, sort_keys=True)` writes, made once (dumps makes an encoder per call:
# twice the time over the 30,000 items of a whole snapshot)
_text: Callable[[Any], str] = json.JSONEncoder(sort_keys=True).encode


@dataclass(frozen=True)
class _Collection:
    """One keyed list field: by key (in the compiler's order) each item's JSON as received
    (sorted keys: a str, which the garbage collector does not walk) and its model."""

    text: dict[str, str]
    models: dict[str, BaseModel]
    ordered: bool = True  # in the compiler's order (a controller always sends it so)
    # an item had no key (accepted whole: a Telemetry the agent cannot read is ignored, not
    # refused), so a delta cannot name its items: one that changes this collection is refused
    unkeyed: bool = False

    @functools.cached_property
    def joined(self) -> str:
        """The collection's JSON, joined once (an unchanged collection is the same object in
        the next document, so it is not joined again)."""
        return "[" + ", ".join(self.text.values()) + "]"

    def model_list(self) -> list[BaseModel]:
        return list(self.models.values())


@dataclass(frozen=True)
class Changed:
    """What a delta changed, for building the next view from the previous one: per collection
    the models it replaced or removed and the models it upserted; the scalars it set."""

    before: dict[str, list[BaseModel]] = field(default_factory=dict)
    after: dict[str, list[BaseModel]] = field(default_factory=dict)
    scalars: frozenset[str] = frozenset()

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self.after) | frozenset(self.before) | self.scalars


@dataclass(frozen=True)
class HeldDocument:
    snapshot: Snapshot
    collections: dict[str, _Collection]
    other: dict[str, Any]  # every other top-level field as received (scalars, node, version)
    # every item of the document is kept (no key twice in a collection): `version` is then
    # the document's as sent; else the first delta drops the repeats, as snapshotdelta does
    exact: bool = True

    @classmethod
    def of(cls, data: Mapping[str, Any], snapshot: Snapshot) -> HeldDocument:
        """``data`` (validated whole as ``snapshot``) kept in pieces."""
        collections: dict[str, _Collection] = {}
        other: dict[str, Any] = {}
        exact = True
        for name, value in data.items():
            if name in snapshotdelta.COLLECTIONS and isinstance(value, list):
                keys, unkeyed = _keys(name, value)
                models = getattr(snapshot, name)
                order = snapshotdelta.ORDER[name]
                collections[name] = kept = _Collection(
                    {k: _text(item) for k, item in zip(keys, value, strict=True)},
                    dict(zip(keys, models, strict=True)),
                    _ordered(value, order),
                    unkeyed,
                )
                exact = exact and len(kept.text) == len(value)
            else:
                other[name] = value
        return cls(snapshot, collections, other, exact)

    def _pieces(self) -> dict[str, str]:
        pieces = {name: _text(value) for name, value in self.other.items()}
        pieces.update((name, c.joined) for name, c in self.collections.items())
        return pieces

    def version(self) -> str:
        """The content version of the document held (`wire_version` of it, from the pieces)."""
        return joined_version(self._pieces(), str(self.other.get("node", "")))

    def document_parts(self) -> Iterator[str]:
        """The document as JSON text, in parts (written to disk without joining them)."""
        yield "{"
        for i, (name, piece) in enumerate(self._pieces().items()):
            yield f"{', ' if i else ''}{json.dumps(name)}: "
            yield piece
        yield "}"

    def document_json(self) -> str:
        """The document as one JSON text (what a worker that holds no snapshot is fed)."""
        return "".join(self.document_parts())

    def apply(self, changes: Mapping[str, Any], version: str) -> tuple[HeldDocument, Changed]:
        """The document after ``changes`` (a delta's), versioned ``version``, and what changed.
        Raises DeltaRefused for a malformed delta, an invalid item or a content version other
        than ``version``; nothing of this document is changed either way."""
        if not isinstance(changes, Mapping):
            raise DeltaRefused(f"delta changes are {type(changes).__name__}, not a mapping")
        upserts: dict[str, Any] = {}
        scalars: dict[str, Any] = {}
        for name, change in changes.items():
            if name in snapshotdelta.SCALARS:
                scalars[name] = change
            elif name in snapshotdelta.COLLECTIONS and isinstance(change, Mapping):
                upserts[name] = list(change.get("upsert") or [])
            else:
                raise DeltaRefused(f"delta changes unknown field {name!r}")
        try:  # only what the delta brings is validated
            fresh = Snapshot.model_validate({"node": self.snapshot.node, **upserts, **scalars})
        except ValidationError as exc:
            raise DeltaRefused(
                f"invalid snapshot: {exc.error_count()} errors: {exc}".replace("\n", " ")
            ) from None
        collections = dict(self.collections)
        update: dict[str, Any] = {"version": version}
        before: dict[str, list[BaseModel]] = {}
        after: dict[str, list[BaseModel]] = {}
        for name, items in upserts.items():
            try:
                collections[name], before[name] = _patched(
                    name, collections.get(name), changes[name], items, getattr(fresh, name)
                )
            except (KeyError, TypeError, AttributeError) as exc:
                raise DeltaRefused(f"delta for {name!r} is malformed: {exc!r}") from None
            after[name] = getattr(fresh, name)
            update[name] = collections[name].model_list()
        other = dict(self.other)
        for name, value in scalars.items():
            other[name] = value
            update[name] = getattr(fresh, name)
        other["version"] = version
        held = HeldDocument(self.snapshot.model_copy(update=update), collections, other)
        if held.version() != version:
            raise DeltaRefused(f"snapshot version {version!r} does not match its content")
        return held, Changed(before, after, frozenset(scalars))


def _patched(
    name: str,
    held: _Collection | None,
    change: Mapping[str, Any],
    items: list[Any],
    models: list[BaseModel],
) -> tuple[_Collection, list[BaseModel]]:
    """The collection after removing and upserting, in the compiler's order (as
    `snapshotdelta.apply` puts it), and the models it replaced or removed."""
    key, order = snapshotdelta.COLLECTIONS[name], snapshotdelta.ORDER[name]
    if held is not None and held.unkeyed:
        raise TypeError(f"an item held in {name!r} has no key")
    text = dict(held.text) if held else {}
    kept = dict(held.models) if held else {}
    gone: list[BaseModel] = []
    resort = held is None or not held.ordered
    for removed in change.get("remove") or []:
        text.pop(removed, None)
        if (model := kept.pop(removed, None)) is not None:
            gone.append(model)
    upserted: set[str] = set()
    for item, model in zip(items, models, strict=True):
        k = key(item)
        was = kept.get(k)
        if was is None:
            resort = True  # a new key: its place is the compiler's order
        else:
            if k not in upserted:  # (an item upserted twice: the last wins, as in `apply`)
                gone.append(was)
            resort = resort or order(_fields(was)) != order(item)
        upserted.add(k)
        text[k], kept[k] = _text(item), model
    if resort:
        ordered = sorted(kept, key=lambda k: order(_fields(kept[k])))
        text = {k: text[k] for k in ordered}
        kept = {k: kept[k] for k in ordered}
    return _Collection(text, kept), gone


def _keys(name: str, items: list[Any]) -> tuple[list[str], bool]:
    """Each item's key in a collection as received, and whether one had none (its place in
    the list stands in for it)."""
    key, keys, unkeyed = snapshotdelta.COLLECTIONS[name], [], False
    for i, item in enumerate(items):
        try:
            keys.append(key(item))
        except (KeyError, TypeError, AttributeError):
            keys.append(f"\0{i}")  # no real key starts with NUL
            unkeyed = True
    return keys, unkeyed


def _fields(model: Any) -> Mapping[str, Any]:
    """An item's fields as `snapshotdelta.ORDER` reads them (a manifest is its own)."""
    return model if isinstance(model, Mapping) else vars(model)


def _ordered(items: list[Any], order: Callable[[Any], tuple]) -> bool:
    """Whether a collection as received is in the compiler's order (else its first patch
    sorts it, as `snapshotdelta.apply` always does)."""
    try:
        return all(order(a) <= order(b) for a, b in itertools.pairwise(items))
    except (KeyError, TypeError, AttributeError):
        return False

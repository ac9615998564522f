"""A lookup table of the data-plane view that the next view patches instead of rebuilding.

The view's dict tables (workload by address and by uid, service by endpoint, protocol by
endpoint) map keys that items claim: an address claimed by two workloads belongs to the last
one in the snapshot's order. An `Index` keeps how many items claim each key, so a delta that
replaces or removes a few items patches a copy of the table (the table in force is never
changed: the proxy reads it) as long as no key it touches is claimed twice; otherwise
which claim wins depends on order, and the caller builds the table whole again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Index(Generic[K]):
    table: dict[K, Any]
    claims: dict[K, int]  # key -> how many items claim it (a key of the table has one or more)

    @classmethod
    def of(cls, table: dict[K, Any], keys: Iterable[K]) -> Index[K]:
        """``table`` as built whole, with the keys every item claimed (repeats counted)."""
        return cls(table, dict(Counter(keys)))

    def patched(
        self, removed: Iterable[tuple[K, Any]], added: Iterable[tuple[K, Any]]
    ) -> Index[K] | None:
        """A copy with the entries of replaced or removed items taken out and those of new
        items put in; None if a key either touches is claimed more than once, before or
        after (build the table whole then)."""
        removed, added = list(removed), list(added)
        claims = self.claims
        if any(claims.get(key, 0) > 1 for key, _ in (*removed, *added)):
            return None
        table, claims = dict(self.table), dict(claims)
        for key, _ in removed:
            left = claims.get(key, 0) - 1
            if left < 0:
                return None  # not what the table was built from: build it whole
            if left == 0:
                del claims[key]
                table.pop(key, None)
            else:
                claims[key] = left
        for key, value in added:
            claims[key] = claims.get(key, 0) + 1
            if claims[key] > 1:
                return None
            table[key] = value
        return Index(table, claims)

"""Locality-aware load balancing, as Istio configures Envoy (DestinationRule
`loadBalancer.localityLbSetting`, on by default).

A locality is `region/zone/subzone`, from the node's `topology.kubernetes.io/region`,
`topology.kubernetes.io/zone` and `topology.istio.io/subzone` labels (controller/compiler.py);
the client's is its node's, an endpoint's its pod's node's. Two modes, decided here once per
cluster and snapshot (agent/proxy/routing.py), applied per pick by agent/proxy/lb.py:

- **failover** (the default, only when the cluster has outlier detection, as Istio applies it):
  each endpoint gets a priority: 0 same region, zone and subzone; 1 same region and zone;
  2 same region; 3 a region a `failover` entry names for the client's; 4 the rest. Traffic
  goes to the best priority while it is healthy and spills to the next as its endpoints are
  ejected (`level_loads`: Envoy's priority load with its overprovisioning factor 1.4).
- **distribute**: the first entry whose `from` matches the client's locality gives each
  endpoint locality a share of the traffic (`to`: pattern -> percent; the localities a
  pattern matches split its percent; one that no pattern matches gets none), scaled by the
  share of its endpoints that are healthy.

A pattern matches part by part; `*` matches the rest, and a shorter pattern matches every
locality it is a prefix of. A client or endpoint without a region (unlabelled nodes) turns
the feature off for that cluster: nothing to prefer.

- **failoverPriority** (instead of the locality levels above, also only with outlier
  detection; Istio's `applyPriorityFailoverPerLocality`): an ordered list of labels. An
  endpoint whose values of all N labels equal the client's gets priority 0; one that equals it
  on the first N-1 but not the N-th gets 1; ... one that differs already on the first gets N
  (a label counts only if all before it matched). `key=value` compares the endpoint's value
  with that value instead of the client's. The values come from where the node proxy knows
  them: region, zone and subzone from the node's locality, `kubernetes.io/hostname` is the
  node's name, `topology.istio.io/network` and `/cluster` are the same for every endpoint
  (meshagent is one network and one cluster) unless given a value, and any other `key=value`
  reads the endpoint pod's own label. A bare key that is not one of those would compare the
  client pod's label: the schema refuses it (a node proxy balances for all the pods of its node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshagent.common.istio import networking as net

OVERPROVISIONING = 1.4  # Envoy's default overprovisioning factor
LOWEST_PRIORITY = 4

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
ONE_MESH_LABELS = ("topology.istio.io/network", "topology.istio.io/cluster")


@dataclass(frozen=True)
class Place:
    """Where a client or an endpoint is, as failoverPriority compares it: the node's name and
    locality, and the pod's labels (an endpoint's; empty for a client, a whole node)."""

    node: str
    locality: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def value(self, key: str) -> str:
        if key == HOSTNAME_LABEL:
            return self.node
        keys = (REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL)
        parts = dict(zip(keys, _parts(self.locality), strict=True))
        if key in parts:
            return parts[key]
        return self.labels.get(key, "")


def of_labels(labels: Mapping[str, str]) -> str:
    """A node's locality from its labels; "" without a region."""
    region = labels.get(REGION_LABEL, "")
    if not region:
        return ""
    return f"{region}/{labels.get(ZONE_LABEL, '')}/{labels.get(SUBZONE_LABEL, '')}"


def _parts(locality: str) -> tuple[str, str, str]:
    region, _, rest = locality.partition("/")
    zone, _, subzone = rest.partition("/")
    return region, zone, subzone


def matches(pattern: str, locality: str) -> bool:
    for want, have in zip(pattern.split("/"), _parts(locality), strict=False):
        if want == "*":
            return True
        if want != have:
            return False
    return True


def failover_priority(
    client: str, endpoint: str, failover: Sequence[net.LocalityFailover] = ()
) -> int:
    region, zone, subzone = _parts(client)
    e_region, e_zone, e_subzone = _parts(endpoint)
    if e_region == region:
        if e_zone == zone:
            return 0 if e_subzone == subzone else 1
        return 2
    if any(f.from_ == region and f.to == e_region for f in failover):
        return 3
    return LOWEST_PRIORITY


def label_priority(client: Place, endpoint: Place, labels: Sequence[str]) -> int:
    """An endpoint's priority by failoverPriority ``labels`` (module docstring)."""
    for index, label in enumerate(labels):
        key, sep, wanted = label.partition("=")
        if not sep:
            if key in ONE_MESH_LABELS:
                continue  # one network, one cluster: every endpoint shares the client's
            wanted = client.value(key)
        if endpoint.value(key) != wanted:
            return len(labels) - index
    return 0


def label_priorities(
    client: Place,
    endpoints: Sequence[Place],
    setting: net.LocalityLbSetting | None,
    has_outlier_detection: bool,
) -> tuple[int, ...]:
    """Each endpoint's failoverPriority priority, or () when it does not apply (no
    failoverPriority, balancing off, no outlier detection, or every endpoint on one level)."""
    if setting is None or not setting.enabled or not setting.failover_priority:
        return ()
    if not has_outlier_detection:
        return ()
    labels = setting.failover_priority
    levels = tuple(label_priority(client, e, labels) for e in endpoints)
    return levels if len(set(levels)) > 1 else ()


def priorities(
    client: str,
    endpoints: Sequence[str],
    setting: net.LocalityLbSetting | None,
    has_outlier_detection: bool,
) -> tuple[int, ...]:
    """Each endpoint's failover priority, or () when failover does not apply (failoverPriority
    is `label_priorities`)."""
    if setting is not None and setting.failover_priority:
        return ()
    if setting is not None and (not setting.enabled or setting.distribute):
        return ()
    if not has_outlier_detection or not client or not all(endpoints):
        return ()
    failover = setting.failover if setting is not None else ()
    levels = tuple(failover_priority(client, e, failover) for e in endpoints)
    return levels if len(set(levels)) > 1 else ()


def shares(
    client: str, endpoints: Sequence[str], setting: net.LocalityLbSetting | None
) -> dict[str, float]:
    """Each endpoint locality's share of the traffic (percent), or {} when distribute does
    not apply to this client."""
    if setting is None or not setting.enabled or not client:
        return {}
    rule = next((d for d in setting.distribute if matches(d.from_, client)), None)
    if rule is None:
        return {}
    owner: dict[str, str] = {}
    for locality in dict.fromkeys(endpoints):
        pattern = next((p for p in rule.to if matches(p, locality)), None)
        if pattern is not None:
            owner[locality] = pattern
    counts: dict[str, int] = {}
    for pattern in owner.values():
        counts[pattern] = counts.get(pattern, 0) + 1
    out = {locality: 0.0 for locality in dict.fromkeys(endpoints)}
    for locality, pattern in owner.items():
        out[locality] = rule.to[pattern] / counts[pattern]
    return out


def level_loads(health: Sequence[tuple[int, int]]) -> list[float]:
    """Envoy's priority load: for levels in priority order, given (healthy, total) each, the
    share of traffic each gets. A level takes min(what is left, 140 % x its healthy
    fraction); when the levels together are under 100 % healthy the loads are scaled up to
    sum to 1 (no panic mode, as Istio configures it); all zero when nothing is healthy."""
    left, loads = 1.0, []
    for healthy, total in health:
        load = min(left, OVERPROVISIONING * healthy / total) if total else 0.0
        loads.append(load)
        left -= load
    used = sum(loads)
    return [load / used for load in loads] if used > 0 else loads

"""Everything the proxy's paths depend on, in one bundle (as ztunnel's ProxyInputs).

Built once by the agent; the outbound listener, the inbound tunnel handler and
the connector all read from it, so a new dependency is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshagent.agent.policy.authorization import AuthzStats
from meshagent.agent.proxy.drain import Drain
from meshagent.agent.proxy.http.types import DEFAULT_SETTINGS, HttpSettings
from meshagent.agent.proxy.limits import Limits
from meshagent.agent.proxy.live import LiveConnections
from meshagent.agent.state import SnapshotStore
from meshagent.agent.telemetry import AccessLog, ProxyMetrics
from meshagent.common.extauthz_provider import Provider


@dataclass
class ProxyInputs:
    store: SnapshotStore
    node: str
    trust_domain: str
    metrics: ProxyMetrics
    access_log: AccessLog | None = None
    authz: AuthzStats = field(default_factory=AuthzStats)
    drain: Drain = field(default_factory=Drain)
    live: LiveConnections = field(default_factory=LiveConnections)  # re-checked per snapshot
    http: HttpSettings = DEFAULT_SETTINGS  # the HTTP engine's settings (path normalization, ...)
    limits: Limits = field(default_factory=Limits)  # per-source bounds, refusals counted
    tcp_idle_timeout: float = 3600.0  # a plain TCP relay idle this long (s) is closed
    # the mesh config's ext-authz providers by name (AuthorizationPolicy CUSTOM)
    ext_authz: dict[str, Provider] = field(default_factory=dict)

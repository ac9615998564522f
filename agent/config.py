"""The agent's settings: a JSON file (MESHAGENT_CONFIG or --config) plus CLI overrides.

On a node the defaults fit the DaemonSet; in the lab each node has its own file
(`meshlab exec --node` points MESHAGENT_CONFIG at it), so `meshagent status`
needs no flags in either place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from meshagent.common.extauthz_provider import ExtensionProvider
from meshagent.common.pathnorm import DEFAULT_MODE, PathNormalization
from meshagent.common.spiffe import check_trust_domain
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_CONFIG = Path("/etc/meshagent/agent.json")
ENV_CONFIG = "MESHAGENT_CONFIG"

# Per-source limits of the proxy (agent/proxy/limits.py), here so the config loads without it.
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_PENDING_REQUESTS = 4_096

# Never redirected: the mesh's own ports and DNS (DESIGN.md section 3).
DEFAULT_EXCLUDED_PORTS = [53, 15000, 15001, 15008, 15012, 15014, 15020, 15021]


MAX_AUTO_WORKERS = 8


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, and its cgroup's CPU quota (a container's
    CPU limit) rounded up, like Go's automaxprocs. At least 1."""
    cores = len(os.sched_getaffinity(0))
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        path = next((line.split("::", 1)[1] for line in own if line.startswith("0::")), "/")
        for folder in (cgroup_root / path.lstrip("/"), cgroup_root):
            limit = folder / "cpu.max"
            if limit.exists():
                quota, _, period = limit.read_text().partition(" ")
                if quota != "max":
                    cores = min(cores, -(-int(quota) // int(period)))
                break
    except (OSError, ValueError):
        pass
    return max(cores, 1)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field(default_factory=lambda: os.uname().nodename)
    # The controller Service, or several replicas' `host:port`, comma-separated (the agent
    # starts at the one its node name hashes to and moves on when one goes).
    controller: str = "meshctl.meshagent-system.svc:15012"
    proxy_ip: str = "127.0.0.1"
    # The proxy's IPv6 address on a dual-stack node: native IPv6 connects of meshed pods go
    # there. Without one they are refused (never let through unmeshed).
    proxy_ip6: str | None = None
    outbound_port: int = 15001
    admin_port: int = 15000
    readiness_port: int = 15021
    metrics_port: int = 15020
    cgroup_path: Path = Path("/sys/fs/cgroup")
    pin_dir: Path = Path("/sys/fs/bpf/meshagent")
    state_dir: Path = Path("/var/lib/meshagent")
    token_file: Path | None = None
    # The mesh root the controller's stream certificate must chain to (the lab writes it;
    # without one the agent talks to the controller in plaintext).
    controller_ca_file: Path | None = None
    excluded_ports: list[int] = Field(default_factory=lambda: list(DEFAULT_EXCLUDED_PORTS))
    discovery_interval: float = 0.5
    trust_domain: str = "cluster.local"
    # Istio's meshConfig.trustDomainAliases: other trust domains whose workloads count as this
    # mesh's, for authorization (a policy principal naming the mesh's domain, an alias or
    # `cluster.local` matches a peer of any of them; common/trustdomain.py). For migrations.
    trust_domain_aliases: list[str] = Field(default_factory=list)
    root_namespace: str = "istio-system"  # where mesh-wide policies live, as Istio's
    # Istio's meshConfig.pathNormalization: how each HTTP request's path is normalized before
    # authorization, route matching and forwarding (NONE, BASE, MERGE_SLASHES or
    # DECODE_AND_MERGE_SLASHES, the strictest and our default; see common/pathnorm.py).
    path_normalization: PathNormalization = DEFAULT_MODE
    # Istio's meshConfig.extensionProviders: the ext-authz services AuthorizationPolicies with
    # action CUSTOM name (`envoyExtAuthzHttp`, common/extauthz.py, or `envoyExtAuthzGrpc`,
    # common/extauthz_grpc.py). A CUSTOM policy naming
    # a provider not declared here denies the requests it matches (fail closed).
    extension_providers: list[ExtensionProvider] = Field(default_factory=list)
    hbone_port: int = 15008
    access_log: Literal["stdout", "off"] = "stdout"
    access_log_sample: float = Field(1.0, ge=0.0, le=1.0)  # the fraction of entries kept
    # Extra node addresses allowed to connect to STRICT pods in plaintext (the proxy's
    # address always is): e.g. the node IP kubelet probes come from.
    trusted_sources: list[str] = Field(default_factory=list)
    # On SIGTERM: stop accepting, then serve the established connections until the last one
    # ends or this deadline passes (an upgrade cuts no long-lived connection before it; the
    # DaemonSet's terminationGracePeriodSeconds, 3660, leaves a minute for preStop and exit).
    drain_timeout_s: float = Field(3600.0, ge=0.0)
    # The heartbeat the connect programs watch (agent/heartbeat.py): written this often while
    # the agent serves; older than the timeout, the agent counts as down and each meshed pod's
    # fail mode (meshagent.io/fail-mode) applies to its new connections.
    heartbeat_interval_s: float = Field(0.25, gt=0.0, le=10.0)
    heartbeat_timeout_s: float = Field(1.0, gt=0.0, le=60.0)
    # Slowloris and idle bounds of the pod-facing HTTP/1.x engine (15001, and HTTP inside
    # 15008 tunnels): a request whose head is not complete this long after its first byte gets
    # 408 and the connection closes (Envoy's request_headers_timeout, which Envoy leaves off;
    # nginx's client_header_timeout is 60 s); a keep-alive connection with no request begun
    # for the idle timeout is closed (Envoy's idle_timeout, 1 h).
    http_request_headers_timeout_s: float = Field(10.0, gt=0.0)
    http_idle_timeout_s: float = Field(3600.0, gt=0.0)
    # An HBONE connection (15008) that carries no tunnel this long is closed (its clients
    # release theirs after 300 s).
    hbone_idle_timeout_s: float = Field(600.0, gt=0.0)
    # A plain TCP relay (15001 to a non-HTTP port, and tunnels to a pod) through which no byte
    # moved either way this long is closed (Envoy tcp_proxy's idle_timeout, 1 h).
    tcp_idle_timeout_s: float = Field(3600.0, gt=0.0)
    # What one source (a pod on 15001, a certificate identity on 15008) may hold in each proxy
    # process: more connections are refused (a 503 on an HTTP port, else closed), more
    # requests in flight get 503 UO (agent/proxy/limits.py).
    max_connections_per_source: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1)
    max_pending_requests_per_source: int = Field(DEFAULT_MAX_PENDING_REQUESTS, ge=1)
    # Proxy processes (0: one per core this process may use, at most 8). With 1 the agent
    # process proxies itself; with more, that many workers share 15001/15008 (agent/workers/).
    proxy_workers: int = Field(0, ge=0, le=64)
    # Same-node L4 connections (tcp-* ports, passthrough) relayed in the kernel once authorized:
    # their two proxy sockets joined by a sockhash and an sk_skb verdict (agent/proxy/kjoin.py).
    # Off by default: the kernel buffers without bound toward a receiver slower than its
    # sender (kjoin.py); off, the proxy relays them itself (splice, bounded buffers).
    kernel_join: bool = False
    # A worker whose RSS exceeds where it stood before a burst by more than this fraction once
    # the burst is over (at most worker_recycle_max_open client connections open), or its
    # fresh figure by this and 0.15 for first use, is replaced by a fresh one, and drains
    # (agent/workers/recycle.py); 0 never replaces one. Issue 17: memory back within 10 % of
    # where it started after a burst (one leaves +46-57 %).
    worker_recycle_growth: float = Field(0.10, ge=0.0)
    worker_recycle_max_open: int = Field(16, ge=0)
    # Where workers' metric files go (one folder per agent process, removed at exit).
    worker_metrics_dir: Path = Path("/tmp/meshagent-metrics")

    @property
    def worker_count(self) -> int:
        return self.proxy_workers or min(available_cores(), MAX_AUTO_WORKERS)

    @field_validator("trust_domain", "trust_domain_aliases")
    @classmethod
    def _trust_domains_valid(cls, value: str | list[str]) -> str | list[str]:
        for domain in [value] if isinstance(value, str) else value:
            check_trust_domain(domain)  # a ValueError naming the domain and what is allowed
        return value

    @property
    def trust_domains(self) -> tuple[str, ...]:
        """The mesh's trust domain, then its aliases (duplicates dropped), as Istio's bundle."""
        return tuple(dict.fromkeys([self.trust_domain, *self.trust_domain_aliases]))

    @field_validator("controller")
    @classmethod
    def _controller_addresses(cls, value: str) -> str:
        _split_addresses(value)  # says which item is not host:port
        return value

    @property
    def controller_addr(self) -> tuple[str, int]:
        """The first of `controller_addrs`."""
        return self.controller_addrs[0]

    @property
    def controller_addrs(self) -> list[tuple[str, int]]:
        """Every ``host:port`` in `controller` (comma-separated: several replicas)."""
        return _split_addresses(self.controller)


def _split_addresses(value: str) -> list[tuple[str, int]]:
    out = []
    for item in value.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{item.strip()!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def config_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(ENV_CONFIG, str(DEFAULT_CONFIG)))


def load_config(path: Path | None = None, **overrides: Any) -> AgentConfig:
    """Read the file if it exists, then apply non-None overrides."""
    data: dict[str, Any] = {}
    file = config_path(path)
    if file.exists():
        data = json.loads(file.read_text())
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AgentConfig.model_validate(data)

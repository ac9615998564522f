"""`meshagent status`: what the node's mesh is doing, from the agent and from the kernel.

What flows through: three sources are read (`gather`), joined into one report (`assemble`,
plain data, no I/O) and printed as a screen (`render`) or as JSON. The sources, so the report
still says something useful when the agent is down:

- the agent's admin endpoint (live proxy, tunnels, controller link, certificates, denials);
- the pinned BPF objects (programs attached to the cgroup, meshed namespaces, counters);
- the agent's state folder (the last accepted snapshot, the saved certificates), which gives
  pods their names, identities and mTLS modes, and certificate expiry with the agent down.
  The snapshot is read as plain JSON (agent/savedview.py), not built into the agent's Tables,
  and certificates are parsed only with the agent down: status is mostly Python start-up.

The JSON report's keys, for scripts (`REPORT_FIELDS`; ``null`` where only the running agent
knows and it is down):

- ``node``; ``agent``: ``running``, ``error``, and from the live agent ``version``,
  ``uptime_s``, ``ready_after_s`` (from its process start to ready) and ``datapath_reused``
  (it found its pinned datapath, built from its own sources, and did not compile),
  ``processes`` (one each for the agent, the workers' fork server and each worker:
  ``role``, ``pid``, ``rss_bytes``, ``pss_bytes``, ``uss_bytes``; they are forks of one
  another, so RSS counts their shared pages in each, PSS splits them and adds up),
  ``controller`` (``address``, ``connected``, ``last_error``, ...) and its
  raw figures (``proxy``, ``inbound``, ``authz``, ``hbone``, ...);
- ``snapshot``: ``version`` and ``source`` (``agent``, ``saved`` or ``null``);
- ``datapath``: ``programs`` attached, ``meshed_netns``, ``counters``, ``peer_auth``,
  ``heartbeat`` (``age_s`` of the agent's last beat, ``timeout_s``, ``agent_alive``);
- ``pods``: one per meshed pod: ``namespace``, ``name``, ``ip``, ``netns_cookie``,
  ``identity``, ``mtls_mode`` (and ``mtls_ports`` overrides), ``fail_mode`` (``open`` or
  ``closed``, as the kernel has it), ``in_force`` (``meshed`` while the agent's heartbeat is
  fresh, else ``open: direct`` or ``closed: refused``), ``certificate`` (``state``,
  ``not_after``, ``expires_in_s``);
- ``connections``: ``outbound`` and ``inbound`` (``active``, ``accepted``), ``http_requests``,
  ``mutual_tls``; ``tunnels``: pooled HBONE connections; ``ejected_endpoints``;
  ``recent_denials``;
- ``services``: the snapshot in force's Services, as the proxy balances them (``namespace``,
  ``name``, ``vips``, ``ports`` (each with ``l7``, its L7 level in force: ``l4``, ``observe``
  or ``full``, and ``l7_pods`` where its pods' own node serves them lower, as it does a Service
  `full` only for its routes; the screen's PORTS column shows ``80/observe`` and
  ``80/full(pods:observe)``), ``endpoints`` with ``ip``,
  ``node`` and ``ports``): what
  ``istioctl proxy-config endpoints`` shows, and what answers "why does this connection still
  reach a pod that is gone" while the controller is away.

Where there is no agent to report on (`no_agent_here`: nothing answers on the admin port and
the config's pins and state folder are absent, or its cgroup path is not a cgroup-v2 folder),
`meshagent status` says so in one sentence and exits non-zero instead of printing a report of
errors; with ``--json`` it prints ``{"error": "..."}``.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from meshagent.agent import handover, savedview
from meshagent.agent.config import AgentConfig
from meshagent.agent.datapath import loader
from meshagent.agent.datapath.maps import DatapathMaps
from meshagent.agent.savedview import SavedView
from meshagent.common.spiffe import Identity, InvalidIdentity, workload_identity

__all__ = [
    "REPORT_FIELDS",
    "assemble",
    "denial_fields",
    "describe_denial",
    "gather",
    "no_agent_here",
    "render",
    "watch",
]

REPORT_FIELDS: tuple[str, ...] = (
    "node",
    "agent",
    "snapshot",
    "datapath",
    "pods",
    "pods_summary",
    "connections",
    "tunnels",
    "ejected_endpoints",
    "recent_denials",
    "services",
)

ADMIN_TIMEOUT = 2.0


def _admin_get(port: int, path: str) -> tuple[int, bytes]:
    """One GET to the local admin endpoint, blocking (no event loop to start for one call)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ADMIN_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _agent_view(config: AgentConfig) -> tuple[dict | None, str]:
    try:
        code, body = _admin_get(config.admin_port, "/status")
    except OSError as exc:  # refused, timed out, reset: in words, without an errno
        reason = exc.strerror or str(exc) or type(exc).__name__
        return None, f"cannot reach the admin endpoint 127.0.0.1:{config.admin_port}: {reason}"
    except http.client.HTTPException as exc:
        return None, f"admin endpoint 127.0.0.1:{config.admin_port}: {exc!r}"
    if code != 200:
        return None, f"admin endpoint answered {code}"
    return json.loads(body), ""


def _is_cgroup2(path: Path) -> bool:
    """Every cgroup-v2 folder (the root too) has cgroup.controllers; v1 and plain ones do not."""
    return (path / "cgroup.controllers").is_file()


def _has_pins(pin_dir: Path) -> bool:
    try:
        return any(pin_dir.iterdir())
    except OSError:  # missing, not a folder, not readable
        return False


def _kernel_view(config: AgentConfig) -> dict[str, Any]:
    settings = loader.datapath_settings(config)
    view: dict[str, Any] = {"pin_dir": str(config.pin_dir), "cgroup": str(config.cgroup_path)}
    view["pins_found"] = _has_pins(config.pin_dir)
    view["state_dir"], view["state_found"] = str(config.state_dir), config.state_dir.is_dir()
    # Agent pods alive on the node (DaemonSet: the hand-over registry): during an upgrade the
    # old one serves the connections it holds until they end or its drain deadline.
    view["agent_pods"] = [
        {"name": r.name, "serving": r.serving}
        for r in handover.live_agents(handover.registry_dir(config.state_dir))
    ]
    if not _is_cgroup2(config.cgroup_path):
        # bpf(query) on anything else fails with a bare EBADF
        view["programs"] = []
        view["programs_error"] = f"{config.cgroup_path} is not a cgroup-v2 folder"
    else:
        try:
            view["programs"] = [asdict(p) for p in loader.attached_programs(settings)]
        except OSError as exc:
            view["programs"], view["programs_error"] = [], str(exc)
    if not view["pins_found"]:
        view["maps_error"] = f"no pinned maps in {config.pin_dir}"
        return view
    try:
        maps = DatapathMaps.open(config.pin_dir)
    except OSError as exc:
        view["maps_error"] = f"cannot open pinned maps: {exc}"
        return view
    try:
        view["meshed_netns"] = [
            {"netns_cookie": cookie, "ip": ip, "fail_mode": mode}
            for cookie, (ip, mode) in sorted(maps.meshed_pods().items())
        ]
        age, timeout = maps.heartbeat_age()
        view["heartbeat"] = heartbeat_view(age, timeout)
        view["counters"] = maps.read_counters()
        view["peer_auth"] = [
            {"ip": ip, "port": port, "mode": mode.name}
            for (ip, port), mode in sorted(maps.peer_auth_entries().items())
        ]
        view["orig_dst_pending"] = sum(1 for _ in maps.orig_dst.iter_keys())
    finally:
        maps.close()
    return view


def heartbeat_view(age: float | None, timeout: float) -> dict[str, Any]:
    """The heartbeat as the connect programs judge it: the agent is up while a beat is younger
    than the timeout (agent/heartbeat.py); `age_s` None when it never beat."""
    return {
        "age_s": None if age is None else round(age, 3),
        "timeout_s": timeout,
        "agent_alive": age is not None and age < timeout,
    }


def fail_mode_in_force(fail_mode: str | None, heartbeat: dict[str, Any] | None) -> str:
    """What a meshed pod's new connections get now: `meshed` (to the proxy) while the agent
    beats, else its fail mode: `open` (straight to the destination) or `closed` (refused)."""
    if heartbeat is None or fail_mode is None:
        return "unknown"
    if heartbeat["agent_alive"]:
        return "meshed"
    return "open: direct" if fail_mode == "open" else "closed: refused"


def _identity(saved: SavedView | None, ip: str, trust_domain: str) -> Identity | None:
    workload = saved.pods_by_ip.get(ip) if saved else None
    if workload is None:
        return None
    try:
        return workload_identity(workload, trust_domain)
    except InvalidIdentity:
        return None


def _saved_certificates(
    config: AgentConfig, saved: SavedView | None, ips: list[str]
) -> list[dict[str, Any]]:
    """Certificate rows (as the live agent gives them) from the certificates kept on disk."""
    # only with the agent down: parsing certificates (cryptography) is a third of start-up
    from meshagent.agent.identity.certstore import CertStore

    store = CertStore(config.state_dir / "certs")
    rows = []
    for ip in ips:
        identity = _identity(saved, ip, config.trust_domain)
        if identity is None:
            continue
        cert = store.load(identity)
        rows.append(
            {
                "identity": identity.uri,
                "state": "saved" if cert else "missing",
                "not_after": cert.not_after.isoformat() if cert else None,
            }
        )
    return rows


def gather(config: AgentConfig) -> dict[str, Any]:
    """Read every source once and join them (see the module docstring for the keys)."""
    agent, error = _agent_view(config)
    kernel = _kernel_view(config)
    saved = savedview.load(config.state_dir, config.node_name)
    certificates = None
    if agent is None:
        ips = [p["ip"] for p in kernel.get("meshed_netns", [])]
        certificates = _saved_certificates(config, saved, ips)
    return assemble(
        config.node_name,
        agent,
        error,
        kernel,
        saved,
        trust_domain=config.trust_domain,
        saved_certificates=certificates,
        now=time.time(),
    )


def no_agent_here(report: dict[str, Any]) -> str | None:
    """One sentence when there is no agent to report on with this config, else None.

    That is when no agent answers and either the cgroup path is not a cgroup-v2 folder (the
    attached programs cannot be asked for), or neither pins nor the state folder exist (no agent
    ever ran here with this config). A node after `meshagent uninstall` keeps its (emptied)
    state folder, so it still gets a report: no programs attached, no pins.
    """
    agent, dp = report["agent"], report["datapath"]
    if agent["running"]:
        return None
    bad_cgroup = dp.get("programs_error", "").endswith("is not a cgroup-v2 folder")
    facts = [f"{dp['cgroup']} is not a cgroup-v2 folder"] if bad_cgroup else []
    facts.append(f"agent: {agent['error'] or 'not answering'}")
    if dp.get("pins_found") is False and dp.get("state_found") is False:
        state = f"no state in {dp.get('state_dir', 'its state folder')}"
        return (
            f"no meshagent datapath found at {dp['pin_dir']}: is the agent running on this "
            f"node? ({', '.join(['pins missing', state, *facts])})"
        )
    if bad_cgroup:
        return (
            f"cannot tell which programs are attached at {dp['cgroup']}: is cgroup_path in "
            f"the agent config right? ({', '.join(facts)})"
        )
    return None


def _expires_in(not_after: str | None, now: float) -> float | None:
    if not not_after:
        return None
    return round(datetime.fromisoformat(not_after).timestamp() - now, 1)


def _ip_order(ip: str) -> tuple[int, int]:
    """Sort key: numerically (.9 before .10), IPv4 before IPv6; unparsable last."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return (7, 0)
    return (address.version, int(address))


def summarize_pods(pods: list[dict[str, Any]]) -> dict[str, Any]:
    """How many pods are meshed, per identity and per mTLS mode: the first thing an operator
    of a full node asks (the per-pod table is behind `--pods`)."""
    return {
        "meshed": len(pods),
        "by_identity": dict(sorted(Counter(p["identity"] or "?" for p in pods).items())),
        "by_mtls_mode": dict(sorted(Counter(p["mtls_mode"] or "?" for p in pods).items())),
    }


def _pods(
    agent: dict | None,
    kernel: dict[str, Any],
    saved: SavedView | None,
    certificates: list[dict[str, Any]],
    trust_domain: str,
    now: float,
) -> list[dict[str, Any]]:
    """Meshed pods as the kernel has them (the agent's list if the maps cannot be read),
    with name, identity and mTLS mode from the snapshot and the identity's certificate."""
    if "meshed_netns" in kernel:
        base = kernel["meshed_netns"]
    else:
        base = (agent or {}).get("meshed_pods", [])
    by_identity = {c["identity"]: c for c in certificates}
    pods = []
    for entry in sorted(base, key=lambda p: _ip_order(p["ip"])):
        ip = entry["ip"]
        workload = saved.pods_by_ip.get(ip) if saved else None
        identity = _identity(saved, ip, trust_domain)
        cert = by_identity.get(identity.uri) if identity else None
        not_after = cert.get("not_after") if cert else None
        fail_mode = entry.get("fail_mode") or (workload.fail_mode if workload else None)
        pods.append(
            {
                "namespace": workload.namespace if workload else entry.get("namespace"),
                "name": workload.name if workload else entry.get("name"),
                "ip": ip,
                "netns_cookie": entry.get("netns_cookie"),
                "identity": identity.uri if identity else None,
                "mtls_mode": workload.mtls_mode if workload else None,
                "mtls_ports": {str(p): m for p, m in workload.mtls_ports.items()}
                if workload
                else {},
                "fail_mode": fail_mode,
                "in_force": fail_mode_in_force(fail_mode, kernel.get("heartbeat")),
                "certificate": {
                    "state": cert["state"] if cert else "missing",
                    "not_after": not_after,
                    "expires_in_s": _expires_in(not_after, now),
                },
            }
        )
    return pods


def assemble(
    node: str,
    agent: dict | None,
    error: str,
    kernel: dict[str, Any],
    saved: SavedView | None,
    *,
    trust_domain: str,
    saved_certificates: list[dict[str, Any]] | None = None,
    now: float,
) -> dict[str, Any]:
    """Join the agent's live view (None when it is down, `error` saying why), the kernel's and
    the saved snapshot into the report; `saved_certificates` stand in for the agent's."""
    for entry in kernel.get("meshed_netns", []):
        workload = saved.pods_by_ip.get(entry["ip"]) if saved else None
        entry["pod"] = f"{workload.namespace}/{workload.name}" if workload else ""
    certificates = agent.get("certificates", []) if agent else (saved_certificates or [])
    pods = _pods(agent, kernel, saved, certificates, trust_domain, now)
    if agent is not None:
        snapshot = {"version": agent.get("snapshot_version") or None, "source": "agent"}
    elif saved is not None:
        snapshot = {"version": saved.version, "source": "saved"}
    else:
        snapshot = {"version": None, "source": None}
    report: dict[str, Any] = {
        "node": node,
        "agent": {"running": agent is not None, "error": error, **(agent or {})},
        "snapshot": snapshot,
        "datapath": kernel,
        "pods": pods,
        "pods_summary": summarize_pods(pods),
        "connections": None,
        "tunnels": None,
        "ejected_endpoints": None,
        "recent_denials": None,
        "services": saved.services if saved else [],
    }
    if agent is not None:
        proxy, inbound = agent.get("proxy", {}), agent.get("inbound", {})
        report["connections"] = {
            "outbound": {
                "active": proxy.get("active_connections", 0),
                "accepted": proxy.get("accepted_connections", 0),
                # same-node L4 connections relayed in the kernel (agent/proxy/kjoin.py)
                "kernel_joined": proxy.get("kernel_joined", 0),
                # plain same-node relays moved between proxy processes at a drain: handed to
                # a replacement or successor, taken from one (agent/proxy/handoff.py)
                "handed_out": proxy.get("handed_out", 0),
                "handed_in": proxy.get("handed_in", 0),
            },
            "inbound": {"active": inbound.get("active", 0), "accepted": inbound.get("accepted", 0)},
            "http_requests": proxy.get("http_requests", 0),
            "mutual_tls": proxy.get("mutual_tls", 0),
        }
        report["tunnels"] = agent.get("tunnels", [])
        report["ejected_endpoints"] = agent.get("outlier_ejections", [])
        report["recent_denials"] = agent.get("authz", {}).get("recent_denials", [])
    return report


def _duration(seconds: float) -> str:
    """Seconds as an operator reads them: 45s, 12m 5s, 3h 4m, 2d 1h (negative: ago)."""
    if seconds < 0:
        return f"{_duration(-seconds)} ago"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _certificate(cert: dict[str, Any]) -> str:
    if cert["expires_in_s"] is None:
        return cert["state"]
    left = cert["expires_in_s"]
    when = f"expired {_duration(-left)} ago" if left < 0 else f"expires in {_duration(left)}"
    return f"{when} ({cert['state']})"


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def _counts(label: str, counts: dict[str, int]) -> list[str]:
    """`label` then `name count` pairs, most first, wrapped so no line grows without end."""
    pairs = [f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines, line = [], label
    for pair in pairs:
        if line != label and len(line) + len(pair) > 100:
            lines.append(line.rstrip(", "))
            line = " " * len(label)
        line += pair + ", "
    lines.append(line.rstrip(", "))
    return lines


def _section(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return [f"{title}:", *(_table([header, *rows]) if rows else ["  (none)"])]


def denial_fields(denial: dict[str, Any]) -> tuple[str, str, str, str]:
    """(source, destination, policy, reason) of one recorded denial, as status shows them: a
    denial no named policy made (no ALLOW policy matched) shows policy `default`."""
    return (
        denial.get("source") or "?",
        denial.get("destination") or "?",
        denial.get("policy") or "default",
        denial.get("reason") or "",
    )


def describe_denial(denial: dict[str, Any]) -> str:
    """One recorded denial on one line, in `meshagent status`'s words."""
    source, destination, policy, reason = denial_fields(denial)
    return f"{source} -> {destination} denied by policy {policy}" + (
        f": {reason}" if reason else ""
    )


def _fail_mode(pod: dict[str, Any]) -> str:
    """`closed`, `open`, and what is in force while the agent is down."""
    mode, now = pod.get("fail_mode") or "?", pod.get("in_force") or "unknown"
    return mode if now in ("meshed", "unknown") else f"{mode} (IN FORCE: {now})"


def _heartbeat_line(heartbeat: dict[str, Any] | None) -> str:
    if heartbeat is None:
        return "Heartbeat:   unknown"
    age, timeout = heartbeat["age_s"], heartbeat["timeout_s"]
    if age is None:
        return "Heartbeat:   never written: agent counts as DOWN, pods' fail modes apply"
    if heartbeat["agent_alive"]:
        return f"Heartbeat:   {age:.2f}s old (timeout {timeout:g}s): pods are meshed"
    return (
        f"Heartbeat:   STALE, {_duration(age)} old (timeout {timeout:g}s): agent counts as "
        "DOWN, pods' fail modes apply (open: direct, closed: refused)"
    )


def _memory_lines(processes: list[dict[str, Any]]) -> list[str]:
    """One line per process. Its RSS counts the pages it shares with the others (they are
    forks of one another); PSS splits them, so the PSS add up to what they hold together."""
    if not processes:
        return []

    def mib(key: str, p: dict[str, Any]) -> str:
        return f"{p[key] / 2**20:.1f} MiB"

    total = sum(p["pss_bytes"] for p in processes) / 2**20
    rows = [
        (p["role"], f"pid {p['pid']}", f"PSS {mib('pss_bytes', p)}", f"RSS {mib('rss_bytes', p)}")
        for p in processes
    ]
    return [
        f"Memory:      {total:.1f} MiB (PSS: shared pages split between the processes)",
        *_table(rows),
    ]


def _agent_pods(pods: list[dict[str, Any]]) -> list[str]:
    """With more than one agent pod alive (an upgrade), each, newest first."""
    if len(pods) < 2:
        return []
    lines = []
    for i, pod in enumerate(reversed(pods)):
        if i == 0:
            state = "newest, owns the node" + ("" if pod["serving"] else ", not serving yet")
        else:
            state = "OLDER: handed over, serves only the connections it holds until they end"
        lines.append(("Agent pods:  " if i == 0 else "             ") + f"{pod['name']} ({state})")
    return lines


POD_TABLE_MAX = 20  # up to this many meshed pods, the per-pod table shows without --pods


def render(
    report: dict[str, Any], *, now: float | None = None, pods: bool = False, services: bool = False
) -> str:
    """The screen: one section per concern, live-only sections marked when the agent is down.
    `now` (UNIX time, default the clock) dates the ejections; `services` adds one row per
    Service endpoint."""
    agent, dp, snap = report["agent"], report["datapath"], report["snapshot"]
    lines = [f"Node:        {report['node']}"]
    if agent["running"]:
        phase = agent.get("phase", "owner")
        lines.append(
            f"Agent:       running (version {agent.get('version', '?')}, "
            f"up {_duration(agent.get('uptime_s', 0))})"
            + ("" if phase == "owner" else f", {phase.upper()}")
        )
        if agent.get("ready_after_s") is not None:
            how = "reused the pinned datapath" if agent.get("datapath_reused") else "built it"
            lines.append(f"Started:     ready {agent['ready_after_s']:.2f} s after start ({how})")
        link = agent.get("controller") or {}
        if link.get("connected"):
            state = "connected" + (" (TLS)" if link.get("tls") else "")
        else:
            state = f"DISCONNECTED ({link.get('last_error') or 'not yet connected'})"
        lines.append(f"Controller:  {link.get('address', '?')} {state}")
        workers = agent.get("workers")
        if workers:
            pids = ", ".join(str(w["pid"]) if w["pid"] else "down" for w in workers)
            restarts = sum(w["restarts"] for w in workers)
            recycled = sum(w.get("recycled", 0) for w in workers)
            draining = sum(len(w.get("retiring_pids") or ()) for w in workers)
            line = f"Proxy:       {len(workers)} workers (pids {pids}; {restarts} restarts"
            if recycled:  # replaced once grown after a burst, or asked (agent/workers/recycle.py)
                line += f"; {recycled} replaced by a fresh one"
            if draining:
                line += f", {draining} draining"
            lines.append(line + ")")
        elif workers is not None or "version" in agent:
            lines.append("Proxy:       in the agent process (proxy_workers: 1)")
        lines += _memory_lines(agent.get("processes") or [])
    else:
        lines.append(
            f"Agent:       DOWN ({agent['error']}); showing the pinned maps and saved state"
        )
        lines.append("Controller:  unknown (agent down)")
    lines += _agent_pods(dp.get("agent_pods") or [])
    source = {"agent": "", "saved": " (saved on disk)", None: ""}[snap["source"]]
    lines.append(f"Snapshot:    {snap['version'] or '-'}{source}")
    lines.append(f"Datapath:    pins {dp['pin_dir']}, cgroup {dp['cgroup']}")
    programs = [
        (str(p["id"]), p["type"], p["name"], p["attach_type"], "" if p["pinned"] else "not ours")
        for p in dp.get("programs") or []
    ]
    lines += _section("Programs attached", ("ID", "TYPE", "NAME", "ATTACH", ""), programs)
    if "programs_error" in dp:
        lines.append(f"  cannot list programs: {dp['programs_error']}")
    summary = report.get("pods_summary") or summarize_pods(report["pods"])
    lines.append(f"Meshed pods: {summary['meshed']}")
    if summary["meshed"]:
        lines += _counts("  by identity:  ", summary["by_identity"])
        lines += _counts("  by mTLS mode: ", summary["by_mtls_mode"])
    if pods or len(report["pods"]) <= POD_TABLE_MAX:
        rows = [
            (
                f"{p['namespace']}/{p['name']}" if p["name"] else "?",
                p["ip"],
                p["identity"] or "?",
                _certificate(p["certificate"]),
                (p["mtls_mode"] or "?")
                + "".join(f" {port}:{mode}" for port, mode in p["mtls_ports"].items()),
                _fail_mode(p),
            )
            for p in report["pods"]
        ]
        if rows:
            header = ("POD", "IP", "IDENTITY", "CERTIFICATE", "MTLS", "FAIL MODE")
            lines += _table([header, *rows])
    else:
        lines.append("  (one row per pod: meshagent status --pods)")
    if "maps_error" in dp:
        lines.append(f"Maps:        {dp['maps_error']}")
    else:
        lines.append(_heartbeat_line(dp.get("heartbeat")))
        c = dp["counters"]
        lines.append(
            f"Redirects:   {c['redirected']} redirected ({c.get('redirected_ipv6', 0)} from IPv6 "
            f"sockets), {c['established']} handed to the proxy, {c['excluded']} excluded ports, "
            f"{c.get('refused', 0)} refused (link-local, MPTCP, no IPv6 proxy), "
            f"{c['strict_dropped']} plaintext dropped (STRICT), "
            f"{c.get('fail_open', 0)} let through (fail-open), "
            f"{c.get('fail_closed', 0)} refused (fail-closed)"
        )
    if services:
        lines += _services_section(report.get("services") or [])
    if not agent["running"]:
        lines.append("Connections, tunnels, ejections, denials: unknown (agent down)")
        return "\n".join(lines)
    conns = report["connections"]
    out, inb = conns["outbound"], conns["inbound"]
    lines.append(
        f"Connections: outbound {out['active']} open / {out['accepted']} accepted "
        f"({conns['http_requests']} HTTP requests, {conns['mutual_tls']} via mTLS tunnels); "
        f"inbound {inb['active']} open / {inb['accepted']} accepted"
    )
    if out.get("handed_in") or out.get("handed_out"):  # agent/proxy/handoff.py
        lines.append(
            f"Handed over: {out.get('handed_in', 0)} connection(s) taken from a previous proxy"
            f" process, {out.get('handed_out', 0)} handed to a successor"
        )
    tunnels = [
        (
            t["node"],
            str(t.get("worker", "-")),
            t["source"],
            t["destination"],
            str(t["connections"]),
            str(t["streams"]),
        )
        for t in sorted(
            report["tunnels"],
            key=lambda t: (t["node"], t.get("worker", -1), t["source"], t["destination"]),
        )
    ]
    header = ("PEER NODE", "WORKER", "SOURCE", "DESTINATION", "CONNS", "STREAMS")
    lines += _section("Tunnels", header, tunnels)
    now = time.time() if now is None else now
    ejected = [
        (e["cluster"], e["address"], f"back in {_duration(e['until'] - now)}", str(e["ejections"]))
        for e in report["ejected_endpoints"]
    ]
    lines += _section("Ejected endpoints", ("CLUSTER", "ENDPOINT", "UNTIL", "EJECTIONS"), ejected)
    denials = [denial_fields(d) for d in report["recent_denials"]]
    lines += _section("Recent denials", ("SOURCE", "DESTINATION", "POLICY", "REASON"), denials)
    return "\n".join(lines)


def _port_level(port: dict[str, Any]) -> str:
    pods = f"(pods:{port['l7_pods']})" if port.get("l7_pods") else ""
    return f"{port['port']}/{port.get('l7', '-')}{pods}"


def _services_section(services: list[dict[str, Any]]) -> list[str]:
    rows = [
        (
            f"{svc['namespace']}/{svc['name']}",
            ",".join(svc["vips"]) or "-",
            ",".join(_port_level(p) for p in svc["ports"]) or "-",
            f"{e['ip']}" if e else "(none)",
            e["node"] if e else "",
        )
        for svc in services
        for e in (svc["endpoints"] or [None])
    ]
    return _section("Services", ("SERVICE", "VIPS", "PORTS", "ENDPOINT", "NODE"), rows)


def watch(
    read: Callable[[], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    *,
    interval: float,
    count: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show a fresh report every `interval` seconds, `count` times (None: until interrupted).
    Returns how many were shown; KeyboardInterrupt is the caller's to catch."""
    if interval <= 0:
        raise ValueError(f"watch interval must be positive, got {interval}")
    if count is not None and count < 1:
        raise ValueError(f"watch count must be at least 1, got {count}")
    shown = 0
    while count is None or shown < count:
        if shown:
            sleep(interval)
        show(read())
        shown += 1
    return shown

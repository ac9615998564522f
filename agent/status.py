"""`meshagent status`: what the node's mesh is doing, from the agent and from the kernel.

Two sources, so the report still says something useful when the agent is
down: the agent's admin endpoint (live proxy and controller state) and the
pinned BPF objects (programs attached to the cgroup, meshed namespaces,
counters), read directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.datapath import loader
from meshagent.agent.datapath.maps import DatapathMaps
from meshagent.agent.run import datapath_settings
from meshagent.agent.state import SNAPSHOT_FILE
from meshagent.common.httpserve import http_get


def _agent_view(config: AgentConfig) -> tuple[dict | None, str]:
    try:
        code, body = trio.run(http_get, "127.0.0.1", config.admin_port, "/status", 2.0)
    except (OSError, trio.TooSlowError) as exc:
        return None, str(exc) or type(exc).__name__
    if code != 200:
        return None, f"admin endpoint answered {code}"
    return json.loads(body), ""


def _kernel_view(config: AgentConfig) -> dict[str, Any]:
    settings = datapath_settings(config)
    view: dict[str, Any] = {"pin_dir": str(config.pin_dir), "cgroup": str(config.cgroup_path)}
    try:
        view["programs"] = [asdict(p) for p in loader.attached_programs(settings)]
    except OSError as exc:
        view["programs"], view["programs_error"] = [], str(exc)
    try:
        maps = DatapathMaps.open(config.pin_dir)
    except OSError as exc:
        view["maps_error"] = f"cannot open pinned maps: {exc}"
        return view
    try:
        view["meshed_netns"] = [
            {"netns_cookie": cookie, "ip": ip} for cookie, ip in sorted(maps.meshed_netns().items())
        ]
        view["counters"] = maps.read_counters()
        view["peer_auth"] = [
            {"ip": ip, "port": port, "mode": mode.name}
            for (ip, port), mode in sorted(maps.peer_auth_entries().items())
        ]
        view["orig_dst_pending"] = sum(1 for _ in maps.orig_dst.iter_keys())
    finally:
        maps.close()
    return view


def _saved_pod_names(config: AgentConfig) -> dict[str, str]:
    """Pod IP -> namespace/name from the last saved snapshot (names when the agent is down)."""
    try:
        snap = json.loads((config.state_dir / SNAPSHOT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {
        ip: f"{w['namespace']}/{w['name']}" for w in snap.get("workloads", []) for ip in w["ips"]
    }


def gather(config: AgentConfig) -> dict[str, Any]:
    agent, error = _agent_view(config)
    names = _saved_pod_names(config)
    kernel = _kernel_view(config)
    for pod in kernel.get("meshed_netns", []):
        pod["pod"] = names.get(pod["ip"], "")
    return {
        "node": config.node_name,
        "agent": {"running": agent is not None, "error": error, **(agent or {})},
        "datapath": kernel,
    }


def render(report: dict[str, Any]) -> str:
    agent, dp = report["agent"], report["datapath"]
    lines = [f"Node:        {report['node']}"]
    if agent["running"]:
        lines.append(f"Agent:       running (version {agent['version']}, up {agent['uptime_s']}s)")
        link = agent["controller"]
        state = "connected" if link["connected"] else f"disconnected ({link['last_error']})"
        lines.append(
            f"Controller:  {link['address']} {state}, snapshot {agent['snapshot_version'] or '-'}"
        )
    else:
        lines.append(f"Agent:       DOWN ({agent['error']}); showing what the pinned maps hold")
    lines.append(f"Datapath:    pins {dp['pin_dir']}, cgroup {dp['cgroup']}")
    lines.append("Programs attached:")
    for p in dp.get("programs") or []:
        mine = "" if p["pinned"] else "  (not ours)"
        lines.append(f"  id {p['id']:<6} {p['type']:<17} {p['name']:<15} {p['attach_type']}{mine}")
    if not dp.get("programs"):
        lines.append("  (none)")
    if "maps_error" in dp:
        lines.append(f"Maps:        {dp['maps_error']}")
        return "\n".join(lines)
    lines.append("Meshed pods:")
    for pod in dp["meshed_netns"]:
        name = pod["pod"] or "?"
        lines.append(f"  {name:<32} {pod['ip']:<15} netns cookie {pod['netns_cookie']}")
    if not dp["meshed_netns"]:
        lines.append("  (none)")
    c = dp["counters"]
    lines.append(
        f"Redirects:   {c['redirected']} redirected, {c['established']} handed to the proxy, "
        f"{c['excluded']} excluded ports, {c['strict_dropped']} plaintext dropped (STRICT)"
    )
    strict = [f"{e['ip']}:{e['port'] or '*'} {e['mode']}" for e in dp.get("peer_auth", [])]
    lines.append(f"mTLS (kernel): {', '.join(strict) if strict else 'no STRICT pods'}")
    if agent["running"]:
        p = agent["proxy"]
        lines.append(
            f"Proxy:       {p['active_connections']} active, {p['accepted_connections']} accepted, "
            f"{p['orig_dst_misses']} without original destination, "
            f"{p['upstream_failures']} upstream failures"
        )
    return "\n".join(lines)

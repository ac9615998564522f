"""From raw samples to what people read: the metric catalogue, summaries and ratios, the targets
of issues 9 and 18 and where each stands, and the Markdown table. Pure: a results dict in, text
out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.stats import Summary, added, ratio, summarize

DIRECT, SAME, CROSS, SIDECAR = "direct", "mesh-same-node", "mesh-cross-node", "sidecar-pair"
BASE_PATHS = (DIRECT, SAME, CROSS, SIDECAR)
# issue 18: the base mesh paths run at the default L7 level (`observe` on an HTTP/1.1 port);
# these reach the same servers at the other two, for the HTTP/1.1 scenarios
SAME_FULL, SAME_L4 = "mesh-same-node-full", "mesh-same-node-l4"
CROSS_FULL, CROSS_L4 = "mesh-cross-node-full", "mesh-cross-node-l4"
CROSS_ROUTED = "mesh-cross-node-routed"
LEVEL_PATHS = (SAME_FULL, SAME_L4, CROSS_FULL, CROSS_L4, CROSS_ROUTED)
PATHS = BASE_PATHS + LEVEL_PATHS
PATH_NOTES = {
    DIRECT: "unmeshed client pod -> server pod IP on the other node; no proxy",
    SAME: "meshed client -> Service VIP -> node-1 proxy -> server on node-1",
    CROSS: "meshed client -> Service VIP -> node-1 proxy -> node-2 (to node-2's proxy over "
    "HBONE where the commit has it) -> server on node-2",
    SIDECAR: "unmeshed client -> HAProxy A (node-1) -> mutual TLS 1.3 -> HAProxy B (node-2) "
    "-> server; TCP mode, one TLS connection per client connection (HTTP mode and h2 for h2c "
    "and gRPC)",
    SAME_FULL: "as mesh-same-node, through Service http-local-full: L7 level `full` "
    "(annotated, and routed by a VirtualService)",
    SAME_L4: "as mesh-same-node, through Service http-local-l4: L7 level `l4` (annotated off)",
    CROSS_FULL: "as mesh-cross-node, through Service http-remote-full: L7 level `full` "
    "(annotated, and routed by a VirtualService: `full` at both ends)",
    CROSS_L4: "as mesh-cross-node, through Service http-remote-l4: L7 level `l4` (annotated off)",
    CROSS_ROUTED: "as mesh-cross-node, through Service http-remote-routed: L7 level `full` by a "
    "VirtualService alone (`full` at the source, `observe` at the destination)",
}


@dataclass(frozen=True)
class Metric:
    id: str
    scenario: str
    title: str
    unit: str
    higher_is_better: bool
    added_from: str | None = None  # derived: that metric minus direct's, round by round


_TCP = "Bulk TCP (iperf3)"
_C1 = "HTTP/1.1, 1 connection, one request at a time (wrk)"
_C16 = "HTTP/1.1 keep-alive, 16 connections (wrk)"
_FIXED = "HTTP/1.1 at a fixed rate, 1 KiB responses, 16 connections (wrk, paced)"
_NEW = "New connection per request (wrk, Connection: close, 16 at a time)"
_IDLE = (
    "Idle proxied connections (proxies restarted, then a fifth of N held, then the rest: per "
    "connection of the rest; the first fifth's figure includes the proxies' first-use growth)"
)
_MEM = (
    "Proxy memory at the end of the fixed-rate run (PSS: a page that processes share, as the "
    "agent's forked fork server and workers do, is split between them, so PSS adds up; RSS "
    "summed counts it once per process)"
)


def node_memory_id(node: int, role: str | None) -> str:
    """The metric of node `node`'s proxy PSS: all its processes (None) or one role's
    (procstat.ROLES)."""
    return f"fixed_node{node}_{role.replace(' ', '') + '_' if role else ''}pss_mib"


_ROLE_TITLES = (
    ("main", "agent (HAProxy: master), PSS"),
    ("fork server", "workers' fork server, PSS"),
    ("workers", "workers, PSS"),
)
_H2 = "HTTP/2 (h2c) keep-alive, 10 connections x 10 streams (h2load)"
_GRPC = "gRPC unary calls, one channel, 10 calls in flight (grpcio)"

METRICS = (
    Metric("tcp_1_gbps", _TCP, "1 stream", "Gbit/s", True),
    Metric("tcp_4_gbps", _TCP, "4 streams", "Gbit/s", True),
    Metric("http_c1_rps", _C1, "requests", "req/s", True),
    Metric("http_c1_p50_ms", _C1, "p50 latency", "ms", False),
    Metric("http_c1_p99_ms", _C1, "p99 latency", "ms", False),
    Metric("http_c1_added_p50_ms", _C1, "added p50 over direct", "ms", False, "http_c1_p50_ms"),
    Metric("http_c16_rps", _C16, "requests", "req/s", True),
    Metric("http_c16_p50_ms", _C16, "p50 latency", "ms", False),
    Metric("http_c16_p99_ms", _C16, "p99 latency", "ms", False),
    Metric("http_c16_p999_ms", _C16, "p99.9 latency", "ms", False),
    Metric("fixed_rps", _FIXED, "achieved rate", "req/s", True),
    Metric("fixed_p50_ms", _FIXED, "p50 latency", "ms", False),
    Metric("fixed_p90_ms", _FIXED, "p90 latency", "ms", False),
    Metric("fixed_p99_ms", _FIXED, "p99 latency", "ms", False),
    Metric("fixed_added_p50_ms", _FIXED, "added p50 over direct", "ms", False, "fixed_p50_ms"),
    Metric("fixed_added_p90_ms", _FIXED, "added p90 over direct", "ms", False, "fixed_p90_ms"),
    Metric("fixed_added_p99_ms", _FIXED, "added p99 over direct", "ms", False, "fixed_p99_ms"),
    Metric("fixed_cpu_per_krps", _FIXED, "proxy CPU per 1,000 req/s, both nodes", "cores", False),
    Metric("fixed_proxy_pss_mib", _MEM, "both nodes, PSS", "MiB", False),
    Metric("fixed_proxy_rss_mib", _MEM, "both nodes, RSS summed over processes", "MiB", False),
    *(
        Metric(node_memory_id(n, role), _MEM, f"node-{n}: {title}", "MiB", False)
        for n in (1, 2)
        for role, title in ((None, "all, PSS"), *_ROLE_TITLES)
    ),
    Metric("newconn_rps", _NEW, "requests = connections", "req/s", True),
    Metric("idle_kib_per_conn", _IDLE, "proxy memory per idle connection", "KiB", False),
    Metric("idle_kib_first_batch", _IDLE, "the first fifth, first use included", "KiB", False),
    Metric("h2_rps", _H2, "requests", "req/s", True),
    Metric("h2_mean_ms", _H2, "mean latency", "ms", False),
    Metric("h2_cpu_per_krps", _H2, "proxy CPU per 1,000 req/s, both nodes", "cores", False),
    Metric("grpc_cps", _GRPC, "calls", "calls/s", True),
    Metric("grpc_p50_ms", _GRPC, "p50 latency", "ms", False),
    Metric("grpc_p99_ms", _GRPC, "p99 latency", "ms", False),
    Metric("grpc_cpu_per_kcalls", _GRPC, "proxy CPU per 1,000 calls/s, both nodes", "cores", False),
)
BY_ID = {m.id: m for m in METRICS}

Samples = dict[str, dict[str, list[float | None]]]  # metric id -> path -> one value per round


def derive_added(samples: Samples) -> None:
    """Fill in the `added_from` metrics: each path's value minus direct's in the same round
    (rounds where either is missing are left out)."""
    for metric in METRICS:
        if metric.added_from is None:
            continue
        source = samples.get(metric.added_from, {})
        base = source.get(DIRECT, [])
        out: dict[str, list[float | None]] = {}
        for path, values in source.items():
            if path == DIRECT:
                continue
            pairs = [(v, b) for v, b in zip(values, base, strict=False) if None not in (v, b)]
            if pairs:
                out[path] = list(added([v for v, _ in pairs], [b for _, b in pairs]))
        if out:
            samples[metric.id] = out


def summaries(samples: Samples) -> dict[str, dict[str, Summary]]:
    out: dict[str, dict[str, Summary]] = {}
    for metric_id, by_path in samples.items():
        for path, values in by_path.items():
            present = [v for v in values if v is not None]
            if present:
                out.setdefault(metric_id, {})[path] = summarize(present)
    return out


def metric_table(sums: dict[str, dict[str, Summary]]) -> list[dict]:
    """Every metric with, per path, its summary and its ratios to direct and to sidecar-pair."""
    rows = []
    for metric in METRICS:
        by_path = sums.get(metric.id)
        if not by_path:
            continue
        direct = by_path.get(DIRECT)
        sidecar = by_path.get(SIDECAR)
        paths = {}
        for path in PATHS:
            s = by_path.get(path)
            if s is None:
                continue
            paths[path] = {
                **s.as_dict(),
                "vs_direct": ratio(s.median, direct.median if direct else None),
                "vs_sidecar_pair": ratio(s.median, sidecar.median if sidecar else None),
            }
        rows.append(
            {
                "id": metric.id,
                "scenario": metric.scenario,
                "title": metric.title,
                "unit": metric.unit,
                "better": "higher" if metric.higher_is_better else "lower",
                "paths": paths,
            }
        )
    return rows


# -- targets --------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _median(sums: dict[str, dict[str, Summary]], metric: str, path: str) -> float | None:
    s = sums.get(metric, {}).get(path)
    return None if s is None else s.median


def _ratio_target(
    metric: str, path: str, other: str, minimum: float
) -> Callable[[dict], tuple[str, bool | None]]:
    def check(sums: dict) -> tuple[str, bool | None]:
        a, b = _median(sums, metric, path), _median(sums, metric, other)
        r = ratio(a, b)
        unit = BY_ID[metric].unit
        if r is None:
            return f"not measured ({path} {fmt(a)}, {other} {fmt(b)} {unit})", None
        return f"{r:.2f} x ({fmt(a)} vs {fmt(b)} {unit})", r >= minimum

    return check


def _at_most(metric: str, path: str, limit: float) -> Callable[[dict], tuple[str, bool | None]]:
    def check(sums: dict) -> tuple[str, bool | None]:
        a = _median(sums, metric, path)
        if a is None:
            return "not measured", None
        return f"{fmt(a)} {BY_ID[metric].unit}", a <= limit

    return check


def _memory_target(path: str, limit: float) -> Callable[[dict], tuple[str, bool | None]]:
    """PSS summed over the proxies' processes against `limit`, their RSS summed beside it."""

    def check(sums: dict) -> tuple[str, bool | None]:
        pss, rss = (
            _median(sums, "fixed_proxy_pss_mib", path),
            _median(sums, "fixed_proxy_rss_mib", path),
        )
        if pss is None:
            return f"not measured (RSS summed {fmt(rss)} MiB)", None
        return f"{fmt(pss)} MiB PSS (RSS summed {fmt(rss)} MiB)", pss <= limit

    return check


def _added_latency_vs_sidecar(sums: dict) -> tuple[str, bool | None]:
    a = _median(sums, "http_c1_added_p50_ms", CROSS)
    b = _median(sums, "http_c1_added_p50_ms", SIDECAR)
    if a is None or b is None:
        return f"not measured (mesh {fmt(a)}, sidecar-pair {fmt(b)} ms)", None
    return f"{fmt(a)} ms vs sidecar-pair {fmt(b)} ms", a <= b


def push_p99_seconds(push: dict | None) -> float | None:
    """The p99 in push_latency.json (written by benchmarks/push_latency.py): a `p99_s`, or a
    `p99_ms`, at the top or one level down."""
    if not isinstance(push, dict):
        return None
    for scope in [push, *[v for v in push.values() if isinstance(v, dict)]]:
        if isinstance(scope.get("p99_s"), int | float):
            return float(scope["p99_s"])
        if isinstance(scope.get("p99_ms"), int | float):
            return float(scope["p99_ms"]) / 1000
    return None


TARGETS: tuple[tuple[str, str, Callable[[dict], tuple[str, bool | None]]], ...] = (
    ("mesh-cross-node bulk throughput (1 stream)", "≥ 1.0 x sidecar-pair",
     _ratio_target("tcp_1_gbps", CROSS, SIDECAR, 1.0)),
    ("mesh-cross-node bulk throughput (1 stream)", "≥ 0.5 x direct",
     _ratio_target("tcp_1_gbps", CROSS, DIRECT, 0.5)),
    ("mesh-cross-node keep-alive req/s, 16 connections", "≥ 1.0 x sidecar-pair",
     _ratio_target("http_c16_rps", CROSS, SIDECAR, 1.0)),
    ("mesh-cross-node one request per connection, req/s", "≥ 5 x sidecar-pair",
     _ratio_target("newconn_rps", CROSS, SIDECAR, 5.0)),
    ("mesh-cross-node added p50 latency, 1 connection", "≤ sidecar-pair's added p50",
     _added_latency_vs_sidecar),
    ("mesh-cross-node at 1,000 req/s: added p90", "≤ 0.2 ms",
     _at_most("fixed_added_p90_ms", CROSS, 0.2)),
    ("mesh-cross-node at 1,000 req/s: added p99", "≤ 0.3 ms",
     _at_most("fixed_added_p99_ms", CROSS, 0.3)),
    ("mesh-cross-node at 1,000 req/s: CPU of both node proxies", "≤ 0.1 core per 1,000 req/s",
     _at_most("fixed_cpu_per_krps", CROSS, 0.1)),
    ("mesh-same-node bulk throughput (1 stream)", "≥ 0.9 x direct",
     _ratio_target("tcp_1_gbps", SAME, DIRECT, 0.9)),
    ("mesh-cross-node proxy memory per idle connection", "≤ 10 KiB",
     _at_most("idle_kib_per_conn", CROSS, 10.0)),
)  # fmt: skip


# issue 18's step: ratios in one run; `observe` is the default level on an HTTP/1.1 port, so
# the base mesh paths measure it; `full` with a route is a Service with a VirtualService (the
# route makes the source `full`; the destination, which decides nothing per request, observes)
TARGETS_18: tuple[tuple[str, str, Callable[[dict], tuple[str, bool | None]]], ...] = (
    ("cross-node keep-alive c16, `observe` (default on HTTP ports)", "≥ 1.0 x sidecar-pair",
     _ratio_target("http_c16_rps", CROSS, SIDECAR, 1.0)),
    ("cross-node keep-alive c16, `full` with a route", "≥ 0.5 x sidecar-pair",
     _ratio_target("http_c16_rps", CROSS_ROUTED, SIDECAR, 0.5)),
    ("same-node keep-alive c16, `l4`", "≥ 0.8 x direct",
     _ratio_target("http_c16_rps", SAME_L4, DIRECT, 0.8)),
    ("same-node bulk (1 stream)", "≥ 0.95 x direct",
     _ratio_target("tcp_1_gbps", SAME, DIRECT, 0.95)),
    ("at 1,000 req/s, default level: added p90 cross-node", "≤ 0.5 ms",
     _at_most("fixed_added_p90_ms", CROSS, 0.5)),
    ("at 1,000 req/s, default level: CPU of both node proxies", "≤ 0.25 core per 1,000 req/s",
     _at_most("fixed_cpu_per_krps", CROSS, 0.25)),
    ("node proxies' memory, both nodes (PSS at the fixed rate)", "≤ 120 MiB",
     _memory_target(CROSS, 120.0)),
    ("new connection per request, cross-node", "≥ 3 x sidecar-pair",
     _ratio_target("newconn_rps", CROSS, SIDECAR, 3.0)),
    ("idle connection, cross-node", "≤ 10 KiB",
     _at_most("idle_kib_per_conn", CROSS, 10.0)),
)  # fmt: skip


def evaluate_targets(sums: dict[str, dict[str, Summary]], push: dict | None) -> list[dict]:
    """Issue 9's targets and issue 18's (each entry names its `issue`); the push latency last."""
    out = []
    for issue, targets in ((9, TARGETS), (18, TARGETS_18)):
        for title, target, check in targets:
            measured, met = check(sums)
            out.append(
                {"title": title, "target": target, "measured": measured, "met": met, "issue": issue}
            )
    p99 = push_p99_seconds(push)
    out.append(
        {
            "issue": 9,
            "title": "controller push to 100 agents, p99",
            "target": "≤ 1 s",
            "measured": "not measured (no benchmarks/results/push_latency.json)"
            if push is None
            else ("see push_latency.json" if p99 is None else f"{fmt(p99)} s"),
            "met": None if p99 is None else p99 <= 1.0,
        }
    )
    return out


# -- Markdown -------------------------------------------------------------------------------


def _cell(entry: dict | None, path: str) -> str:
    if entry is None:
        return "—"
    text = fmt(entry["median"])
    if entry["n"] > 1 and entry["spread_pct"] is not None:
        text += f" ±{entry['spread_pct'] / 2:.0f}%"
    ratios = []
    if path != DIRECT and entry.get("vs_direct") is not None:
        ratios.append(f"{entry['vs_direct']:.2f}xd")
    if path != SIDECAR and entry.get("vs_sidecar_pair") is not None:
        ratios.append(f"{entry['vs_sidecar_pair']:.2f}xs")
    return text + (f" ({', '.join(ratios)})" if ratios else "")


_STATUS = {True: "met", False: "**missed**", None: "not measured"}


def _tool_errors(samples: Samples) -> list[str]:
    """'<scenario> on `<path>`: n, n, n' for every tool run set that counted errors."""
    out = []
    for metric, by_path in samples.items():
        if not metric.endswith("_errors"):
            continue
        for path, values in by_path.items():
            if any(values):
                counts = ", ".join("-" if v is None else str(int(v)) for v in values)
                out.append(f"{metric.removesuffix('_errors')} on `{path}`: {counts}")
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# meshagent benchmarks",
        "",
        f"Output of `{results['command']}` ({results['mode']} mode, {s['runs']} run(s) of every "
        f"figure, interleaved), {results['finished_at']}.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {m['python']}; "
        + (
            f"code of commit `{m['commit']}` (extracted with git archive)"
            if str(m.get("code", "")).startswith("commit")
            else f"working tree at commit `{m['commit']}`"
            + (" with uncommitted changes" if m.get("dirty") else "")
        )
        + f"; load average {m['loadavg_start']} at the start, {m['loadavg_end']} at the end"
        + (f"; other labs running: {', '.join(m['other_labs'])}" if m.get("other_labs") else "")
        + (f"; proxy workers per node: {m['proxy_workers']}" if m.get("proxy_workers") else "")
        + ". Clients, servers and proxies all share these cores.",
        "",
        "Paths:",
        "",
        *[f"- `{p}`: {note}" for p, note in results["paths"].items()],
        "",
        "The mesh sees the HTTP port as HTTP (Service port `http`), the h2c and gRPC ports as "
        "HTTP/2 and gRPC (`http2`, `grpc`) and the iperf3 and idle ports as opaque TCP "
        "(`tcp-*`); the HAProxy pair forwards the HTTP/1.1, iperf3 and idle ports as TCP and "
        "serves h2c and gRPC in HTTP mode (h2 in, h2 over its mutual TLS, h2c to the server).",
        "",
        "Each cell: median over the runs, ± half the spread (max - min) as a share of the "
        "median, and in parentheses the ratio of the medians to `direct` (xd) and to "
        "`sidecar-pair` (xs) measured in the same run.",
    ]
    levels = results.get("l7_levels") or {}
    if levels:
        shown = ", ".join(f"`{p}` {level}" for p, level in levels.items())
        lines += [
            "",
            f"L7 level of each mesh path's HTTP port, as node-1's status showed it: {shown}.",
        ]
    sections: dict[str, list[dict]] = {}
    for row in results["metrics"]:
        sections.setdefault(row["scenario"], []).append(row)
    for scenario, rows in sections.items():
        # the four base paths always, a level path where it was measured
        measured = {p for row in rows for p in row["paths"]}
        columns = [p for p in PATHS if p in BASE_PATHS or p in measured]
        lines += ["", f"## {scenario}", "", "| figure | " + " | ".join(columns) + " |"]
        lines.append("|---|" + "---|" * len(columns))
        for row in rows:
            title = f"{row['title']} ({row['unit']}, {row['better']} is better)"
            cells = [_cell(row["paths"].get(p), p) for p in columns]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for issue in (9, 18):
        targets = [t for t in results["targets"] if t.get("issue", 9) == issue]
        if not targets:
            continue
        lines += ["", f"## Targets (issue {issue})", "", "| target | goal | measured | status |"]
        lines.append("|---|---|---|---|")
        for t in targets:
            row = f"| {t['title']} | {t['target']} | {t['measured']} | {_STATUS[t['met']]} |"
            lines.append(row)
    if results.get("errors"):
        lines += ["", "## Failed measurements", ""]
        for e in results["errors"]:
            lines.append(f"- run {e['round'] + 1}, {e['scenario']}, `{e['path']}`: {e['error']}")
    tool_errors = _tool_errors(results.get("samples") or {})
    if tool_errors:
        lines += [
            "",
            "Socket errors, timeouts, non-2xx answers or failed gRPC calls that the load tool "
            "counted (per run): " + "; ".join(tool_errors) + ".",
        ]
    idle = results.get("idle_proxy_cpu_cores") or {}
    if idle:
        shown = ", ".join(f"{name} {value:.3f}" for name, value in idle.items())
        lines += ["", f"Proxies' CPU while idle, before the runs (cores): {shown}."]
    lines += ["", _settings_line(results), ""]
    return "\n".join(lines)


H2_SCENARIOS = frozenset(("h2-keepalive", "grpc-unary"))


def _settings_line(results: dict) -> str:
    """How long and how much, for the scenarios that ran."""
    s = results["settings"]
    ran = set(results.get("scenarios") or ())
    parts = []
    if not ran or ran - H2_SCENARIOS:
        parts.append(
            f"{s['tcp_seconds']} s per iperf3 run ({s['tcp_omit']} s of slow start left out), "
            f"{s['http_seconds']} s per wrk run ({s['latency_seconds']} s at 1 connection), "
            f"{s['rate']} req/s for {s['rate_seconds']} s over {s['rate_connections']} "
            f"connections, {s['newconn_seconds']} s of new connections, "
            f"{s['idle_connections']} idle connections"
        )
    if ran & H2_SCENARIOS:
        parts.append(
            f"{s['h2_seconds']} s per h2load run (`-c {s['h2_connections']} -m {s['h2_streams']}"
            f" -D {s['h2_seconds']}`; the requests in flight when h2load stops, which it counts "
            f"as failed, are not errors) and per gRPC run ({s['grpc_concurrency']} unary calls "
            "in flight on one channel)"
        )
    return "Settings: " + "; ".join(parts) + "."

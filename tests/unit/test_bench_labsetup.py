"""benchmarks/lab.yaml and labsetup.py: the bench lab has what each path needs, where it needs
it, and the run folder holds configurations that agree with the planned addresses."""

from __future__ import annotations

import json
import subprocess

import pytest
from meshagent.lab.paths import POD_NET_OCTET

from benchmarks import configs, labsetup


def _objects(run_dir="/tmp/run") -> list[dict]:
    return labsetup.render_manifest(labsetup.MANIFEST.read_text(), run_dir)


def test_the_run_folder_is_filled_in_everywhere():
    text = str(_objects("/tmp/bench-xyz"))
    assert labsetup.PLACEHOLDER not in text and labsetup.REPO_PLACEHOLDER not in text
    assert "/tmp/bench-xyz/haproxy-a.cfg" in text
    assert f"{labsetup.REPO}/tests/e2e/apps/grpc_echo.py" in text


def test_meshed_and_plain_namespaces():
    namespaces = {o["metadata"]["name"]: o for o in _objects() if o["kind"] == "Namespace"}
    assert namespaces["bench-mesh"]["metadata"]["labels"]["meshagent.io/mesh"] == "enabled"
    assert "labels" not in namespaces["bench-plain"]["metadata"]


def test_servers_clients_and_proxies_sit_on_the_nodes_each_path_needs():
    ips = labsetup.plan_ips(_objects())

    def node(pod: str) -> int:
        octet, index = ips[pod].split(".")[1:3]
        assert int(octet) == POD_NET_OCTET
        return int(index)

    assert node("bench-plain/client") == node("bench-mesh/client") == 1
    assert node("bench-plain/sidecar-a") == 1 and node("bench-plain/sidecar-b") == 2
    assert node("bench-plain/http") == node("bench-mesh/http-remote") == 2
    assert node("bench-mesh/http-local") == 1
    assert node("bench-plain/iperf") == node("bench-mesh/iperf-remote") == 2
    assert node("bench-mesh/iperf-local") == 1
    assert node("bench-plain/grpc") == node("bench-mesh/grpc-remote") == 2
    assert node("bench-mesh/grpc-local") == 1


def test_mesh_paths_dial_services_that_select_their_servers():
    objects = _objects()
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    pods = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}
    paths = labsetup.bench_paths(labsetup.plan_ips(objects))
    expected = {
        "mesh-same-node": ("http-local", "iperf-local", "grpc-local"),
        "mesh-cross-node": ("http-remote", "iperf-remote", "grpc-remote"),
    }
    for name, (http, iperf, grpc) in expected.items():
        path = paths[name]
        targets = (
            (path.http, "http", http),
            (path.iperf, "tcp-iperf", iperf),
            (path.idle, "tcp-idle", http),
            (path.h2, "http2", http),
            (path.grpc, "grpc", grpc),
        )
        for (host, port), port_name, server in targets:
            svc_name, namespace = host.split(".")
            assert namespace == "bench-mesh"
            svc = services[svc_name]
            assert svc["spec"]["selector"] == {"app": server}
            assert pods[server]["metadata"]["labels"]["app"] == server
            # the port's name tells the mesh its protocol: HTTP, or opaque TCP
            assert {"name": port_name, "port": port, "targetPort": port} in svc["spec"]["ports"]
        assert len(path.proxies) == 2  # both node agents


def test_direct_and_sidecar_paths_dial_pod_ips_and_the_sidecar_config_agrees(tmp_path):
    manifest, paths = labsetup.prepare(tmp_path / "run")
    ips = labsetup.plan_ips(
        labsetup.render_manifest(labsetup.MANIFEST.read_text(), tmp_path / "run")
    )
    assert paths["direct"].http == (ips["bench-plain/http"], configs.HTTP_PORT)
    assert paths["direct"].iperf == (ips["bench-plain/iperf"], configs.IPERF_PORT)
    assert paths["direct"].proxies == ()
    assert paths["sidecar-pair"].http == (ips["bench-plain/sidecar-a"], configs.SIDECAR_A_HTTP)
    a = (tmp_path / "run" / "haproxy-a.cfg").read_text()
    b = (tmp_path / "run" / "haproxy-b.cfg").read_text()
    assert f"{ips['bench-plain/sidecar-b']}:{configs.SIDECAR_B_HTTP}" in a
    assert f"{ips['bench-plain/http']}:{configs.HTTP_PORT}" in b
    assert f"{ips['bench-plain/iperf']}:{configs.IPERF_PORT}" in b
    assert paths["direct"].grpc == (ips["bench-plain/grpc"], configs.GRPC_PORT)
    assert paths["sidecar-pair"].h2 == (ips["bench-plain/sidecar-a"], configs.SIDECAR_A_H2)
    assert f"{ips['bench-plain/sidecar-b']}:{configs.SIDECAR_B_GRPC}" in a
    assert f"{ips['bench-plain/grpc']}:{configs.GRPC_PORT}" in b
    assert manifest.exists() and (tmp_path / "run" / "nginx-plain").is_dir()


def test_lab_up_output_must_match_the_plan():
    planned = {"bench-plain/http": "10.1.2.10"}
    labsetup.check_ips("lab up: 2 nodes\n  bench-plain/http   node-2   10.1.2.10\n", planned)
    with pytest.raises(labsetup.LabFailed, match=r"10\.1\.2\.99"):
        labsetup.check_ips("  bench-plain/http   node-2   10.1.2.99\n", planned)


def test_level_paths_reach_the_same_server_through_services_forcing_their_level():
    """Issue 18: mesh-*-full and mesh-*-l4 dial Services of their own, annotated with the level
    (the `full` ones also routed by a VirtualService; mesh-cross-node-routed by a VirtualService
    alone, not annotated), in front of pods of their own running the
    base path's nginx on the base path's node, and run the HTTP/1.1 scenarios only. Pods of
    their own: a pod port behind several Services gets the highest of their levels on the
    destination's node, so a shared server would be measured at `full` there for every level."""
    objects = _objects()
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    routes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "VirtualService"}
    pods = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}
    paths = labsetup.bench_paths(labsetup.plan_ips(objects))
    assert set(labsetup.LEVEL_PATHS) <= set(paths)

    def servers(svc: dict) -> list[dict]:
        selector = svc["spec"]["selector"].items()
        return [p for p in pods.values() if selector <= p["metadata"]["labels"].items()]

    def nginx(pod: dict) -> tuple[str, list[str]]:
        (container,) = pod["spec"]["containers"]
        command = list(container["command"])
        prefix = command.index("-p") + 1
        command[prefix] = "<prefix>"
        return pod["spec"]["nodeName"], command

    prefixes = set()
    for base in ("mesh-same-node", "mesh-cross-node"):
        (base_server,) = servers(services[paths[base].http[0].split(".")[0]])
        cases = [("full", "full", "full"), ("l4", "l4", "off")]
        if base == "mesh-cross-node":  # `full` by a VirtualService alone: no annotation
            cases.append(("routed", "full (pods observe)", None))
        for suffix, level, annotation in cases:
            path = paths[f"{base}-{suffix}"]
            svc_name, namespace = path.http[0].split(".")
            svc = services[svc_name]
            assert namespace == "bench-mesh" and path.level == (svc_name, level)
            (server,) = servers(svc)
            assert server is not base_server and nginx(server) == nginx(base_server)
            command = server["spec"]["containers"][0]["command"]
            prefixes.add(command[command.index("-p") + 1])
            others = [
                s for name, s in services.items() if name != svc_name and server in servers(s)
            ]
            assert others == []  # its level alone applies on the server's node
            wanted = {"meshagent.io/l7": annotation} if annotation else None
            assert svc["metadata"].get("annotations") == wanted
            assert {"name": "http", "port": 8080, "targetPort": 8080} in svc["spec"]["ports"]
            assert path.proxies == paths[base].proxies
            assert path.runs("http-c16") and not path.runs("tcp-1")
            assert not path.runs("idle-connections") and not path.runs("h2-keepalive")
            if level.startswith("full"):
                (rule,) = routes[svc_name]["spec"]["http"]
                assert rule["route"][0]["destination"]["host"] == svc_name
            else:
                assert svc_name not in routes
        assert paths[base].runs("tcp-1") and paths[base].level is None
        base_services = [name for name, s in services.items() if base_server in servers(s)]
        assert base_services == [paths[base].http[0].split(".")[0]]  # `observe` alone there
    # each nginx has a prefix (pid file, logs) of its own, which the run folder makes
    assert {p.rsplit("/", 1)[1] for p in prefixes} <= set(labsetup.NGINX_PREFIXES)
    assert len(prefixes) == 5


def test_levels_in_force_waits_for_the_level_paths_and_names_those_never_shown(monkeypatch):
    """The controller's first push may come after `meshlab up`: the harness reads node-1's
    status again until each level path's Service shows its level, and gives up on the rest."""
    paths = labsetup.bench_paths(labsetup.plan_ips(_objects()))
    chosen = [paths[n] for n in ("direct", "mesh-cross-node", "mesh-cross-node-l4")]
    shown = iter([{}, {"http-remote": "observe", "http-remote-l4": "l4"}])
    monkeypatch.setattr(labsetup, "_levels_shown", lambda node: next(shown))
    levels, wrong = labsetup.levels_in_force(chosen, timeout=5)
    assert levels == {"mesh-cross-node": "observe", "mesh-cross-node-l4": "l4"} and wrong == []

    monkeypatch.setattr(labsetup, "_levels_shown", lambda node: {"http-remote-full": "observe"})
    levels, wrong = labsetup.levels_in_force([paths["mesh-cross-node-full"]], timeout=0.1)
    assert levels == {"mesh-cross-node-full": "observe"}
    assert [p.name for p in wrong] == ["mesh-cross-node-full"]


def test_levels_shown_name_the_pods_level_where_it_is_lower(monkeypatch):
    """A Service `full` only for its routes shows `full` with its pods' node at `observe`
    (`meshagent status --json`'s ``l7_pods``): the routed path's destination side, read, not
    assumed."""
    status = {
        "services": [
            {"name": "http-remote-routed", "namespace": "bench-mesh",
             "ports": [{"port": 8080, "l7": "full", "l7_pods": "observe"}]},
            {"name": "http-remote-full", "namespace": "bench-mesh",
             "ports": [{"port": 8080, "l7": "full"}, {"port": 9090, "l7": "l4"}]},
            {"name": "reviews", "namespace": "shop", "ports": [{"port": 8080, "l7": "full"}]},
        ]
    }  # fmt: skip
    seen = []

    def fake_meshlab(*args, **kwargs):
        seen.append(args)
        return subprocess.CompletedProcess(args, 0, stdout=json.dumps(status), stderr="")

    monkeypatch.setattr(labsetup, "meshlab", fake_meshlab)
    assert labsetup._levels_shown("node-1") == {
        "http-remote-routed": "full (pods observe)",
        "http-remote-full": "full",
    }
    assert seen[0][:3] == ("exec", "--node", "node-1")

"""Which protocol serves a connection: the dialled Service port's (routing.port_protocol), named
by the source in the HBONE CONNECT; the destination's fallback when a source does not say is
the pod port's, from the snapshot (`Tables.pod_protocols`)."""

from __future__ import annotations

from meshagent.agent.state import Tables
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot


def _service(name: str, ports: list[ServicePort], ip: str) -> Service:
    return Service(
        namespace="g7",
        name=name,
        vips=["10.96.0.9"],
        ports=ports,
        endpoints=[
            Endpoint(ip=ip, node="node-2", workload_uid=name, ports={p.port: 8082 for p in ports})
        ],
    )


def test_one_pod_port_behind_http_and_http2_service_ports_falls_back_to_http1():
    both = _service(
        "web",
        [
            ServicePort(name="http-a", port=8083, target_port=8082),
            ServicePort(name="http2-b", port=8082, target_port=8082),
        ],
        "10.0.2.11",
    )
    grpc = _service("echo", [ServicePort(name="grpc", port=50051, target_port=8082)], "10.0.2.12")
    tcp = _service("db", [ServicePort(name="", port=5432, target_port=8082)], "10.0.2.13")
    tables = Tables.build(Snapshot(node="node-2", services=[both, grpc, tcp]))
    # what the source names in the CONNECT wins; this is only the guess without it
    assert tables.pod_protocol("10.0.2.11", 8082) == "http1"
    assert tables.pod_protocol("10.0.2.12", 8082) == "http2"
    assert tables.pod_protocol("10.0.2.13", 8082) == "tcp"
    assert tables.pod_protocol("10.0.2.99", 80) == "tcp"

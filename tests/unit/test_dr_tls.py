"""DestinationRule `tls` (issue #21 item 3), mode by mode, as Istio's ClientTLSSettings says:
the schema, the policy merge (port level, subsets), and TLS origination against a real TLS
server on loopback (real handshakes with throwaway certificates)."""

from __future__ import annotations

import ssl
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding
from meshagent.agent.proxy.routing import merge_policy
from meshagent.agent.proxy.tls_origin import TlsOriginError, originate
from meshagent.agent.proxy.upstream import Connector, UpstreamError
from meshagent.common.istio.networking import ClientTLSSettings, TrafficPolicy
from meshagent.common.istio.resource import parse_resource
from meshagent.common.istio.support import warnings
from pydantic import ValidationError

from tests.certs import TestCA

HOST = "tls-server.outside.svc.cluster.local"


def tls(**fields) -> ClientTLSSettings:
    return ClientTLSSettings.model_validate(fields)


# -- schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "ISTIO_MUTUAL", "caCertificates": "/c.pem"}, "ISTIO_MUTUAL uses the mesh's"),
        ({"mode": "MUTUAL", "caCertificates": "/c.pem"}, "MUTUAL needs clientCertificate"),
        ({"mode": "SIMPLE", "privateKey": "/k.pem"}, "only used with MUTUAL, not SIMPLE"),
        ({"mode": "SIMPLE", "caCertificates": "ca.pem"}, "absolute file path on the node"),
        ({"mode": "SIMPLE", "credentialName": "ca"}, "credentialName"),
        ({"mode": "STRICT"}, "mode"),
    ],
)
def test_inconsistent_settings_are_refused_naming_the_field(fields, message) -> None:
    with pytest.raises(ValidationError) as caught:
        tls(**fields)
    assert message in str(caught.value)


def test_every_istio_mode_is_accepted() -> None:
    assert tls(mode="ISTIO_MUTUAL", sni="x").mode == "ISTIO_MUTUAL"
    assert tls(mode="DISABLE").mode == "DISABLE"
    simple = tls(mode="SIMPLE", caCertificates="/ca.pem", sni="a", subjectAltNames=["b"])
    assert simple.subject_alt_names == ("b",)
    mutual = tls(mode="MUTUAL", clientCertificate="/c.pem", privateKey="/k.pem")
    assert mutual.client_certificate == "/c.pem"


# -- merge ------------------------------------------------------------------------------------


def policy(**fields) -> TrafficPolicy:
    return TrafficPolicy.model_validate(fields)


def test_istio_mutual_is_the_mesh_default_and_the_others_are_kept() -> None:
    assert merge_policy(policy(tls={"mode": "ISTIO_MUTUAL"}), None, 80).tls is None
    assert merge_policy(policy(tls={"mode": "DISABLE"}), None, 80).tls.mode == "DISABLE"


def test_port_level_tls_replaces_the_rules_and_a_subset_overrides_both() -> None:
    top = policy(
        tls={"mode": "DISABLE"},
        portLevelSettings=[{"port": {"number": 443}, "tls": {"mode": "SIMPLE", "sni": "x"}}],
    )
    assert merge_policy(top, None, 443).tls.mode == "SIMPLE"
    assert merge_policy(top, None, 80).tls.mode == "DISABLE"
    subset = policy(tls={"mode": "ISTIO_MUTUAL"})
    assert merge_policy(top, subset, 80).tls is None
    # a subset's port-level settings replace the four policies whole
    sub_port = policy(portLevelSettings=[{"port": {"number": 80}, "connectionPool": {"tcp": {}}}])
    assert merge_policy(top, sub_port, 80).tls is None


# -- origination against a real TLS server ----------------------------------------------------


class Server:
    """A TLS echo-greeting server on loopback with a certificate from `ca` naming HOST; it
    records the client certificate it saw (MUTUAL)."""

    def __init__(self, ca: TestCA, tmp: Path, client_ca: TestCA | None = None) -> None:
        leaf = ca.issue(dns=(HOST,))
        (tmp / "server.pem").write_bytes(leaf.chain_pem)
        (tmp / "server.key").write_bytes(leaf.key_pem)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(tmp / "server.pem", tmp / "server.key")
        if client_ca is not None:
            (tmp / "client-ca.pem").write_bytes(client_ca.pem)
            self.ctx.load_verify_locations(tmp / "client-ca.pem")
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.client_certs: list[bytes | None] = []
        self.alpn: list[str | None] = []  # the protocol each handshake selected

    async def handle(self, raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, self.ctx, server_side=True)
        try:
            await stream.do_handshake()
            self.client_certs.append(stream.getpeercert(binary_form=True))
            self.alpn.append(stream.selected_alpn_protocol())
            await stream.send_all(b"hello " + await stream.receive_some(100))
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def exchange(server: Server, settings: ClientTLSSettings, alpn=()) -> bytes:
    """One greeting through `originate`; its error is raised as is (not in a group)."""
    failure: TlsOriginError | None = None
    reply = b""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            with trio.fail_after(10):
                stream = await originate(raw, settings, HOST, alpn)
                assert stream.socket is raw.socket  # the pool polls it while idle
                await stream.send_all(b"mesh")
                reply = await stream.receive_some(100)
                await stream.aclose()
        except TlsOriginError as exc:
            failure = exc
        except trio.BrokenResourceError:
            reply = b""  # refused after the handshake (TLS 1.3 checks client certificates late)
        finally:
            await trio.aclose_forcefully(raw)
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return reply


def write_ca(ca: TestCA, path: Path) -> str:
    path.write_bytes(ca.pem)
    return str(path)


async def test_simple_verifies_the_server_against_ca_certificates(tmp_path) -> None:
    ca = TestCA()
    settings = tls(mode="SIMPLE", caCertificates=write_ca(ca, tmp_path / "ca.pem"))
    assert await exchange(Server(ca, tmp_path), settings) == b"hello mesh"


async def test_an_http2_upstream_offers_alpn_h2(tmp_path) -> None:
    """h2UpgradePolicy UPGRADE over `tls` SIMPLE: the handshake offers h2 (as Envoy does for
    a cluster it speaks HTTP/2 to); an HTTP/1.1 upstream offers nothing."""
    ca = TestCA()
    settings = tls(mode="SIMPLE", caCertificates=write_ca(ca, tmp_path / "ca.pem"))
    server = Server(ca, tmp_path)
    assert await exchange(server, settings, ("h2",)) == b"hello mesh"
    assert await exchange(server, settings) == b"hello mesh"
    assert server.alpn == ["h2", None]


async def test_simple_refuses_a_server_of_another_ca_saying_why(tmp_path) -> None:
    settings = tls(mode="SIMPLE", caCertificates=write_ca(TestCA("other"), tmp_path / "ca.pem"))
    with pytest.raises(TlsOriginError, match=r"certificate verify failed|unable to get"):
        await exchange(Server(TestCA(), tmp_path), settings)


async def test_the_sni_must_be_a_name_of_the_server(tmp_path) -> None:
    ca = TestCA()
    settings = tls(mode="SIMPLE", caCertificates=write_ca(ca, tmp_path / "ca.pem"), sni="evil")
    with pytest.raises(TlsOriginError, match=r"Hostname mismatch|hostname"):
        await exchange(Server(ca, tmp_path), settings)


async def test_subject_alt_names_replace_the_sni_check(tmp_path) -> None:
    ca = TestCA()
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    ok = tls(mode="SIMPLE", caCertificates=ca_file, sni="other", subjectAltNames=["x", HOST])
    assert await exchange(Server(ca, tmp_path), ok) == b"hello mesh"
    wrong = tls(mode="SIMPLE", caCertificates=ca_file, subjectAltNames=["db.example.com"])
    with pytest.raises(TlsOriginError, match="match none of subjectAltNames"):
        await exchange(Server(ca, tmp_path), wrong)


async def test_insecure_skip_verify_accepts_any_server(tmp_path) -> None:
    settings = tls(
        mode="SIMPLE",
        caCertificates=write_ca(TestCA("other"), tmp_path / "ca.pem"),
        subjectAltNames=["nobody"],
        insecureSkipVerify=True,
    )
    assert await exchange(Server(TestCA(), tmp_path), settings) == b"hello mesh"


async def test_mutual_presents_the_client_certificate_files(tmp_path) -> None:
    ca, client_ca = TestCA(), TestCA("clients")
    client = client_ca.issue(dns=("client.example",))
    (tmp_path / "client.pem").write_bytes(client.chain_pem)
    (tmp_path / "client.key").write_bytes(client.key_pem)
    server = Server(ca, tmp_path, client_ca=client_ca)
    settings = tls(
        mode="MUTUAL",
        caCertificates=write_ca(ca, tmp_path / "ca.pem"),
        clientCertificate=str(tmp_path / "client.pem"),
        privateKey=str(tmp_path / "client.key"),
    )
    assert await exchange(server, settings) == b"hello mesh"
    # the very certificate of the files
    assert server.client_certs[-1] == client.certificate.public_bytes(Encoding.DER)
    no_client = tls(mode="SIMPLE", caCertificates=str(tmp_path / "ca.pem"))
    assert await exchange(server, no_client) == b""  # the server requires one


async def test_missing_files_are_named(tmp_path) -> None:
    settings = tls(
        mode="MUTUAL",
        clientCertificate=str(tmp_path / "absent.pem"),
        privateKey=str(tmp_path / "absent.key"),
        insecureSkipVerify=True,
    )
    with pytest.raises(TlsOriginError, match=r"absent\.pem"):
        await exchange(Server(TestCA(), tmp_path), settings)


# -- DISABLE toward a STRICT destination ------------------------------------------------------


def connector_to(mode: str) -> Connector:
    dest = SimpleNamespace(meshed=True, node="node-2", namespace="shop")
    tables = SimpleNamespace(
        workload_by_ip={"10.244.2.7": dest},
        mtls_for=lambda _w: SimpleNamespace(mode_for=lambda _port: mode),
    )
    inputs = SimpleNamespace(store=SimpleNamespace(tables=tables), node="node-1", trust_domain="t")
    return Connector(inputs, pool=None, identities=None)


@pytest.mark.parametrize("mode", ["DISABLE", "SIMPLE"])
async def test_tls_other_than_istio_mutual_to_a_strict_destination_is_refused(mode) -> None:
    with pytest.raises(UpstreamError) as caught:
        await connector_to("STRICT").open(
            None, "10.244.2.7", 9080, "10.244.1.5", tls=tls(mode=mode)
        )
    assert caught.value.kind == "refused"
    assert f"tls mode {mode} is not the mesh's mTLS" in str(caught.value)
    assert "STRICT PeerAuthentication requires" in str(caught.value)


def test_istio_mutual_names_are_warned_as_ignored() -> None:
    dr = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "host": "reviews",
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL", "sni": "reviews.shop"}},
        },
    }
    assert [p for p, _ in warnings(parse_resource(dr))] == ["spec.trafficPolicy.tls"]
    dr["spec"]["trafficPolicy"]["tls"] = {"mode": "ISTIO_MUTUAL"}
    assert warnings(parse_resource(dr)) == []

"""HBONE TLS contexts, checked with real handshakes over in-memory BIOs; the TLS stream over
in-memory streams and a local socket pair."""

from __future__ import annotations

import contextlib
import ssl
import tracemalloc
from functools import partial

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.serialization import Encoding
from meshagent.agent.hbone.errors import PeerIdentityError
from meshagent.agent.hbone.tls import (
    client_context,
    peer_identity,
    server_context_selector,
)
from meshagent.agent.hbone.tlsstream import TlsStream
from meshagent.common.spiffe import Identity, sni_for

from tests.certs import TestCA
from tests.unit.failed_reads import count_failed_reads

TD = "cluster.local"
FRONTEND = Identity(TD, "shop", "frontend")
REVIEWS = Identity(TD, "shop", "reviews")
RATINGS = Identity(TD, "shop", "ratings")


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, sni: str | None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two in-memory endpoints; raise the first side's error."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server judges the client certificate after the client is done, so
            # let any alert reach the client as a read error.
            with contextlib.suppress(ssl.SSLWantReadError):
                client.read(1)
            return client, server
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def leaves(ca):
    return {identity: ca.issue(identity.uri) for identity in (FRONTEND, REVIEWS, RATINGS)}


def lookup_from(leaves):
    by_sni = {
        sni_for(identity): (leaf.chain_pem, leaf.key_pem) for identity, leaf in leaves.items()
    }
    return by_sni.get


def test_server_presents_the_identity_named_in_sni_and_each_side_reads_the_other(ca, leaves):
    selector = server_context_selector(lookup_from(leaves), ca.pem)
    ctx = client_context(leaves[FRONTEND].chain_pem, leaves[FRONTEND].key_pem, ca.pem)
    for wanted in (REVIEWS, RATINGS):
        client, server = handshake(ctx, selector.context, sni_for(wanted))
        assert peer_identity(client) == wanted
        assert peer_identity(server) == FRONTEND
        assert selector.identity_of(server.context) == wanted
        assert client.version() == "TLSv1.3"
        assert client.selected_alpn_protocol() == "h2"


def test_unknown_server_name_fails_the_handshake(ca, leaves):
    selector = server_context_selector(lookup_from(leaves), ca.pem)
    ctx = client_context(leaves[FRONTEND].chain_pem, leaves[FRONTEND].key_pem, ca.pem)
    stranger = Identity(TD, "other", "nobody")
    with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|CALLBACK_FAILED"):
        handshake(ctx, selector.context, sni_for(stranger))


def test_a_renewed_certificate_gets_a_new_context_for_new_handshakes_only(ca, leaves):
    current = {"material": (leaves[REVIEWS].chain_pem, leaves[REVIEWS].key_pem)}
    selector = server_context_selector(lambda name: current["material"], ca.pem)
    ctx = client_context(leaves[FRONTEND].chain_pem, leaves[FRONTEND].key_pem, ca.pem)

    _, first = handshake(ctx, selector.context, sni_for(REVIEWS))
    _, again = handshake(ctx, selector.context, sni_for(REVIEWS))
    assert again.context is first.context  # cached, not rebuilt per handshake

    renewed = ca.issue(REVIEWS.uri)
    current["material"] = (renewed.chain_pem, renewed.key_pem)
    client, after = handshake(ctx, selector.context, sni_for(REVIEWS))
    assert after.context is not first.context
    assert selector.identity_of(after.context) == REVIEWS
    assert client.getpeercert(binary_form=True) == renewed.certificate.public_bytes(Encoding.DER)
    assert selector.identity_of(first.context) == REVIEWS  # old connections keep theirs


def test_client_certificate_from_another_ca_is_refused(ca, leaves):
    selector = server_context_selector(lookup_from(leaves), ca.pem)
    rogue = TestCA("rogue").issue(FRONTEND.uri)
    ctx = client_context(rogue.chain_pem, rogue.key_pem, ca.pem)
    with pytest.raises(ssl.SSLError, match=r"UNKNOWN_CA|certificate verify failed"):
        handshake(ctx, selector.context, sni_for(REVIEWS))


def test_server_certificate_from_another_ca_is_refused(ca, leaves):
    rogue_ca = TestCA("rogue")
    rogue = rogue_ca.issue(REVIEWS.uri)
    selector = server_context_selector(lambda name: (rogue.chain_pem, rogue.key_pem), ca.pem)
    ctx = client_context(leaves[FRONTEND].chain_pem, leaves[FRONTEND].key_pem, ca.pem)
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(ctx, selector.context, sni_for(REVIEWS))


def test_a_bundle_with_two_roots_trusts_both_during_rotation(ca, leaves):
    new_ca = TestCA("next root")
    bundle = ca.pem + new_ca.pem
    selector = server_context_selector(lookup_from(leaves), bundle)
    moved = new_ca.issue(FRONTEND.uri)
    ctx = client_context(moved.chain_pem, moved.key_pem, bundle)
    _, server = handshake(ctx, selector.context, sni_for(REVIEWS))
    assert peer_identity(server) == FRONTEND


def test_tls_1_2_is_refused(ca, leaves):
    selector = server_context_selector(lookup_from(leaves), ca.pem)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.check_hostname = False
    old.load_verify_locations(cadata=ca.pem.decode())
    with pytest.raises(ssl.SSLError):
        handshake(old, selector.context, sni_for(REVIEWS))


def test_peer_identity_requires_exactly_one_spiffe_uri(ca, leaves, tmp_path):
    two = ca.issue(REVIEWS.uri, RATINGS.uri)
    selector = server_context_selector(lambda name: (two.chain_pem, two.key_pem), ca.pem)
    # Loading the server's own certificate already insists on one identity.
    ctx = client_context(leaves[FRONTEND].chain_pem, leaves[FRONTEND].key_pem, ca.pem)
    with pytest.raises(ssl.SSLError):
        handshake(ctx, selector.context, sni_for(REVIEWS))

    none = ca.issue()
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.pem.decode())
    bare.set_alpn_protocols(["h2"])
    (tmp_path / "cert.pem").write_bytes(none.chain_pem)
    (tmp_path / "key.pem").write_bytes(none.key_pem)
    bare.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    selector = server_context_selector(lookup_from(leaves), ca.pem)
    _, server = handshake(bare, selector.context, sni_for(REVIEWS))
    with pytest.raises(PeerIdentityError, match="no subject alternative names"):
        peer_identity(server)


@pytest.mark.parametrize(
    ("what", "fault"),
    [
        ("bundle-not-pem", "trust bundle is not PEM"),
        ("chain-not-pem", "certificate chain is not PEM"),
        ("key-mismatch", "do not load together"),
        ("no-spiffe-id", "not a workload certificate"),
    ],
)
def test_bad_material_is_refused_with_a_clear_message(ca, leaves, what, fault):
    leaf = leaves[FRONTEND]
    chain, key, bundle = leaf.chain_pem, leaf.key_pem, ca.pem
    if what == "bundle-not-pem":
        bundle = b"hello"
    elif what == "chain-not-pem":
        chain = b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    elif what == "key-mismatch":
        key = leaves[REVIEWS].key_pem
    elif what == "no-spiffe-id":
        bare = ca.issue()
        chain, key = bare.chain_pem, bare.key_pem
    with pytest.raises(ValueError, match=fault):
        client_context(chain, key, bundle)


async def _tls_pair(ca, leaves, make_transport) -> tuple[TlsStream, TlsStream]:
    left, right = make_transport()
    ctx = client_context(leaves[FRONTEND].chain_pem, leaves[FRONTEND].key_pem, ca.pem)
    selector = server_context_selector(lookup_from(leaves), ca.pem)
    client = TlsStream(left, ctx, server_hostname=sni_for(REVIEWS))
    server = TlsStream(right, selector.context, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def test_tls_stream_meets_trios_two_way_stream_contract(ca, leaves):
    await trio.testing.check_two_way_stream(
        partial(_tls_pair, ca, leaves, trio.testing.memory_stream_pair),
        partial(_tls_pair, ca, leaves, trio.testing.lockstep_stream_pair),
    )


def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_tls_stream_over_a_socket_meets_trios_two_way_stream_contract(ca, leaves):
    # Over a socket the stream reads ciphertext into a buffer of its own, not receive_some.
    await trio.testing.check_two_way_stream(partial(_tls_pair, ca, leaves, _socket_pair), None)


async def test_tls_stream_over_a_socket_reads_what_arrived_without_allocating_a_whole_read(
    ca, leaves
):
    client, server = await _tls_pair(ca, leaves, _socket_pair)
    for size in (1, 100, 3000):
        await client.send_all(b"q" * size)
        await trio.testing.wait_all_tasks_blocked()
        tracemalloc.start()
        try:
            got = await server.receive_some()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert got == b"q" * size
        # A 256 KiB read used to allocate 256 KiB (twice: socket and TLS), whatever came.
        assert peak < 32 * 1024, f"receiving {size} bytes allocated {peak} bytes at the peak"
    payload = bytes(range(256)) * 12_289  # ~3 MiB: many socket reads, records cut anywhere
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        received = bytearray()
        while len(received) < len(payload):
            received += await server.receive_some()
    assert received == payload
    await client.aclose()
    assert await server.receive_some() == b""  # close_notify is a clean EOF
    await server.aclose()


async def test_tls_stream_hands_over_every_buffered_record_in_one_read(ca, leaves):
    client, server = await _tls_pair(ca, leaves, trio.testing.memory_stream_pair)
    for _ in range(8):  # eight writes: eight TLS records of 10 KiB each
        await client.send_all(b"r" * 10_000)
    assert await server.receive_some() == b"r" * 80_000
    await client.aclose()
    assert await server.receive_some() == b""  # close_notify is a clean EOF


async def test_tls_stream_reports_a_refused_client_certificate_to_both_sides(ca, leaves):
    left, right = trio.testing.memory_stream_pair()
    rogue = TestCA("rogue").issue(FRONTEND.uri)
    client = TlsStream(
        left,
        client_context(rogue.chain_pem, rogue.key_pem, ca.pem),
        server_hostname=sni_for(REVIEWS),
    )
    server = TlsStream(
        right, server_context_selector(lookup_from(leaves), ca.pem).context, server_side=True
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)  # TLS 1.3: the client finishes first
        with pytest.raises(trio.BrokenResourceError, match="handshake failed"):
            await server.do_handshake()
    # The server's alert reaches the client, which learns why instead of seeing a bare EOF.
    with pytest.raises(trio.BrokenResourceError) as caught:
        await client.receive_some()
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    assert "UNKNOWN_CA" in str(caught.value.__cause__)


async def test_send_now_writes_to_the_socket_and_leaves_what_it_did_not_take_for_send_all(
    ca, leaves
):
    client, server = await _tls_pair(ca, leaves, _socket_pair)
    assert client.can_send_now
    assert client.send_now(b"hello")  # no await: in the socket already
    assert await server.receive_some() == b"hello"
    # Nobody reads: the socket takes part of 8 MiB and the rest waits in the stream.
    payload = bytes(range(256)) * 32_768
    assert not client.send_now(payload)
    assert client.unsent > 0
    assert not client.can_send_now  # until the rest went out
    received = bytearray()

    async def read(n: int) -> None:
        while len(received) < n:
            received.extend(await server.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, len(payload) + 4)
        await client.send_all(b"")  # sends what was left, first
        await client.send_all(b"tail")
    assert received == payload + b"tail"
    assert client.unsent == 0 and client.can_send_now
    await client.aclose()
    await server.aclose()


async def _send_when_blocked(stream: TlsStream, data: bytes) -> None:
    await trio.testing.wait_all_tasks_blocked()  # the reader waits on its socket
    await stream.send_all(data)


async def test_tls_stream_waits_for_the_socket_after_a_short_read_instead_of_failing_reads(
    ca, leaves, monkeypatch
):
    client, server = await _tls_pair(ca, leaves, _socket_pair)
    failed = count_failed_reads(monkeypatch)  # the handshake's reads do not count
    for i in range(50):  # each read begins before its message is sent: it has to wait
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_when_blocked, client, b"ping %d" % i)
            assert await server.receive_some() == b"ping %d" % i
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_when_blocked, server, b"pong %d" % i)
            assert await client.receive_some() == b"pong %d" % i
    assert failed.count <= 2, f"{failed.count} socket reads found nothing for 100 messages"
    await client.aclose()
    await server.aclose()

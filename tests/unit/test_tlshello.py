"""The SNI read from a TLS client's first bytes (common/tlshello.py), from ClientHellos made by
the real TLS stack (Python's ssl, OpenSSL), whole, cut short, split over records, and from
bytes that are not TLS at all."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshagent.common.tlshello import MAX_HELLO, Hello, server_name


def client_hello(server_hostname: str | None, **options) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for name, value in options.items():
        setattr(ctx, name, value)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello("Reviews.Prod.svc.cluster.local")


def _records(handshake: bytes, cut: int) -> bytes:
    """``handshake`` (one ClientHello message) in two handshake records, split at ``cut``."""
    head = b"\x16\x03\x01"
    return b"".join(
        head + len(part).to_bytes(2, "big") + part for part in (handshake[:cut], handshake[cut:])
    )


def test_the_sni_of_a_real_client_hello_lower_cased():
    assert server_name(HELLO) == "reviews.prod.svc.cluster.local"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_each_tls_version_names_its_server(version):
    hello = client_hello("a.example.com", minimum_version=version, maximum_version=version)
    assert server_name(hello) == "a.example.com"


def test_every_prefix_of_a_hello_asks_for_more():
    assert {server_name(HELLO[:n]) for n in range(len(HELLO))} == {Hello.INCOMPLETE}


def test_a_hello_split_over_two_records_is_gathered():
    handshake = HELLO[5:]
    for cut in (1, 4, 40, len(handshake) - 1):
        assert server_name(_records(handshake, cut)) == "reviews.prod.svc.cluster.local"


def test_a_record_of_early_data_after_the_hello_does_not_hide_it():
    assert server_name(HELLO + b"\x17\x03\x03\x00\x02hi") == "reviews.prod.svc.cluster.local"


def test_a_hello_without_a_server_name():
    assert server_name(client_hello(None)) is Hello.NO_SNI


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x02\x00\x00\x05hello",  # not TLS's major version
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello, not a ClientHello
        b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03",  # a ClientHello too short inside
    ],
)
def test_bytes_that_are_no_client_hello_have_no_server_name(data):
    assert server_name(data) is Hello.NOT_TLS


def test_a_hello_that_never_ends_is_given_up_at_the_bound():
    endless = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + bytes(MAX_HELLO)
    assert server_name(endless) is Hello.NOT_TLS


@given(st.binary(max_size=4096))
def test_any_bytes_give_an_answer_never_an_error(data):
    assert isinstance(server_name(data), str | Hello)


@given(st.integers(0, len(HELLO) - 1), st.integers(0, 255))
def test_a_corrupted_hello_gives_an_answer_never_an_error(at, value):
    mutated = bytearray(HELLO)
    mutated[at] = value
    assert isinstance(server_name(bytes(mutated)), str | Hello)

"""TLS origination from the source node's proxy: DestinationRule `tls` SIMPLE and MUTUAL.

A meshed client speaks plaintext; its node's proxy opens TLS to the destination (typically a
server outside the mesh), as Istio's sidecar does. Certificates are files on the node
(`caCertificates`, `clientCertificate`, `privateKey`): the operator puts them there (a
hostPath or a volume of the agent's DaemonSet), since `credentialName` Secrets are not read.

Verification, following Istio with VERIFY_CERTIFICATE_AT_CLIENT and auto SNI:
- the chain against `caCertificates`, or the system's trust store when unset;
- the name: any of `subjectAltNames` (exact DNS or URI SAN), else the SNI;
- `insecureSkipVerify: true` skips both.
The SNI is `sni`, else the destination's hostname (the Service's FQDN).
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING

import trio
from cryptography import x509

if TYPE_CHECKING:
    from meshagent.common.istio.networking import ClientTLSSettings


class TlsStream(trio.abc.HalfCloseableStream):
    """An SSLStream the relays can half-close: TLS via trio cannot send close_notify and keep
    reading, so `send_eof` sends nothing and the server's end closes the connection.

    `socket` is the TCP socket under it, so the HTTP pool polls an idle connection for the
    server's close instead of watching it with a receive it cancels on reuse (a cancelled
    SSLStream operation may leave the stream unusable)."""

    def __init__(self, tls: trio.SSLStream) -> None:
        self.tls = tls
        self.socket = getattr(tls.transport_stream, "socket", None)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.tls.receive_some(max_bytes)

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        await self.tls.aclose()


class TlsOriginError(Exception):
    """TLS to the destination failed: the message says which setting or check (for the 503)."""


_contexts: dict[tuple, ssl.SSLContext] = {}
_MAX_CONTEXTS = 64


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def context(settings: ClientTLSSettings, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """The SSLContext for `settings` offering `alpn`, rebuilt when one of its files changes
    (rotation)."""
    files = (settings.ca_certificates, settings.client_certificate, settings.private_key)
    key = (settings, alpn, tuple(_mtime(f) for f in files))
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _build(settings)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if len(_contexts) >= _MAX_CONTEXTS:
            _contexts.clear()
        _contexts[key] = ctx
    return ctx


def _build(settings: ClientTLSSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        # names are checked here (subjectAltNames) or by OpenSSL against the SNI
        ctx.check_hostname = not settings.subject_alt_names
        try:
            if settings.ca_certificates:
                ctx.load_verify_locations(cafile=settings.ca_certificates)
            else:
                ctx.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise TlsOriginError(
                f"caCertificates {settings.ca_certificates}: cannot load: {exc}"
            ) from None
    if settings.mode == "MUTUAL":
        try:
            ctx.load_cert_chain(settings.client_certificate or "", settings.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsOriginError(
                f"clientCertificate {settings.client_certificate} / privateKey "
                f"{settings.private_key}: cannot load: {exc}"
            ) from None
    return ctx


def peer_names(der: bytes) -> set[str]:
    """The DNS and URI subject alternative names of a DER certificate."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | set(
        san.get_values_for_type(x509.UniformResourceIdentifier)
    )


async def originate(
    stream: trio.abc.Stream,
    settings: ClientTLSSettings,
    hostname: str | None,
    alpn: tuple[str, ...] = (),
) -> TlsStream:
    """Handshake TLS over `stream` per `settings`, offering the protocols `alpn` (("h2",) for
    HTTP/2 upstreams, as Envoy offers h2 to a cluster it speaks HTTP/2 to); raises
    TlsOriginError naming the cause. The caller bounds the time (its connect timeout) and
    closes `stream` on failure."""
    sni = settings.sni or hostname
    ctx = context(settings, alpn)
    if ctx.check_hostname and not sni:
        raise TlsOriginError("no SNI to verify the server's name against: set sni")
    tls = trio.SSLStream(stream, ctx, server_hostname=sni, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        detail = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
        code = getattr(cause, "reason", None)
        reason = f"{code}: {detail}" if code and detail != code else str(detail or cause or exc)
        raise TlsOriginError(f"TLS handshake with {sni or 'server'}: {reason}") from None
    wanted = set(settings.subject_alt_names)
    if wanted and not settings.insecure_skip_verify:
        der = tls.getpeercert(binary_form=True)
        names = peer_names(der) if der else set()
        if not names & wanted:
            await trio.aclose_forcefully(tls)
            raise TlsOriginError(
                f"server certificate names {sorted(names)} match none of subjectAltNames "
                f"{sorted(wanted)}"
            )
    return TlsStream(tls)

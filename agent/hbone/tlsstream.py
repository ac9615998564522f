"""TLS over a trio stream, decrypting every record a socket read brings in one go.

What flows through: ciphertext from the TCP stream into an `ssl.SSLObject` (memory BIOs),
plaintext out; plaintext in, ciphertext to the TCP stream.

Why not `trio.SSLStream`: it returns at most one TLS record (16 KiB) per `receive_some`,
and each call is a trip through the scheduler. At HBONE's bulk rates that overhead, not
the cryptography, dominates: on loopback, the receiving proxy spent about 6.5 s of CPU per
GiB with `trio.SSLStream` and 2.8 s with this stream, which hands the reader every record
that one 256 KiB socket read completed (the sender: 3.7 s against 2.5 s). It serves exactly
HBONE's pattern (one reader task, one writer task, TLS 1.3, no renegotiation), no more.

Reading never writes: TLS 1.3 post-handshake messages that need an answer (a KeyUpdate)
leave it in the outgoing BIO, and it goes out ahead of the next write, which is what
RFC 8446 section 4.6.3 asks for. So a reader can never block on a full send buffer.

Reads allocate only what arrived: ciphertext is received into a buffer the stream keeps (an
anonymous mapping, so only the pages a read reached are resident) and plaintext is taken in
pieces no larger than the ciphertext waiting. A ``recv(256 KiB)`` allocates 256 KiB whatever
comes, and under the workers' allocator (agent/workers/launch.py: buffers of 64 KiB and more
are mmapped) each such call, even one that finds nothing, costs a map, an unmap and page
faults: 20-50 µs against 2 µs, several times per small request.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import os
import ssl

import trio
from meshagent.agent import sockio

__all__ = ["TlsStream"]

# One socket read; every TLS record it completes is decrypted before returning.
RECEIVE_SIZE = 256 * 1024
# How long a closing stream tries to deliver its close_notify or a failed handshake's alert.
_GOODBYE_TIMEOUT = 1.0


class TlsStream(trio.abc.Stream):
    """A TLS connection over ``transport``; call `do_handshake` before anything else.

    Errors from TLS (bad records, alerts, truncation) raise `trio.BrokenResourceError`
    whose ``__cause__`` is the `ssl.SSLError`; a close_notify from the peer is a clean EOF.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = ssl_context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._handshake_done = False
        self._eof = False
        self._broken: trio.BrokenResourceError | None = None
        self._closed = False
        self._receiving = False
        self._sending = False
        self._buffer: mmap.mmap | None = None  # ciphertext reads (SocketStream transports)
        self._drained = False  # the last socket read did not fill the buffer
        self._waited = False  # this receive_some waited for the socket (a checkpoint)
        self._unsent = b""  # ciphertext `send_now` encrypted but the socket did not take yet

    # --- what callers ask the TLS session --------------------------------------------

    @property
    def context(self) -> ssl.SSLContext:
        """The context in use (a server's SNI callback may have switched it)."""
        return self.ssl_object.context

    def getpeercert(self, binary_form: bool = False) -> object:
        return self.ssl_object.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self.ssl_object.selected_alpn_protocol()

    def version(self) -> str | None:
        return self.ssl_object.version()

    # --- internals -----------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(str(self._broken)) from self._broken.__cause__
        if not self._handshake_done:
            raise RuntimeError("TLS stream used before do_handshake()")

    def _break(self, exc: BaseException, message: str) -> trio.BrokenResourceError:
        broken = trio.BrokenResourceError(f"{message}: {exc}")
        broken.__cause__ = exc
        self._broken = self._broken or broken
        return broken

    async def _send_ciphertext(self) -> None:
        data = self._outgoing.read()
        if self._unsent:  # what `send_now` left goes first
            data, self._unsent = self._unsent + data, b""
        if data:
            try:
                await self.transport.send_all(data)
            except BaseException as exc:
                # Some unknown part of a record went out: the session cannot continue.
                self._break(exc, "TLS send failed")
                raise

    # --- handshake -----------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake (bound it with a timeout). Raise `trio.BrokenResourceError`."""
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        while True:
            try:
                self.ssl_object.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except (ssl.SSLError, ssl.CertificateError) as exc:
                # Deliver the alert that explains the refusal, then give up.
                with trio.move_on_after(_GOODBYE_TIMEOUT), contextlib.suppress(Exception):
                    await self._send_ciphertext()
                raise self._break(exc, "TLS handshake failed") from exc
            await self._send_ciphertext()
            if done:
                self._handshake_done = True
                return
            if not await self._receive_ciphertext():
                exc = ssl.SSLEOFError("peer closed the connection during the TLS handshake")
                raise self._break(exc, "TLS handshake failed") from exc

    async def _receive_ciphertext(self) -> bool:
        """Move what the transport has (waiting for some) into the incoming BIO; False at EOF.

        Over a socket, read as agent/sockio.py does: after a read that did not fill the buffer
        (the socket drained) wait for readiness first, instead of a read that fails with
        EAGAIN (an exception) before every wait; a read is then one system call (into one
        buffer kept for the stream's life)."""
        try:
            if not isinstance(self.transport, trio.SocketStream):
                data = await self.transport.receive_some(RECEIVE_SIZE)
                self._incoming.write(data)
                return bool(data)
            if self._buffer is None:
                self._buffer = mmap.mmap(-1, RECEIVE_SIZE)
            count, waited = await sockio.read_ready(
                self.transport.socket, os.readv, (self._buffer,), self._drained
            )
            self._waited = self._waited or waited
        except trio.BrokenResourceError as exc:
            raise self._break(exc.__cause__ or exc, "transport failed") from exc
        self._drained = count < RECEIVE_SIZE
        with memoryview(self._buffer) as view, view[:count] as received:
            self._incoming.write(received)
        return count > 0

    # --- trio.abc.Stream -----------------------------------------------------------------

    def _decrypt(self, limit: int) -> list[bytes]:
        """Every plaintext byte (up to ``limit``) the buffered records hold, without I/O."""
        chunks: list[bytes] = []
        total = 0
        try:
            while total < limit:
                # A record's plaintext is never longer than its ciphertext: asking for no more
                # than what waits keeps each read's allocation to what it returns.
                waiting = self._incoming.pending + self.ssl_object.pending()
                chunk = self.ssl_object.read(max(1, min(limit - total, waiting)))
                if not chunk:  # close_notify (Python returns b"" for a clean shutdown)
                    self._eof = True
                    break
                chunks.append(chunk)
                total += len(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True  # close_notify: a clean end
        except ssl.SSLError as exc:
            if not chunks:
                raise self._break(exc, "TLS error") from exc
            # Hand out what was decrypted; the error surfaces on the next call.
            self._break(exc, "TLS error")
        return chunks

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is reading this TLS stream")
        limit = RECEIVE_SIZE if max_bytes is None else operator.index(max_bytes)
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        self._waited = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._eof and self._broken is None and not self._closed:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                self._check()
                chunks = self._decrypt(limit)
                if chunks:
                    if not self._waited:  # a wait for the socket was this call's checkpoint
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if self._eof:
                    continue
                if not await self._receive_ciphertext():
                    self._incoming.write_eof()  # the next read says whether it was clean
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is writing this TLS stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check()
            if not data and not self._unsent:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            if data:
                try:
                    self.ssl_object.write(data)
                except ssl.SSLError as exc:
                    raise self._break(exc, "TLS error") from exc
            await self._send_ciphertext()
        finally:
            self._sending = False

    @property
    def unsent(self) -> int:
        """Bytes of ciphertext `send_now` left for the next `send_all`."""
        return len(self._unsent)

    @property
    def can_send_now(self) -> bool:
        """Whether `send_now` may be tried now: a socket transport, a healthy session, no
        `send_all` in progress and nothing left over from an earlier `send_now`."""
        return (
            self._handshake_done
            and not self._sending
            and not self._unsent
            and self._broken is None
            and not self._closed
            and isinstance(self.transport, trio.SocketStream)
        )

    def send_now(self, data: bytes) -> bool:
        """Encrypt ``data`` and hand it to the socket without a trip through the scheduler:
        True if the socket took all of it. What it did not take waits for the next
        `send_all` (``send_all(b"")`` flushes it). Only when `can_send_now`.

        Why: a small message through the tunnel otherwise wakes the connection's writer task
        for one `send_all`, which with trio's checkpoints is several scheduler rounds per
        message (HboneConnection._push). A socket error breaks the stream and raises
        `trio.BrokenResourceError`, as `send_all` would.
        """
        assert self.can_send_now
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            raise self._break(exc, "TLS error") from exc
        ciphertext = self._outgoing.read()
        assert isinstance(self.transport, trio.SocketStream)
        try:
            sent = sockio.write_now(self.transport.socket, ciphertext)
        except trio.BrokenResourceError as exc:
            raise self._break(exc.__cause__ or exc, "TLS send failed") from exc
        if sent < len(ciphertext):
            self._unsent = ciphertext[sent:]
            return False
        return True

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is writing this TLS stream")
        self._sending = True
        try:
            self._check()
            await self.transport.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Send close_notify (briefly, if the session is healthy), then close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshake_done and self._broken is None and not self._sending:
                with contextlib.suppress(ssl.SSLError):
                    self.ssl_object.unwrap()  # queues close_notify; we do not wait for theirs
                with trio.move_on_after(_GOODBYE_TIMEOUT), contextlib.suppress(Exception):
                    await self._send_ciphertext()
        finally:
            await self.transport.aclose()

"""Startup and authentication, sans-I/O: the packets a client opens with, and the server's
authentication relayed message by message until its first ReadyForQuery.

The session does the I/O (answers, TLS, the upstream connection) and asks these what the
bytes say. Authentication passes untouched but for one edit: SCRAM-SHA-256-PLUS leaves the
server's SASL offer, since channel binding cannot cross a proxy.
"""

from __future__ import annotations

from proxy.protocol import codes as c
from proxy.protocol import messages as m
from proxy.protocol.framing import BODY, FrameDecoder, ProtocolViolation
from proxy.protocol.startup import StartupPacket, read_startup_packet

__all__ = ["AuthRelay", "StartupReader"]

_AUTH_INTEREST = bytes([BODY]) * 256  # every message whole while authenticating
_SCRAM_PLUS = "SCRAM-SHA-256-PLUS"


class StartupReader:
    """The client's untyped packets (SSLRequest, CancelRequest, StartupMessage), and the
    bytes it sends on before the upstream connection is up, bounded by `limit`."""

    __slots__ = ("buf", "limit")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> None:
        self.buf += data

    def hold(self, data: bytes) -> None:
        """Keeps what arrives while the upstream connection opens, up to the limit."""
        self.buf += data
        if len(self.buf) > self.limit:
            raise ProtocolViolation("too much data before authentication")

    def next_packet(self) -> tuple[StartupPacket, bytes] | None:
        """The next whole packet and its bytes, or None until more arrive."""
        if not self.buf:
            return None
        packet, used = read_startup_packet(self.buf)
        if packet is None:
            return None
        raw = bytes(self.buf[:used])
        del self.buf[:used]
        return packet, raw

    def take(self) -> bytes:
        """What the client sent after its startup packet, to relay once connected."""
        pending = bytes(self.buf)
        self.buf.clear()
        return pending


class AuthRelay:
    """The server's side of authentication, message by message."""

    __slots__ = ("backend_key", "failed", "frames")

    def __init__(self, max_message_size: int) -> None:
        self.frames = FrameDecoder(
            _AUTH_INTEREST, max_length=max_message_size, inspect_limit=1 << 20
        )
        self.backend_key: tuple[int, bytes] | None = None
        self.failed = False  # the server sent an ErrorResponse: it will close

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, memoryview | None]] | None]:
        """What to send the client for `data`, and once the first ReadyForQuery passed,
        the frames from it on (for the round trips); None while authenticating.

        Raises ProtocolViolation for what no server sends here."""
        frames = self.frames.feed(data)
        out: list[bytes] = []
        for index, (mtype, body) in enumerate(frames):
            if body is None:
                raise ProtocolViolation("oversized message during authentication")
            raw = m.frame(bytes((mtype,)), body)
            if mtype == c.AUTHENTICATION:
                raw = _strip_channel_binding(body) or raw
            elif mtype == c.BACKEND_KEY_DATA:
                try:
                    key = m.BackendKeyData.decode(body)
                except ValueError as exc:
                    raise ProtocolViolation(str(exc)) from None
                self.backend_key = (key.process_id, key.secret_key)
            elif mtype == c.ERROR_RESPONSE:
                self.failed = True
            elif mtype == c.READY_FOR_QUERY:  # authenticated: relaying chunks from here
                out.append(raw)
                for later_type, later_body in frames[index + 1 :]:
                    out.append(m.frame(bytes((later_type,)), later_body or b""))
                return b"".join(out), frames[index:]
            out.append(raw)
        return b"".join(out), None

    def held(self) -> bytes:
        """The start of a message that the last chunk did not complete: once relaying in
        chunks, it goes to the client as it is, and the rest flows raw."""
        return self.frames.held


def _strip_channel_binding(body: memoryview) -> bytes | None:
    """AuthenticationSASL without SCRAM-SHA-256-PLUS: channel binding cannot cross a proxy.

    Returns the re-encoded message, or None when nothing had to change.
    """
    request = m.AuthenticationRequest.decode(body)
    if request.code != m.AUTH_SASL or _SCRAM_PLUS not in request.mechanisms:
        return None
    kept = tuple(x for x in request.mechanisms if x != _SCRAM_PLUS)
    return m.AuthenticationRequest.sasl(kept).encode()

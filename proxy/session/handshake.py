"""Startup and authentication, sans-I/O: the packets a client opens with, and the server's
authentication relayed message by message until its first ReadyForQuery.

The session does the I/O (answers, TLS, the upstream connection) and asks these what the
bytes say. Authentication passes untouched but for one edit: SCRAM-SHA-256-PLUS leaves the
server's SASL offer, since channel binding cannot cross a proxy.
"""

from __future__ import annotations

from typing import cast

from proxy.protocol import codes as c
from proxy.protocol import messages as m
from proxy.protocol.framing import BODY, FrameDecoder, ProtocolViolation
from proxy.protocol.startup import StartupPacket, read_startup_packet

__all__ = ["AuthRelay", "StartupReader"]

_AUTH_INTEREST = bytes([BODY]) * 256  # every message whole while authenticating
_AUTH_LIMIT = 1 << 20  # no authentication message is larger
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
    """The server's side of authentication, message by message, read in place."""

    __slots__ = ("backend_key", "error", "frames", "max_length", "status")

    def __init__(self, max_message_size: int) -> None:
        self.max_length = max_message_size
        # only a message split across chunks is put back together here
        self.frames = FrameDecoder(
            _AUTH_INTEREST, max_length=max_message_size, inspect_limit=_AUTH_LIMIT
        )
        self.backend_key: tuple[int, bytes] | None = None
        self.error: m.ErrorResponse | None = None  # the server refused: it will close
        self.status: bytes | None = None  # of the first ReadyForQuery, once it passed

    @property
    def failed(self) -> bool:
        """The server sent an ErrorResponse (`error`): authentication or startup failed."""
        return self.error is not None

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """What to send the client for `data`, and once the first ReadyForQuery passed,
        the bytes of `data` after it (relayed as they are; the relay's reader takes the
        stream from there, at a message boundary); None while authenticating.

        Raises ProtocolViolation for what no server sends here."""
        out: list[bytes] = []
        pos = 0
        if not self.frames.at_boundary:  # first the end of a message an earlier chunk began
            frames, pos = self.frames.finish(data)
            for mtype, body in frames:
                out.append(self._message(mtype, body, None))
                if mtype == c.READY_FOR_QUERY:
                    tail = data[pos:]
                    return b"".join(out) + tail, tail
        size = len(data)
        while pos + c.HEADER_SIZE <= size:
            length = c.HEADER.unpack_from(data, pos)[1]
            if length < 4 or length > self.max_length:
                raise ProtocolViolation(
                    f"invalid length {length} for message type {data[pos]:#04x}"
                )
            end = pos + 1 + length
            if end > size:
                break
            mtype = data[pos]
            out.append(self._message(mtype, memoryview(data)[pos + 5 : end], data[pos:end]))
            pos = end
            if mtype == c.READY_FOR_QUERY:
                tail = data[pos:]
                return b"".join(out) + tail, tail
        if pos < size:  # a message continues in the next chunk
            for mtype, body in self.frames.feed(memoryview(data)[pos:]):
                self._message(mtype, body, None)  # only an oversized one comes back now
        return b"".join(out), None

    def _message(self, mtype: int, body: memoryview | None, raw: bytes | None) -> bytes:
        """One whole message as the client gets it; `raw` is its bytes when at hand."""
        if body is None or len(body) > _AUTH_LIMIT:
            raise ProtocolViolation("oversized message during authentication")
        if raw is None:
            raw = m.frame(bytes((mtype,)), body)
        if mtype == c.AUTHENTICATION:
            return _strip_channel_binding(body) or raw
        if mtype == c.BACKEND_KEY_DATA:
            try:
                key = m.BackendKeyData.decode(body)
            except ValueError as exc:
                raise ProtocolViolation(str(exc)) from None
            self.backend_key = (key.process_id, key.secret_key)
        elif mtype == c.ERROR_RESPONSE:
            try:
                self.error = cast(m.ErrorResponse, m.ErrorResponse.decode(body))
            except ValueError as exc:
                raise ProtocolViolation(f"malformed ErrorResponse: {exc}") from None
        elif mtype == c.READY_FOR_QUERY:
            self.status = bytes(body[:1]) or b"I"
        return raw


def _strip_channel_binding(body: memoryview) -> bytes | None:
    """AuthenticationSASL without SCRAM-SHA-256-PLUS: channel binding cannot cross a proxy.

    Returns the re-encoded message, or None when nothing had to change.
    """
    request = m.AuthenticationRequest.decode(body)
    if request.code != m.AUTH_SASL or _SCRAM_PLUS not in request.mechanisms:
        return None
    kept = tuple(x for x in request.mechanisms if x != _SCRAM_PLUS)
    return m.AuthenticationRequest.sasl(kept).encode()

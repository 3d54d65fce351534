"""A minimal PostgreSQL protocol-3 client over a plain socket, for tests that must send what
no driver would (garbage, oversized lengths, stalls) or read at a chosen pace.

Deliberately independent of pgwarden's own codec, so a codec bug cannot hide itself.
"""

from __future__ import annotations

import socket
import struct
import time

__all__ = [
    "PROTOCOL_3_0",
    "RawClient",
    "error_fields",
    "query_message",
    "ssl_request",
    "startup_message",
]

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103

Message = tuple[bytes, bytes]  # (type byte, body)


def startup_message(protocol: int = PROTOCOL_3_0, **params: str) -> bytes:
    """A StartupMessage: length, protocol version, NUL-terminated key/value pairs, NUL."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!iI", 8 + len(body), protocol) + body


def ssl_request() -> bytes:
    return struct.pack("!iI", 8, SSL_REQUEST_CODE)


def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", 4 + len(body)) + body


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body: {'S': 'FATAL', 'C': ...}."""
    fields = {}
    for part in body.rstrip(b"\0").split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


class RawClient:
    """One TCP connection; reads return whole typed messages."""

    def __init__(
        self, host: str, port: int, *, timeout: float = 5.0, rcvbuf: int | None = None
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the TCP window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close abruptly with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def _fill(self, deadline: float) -> bool:
        """Receive more bytes; False at EOF. Raises TimeoutError past `deadline`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the proxy in time")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_message(self, timeout: float = 5.0) -> Message | None:
        """The next typed message, or None at a clean EOF (a partial message is an error)."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack_from("!I", self.buf, 1)
                if length < 4:
                    raise AssertionError(f"invalid message length {length} from the proxy")
                if len(self.buf) >= 1 + length:
                    mtype, body = bytes(self.buf[:1]), bytes(self.buf[5 : 1 + length])
                    del self.buf[: 1 + length]
                    return mtype, body
            if not self._fill(deadline):
                if self.buf:
                    raise AssertionError(f"EOF inside a message: {bytes(self.buf[:40])!r}")
                return None

    def read_until_closed(self, timeout: float = 5.0) -> list[Message]:
        """Every message until the proxy closes the connection; raises TimeoutError if it
        stays open and ConnectionResetError if it is reset instead of closed."""
        deadline = time.monotonic() + timeout
        messages = []
        while (message := self.read_message(max(deadline - time.monotonic(), 0.001))) is not None:
            messages.append(message)
        return messages

    def read_until_ready(self, timeout: float = 5.0) -> list[Message]:
        """Messages up to and including ReadyForQuery; raises on EOF before it."""
        deadline = time.monotonic() + timeout
        messages = []
        while True:
            message = self.read_message(max(deadline - time.monotonic(), 0.001))
            if message is None:
                raise AssertionError(f"connection closed before ReadyForQuery: {messages}")
            messages.append(message)
            if message[0] == b"Z":
                return messages

    def login(self, user: str = "postgres", database: str = "postgres", **params: str) -> None:
        """StartupMessage for a trust-authenticated user, then wait for ReadyForQuery."""
        self.send(startup_message(user=user, database=database, **params))
        messages = self.read_until_ready()
        errors = [error_fields(body) for kind, body in messages if kind == b"E"]
        assert not errors, f"login failed: {errors}"

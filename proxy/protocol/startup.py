"""The untyped packets a client may open a connection with.

StartupMessage, SSLRequest, GSSENCRequest and CancelRequest all start with a length and a
32-bit code instead of a type byte. Lengths are bounded as PostgreSQL bounds them
(MAX_STARTUP_PACKET_LENGTH), so garbage or HTTP on the port is refused after 8 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from proxy.protocol.framing import ProtocolViolation

__all__ = [
    "MAX_STARTUP_LENGTH",
    "CancelRequest",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "read_startup_packet",
]

MAX_STARTUP_LENGTH = 10000
PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_HEAD = struct.Struct("!iI")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _HEAD.pack(8, SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _HEAD.pack(8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes = field(repr=False)

    def encode(self) -> bytes:
        return _HEAD.pack(12 + len(self.secret_key), CANCEL_REQUEST_CODE) + (
            struct.pack("!i", self.process_id) + self.secret_key
        )


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol version and the connection parameters (user, database, options, ...)."""

    protocol: int
    parameters: dict[str, str]

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    def encode(self) -> bytes:
        # each key and value is NUL-terminated, then one more NUL ends the list
        pairs = [
            k.encode("utf-8", "surrogateescape") + b"\0" + v.encode("utf-8", "surrogateescape")
            for k, v in self.parameters.items()
        ]
        body = b"\0".join(pairs) + (b"\0" if pairs else b"") + b"\0"
        return _HEAD.pack(8 + len(body), self.protocol) + body


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def read_startup_packet(buf: bytes | bytearray) -> tuple[StartupPacket | None, int]:
    """Decodes the packet at the start of `buf`.

    Returns (packet, bytes consumed), or (None, 0) while `buf` holds too little. Raises
    ProtocolViolation for anything PostgreSQL itself would refuse.
    """
    if len(buf) < 8:
        return None, 0
    length, code = _HEAD.unpack_from(buf, 0)
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise ProtocolViolation("invalid length of startup packet")
    if len(buf) < length:
        return None, 0
    body = bytes(buf[8:length])
    if code == SSL_REQUEST_CODE:
        packet: StartupPacket = SSLRequest()
    elif code == GSSENC_REQUEST_CODE:
        packet = GSSENCRequest()
    elif code == CANCEL_REQUEST_CODE:
        if len(body) < 8:
            raise ProtocolViolation("invalid length of cancel request")
        packet = CancelRequest(struct.unpack_from("!i", body)[0], body[4:])
    elif code >> 16 == 3:
        packet = StartupMessage(code, _parameters(body))
    else:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0"
        )
    if length != 8 and isinstance(packet, SSLRequest | GSSENCRequest):
        raise ProtocolViolation("invalid length of SSL or GSS encryption request")
    return packet, length


def _parameters(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    # every key and value ends in NUL, and one more NUL ends the list
    *items, last = body[:-1].split(b"\0")
    if last:  # the list terminator is missing: the final NUL ended a key or value
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    if len(items) % 2:
        raise ProtocolViolation("invalid startup packet layout: missing value")
    params = {}
    for key, value in zip(items[::2], items[1::2], strict=True):
        if not key:  # PostgreSQL takes an empty name for the terminator, then finds bytes after it
            raise ProtocolViolation(
                "invalid startup packet layout: expected terminator as last byte"
            )
        params[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    if not params.get("user"):
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return params

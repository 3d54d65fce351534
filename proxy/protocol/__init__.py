"""The PostgreSQL v3 wire protocol, sans-I/O: framing, message classes, startup packets."""

from proxy.protocol import messages
from proxy.protocol.framing import (
    BODY,
    SKIP,
    TYPE_ONLY,
    FrameDecoder,
    ProtocolViolation,
    interest_table,
)
from proxy.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    read_startup_packet,
)

__all__ = [
    "BODY",
    "SKIP",
    "TYPE_ONLY",
    "CancelRequest",
    "FrameDecoder",
    "GSSENCRequest",
    "ProtocolViolation",
    "SSLRequest",
    "StartupMessage",
    "interest_table",
    "messages",
    "read_startup_packet",
]

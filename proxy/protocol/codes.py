"""Message type codes of protocol 3, named as in the PostgreSQL docs, and the one header reader.

A code means different things by direction ('D' is Describe from the client, DataRow from
the server), so every name here is a message's full name and the walks of each direction
use only their own. Codes are ints, as indexing a chunk gives them; `Final` lets compiled
code (mypyc) inline them.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "AUTHENTICATION",
    "BACKEND_KEY_DATA",
    "BIND",
    "BIND_COMPLETE",
    "CLOSE",
    "CLOSE_COMPLETE",
    "COMMAND_COMPLETE",
    "COPY_BOTH_RESPONSE",
    "COPY_DATA",
    "COPY_DONE",
    "COPY_FAIL",
    "COPY_IN_RESPONSE",
    "COPY_OUT_RESPONSE",
    "DATA_ROW",
    "DESCRIBE",
    "EMPTY_QUERY_RESPONSE",
    "ERROR_RESPONSE",
    "EXECUTE",
    "FLUSH",
    "FUNCTION_CALL",
    "HEADER",
    "HEADER_SIZE",
    "NO_DATA",
    "PARAMETER_DESCRIPTION",
    "PARSE",
    "PARSE_COMPLETE",
    "PORTAL_SUSPENDED",
    "QUERY",
    "READY_FOR_QUERY",
    "ROW_DESCRIPTION",
    "SYNC",
    "TERMINATE",
    "message_length",
]

HEADER_SIZE: Final = 5  # type byte + int32 length (the length counts itself, not the type)
# The header as (type, length) in one C call: what interpreted code (the relay's framing
# and editors) reads headers with; compiled code reads the length with `message_length`.
HEADER: Final = struct.Struct("!BI")

# Frontend: client -> server
BIND: Final = 0x42  # B
CLOSE: Final = 0x43  # C
COPY_FAIL: Final = 0x66  # f
DESCRIBE: Final = 0x44  # D
EXECUTE: Final = 0x45  # E
FLUSH: Final = 0x48  # H
FUNCTION_CALL: Final = 0x46  # F
PARSE: Final = 0x50  # P
QUERY: Final = 0x51  # Q
SYNC: Final = 0x53  # S
TERMINATE: Final = 0x58  # X

# Both directions
COPY_DATA: Final = 0x64  # d
COPY_DONE: Final = 0x63  # c

# Backend: server -> client
AUTHENTICATION: Final = 0x52  # R
BACKEND_KEY_DATA: Final = 0x4B  # K
BIND_COMPLETE: Final = 0x32  # 2
CLOSE_COMPLETE: Final = 0x33  # 3
COMMAND_COMPLETE: Final = 0x43  # C
COPY_BOTH_RESPONSE: Final = 0x57  # W
COPY_IN_RESPONSE: Final = 0x47  # G
COPY_OUT_RESPONSE: Final = 0x48  # H
DATA_ROW: Final = 0x44  # D
EMPTY_QUERY_RESPONSE: Final = 0x49  # I
ERROR_RESPONSE: Final = 0x45  # E
NO_DATA: Final = 0x6E  # n
PARAMETER_DESCRIPTION: Final = 0x74  # t
PARSE_COMPLETE: Final = 0x31  # 1
PORTAL_SUSPENDED: Final = 0x73  # s
READY_FOR_QUERY: Final = 0x5A  # Z
ROW_DESCRIPTION: Final = 0x54  # T


def message_length(data: bytes | bytearray | memoryview, pos: int) -> int:
    """The length field of the header starting at `pos` (it counts itself, not the type
    byte), for compiled code (the tracker): there indexing is several times cheaper than
    a struct call; interpreted, `HEADER.unpack_from` is."""
    return data[pos + 1] << 24 | data[pos + 2] << 16 | data[pos + 3] << 8 | data[pos + 4]

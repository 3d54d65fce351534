"""Parameter and result values in one comparable text form, for tracing where values came from.

Text-format values are compared as text; binary values are converted for the types whose
binary form is unambiguous (integers, uuid, text). Anything else is left out rather than
guessed: a missed trace costs a weaker advice, a false trace would cost trust.
"""

from __future__ import annotations

import struct
import uuid

__all__ = ["canonical", "literal_text"]

_INTS = {21: struct.Struct("!h"), 23: struct.Struct("!i"), 20: struct.Struct("!q")}
_TEXTUAL = {25, 1042, 1043, 19, 705}


def canonical(value: bytes | None, fmt: int, type_oid: int) -> str | None:
    if value is None:
        return None
    if fmt == 0:
        return value.decode("utf-8", "replace")
    packer = _INTS.get(type_oid)
    if packer is not None and len(value) == packer.size:
        return str(packer.unpack(value)[0])
    if type_oid == 2950 and len(value) == 16:
        return str(uuid.UUID(bytes=value))
    if type_oid in _TEXTUAL:
        return value.decode("utf-8", "replace")
    return None


def literal_text(token: str) -> str | None:
    """The value of a literal token as written in SQL: '...' strings and plain numbers."""
    token = token.strip()
    if len(token) >= 2 and token[0] == "'" and token[-1] == "'":
        return token[1:-1].replace("''", "'")
    if token.lstrip("-").replace(".", "", 1).isdigit():
        return token
    return None

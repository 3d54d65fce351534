"""Incremental framing of typed protocol-3 messages, without copying what passes through.

The relay forwards each received chunk whole and only then asks the decoder what the chunk
held. The decoder walks the message headers in place: a message's body is handed out as a
`memoryview` of the chunk, bytes are copied only for a message split across chunks, and
messages nobody asked to see (or too large to inspect) are skipped without buffering, so
memory stays bounded by `inspect_limit` whatever the stream carries.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.protocol.codes import HEADER, HEADER_SIZE

__all__ = [
    "BODY",
    "MAX_MESSAGE_LENGTH",
    "SKIP",
    "TYPE_ONLY",
    "FrameDecoder",
    "ProtocolViolation",
    "interest_table",
]

# PostgreSQL refuses messages of 1 GB or more (PQ_LARGE_MESSAGE_LIMIT); so does pgwarden.
MAX_MESSAGE_LENGTH = 0x3FFFFFFF

SKIP = 0  # not reported
TYPE_ONLY = 1  # reported as (type, None)
BODY = 2  # reported as (type, body) when the body fits `inspect_limit`, else (type, None)


class ProtocolViolation(Exception):
    """The peer sent bytes that cannot be a protocol-3 message stream."""


def interest_table(type_only: Iterable[int] = (), body: Iterable[int] = ()) -> bytes:
    """A 256-entry lookup of what to report for each message type code."""
    table = bytearray(256)
    for t in type_only:
        table[t] = TYPE_ONLY
    for t in body:
        table[t] = BODY
    return bytes(table)


class FrameDecoder:
    """Splits a byte stream into (type, body) frames for inspection.

    `feed()` returns the frames completed by a chunk, in order. A frame's body is a
    memoryview valid until the next `feed()`; callers that keep it must copy it.
    """

    __slots__ = ("_buf", "_need", "_skip", "inspect_limit", "interest", "max_length")

    def __init__(
        self,
        interest: bytes,
        *,
        inspect_limit: int = 1 << 20,
        max_length: int = MAX_MESSAGE_LENGTH,
    ) -> None:
        self.interest = interest
        self.inspect_limit = inspect_limit
        self.max_length = max_length
        self._buf = bytearray()  # an incomplete message (header included) being collected
        self._need = 0  # bytes still missing from _buf; 0 while only a partial header is held
        self._skip = 0  # bytes of an uninteresting or oversized message still to pass over

    @property
    def held(self) -> bytes:
        """The start of an incomplete inspected message, kept until the rest arrives."""
        return bytes(self._buf)

    def remaining(self) -> tuple[bytes, int]:
        """Where the stream stands inside a message, for a reader taking over from here:
        the bytes of a header not yet complete, and the body bytes still to come."""
        if self._skip:
            return b"", self._skip
        if self._need:
            return b"", self._need
        return bytes(self._buf), 0

    def resume(self, header: bytes, rest: int) -> None:
        """Starts this decoder where another stands (its `remaining()`), mid-stream: a
        message whose start it did not see is passed over unreported."""
        self._buf = bytearray(header)
        self._need = 0
        self._skip = rest

    @property
    def at_boundary(self) -> bool:
        """True when the stream so far ends exactly at a message boundary."""
        return not self._buf and not self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, memoryview | None]]:
        if self._buf or self._skip:
            out, pos = self.finish(data)
        else:
            out, pos = [], 0
        size = len(data)
        view: memoryview | None = None  # made only when a body is handed out
        interest = self.interest
        limit = self.inspect_limit
        unpack = HEADER.unpack_from  # reads bytes faster than it reads a memoryview
        while pos < size:
            if size - pos < HEADER_SIZE:
                self._buf += memoryview(data)[pos:]
                break
            mtype, length = unpack(data, pos)
            if length < 4 or length > self.max_length:
                raise ProtocolViolation(f"invalid length {length} for message type {mtype:#04x}")
            end = pos + 1 + length
            want = interest[mtype]
            if end <= size:
                if want == BODY and length - 4 <= limit:
                    if view is None:
                        view = memoryview(data)
                    out.append((mtype, view[pos + HEADER_SIZE : end]))
                elif want:
                    out.append((mtype, None))
                pos = end
                continue
            if want == BODY and length - 4 <= limit:
                self._buf += memoryview(data)[pos:]
                self._need = end - size
            else:
                if want:
                    out.append((mtype, None))
                self._skip = end - size
            break
        return out

    def finish(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[tuple[int, memoryview | None]], int]:
        """Completes only the message an earlier chunk left incomplete: its frame (if it is
        reported) and where in `data` the next message starts. For readers that walk whole
        messages themselves and need a decoder only at chunk boundaries."""
        out: list[tuple[int, memoryview | None]] = []
        size = len(data)
        pos = 0
        if self._skip:
            pos = min(self._skip, size)
            self._skip -= pos
        if self._buf and pos < size:
            pos = self._continue_partial(memoryview(data), pos, out)
        return out, pos

    def _continue_partial(
        self, view: memoryview, pos: int, out: list[tuple[int, memoryview | None]]
    ) -> int:
        """Completes the held message from the chunk's start; returns where framing resumes."""
        buf = self._buf
        if not self._need:  # only part of a header was held: complete the header first
            take = min(HEADER_SIZE - len(buf), len(view) - pos)
            buf += view[pos : pos + take]
            pos += take
            if len(buf) < HEADER_SIZE:
                return pos
            mtype, length = HEADER.unpack_from(buf, 0)
            if length < 4 or length > self.max_length:
                raise ProtocolViolation(f"invalid length {length} for message type {mtype:#04x}")
            want = self.interest[mtype]
            if want != BODY or length - 4 > self.inspect_limit:
                if want:
                    out.append((mtype, None))
                buf.clear()
                remaining = length - 4
                take = min(remaining, len(view) - pos)
                self._skip = remaining - take
                return pos + take
            self._need = length - 4
            if not self._need:
                out.append((mtype, memoryview(bytes(buf[HEADER_SIZE:]))))
                buf.clear()
                return pos
        take = min(self._need, len(view) - pos)
        buf += view[pos : pos + take]
        self._need -= take
        pos += take
        if not self._need:
            out.append((buf[0], memoryview(bytes(buf[HEADER_SIZE:]))))
            buf.clear()
        return pos

"""The only edits pgwarden makes to a stream: whole messages handed to an edit function,
and Flushes added after pipelined Executes.

MessageEditor passes messages of other types on byte for byte as they arrive, whatever
the chunking; only messages of the chosen types are held until complete (bounded by
`max_held`; a larger one passes through unedited). Used to rewrite statements on their
way to the server (rules) and errors on their way back (timeouts, blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.protocol import codes as c

__all__ = [
    "ErrorEditor",
    "FlushInserter",
    "MessageEditor",
    "StatementEditor",
    "flush_after_executes",
]


class MessageEditor:
    def __init__(
        self,
        types: bytes,
        edit: Callable[[bytes], bytes],
        *,
        header_sent: bytes = b"",
        passing: int = 0,
        max_held: int = 1 << 20,
    ) -> None:
        """Starts mid-stream when asked: `header_sent` is the start of a header already
        passed on, `passing` the rest of a message already being passed on."""
        self.types = frozenset(types)
        self.edit = edit
        self.max_held = max_held
        self._header = bytearray(header_sent)  # a partial message header
        self._header_sent = len(header_sent)
        self._passing = passing  # bytes of a message still to pass through unedited
        self._held = bytearray()  # a message of a chosen type being collected
        self._held_need = 0

    @property
    def at_boundary(self) -> bool:
        return not self._header and not self._passing and not self._held

    def feed(self, data: bytes) -> bytes:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        pos, size = 0, len(view)
        edited = False  # bytes were held, carried over or edited: the output is not the chunk
        while pos < size:
            if self._passing:
                take = min(self._passing, size - pos)
                out.append(view[pos : pos + take])
                self._passing -= take
                pos += take
                continue
            if self._held:
                edited = True
                take = min(self._held_need, size - pos)
                self._held += view[pos : pos + take]
                self._held_need -= take
                pos += take
                if not self._held_need:
                    out.append(self.edit(bytes(self._held)))
                    self._held.clear()
                continue
            if self._header:  # a header an earlier chunk began goes out whole, from here
                edited = True
            take = min(c.HEADER_SIZE - len(self._header), size - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) < c.HEADER_SIZE:
                edited = True  # held until the next chunk
                continue
            mtype, length = c.HEADER.unpack_from(self._header)
            header = bytes(self._header)
            self._header.clear()
            if self._header_sent:  # its start already went out: pass the rest unedited
                out.append(header[self._header_sent :])
                self._header_sent = 0
                self._passing = max(0, length - 4)
            elif mtype in self.types and 4 <= length <= self.max_held:
                edited = True
                self._held += header
                self._held_need = length - 4
                if not self._held_need:
                    out.append(self.edit(bytes(self._held)))
                    self._held.clear()
            else:
                out.append(header)
                self._passing = max(0, length - 4)
        if not edited:
            return data  # passed on as it came: the chunk itself
        return b"".join(out)


class ErrorEditor(MessageEditor):
    """Passes a server-to-client stream through, handing each ErrorResponse to `edit`."""

    def __init__(
        self, edit: Callable[[bytes], bytes], *, header_sent: bytes = b"", passing: int = 0
    ) -> None:
        super().__init__(bytes((c.ERROR_RESPONSE,)), edit, header_sent=header_sent, passing=passing)


class StatementEditor(MessageEditor):
    """Passes a client-to-server stream through, handing each Query and Parse to `edit`."""

    def __init__(
        self, edit: Callable[[bytes], bytes], *, header_sent: bytes = b"", passing: int = 0
    ) -> None:
        super().__init__(bytes((c.QUERY, c.PARSE)), edit, header_sent=header_sent, passing=passing)


_FLUSH: Final = bytes((c.FLUSH, 0, 0, 0, 4))
_SYNC_OR_FLUSH: Final = (c.SYNC, c.FLUSH)


def flush_after_executes(data: bytes, start: int = 0) -> bytes:
    """`data` with a Flush after every Execute that is not already followed by a Sync or
    Flush; the first message starts at `start` (the rest of one already passed on before).

    PostgreSQL holds the replies of pipelined statements until a Sync or Flush, so without
    this pgwarden could not see when one statement ends and the next begins, and could
    not time them one by one. Flush has no reply: the client sees no difference. An
    Execute that ends the chunk gets one too: what follows it is not known yet.
    """
    return _insert_flushes(data, start)[0]


def _insert_flushes(data: bytes, pos: int) -> tuple[bytes, int]:
    """`flush_after_executes`, and where the message the chunk ends inside begins."""
    parts: list[bytes] = []
    last = 0
    size = len(data)
    while pos + c.HEADER_SIZE <= size:
        end = pos + 1 + c.HEADER.unpack_from(data, pos)[1]
        if end > size:
            break
        if data[pos] == c.EXECUTE and (end >= size or data[end] not in _SYNC_OR_FLUSH):
            parts.append(data[last:end])
            parts.append(_FLUSH)
            last = end
        pos = end
    if not parts:
        return data, pos
    parts.append(data[last:])
    return b"".join(parts), pos


class FlushInserter:
    """`flush_after_executes` over a stream cut into chunks anywhere: it remembers where
    the message a chunk ends in stops, so the next chunk's first header is found (and an
    Execute that a chunk completes gets its Flush too)."""

    __slots__ = ("_execute", "_header", "_passing")

    def __init__(self, *, header_sent: bytes = b"", passing: int = 0) -> None:
        """Starts mid-stream when asked, as `FrameDecoder.remaining()` tells it: a
        message whose header was not seen is taken for one that is no Execute."""
        self._header = bytearray(header_sent)  # the start of a header seen, not its end
        self._passing = passing  # bytes of the current message still to come
        self._execute = False  # the current message is an Execute

    def feed(self, data: bytes) -> bytes:
        size = len(data)
        pos = 0
        if self._header:  # complete a header the last chunk began
            pos = min(c.HEADER_SIZE - len(self._header), size)
            self._header += data[:pos]
            if len(self._header) < c.HEADER_SIZE:
                return data
            self._execute = self._header[0] == c.EXECUTE
            self._passing = c.HEADER.unpack_from(self._header)[1] - 4
            self._header.clear()
        head = b""
        if self._passing or self._execute:  # the end of a message an earlier chunk began
            take = min(self._passing, size - pos)
            pos += take
            self._passing -= take
            if self._passing:
                return data
            if self._execute and (pos >= size or data[pos] not in _SYNC_OR_FLUSH):
                head = data[:pos] + _FLUSH
            self._execute = False
        out, tail = _insert_flushes(data, pos)
        if head:
            out = head + out[pos:]
        if tail < size:  # a message continues in the next chunk
            if size - tail < c.HEADER_SIZE:
                self._header += data[tail:]
            else:
                self._passing = tail + 1 + c.HEADER.unpack_from(data, tail)[1] - size
                self._execute = data[tail] == c.EXECUTE
        return out

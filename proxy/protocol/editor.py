"""A stream pass-through that hands chosen message types, whole, to an edit function.

Messages of other types pass on byte for byte as they arrive, whatever the chunking;
only messages of the chosen types are held until complete (bounded by `max_held`; a
larger one passes through unedited). Used to rewrite statements on their way to the
server and errors on their way back.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["MessageEditor"]

_HEADER = struct.Struct("!BI")


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
        while pos < size:
            if self._passing:
                take = min(self._passing, size - pos)
                out.append(view[pos : pos + take])
                self._passing -= take
                pos += take
                continue
            if self._held:
                take = min(self._held_need, size - pos)
                self._held += view[pos : pos + take]
                self._held_need -= take
                pos += take
                if not self._held_need:
                    out.append(self.edit(bytes(self._held)))
                    self._held.clear()
                continue
            take = min(5 - len(self._header), size - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) < 5:
                continue
            mtype, length = _HEADER.unpack_from(self._header)
            header = bytes(self._header)
            self._header.clear()
            if self._header_sent:  # its start already went out: pass the rest unedited
                out.append(header[self._header_sent :])
                self._header_sent = 0
                self._passing = max(0, length - 4)
            elif mtype in self.types and 4 <= length <= self.max_held:
                self._held += header
                self._held_need = length - 4
                if not self._held_need:
                    out.append(self.edit(bytes(self._held)))
                    self._held.clear()
            else:
                out.append(header)
                self._passing = max(0, length - 4)
        if len(out) == 1 and isinstance(out[0], memoryview) and len(out[0]) == size:
            return data  # nothing held or edited: the chunk itself
        return b"".join(out)

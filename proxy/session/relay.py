"""The READY phase: bytes relayed in whole chunks, the hooks around them, analysis after.

    client bytes ─► framed (validated; the round trips' client side) ─► hooks edit
                 ─► server ─► analysis ─► hooks.client_sent
    server bytes ─► errors edited (only while a hook asks) ─► client ─► analysis
                 ─► hooks.round_trip_end (a ReadyForQuery passed) ─► hooks.server_sent

The server stream is read by one reader, chosen when the relay starts, which also keeps
the server side of the round trips (drain, the client-gone cancel, transaction metrics):
- `realtime`: the statement tracker, as each chunk passes, because a hook must know what
  runs now (timeouts) or see every round trip end as it happens (rules);
- `deferred`: the statement tracker, later, in batches (the Backlog): the cheapest way,
  when no hook asks for more. Who needs the round trips current first catches up on this
  session's queued chunks (`catch_up`), never on other sessions';
- `plain`: analysis is off, so the relay frames the server stream for the round trips.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from proxy.inspector import Inspector
from proxy.protocol.editor import ErrorEditor
from proxy.protocol.framing import FrameDecoder, ProtocolViolation
from proxy.session.hooks import SessionHook
from proxy.tracking.events import Running
from proxy.tracking.round_trips import SERVER_INTEREST, RoundTrips

__all__ = ["Relay", "RelayOwner"]

_SERVER_INSPECT_LIMIT = 1 << 16  # larger server messages pass uninspected


def _dropped(data: bytes, now: float) -> None:
    """A closed relay's reader of the server stream: nothing is read any more."""


class RelayOwner(Protocol):
    """What the relay needs of the session it runs for."""

    bytes_in: int
    bytes_out: int
    draining: bool

    def protocol_violation(self, side: str, exc: ProtocolViolation) -> None: ...

    def drain_if_idle(self) -> None: ...

    def books_lost(self, exc: Exception) -> None: ...


class Relay:
    """`client_frames` is the client stream's decoder as the handshake left it; the server
    stream is taken at a message boundary."""

    def __init__(
        self,
        owner: RelayOwner,
        client: asyncio.Transport,
        server: asyncio.Transport,
        round_trips: RoundTrips,
        client_frames: FrameDecoder,
        inspector: Inspector | None,
        max_message_size: int,
    ) -> None:
        self.owner = owner
        self.client: asyncio.Transport | None = client
        self.server = server
        self.round_trips = round_trips
        self.client_frames = client_frames
        self.inspector = inspector
        self.hooks: list[SessionHook] = []
        self.errors: ErrorEditor | None = None  # hands ErrorResponses to the hooks
        self.mode = "plain"
        self._readies = round_trips.readies  # ReadyForQuery messages the hooks were told of
        self._server_frames: FrameDecoder | None = None  # the plain mode's reader
        self._feed_client: Callable[[bytes, float], None] | None = None
        self._feed_server: Callable[[bytes, float], None] = self._read_server
        if inspector is None:
            self._server_frames = FrameDecoder(
                SERVER_INTEREST, inspect_limit=_SERVER_INSPECT_LIMIT, max_length=max_message_size
            )
        else:
            inspector.keep_books(round_trips, owner.books_lost)
            self._defer()

    # ---------------------------------------------------------------- the path

    def client_data(self, data: bytes) -> None:
        try:
            frames = self.client_frames.feed(data)
        except ProtocolViolation as exc:
            self.owner.protocol_violation("client", exc)
            return
        self.owner.bytes_in += len(data)
        hooks = self.hooks
        out = data
        for hook in hooks:
            out = hook.edit_client(out)
        if out:
            self.server.write(out)
        if frames:
            self.round_trips.client(frames)
        feed = self._feed_client
        if feed is not None:  # analysis sees the statements as the application sent them
            feed(data, time.perf_counter())
        for hook in hooks:
            hook.client_sent()

    def server_data(self, data: bytes) -> None:
        self.owner.bytes_out += len(data)
        if self.errors is not None:  # analysis sees the errors as the client does
            data = self.errors.feed(data)
        if self.client is not None:
            self.client.write(data)
        if not self.track_server(data):
            return
        hooks = self.hooks
        if self.owner.draining:
            self.owner.drain_if_idle()
        if hooks:
            for hook in hooks:
                hook.server_sent()
            errors = self.errors
            if errors is not None and errors.at_boundary and not self._errors_wanted():
                self.errors = None

    def track_server(self, data: bytes) -> bool:
        """Hands server bytes relayed to the client to the server stream's reader, and
        tells the hooks when a round trip ended; False when the bytes cannot be a
        protocol-3 stream (the session is ending)."""
        try:
            self._feed_server(data, time.perf_counter())
        except ProtocolViolation as exc:
            self.owner.protocol_violation("server", exc)
            return False
        books = self.round_trips
        if books.readies != self._readies:  # also those a catch-up read meanwhile
            self._readies = books.readies
            idle = not books.awaiting and not books.unsynced
            for hook in self.hooks:
                hook.round_trip_end(books.status, idle)
        return True

    # ------------------------------------------------------------------ hooks

    def add_hook(self, hook: SessionHook) -> None:
        """Installs `hook` after the others; a hook that must know what runs now has the
        statement tracker read each chunk as it passes from here on."""
        if hook.realtime and self.mode == "deferred":
            self._realtime()
        self.hooks.append(hook)

    def edit_errors(self) -> None:
        """Starts handing server errors to the hooks, from where the stream stands."""
        if self.errors is None:
            header, passing = self.server_position()
            self.errors = ErrorEditor(self._edit_error, header_sent=header, passing=passing)

    def _edit_error(self, raw: bytes) -> bytes:
        for hook in self.hooks:
            edited = hook.server_error(raw)
            if edited is not None:
                return edited
        return raw

    def _errors_wanted(self) -> bool:
        return any(hook.edits_errors for hook in self.hooks)

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()
        self.hooks.clear()
        # Both call back into this relay: left, the cycle would keep the closed session
        # in memory until the seldom full collection (cli.py), instead of freeing it now.
        self.errors = None
        self._feed_server = _dropped

    # --------------------------------------------------------- who reads what

    def _defer(self) -> None:
        inspector = self.inspector
        assert inspector is not None
        self._feed_client = partial(inspector.backlog.add, inspector, True)
        self._feed_server = partial(inspector.backlog.add, inspector, False)
        self.mode = "deferred"

    def _realtime(self) -> None:
        inspector = self.inspector
        assert inspector is not None
        inspector.catch_up()  # the tracker goes on from where this session's queue ends
        self._feed_client = inspector.client
        self._feed_server = inspector.server
        self.mode = "realtime"

    def _read_server(self, data: bytes, now: float) -> None:
        assert self._server_frames is not None
        frames = self._server_frames.feed(data)
        if frames:
            self.round_trips.server(frames)

    def catch_up(self) -> None:
        """Analyses this session's queued chunks, so the round trips are current."""
        if self.mode == "deferred" and self.inspector is not None:
            self.inspector.catch_up()

    def server_position(self) -> tuple[bytes, int]:
        """Where the server stream relayed so far stands, as `FrameDecoder.remaining()`
        tells it (current: whatever is queued for this session is analysed first)."""
        if self._server_frames is not None:
            return self._server_frames.remaining()
        assert self.inspector is not None
        self.catch_up()
        return self.inspector.server_position()

    def running(self) -> Running | None:
        """What the server executes now, as the tracker sees it (None without one)."""
        self.catch_up()
        inspector = self.inspector
        tracker = inspector.tracker if inspector is not None else None
        return tracker.current() if tracker is not None else None

"""Follows the protocol's round trips so the session knows when the connection is idle.

A round trip opens with a Query, Sync or FunctionCall and closes with the ReadyForQuery
it earns; extended-protocol messages sent without a Sync yet also count as work in
flight. Drain, client-disconnect cancellation and transaction metrics rest on this
bookkeeping. The client side is read by the relay as it passes. The server side has one
reader per session (proxy/session/relay.py says which): the StatementTracker when analysis
runs, else the relay's own framing; either reports through `server()` or `ready()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.protocol import codes as c
from proxy.protocol.framing import interest_table
from proxy.protocol.messages import ErrorResponse

__all__ = ["CLIENT_INTEREST", "SERVER_INTEREST", "RoundTrips"]

_OPENS_ROUND_TRIP = frozenset((c.QUERY, c.SYNC, c.FUNCTION_CALL))
_EXTENDED = frozenset((c.PARSE, c.BIND, c.EXECUTE, c.DESCRIBE, c.CLOSE, c.FLUSH))

# What the relay frames of each stream for the round trips (the tracker reads more).
CLIENT_INTEREST = interest_table(
    type_only=(*_OPENS_ROUND_TRIP, *_EXTENDED, c.TERMINATE, c.COPY_DATA, c.COPY_DONE, c.COPY_FAIL)
)
SERVER_INTEREST = interest_table(body=(c.READY_FOR_QUERY, c.ERROR_RESPONSE))


class RoundTrips:
    __slots__ = (
        "awaiting",
        "fatal_seen",
        "on_transaction_end",
        "readies",
        "status",
        "terminated",
        "transaction_started",
        "unsynced",
    )

    def __init__(self, on_transaction_end: Callable[[float], None] | None = None) -> None:
        self.awaiting = 0  # ReadyForQuery messages the server still owes
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.status = b"I"  # transaction status from the last ReadyForQuery
        self.terminated = False  # the client sent Terminate
        self.fatal_seen = False  # the server sent a FATAL or PANIC error
        self.transaction_started = 0.0  # when the open transaction began (perf_counter)
        self.on_transaction_end = on_transaction_end  # told each transaction's duration
        self.readies = 0  # ReadyForQuery messages seen: a change tells a round trip ended

    def client(self, frames: list[tuple[int, memoryview | None]]) -> None:
        for mtype, _ in frames:
            if mtype in _OPENS_ROUND_TRIP:
                self.awaiting += 1
                if mtype == c.SYNC:
                    self.unsynced = False
            elif mtype in _EXTENDED:
                self.unsynced = True
            elif mtype == c.TERMINATE:
                self.terminated = True

    def server(self, frames: list[tuple[int, memoryview | None]]) -> bool:
        """Updates from server frames; True when a ReadyForQuery passed."""
        ready = False
        for mtype, body in frames:
            if mtype == c.READY_FOR_QUERY and body is not None:
                self.ready(bytes(body[:1]), 0.0)
                ready = True
            elif mtype == c.ERROR_RESPONSE and body is not None and _is_fatal(body):
                self.fatal_seen = True
        return ready

    def authenticated(self, status: bytes) -> None:
        """The ReadyForQuery that ends authentication: owed to the startup packet, not
        to a message of the client's (one pipelined behind the startup is still owed)."""
        self.status = status

    def ready(self, status: bytes, now: float) -> None:
        """A ReadyForQuery with `status` arrived at `now` (0: just now)."""
        before = self.status
        self.status = status
        self.readies += 1
        if self.awaiting:
            self.awaiting -= 1
        if status != before:
            if before == b"I":
                self.transaction_started = now or time.perf_counter()
            elif status == b"I" and self.transaction_started:
                if self.on_transaction_end is not None:
                    duration = (now or time.perf_counter()) - self.transaction_started
                    self.on_transaction_end(duration)
                self.transaction_started = 0.0

    @property
    def idle(self) -> bool:
        """Nothing owed by the server, nothing pending from the client, no transaction open."""
        return not self.awaiting and not self.unsynced and self.status == b"I"

    @property
    def busy(self) -> bool:
        """A statement may be running on the server right now."""
        return bool(self.awaiting) or self.unsynced


def _is_fatal(body: memoryview) -> bool:
    """Severity from the V field (never localized), else S (localized on old servers)."""
    try:
        error = ErrorResponse.decode(body)
    except ValueError:
        return False
    return error.severity in ("FATAL", "PANIC")

"""The named hooks of the relay: where features act on a session's streams.

The relay (relay.py) calls the hooks of its session at fixed points, each hook in turn,
in the order the session installed them (rules, then timeouts):

    client bytes ─► edit_client ─► server ─► (tracked) ─► client_sent
    server bytes ─► server_error (each ErrorResponse, while edited) ─► client
                 ─► (tracked) ─► round_trip_end (a ReadyForQuery passed) ─► server_sent

Every hook does nothing by default: a feature overrides the ones it needs. A hook runs on
the relay path, so it must be cheap, must never block, and must not raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

from proxy.analysis.matching import SessionIdentity
from proxy.tracking.events import Running
from proxy.tracking.round_trips import RoundTrips

__all__ = ["SessionControl", "SessionHook"]


class SessionControl(Protocol):
    """What a hook may ask of the session it serves."""

    @property
    def identity(self) -> SessionIdentity: ...

    @property
    def round_trips(self) -> RoundTrips: ...

    def log_fields(self) -> dict[str, object]:
        """Who the session is, for log lines (never a secret)."""
        ...

    def running(self) -> Running | None:
        """What the server executes now, as the (current) statement tracker sees it."""
        ...

    def edit_errors(self) -> None:
        """From now on, hand each ErrorResponse on its way to the client to `server_error`."""
        ...

    def pause_client(self, reason: str) -> None: ...

    def resume_client(self, reason: str) -> None: ...

    def cancel_backend(self, done: Callable[[], None]) -> None:
        """Cancels what the backend runs; `done` runs once the cancel was delivered."""
        ...

    def fail(self, sqlstate: str, message: str, reason: str) -> None:
        """Ends the session with a FATAL error where the client can read one."""
        ...


class SessionHook:
    """One feature on one session's relay path."""

    # True when the hook must know what runs now: the session then tracks statements as
    # each chunk passes instead of later, in batches (see relay.py)
    realtime: ClassVar[bool] = False

    def edit_client(self, data: bytes) -> bytes:
        """Client bytes on their way to the server, as earlier hooks left them."""
        return data

    def client_sent(self) -> None:
        """A client chunk reached the server and was tracked (it may have completed a
        message, or only continued one)."""

    def server_error(self, raw: bytes) -> bytes | None:
        """An ErrorResponse (whole, header included) on its way to the client, while the
        session edits errors: the message to send instead, or None to leave it."""
        return None

    @property
    def edits_errors(self) -> bool:
        """Whether an error may still come that `server_error` must see."""
        return False

    def round_trip_end(self, status: bytes, idle: bool) -> None:
        """A ReadyForQuery passed: `status` is the transaction status (I, T, E), `idle`
        that the server owes nothing more (the client acts next)."""

    def server_sent(self) -> None:
        """A server chunk reached the client and was tracked."""

    def close(self) -> None:
        """The session ends: release timers and whatever else the hook holds."""

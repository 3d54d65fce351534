"""The Session object without sockets or PostgreSQL: a fake listener and fake transports,
server bytes in, what the client gets and what the listener is told out."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest

from proxy.config import settings_from_dict
from proxy.inspector import Analysis
from proxy.metrics import Metrics
from proxy.protocol import messages as m
from proxy.protocol.startup import CancelRequest
from proxy.rewriters.rules import RuleEngine
from proxy.session import Phase, Session
from proxy.timeouts import TimeoutPolicy


class Transport:
    """Records what is written; enough of asyncio.Transport for a session."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0  # everything written went at once

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


class Host:
    """A listener with analysis, timeouts and rules off, recording what it is told."""

    def __init__(self) -> None:
        self.settings = settings_from_dict({"limits": {"startup_timeout": 0}})  # no timer
        self.metrics = Metrics()
        self.server_tls: ssl.SSLContext | None = None
        self.draining = False
        self.analysis: Analysis | None = None
        self.timeouts: TimeoutPolicy | None = None
        self.rules: RuleEngine | None = None
        self.told: list[str] = []

    def session_ready(self, session: Session) -> None:
        self.told.append("ready")

    def session_closed(self, session: Session) -> None:
        self.told.append("closed")

    def forward_cancel(
        self, request: CancelRequest, done: Callable[[], None] | None = None
    ) -> None:
        self.told.append("cancel")

    def cancel_backend(self, session: Session, done: Callable[[], None]) -> None:
        self.told.append("cancel")


AUTH_OK = m.AuthenticationRequest(m.AUTH_OK).encode()
READY = m.ReadyForQuery(b"I").encode()


def authenticating() -> tuple[Session, Host, Transport, Transport]:
    """A session whose upstream connection is open and whose startup packet went out."""
    host = Host()
    session = Session(host)
    client, server = Transport(), Transport()
    session.connection_made(client)  # type: ignore[arg-type]
    session.server = server  # type: ignore[assignment]
    session._enter(Phase.AUTH)
    return session, host, client, server


def test_authentication_ends_ready_with_the_tail_relayed() -> None:
    session, host, client, _ = authenticating()
    tail = m.NoticeResponse.build("NOTICE", "00000", "hello").encode()
    session.server_data(AUTH_OK + READY + tail)
    assert session.phase is Phase.READY
    assert host.told == ["ready"]
    assert bytes(client.written) == AUTH_OK + READY + tail
    assert session.round_trips.idle


def test_garbage_after_the_first_ready_closes_the_session_and_never_marks_it_ready() -> None:
    session, host, client, server = authenticating()
    session.server_data(AUTH_OK + READY + b"Z\x00\x00\x00\x01")  # a length no message has
    assert session.phase is Phase.CLOSED
    assert host.told == ["closed"]
    assert session.relay is None
    assert client.closed and server.closed


@pytest.mark.parametrize("cut", range(1, len(AUTH_OK + READY)))
def test_the_switch_to_ready_at_any_cut(cut: int) -> None:
    session, host, client, _ = authenticating()
    stream = AUTH_OK + READY + READY
    assert host.told == []
    session.server_data(stream[:cut])
    session.server_data(stream[cut:])
    assert session.phase is Phase.READY
    assert bytes(client.written) == stream
    assert session.round_trips.readies == 1  # the second one; the first ends authentication
    assert host.told == ["ready"]


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_bug_on_the_relay_path_ends_that_session_alone_with_an_error(side: str) -> None:
    """What compiled relay code does where Python would go on (a TypeError, raised here by
    the transport the relay writes to): the session ends with an ErrorResponse and a log
    line; another session relays on unharmed."""
    broken, _, broken_client, broken_server = authenticating()
    healthy, _, healthy_client, healthy_server = authenticating()
    for session in (broken, healthy):
        session.server_data(AUTH_OK + READY)
    calls: list[bytes] = []

    def fails(data: bytes) -> None:
        calls.append(data)
        raise TypeError("expected bytes, got int")

    if side == "client":
        broken_server.write = fails  # type: ignore[method-assign]
        query = m.Query("SELECT 1").encode()
        broken.data_received(query)
        assert calls[0] == query
        # the client is told, at a message boundary
        error = m.ErrorResponse.decode(bytes(broken_client.written)[len(AUTH_OK + READY) + 5 :])
        assert error.sqlstate == "XX000" and error.severity == "FATAL"
        assert "pgwarden: internal error" in error.message
    else:
        broken_client.write = fails  # type: ignore[method-assign]
        notice = m.NoticeResponse.build("NOTICE", "00000", "x").encode()
        broken.server_data(notice)
        assert calls[0] == notice
    assert broken.phase is Phase.CLOSED and broken.close_reason == "internal_error"
    assert broken_client.closed and broken_server.closed
    counter = broken.metrics.connection_errors["internal_error"]
    assert counter._value.get() == 1  # type: ignore[attr-defined]
    query = m.Query("SELECT 1").encode()
    healthy.data_received(query)
    assert bytes(healthy_server.written).endswith(query)
    assert healthy.phase is Phase.READY and not healthy_client.closed

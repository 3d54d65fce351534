"""RoundTrips, playbook style: these messages in from client and server, this state out."""

from __future__ import annotations

import pytest

from proxy.protocol import messages as m
from proxy.protocol.framing import FrameDecoder
from proxy.tracking.round_trips import CLIENT_INTEREST, SERVER_INTEREST, RoundTrips


class Playbook:
    """A RoundTrips fed real bytes through the same framing the session uses."""

    def __init__(self) -> None:
        self.rt = RoundTrips()
        self._client = FrameDecoder(CLIENT_INTEREST)
        self._server = FrameDecoder(SERVER_INTEREST, inspect_limit=1 << 16)

    def client(self, *msgs: m._Message) -> None:
        self.rt.client(self._client.feed(b"".join(x.encode() for x in msgs)))

    def server(self, *msgs: m._Message) -> bool:
        return self.rt.server(self._server.feed(b"".join(x.encode() for x in msgs)))


@pytest.fixture
def pb() -> Playbook:
    return Playbook()


ROWS = (
    m.RowDescription((m.Column("?column?", 0, 0, 23, 4, -1, 0),)),
    m.DataRow((b"1",)),
    m.CommandComplete("SELECT 1"),
)


def test_starts_idle(pb: Playbook) -> None:
    """A fresh connection owes nothing."""
    assert pb.rt.idle
    assert not pb.rt.busy
    assert pb.rt.status == b"I"
    assert not pb.rt.terminated
    assert not pb.rt.fatal_seen


def test_simple_query_round_trip(pb: Playbook) -> None:
    """Query opens a round trip; only its ReadyForQuery closes it."""
    pb.client(m.Query("SELECT 1"))
    assert pb.rt.busy
    assert not pb.rt.idle
    assert pb.server(*ROWS) is False
    assert pb.rt.busy
    assert pb.server(m.ReadyForQuery(b"I")) is True
    assert pb.rt.idle
    assert not pb.rt.busy


def test_extended_without_sync_is_busy(pb: Playbook) -> None:
    """Parse/Bind/Execute without Sync: busy though no ReadyForQuery is owed yet."""
    pb.client(m.Parse("", "SELECT 1"), m.Bind("", ""), m.Execute(""))
    assert pb.rt.busy
    assert not pb.rt.idle
    assert pb.rt.awaiting == 0
    assert pb.server(m.ParseComplete(), m.BindComplete(), *ROWS) is False
    assert pb.rt.busy


def test_sync_then_ready_for_query_is_idle(pb: Playbook) -> None:
    """Sync turns pending extended messages into one owed ReadyForQuery."""
    pb.client(m.Parse("", "SELECT 1"), m.Bind("", ""), m.Describe(b"P", ""), m.Execute(""))
    pb.client(m.Sync())
    assert pb.rt.awaiting == 1
    assert not pb.rt.unsynced
    assert pb.rt.busy
    pb.server(m.ParseComplete(), m.BindComplete(), *ROWS)
    assert pb.rt.busy
    assert pb.server(m.ReadyForQuery(b"I"))
    assert pb.rt.idle


def test_flush_and_close_count_as_unsynced(pb: Playbook) -> None:
    """Close and Flush are extended-protocol work until a Sync."""
    pb.client(m.Close(b"S", "s1"), m.Flush())
    assert pb.rt.busy
    pb.server(m.CloseComplete())
    assert pb.rt.busy
    pb.client(m.Sync())
    pb.server(m.ReadyForQuery(b"I"))
    assert pb.rt.idle


def test_pipelined_syncs_each_owe_a_ready(pb: Playbook) -> None:
    """Two Syncs in flight: idle only after the second ReadyForQuery."""
    pb.client(m.Parse("", "SELECT 1"), m.Sync(), m.Bind("", ""), m.Execute(""), m.Sync())
    assert pb.rt.awaiting == 2
    assert pb.server(m.ParseComplete(), m.ReadyForQuery(b"I"))
    assert pb.rt.busy
    assert pb.server(m.BindComplete(), *ROWS, m.ReadyForQuery(b"I"))
    assert pb.rt.idle


def test_transaction_open_is_not_idle(pb: Playbook) -> None:
    """Status 'T' (or failed 'E'): nothing running, but not idle either."""
    pb.client(m.Query("BEGIN"))
    pb.server(m.CommandComplete("BEGIN"), m.ReadyForQuery(b"T"))
    assert pb.rt.status == b"T"
    assert not pb.rt.busy
    assert not pb.rt.idle
    pb.client(m.Query("SELECT 1/0"))
    pb.server(m.ErrorResponse.build("ERROR", "22012", "division by zero"), m.ReadyForQuery(b"E"))
    assert pb.rt.status == b"E"
    assert not pb.rt.idle
    assert not pb.rt.fatal_seen
    pb.client(m.Query("ROLLBACK"))
    pb.server(m.CommandComplete("ROLLBACK"), m.ReadyForQuery(b"I"))
    assert pb.rt.idle


def test_function_call_opens_round_trip(pb: Playbook) -> None:
    """FunctionCall owes a ReadyForQuery like a Query."""
    pb.client(m.FunctionCall(1598))
    assert pb.rt.awaiting == 1
    pb.server(m.FunctionCallResponse(b"x"), m.ReadyForQuery(b"I"))
    assert pb.rt.idle


def test_terminate_flagged(pb: Playbook) -> None:
    """Terminate is recorded; it opens no round trip."""
    pb.client(m.Terminate())
    assert pb.rt.terminated
    assert pb.rt.awaiting == 0


@pytest.mark.parametrize(
    ("severity", "fatal"),
    [("FATAL", True), ("PANIC", True), ("ERROR", False), ("WARNING", False)],
)
def test_fatal_error_flagged(pb: Playbook, severity: str, fatal: bool) -> None:
    """FATAL and PANIC errors mean the server is closing; ERROR does not."""
    pb.server(m.ErrorResponse.build(severity, "57P01", "terminating connection"))
    assert pb.rt.fatal_seen is fatal


def test_fatal_error_split_across_chunks(pb: Playbook) -> None:
    """The flag does not depend on how the server's bytes were chunked."""
    wire = m.ErrorResponse({"S": "FATAL", "C": "57P01", "M": "bye"}).encode()
    decoder = FrameDecoder(SERVER_INTEREST)
    for i in range(len(wire)):
        pb.rt.server(decoder.feed(wire[i : i + 1]))
    assert pb.rt.fatal_seen


def test_fatal_error_localized_severity(pb: Playbook) -> None:
    """PostgreSQL 9.6+ sends the untranslated severity in V; S may be translated."""
    pb.server(m.ErrorResponse({"S": "ВАЖНО", "V": "FATAL", "C": "57P01", "M": "..."}))
    assert pb.rt.fatal_seen


def test_ready_for_query_without_request_does_not_underflow(pb: Playbook) -> None:
    """An unsolicited ReadyForQuery (after startup) leaves the count at zero."""
    assert pb.server(m.ReadyForQuery(b"I"))
    assert pb.rt.awaiting == 0
    assert pb.rt.idle


def test_copy_messages_do_not_open_round_trips(pb: Playbook) -> None:
    """COPY FROM STDIN: the Query owes the one ReadyForQuery; CopyData/CopyDone add none."""
    pb.client(m.Query("COPY t FROM STDIN"))
    pb.server(m.CopyInResponse(0, (0,)))
    pb.client(m.CopyData(b"1\n"), m.CopyDone())
    assert pb.rt.awaiting == 1
    pb.server(m.CommandComplete("COPY 1"), m.ReadyForQuery(b"I"))
    assert pb.rt.idle


def test_a_query_pipelined_behind_the_startup_stays_owed(pb: Playbook) -> None:
    """The ReadyForQuery that ends authentication answers the startup packet, not a
    Query the client sent behind it: that one is still running, so not idle."""
    pb.client(m.Query("select pg_sleep(1)"))
    pb.rt.authenticated(b"I")
    assert pb.rt.awaiting == 1
    assert pb.rt.busy and not pb.rt.idle
    pb.server(*ROWS, m.ReadyForQuery(b"I"))
    assert pb.rt.idle

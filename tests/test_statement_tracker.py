"""StatementTracker attributes every server reply to its statement, in protocol order.

Playbook style: each test feeds hand-built client and server messages as raw bytes, as the
relay hands them over, and checks the StatementEvents emitted: text, rows, SQLSTATE, round
trips, transactions, result samples.
"""

from __future__ import annotations

import struct

import pytest

from proxy.analysis.analyzer import Analyzer
from proxy.protocol import messages as m
from proxy.tracking.events import StatementEvent
from proxy.tracking.round_trips import RoundTrips
from proxy.tracking.statements import StatementTracker

INT4 = 23
TEXT = 25


class Playbook:
    """A tracker fed raw protocol bytes as the relay reads them, with a clock that advances
    1 ms per read."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[StatementEvent] = []
        self.batches: list[list[StatementEvent]] = []
        self.tracker = StatementTracker(Analyzer(), self._emit)

    def _clock(self) -> float:
        self.now += 0.001
        return self.now

    def _emit(self, events: list[StatementEvent]) -> None:
        self.batches.append(list(events))
        self.events.extend(events)

    def client(self, *messages: m._Message) -> None:
        self.tracker.client(b"".join(msg.encode() for msg in messages), self._clock())

    def server(self, *messages: m._Message) -> None:
        self.tracker.server(b"".join(msg.encode() for msg in messages), self._clock())

    def texts(self) -> list[str]:
        return [e.info.normalized for e in self.events]


def ready(status: bytes = b"I") -> m.ReadyForQuery:
    return m.ReadyForQuery(status)


def error(sqlstate: str) -> m.ErrorResponse:
    return m.ErrorResponse.build("ERROR", sqlstate, "failed")


def columns(*spec: tuple[str, int, int]) -> m.RowDescription:
    """RowDescription from (name, type oid, format) triples."""
    return m.RowDescription(tuple(m.Column(n, 0, 0, oid, -1, -1, fmt) for n, oid, fmt in spec))


def row(*values: bytes | None) -> m.DataRow:
    return m.DataRow(values)


def int4(value: int) -> bytes:
    return struct.pack("!i", value)


def extended(sql: str, *params: bytes, name: str = "") -> list[m._Message]:
    """What libpq sends for one PQsendQueryParams: Parse, Bind, Describe P, Execute, Sync."""
    return [
        m.Parse(name, sql, (INT4,) * len(params)),
        m.Bind("", name, (1,), params, ()),
        m.Describe(b"P", ""),
        m.Execute(""),
        m.Sync(),
    ]


# ----------------------------------------------------------------------------- simple query


def test_simple_query_rows_from_command_complete() -> None:
    p = Playbook()
    p.client(m.Query("SELECT id FROM users WHERE id = 42"))
    p.server(
        columns(("id", INT4, 0)),
        row(b"42"),
        m.CommandComplete("SELECT 1"),
        ready(),
    )
    (event,) = p.events
    assert event.info.normalized == "SELECT id FROM users WHERE id = $1"
    assert event.parsed.literals == ("42",)
    assert event.rows == 1
    assert event.sqlstate is None
    assert event.transaction is None
    assert event.round_trip_statements == 1
    assert event.finished >= event.started


def test_events_are_emitted_only_when_the_round_trip_ends() -> None:
    p = Playbook()
    p.client(m.Query("SELECT 1"))
    p.server(columns(("x", INT4, 0)), row(b"1"), m.CommandComplete("SELECT 1"))
    assert p.events == []
    p.server(ready())
    assert len(p.events) == 1


def test_multi_statement_query_error_in_the_middle() -> None:
    p = Playbook()
    p.client(m.Query("INSERT INTO t VALUES (1); SELECT 1/0; DELETE FROM t"))
    p.server(m.CommandComplete("INSERT 0 1"), error("22012"), ready())
    assert p.texts() == ["INSERT INTO t VALUES ($1)", "SELECT $2/$3"]
    insert, select = p.events
    assert insert.rows == 1 and insert.sqlstate is None
    assert select.sqlstate == "22012"
    assert {e.round_trip_statements for e in p.events} == {2}
    # the DELETE never ran: it is not reported, and the next round trip is attributed cleanly
    p.client(m.Query("SELECT 2"))
    p.server(columns(("x", INT4, 0)), row(b"2"), m.CommandComplete("SELECT 1"), ready())
    assert p.events[-1].info.command == "SELECT" and p.events[-1].rows == 1
    assert p.events[-1].sqlstate is None


def test_multi_statement_query_each_statement_gets_its_own_rows() -> None:
    p = Playbook()
    p.client(m.Query("UPDATE t SET a = 1; SELECT a FROM t; DELETE FROM t"))
    p.server(
        m.CommandComplete("UPDATE 3"),
        columns(("a", INT4, 0)),
        row(b"1"),
        row(b"1"),
        m.CommandComplete("SELECT 2"),
        m.CommandComplete("DELETE 3"),
        ready(),
    )
    assert [(e.info.command, e.rows) for e in p.events] == [
        ("UPDATE", 3),
        ("SELECT", 2),
        ("DELETE", 3),
    ]
    select = p.events[1]
    assert select.result is not None and len(select.result.rows) == 2
    assert p.events[0].result is None


def test_empty_query() -> None:
    p = Playbook()
    p.client(m.Query(""))
    p.server(m.EmptyQueryResponse(), ready())
    (event,) = p.events
    assert event.info.command == "EMPTY"


def test_unparsable_query_is_still_attributed() -> None:
    p = Playbook()
    p.client(m.Query("SELEC nothing"))
    p.server(error("42601"), ready())
    (event,) = p.events
    assert event.info.error is not None
    assert event.sqlstate == "42601"


# ---------------------------------------------------------------------------- transactions


def test_transaction_ids_begin_to_commit_vs_autocommit() -> None:
    p = Playbook()
    p.client(m.Query("SELECT 1"))
    p.server(m.CommandComplete("SELECT 1"), ready(b"I"))
    for sql, tag, status in [
        ("BEGIN", "BEGIN", b"T"),
        ("SELECT * FROM t WHERE id = 1", "SELECT 1", b"T"),
        ("INSERT INTO t VALUES (2)", "INSERT 0 1", b"T"),
        ("COMMIT", "COMMIT", b"I"),
        ("SELECT 2", "SELECT 1", b"I"),
        ("BEGIN", "BEGIN", b"T"),
        ("COMMIT", "COMMIT", b"I"),
    ]:
        p.client(m.Query(sql))
        p.server(m.CommandComplete(tag), ready(status))
    tx = [e.transaction for e in p.events]
    assert tx[0] is None and tx[5] is None
    assert tx[1] == tx[2] == tx[3] == tx[4] is not None
    assert tx[6] == tx[7] is not None
    assert tx[6] != tx[1]


def test_whole_transaction_in_one_simple_query() -> None:
    p = Playbook()
    p.client(m.Query("BEGIN; SELECT 1; COMMIT"))
    p.server(
        m.CommandComplete("BEGIN"),
        m.CommandComplete("SELECT 1"),
        m.CommandComplete("COMMIT"),
        ready(b"I"),
    )
    assert len({e.transaction for e in p.events}) == 1
    assert p.events[0].transaction is not None


def test_failed_transaction_status() -> None:
    p = Playbook()
    p.client(m.Query("BEGIN"))
    p.server(m.CommandComplete("BEGIN"), ready(b"T"))
    p.client(m.Query("SELECT 1/0"))
    p.server(error("22012"), ready(b"E"))
    p.client(m.Query("ROLLBACK"))
    p.server(m.CommandComplete("ROLLBACK"), ready(b"I"))
    assert p.tracker.status == b"I"
    assert len({e.transaction for e in p.events}) == 1
    assert p.events[1].sqlstate == "22012"


# ------------------------------------------------------------------------ extended protocol


def test_extended_protocol_statement_params_and_rows() -> None:
    p = Playbook()
    p.client(*extended("SELECT name FROM users WHERE id = $1", int4(7)))
    p.server(
        m.ParseComplete(),
        m.BindComplete(),
        columns(("name", TEXT, 0)),
        row(b"ann"),
        m.CommandComplete("SELECT 1"),
        ready(),
    )
    (event,) = p.events
    assert event.info.normalized == "SELECT name FROM users WHERE id = $1"
    assert event.params() == ((int4(7), 1),)
    assert event.param_types == (INT4,)
    assert event.rows == 1
    assert p.tracker.desynchronized == 0


def test_extended_protocol_result_sample_from_describe_portal() -> None:
    """libpq describes the portal; its RowDescription names the columns of the Execute."""
    p = Playbook()
    p.client(*extended("SELECT id, name FROM users WHERE org = $1", int4(1)))
    p.server(
        m.ParseComplete(),
        m.BindComplete(),
        columns(("id", INT4, 0), ("name", TEXT, 0)),
        row(b"1", b"a"),
        row(b"2", b"b"),
        m.CommandComplete("SELECT 2"),
        ready(),
    )
    (event,) = p.events
    assert event.result is not None
    assert [c.name for c in event.result.columns] == ["id", "name"]
    assert event.result.column_values(0) == [b"1", b"2"]


def test_extended_protocol_result_sample_from_describe_statement() -> None:
    """asyncpg describes the statement once, then binds it with binary results."""
    p = Playbook()
    p.client(m.Parse("s1", "SELECT id FROM authors", ()), m.Describe(b"S", "s1"), m.Sync())
    p.server(
        m.ParseComplete(),
        m.ParameterDescription(()),
        columns(("id", INT4, 0)),
        ready(),
    )
    p.client(m.Bind("", "s1", (), (), (1,)), m.Execute(""), m.Sync())
    p.server(
        m.BindComplete(),
        row(int4(10)),
        row(int4(11)),
        m.CommandComplete("SELECT 2"),
        ready(),
    )
    event = p.events[-1]
    assert event.info.normalized == "SELECT id FROM authors"
    assert event.result is not None
    (column,) = event.result.columns
    assert (column.name, column.type_oid, column.format) == ("id", INT4, 1)
    assert event.result.column_values(0) == [int4(10), int4(11)]


def test_named_statement_reused_by_bind_without_parse() -> None:
    p = Playbook()
    p.client(m.Parse("by_id", "SELECT * FROM users WHERE id = $1", (INT4,)), m.Sync())
    p.server(m.ParseComplete(), ready())
    for value in (1, 2, 3):
        p.client(m.Bind("", "by_id", (1,), (int4(value),), ()), m.Execute(""), m.Sync())
        p.server(m.BindComplete(), row(b"x"), m.CommandComplete("SELECT 1"), ready())
    assert p.texts() == ["SELECT * FROM users WHERE id = $1"] * 3
    assert [e.params() for e in p.events] == [((int4(v), 1),) for v in (1, 2, 3)]
    assert [e.param_types for e in p.events] == [(INT4,)] * 3
    assert len({e.round_trip for e in p.events}) == 3


def test_close_statement_forgets_it() -> None:
    p = Playbook()
    p.client(m.Parse("s", "SELECT * FROM users WHERE id = $1", (INT4,)), m.Sync())
    p.server(m.ParseComplete(), ready())
    p.client(m.Close(b"S", "s"), m.Sync())
    p.server(m.CloseComplete(), ready())
    # a Bind to the closed name fails on the server and must not be attributed to it
    p.client(m.Bind("", "s", (1,), (int4(1),), ()), m.Execute(""), m.Sync())
    p.server(error("26000"), ready())
    assert p.events == []
    assert p.tracker.desynchronized == 0
    # the name can be prepared again with another statement
    p.client(m.Parse("s", "DELETE FROM t WHERE id = $1", (INT4,)))
    p.client(m.Bind("", "s", (1,), (int4(1),), ()), m.Execute(""), m.Sync())
    p.server(m.ParseComplete(), m.BindComplete(), m.CommandComplete("DELETE 1"), ready())
    (event,) = p.events
    assert event.info.command == "DELETE" and event.rows == 1


def test_pipelined_batch_shares_one_round_trip() -> None:
    """executemany: Bind/Execute per row, one Sync."""
    p = Playbook()
    sql = "INSERT INTO t (a) VALUES ($1)"
    p.client(m.Parse("", sql, (INT4,)))
    for i in range(5):
        p.client(m.Bind("", "", (1,), (int4(i),), ()), m.Execute(""))
    p.client(m.Sync())
    p.server(m.ParseComplete())
    for _ in range(5):
        p.server(m.BindComplete(), m.CommandComplete("INSERT 0 1"))
    p.server(ready())
    assert len(p.events) == 5
    assert {e.round_trip_statements for e in p.events} == {5}
    assert len({e.round_trip for e in p.events}) == 1
    assert [e.params() for e in p.events] == [((int4(i), 1),) for i in range(5)]
    # started times are serialized: each starts when the one before finished
    for before, after in zip(p.events, p.events[1:], strict=False):
        assert after.started >= before.finished


def test_pipeline_error_skips_the_rest_until_sync() -> None:
    p = Playbook()
    sql = "INSERT INTO t (a) VALUES ($1)"
    p.client(m.Parse("", sql, (INT4,)))
    for i in range(4):
        p.client(m.Bind("", "", (1,), (int4(i),), ()), m.Execute(""))
    p.client(m.Sync())
    # first insert succeeds, second violates a constraint, the rest are discarded
    p.server(m.ParseComplete(), m.BindComplete(), m.CommandComplete("INSERT 0 1"))
    p.server(m.BindComplete(), error("23505"), ready())
    assert [e.sqlstate for e in p.events] == [None, "23505", "skipped", "skipped"]
    assert p.tracker.desynchronized == 0
    # the next round trip is attributed normally
    p.client(*extended("SELECT * FROM t WHERE a = $1", int4(1)))
    p.server(m.ParseComplete(), m.BindComplete(), m.NoData(), m.CommandComplete("SELECT 0"))
    p.server(ready())
    assert p.events[-1].sqlstate is None and p.events[-1].rows == 0


def test_several_syncs_in_flight() -> None:
    """A pipeline of round trips: each Sync ends one, replies still line up."""
    p = Playbook()
    p.client(*extended("SELECT * FROM a WHERE id = $1", int4(1)))
    p.client(*extended("SELECT * FROM b WHERE id = $1", int4(2)))
    p.server(m.ParseComplete(), m.BindComplete(), m.NoData(), error("42P01"), ready())
    p.server(m.ParseComplete(), m.BindComplete(), m.NoData(), m.CommandComplete("SELECT 0"))
    p.server(ready())
    assert p.texts() == ["SELECT * FROM a WHERE id = $1", "SELECT * FROM b WHERE id = $1"]
    assert [e.sqlstate for e in p.events] == ["42P01", None]
    assert [e.round_trip_statements for e in p.events] == [1, 1]
    assert p.events[0].round_trip != p.events[1].round_trip


def test_portal_suspended_then_resumed() -> None:
    p = Playbook()
    p.client(
        m.Parse("", "SELECT g FROM generate_series(1, 3) g", ()),
        m.Bind("c", "", (), (), ()),
        m.Execute("c", 2),
        m.Sync(),
    )
    p.server(m.ParseComplete(), m.BindComplete(), row(b"1"), row(b"2"), m.PortalSuspended())
    p.server(ready(b"T"))
    p.client(m.Execute("c", 2), m.Sync())
    p.server(row(b"3"), m.CommandComplete("SELECT 1"), ready(b"T"))
    first, second = p.events
    assert first.portal_suspended and first.rows is None
    assert not second.portal_suspended and second.rows == 1
    assert first.info.normalized == second.info.normalized


def test_describe_statement_records_parameter_types() -> None:
    p = Playbook()
    p.client(m.Parse("q", "SELECT * FROM t WHERE a = $1", ()), m.Describe(b"S", "q"), m.Sync())
    p.server(m.ParseComplete(), m.ParameterDescription((INT4,)), m.NoData(), ready())
    p.client(m.Bind("", "q", (1,), (int4(5),), ()), m.Execute(""), m.Sync())
    p.server(m.BindComplete(), m.CommandComplete("SELECT 0"), ready())
    (event,) = p.events
    assert event.param_types == (INT4,)
    assert p.tracker.desynchronized == 0


# ----------------------------------------------------------------------------------- COPY


def test_copy_in_simple_query() -> None:
    p = Playbook()
    p.client(m.Query("COPY t (a) FROM STDIN"))
    p.server(m.CopyInResponse(0, (0,)))
    p.client(m.CopyData(b"1\n2\n3\n"), m.CopyDone())
    p.server(m.CommandComplete("COPY 3"), ready())
    (event,) = p.events
    assert event.info.command == "COPY" and event.rows == 3


def test_copy_out_simple_query() -> None:
    p = Playbook()
    p.client(m.Query("COPY t TO STDOUT"))
    p.server(m.CopyOutResponse(0, (0,)), m.CopyData(b"1\n"), m.CopyData(b"2\n"), m.CopyDone())
    p.server(m.CommandComplete("COPY 2"), ready())
    (event,) = p.events
    assert event.info.command == "COPY" and event.rows == 2


def test_copy_fail_then_next_statement() -> None:
    p = Playbook()
    p.client(m.Query("COPY t FROM STDIN; SELECT 1"))
    p.server(m.CopyInResponse(0, (0,)))
    p.client(m.CopyFail("client gave up"))
    p.server(error("57014"), ready())
    (event,) = p.events
    assert event.info.command == "COPY" and event.sqlstate == "57014"
    p.client(m.Query("SELECT 1"))
    p.server(m.CommandComplete("SELECT 1"), ready())
    assert p.events[-1].sqlstate is None


def test_copy_in_extended_protocol() -> None:
    p = Playbook()
    p.client(m.Parse("", "COPY t FROM STDIN", ()), m.Bind("", "", (), (), ()))
    p.client(m.Execute(""), m.Sync())
    p.server(m.ParseComplete(), m.BindComplete(), m.CopyInResponse(0, (0,)))
    p.client(m.CopyData(b"1\n"), m.CopyDone())
    p.server(m.CommandComplete("COPY 1"), ready())
    (event,) = p.events
    assert event.info.command == "COPY" and event.rows == 1


# ------------------------------------------------------------------------------ samples


def test_result_sample_keeps_data_rows() -> None:
    p = Playbook()
    p.client(m.Query("SELECT id FROM authors"))
    p.server(columns(("id", INT4, 0)))
    p.server(*(row(str(i).encode()) for i in range(50)))
    p.server(m.CommandComplete("SELECT 50"), ready())
    (event,) = p.events
    assert event.result is not None
    assert event.result.column_values(0) == [str(i).encode() for i in range(50)]
    assert event.bytes_returned > 0
    assert event.rows == 50


def test_result_sample_is_bounded_but_bytes_are_all_counted() -> None:
    p = Playbook()
    p.client(m.Query("SELECT g FROM generate_series(1, 1500) g"))
    p.server(columns(("g", INT4, 0)))
    rows = [row(str(i).encode()) for i in range(1500)]
    p.server(*rows, m.CommandComplete("SELECT 1500"), ready())
    (event,) = p.events
    assert event.result is not None
    assert len(event.result.rows) == 1000
    assert event.bytes_returned == sum(len(r.encode()) for r in rows)
    assert event.rows == 1500


def test_frames_split_across_chunks() -> None:
    """The relay hands over whatever a read returned; messages may straddle reads."""
    p = Playbook()
    raw = b"".join(msg.encode() for msg in extended("SELECT * FROM t WHERE id = $1", int4(9)))
    for i in range(0, len(raw), 3):
        p.tracker.client(raw[i : i + 3], p._clock())
    reply = (
        b"".join(
            msg.encode()
            for msg in (
                m.ParseComplete(),
                m.BindComplete(),
                m.NoData(),
                m.CommandComplete("SELECT 0"),
            )
        )
        + ready().encode()
    )
    for i in range(0, len(reply), 2):
        p.tracker.server(reply[i : i + 2], p._clock())
    (event,) = p.events
    assert event.params() == ((int4(9), 1),)
    assert event.rows == 0


def test_every_chunking_of_a_pipeline_gives_the_same_events() -> None:
    """Walking whole messages in place and putting split ones back together agree."""
    sent = b"".join(
        msg.encode()
        for msg in (
            *extended("SELECT * FROM t WHERE id = $1", int4(1), name="s1"),
            m.Bind("p1", "s1", (1,), (int4(2),), ()),
            m.Describe(b"P", "p1"),
            m.Execute("p1"),
            m.Close(b"P", "p1"),
            m.Sync(),
        )
    )
    reply = b"".join(
        msg.encode()
        for msg in (
            m.ParseComplete(),
            m.BindComplete(),
            columns(("id", INT4, 1)),
            row(int4(1)),
            m.CommandComplete("SELECT 1"),
            ready(),
            m.BindComplete(),
            columns(("id", INT4, 1)),
            row(int4(2)),
            row(int4(3)),
            m.CommandComplete("SELECT 2"),
            m.CloseComplete(),
            ready(),
        )
    )

    def events(size: int) -> list[tuple[str, int | None, int, list[bytes | None]]]:
        p = Playbook()
        for i in range(0, len(sent), size):
            p.tracker.client(sent[i : i + size], p._clock())
        for i in range(0, len(reply), size):
            p.tracker.server(reply[i : i + size], p._clock())
        assert p.tracker.desynchronized == 0
        return [
            (e.info.normalized, e.rows, e.bytes_returned, e.result.column_values(0))
            for e in p.events
            if e.result is not None
        ]

    whole = events(len(sent) + len(reply))
    assert [rows for _, rows, _, _ in whole] == [1, 2]
    assert whole[1][3] == [int4(2), int4(3)]
    for size in (1, 2, 3, 5, 7, 11, 64):
        assert events(size) == whole


def test_a_query_too_large_to_inspect_is_still_owed_its_reply() -> None:
    """Counted (and its reply attributed to it), never analysed: the next one is intact."""
    p = Playbook()
    limit = p.tracker.analyzer.max_statement_length * 4
    huge = "SELECT '" + "x" * limit + "'"
    raw = m.Query(huge).encode()
    for i in range(0, len(raw), 65536):  # as the relay reads it
        p.tracker.client(raw[i : i + 65536], p._clock())
    p.client(m.Query("SELECT 1"))
    p.server(columns(("x", TEXT, 0)), row(b"x" * 10), m.CommandComplete("SELECT 1"), ready())
    p.server(columns(("n", INT4, 0)), row(b"1"), m.CommandComplete("SELECT 1"), ready())
    first, second = p.events
    assert first.info.error == "statement too large to inspect" and first.rows == 1
    assert second.info.normalized == "SELECT $1" and second.rows == 1
    assert p.tracker.desynchronized == 0


def test_a_row_too_large_to_inspect_is_counted_not_kept() -> None:
    """A DataRow over the inspection limit, split across reads, still counts its bytes."""
    p = Playbook()
    p.client(m.Query("SELECT big FROM blobs"))
    big = row(b"z" * 200_000).encode()
    reply = columns(("big", TEXT, 0)).encode() + big + m.CommandComplete("SELECT 1").encode()
    reply += ready().encode()
    for i in range(0, len(reply), 65536):
        p.tracker.server(reply[i : i + 65536], p._clock())
    (event,) = p.events
    assert event.bytes_returned == len(big)
    assert event.result is not None and event.result.rows == []
    assert event.rows == 1


def test_tracking_may_start_inside_a_message() -> None:
    """Started where the relay's own reader stands, the tracker skips the message under way."""
    rest = m.ParameterStatus("application_name", "app").encode()
    p = Playbook()
    p.tracker = StatementTracker(Analyzer(), p._emit, server_at=(b"", len(rest) - 7))
    p.client(m.Query("SELECT 1"))
    p.tracker.server(rest[7:], p._clock())
    p.server(columns(("n", INT4, 0)), row(b"1"), m.CommandComplete("SELECT 1"), ready())
    (event,) = p.events
    assert event.rows == 1 and p.tracker.desynchronized == 0


def test_unexpected_replies_never_raise() -> None:
    """Replies with nothing owed (a FATAL at idle, a stray NoData) are ignored."""
    p = Playbook()
    p.server(m.ErrorResponse.build("FATAL", "57P01", "terminating"))
    p.server(m.CommandComplete("SELECT 1"), m.NoData(), ready())
    p.client(m.Query("SELECT 1"))
    p.server(m.CommandComplete("SELECT 1"), ready())
    assert len(p.events) == 1


@pytest.mark.parametrize(
    ("sql", "command"),
    [
        ("DO $$ BEGIN PERFORM 1; END $$", "DO"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$", "CREATE"),
        ("NOTIFY chan, 'payload'", "NOTIFY"),
    ],
)
def test_statements_whose_normalized_text_does_not_parse(sql: str, command: str) -> None:
    """normalize() can turn valid SQL into text pglast rejects; the session keeps tracking."""
    p = Playbook()
    p.client(m.Query(sql))
    p.server(m.CommandComplete(command), ready())
    p.client(m.Query("SELECT 1"))
    p.server(m.CommandComplete("SELECT 1"), ready())
    assert [e.info.command for e in p.events] == [command, "SELECT"]
    assert "$1" in p.events[0].info.normalized  # the body or payload is not kept


def test_pipelined_round_trips_of_one_transaction() -> None:
    """Round trips sent before any reply (pipeline mode): status comes from the replies."""
    p = Playbook()
    for sql in ("BEGIN", "INSERT INTO t (a) VALUES ($1)", "COMMIT", "SELECT 1"):
        params = (int4(1),) if "$1" in sql else ()
        p.client(
            m.Parse("", sql, (INT4,) * len(params)),
            m.Bind("", "", (1,) * len(params), params, ()),
            m.Execute(""),
            m.Sync(),
        )
    for tag, status in [("BEGIN", b"T"), ("INSERT 0 1", b"T"), ("COMMIT", b"I")]:
        p.server(m.ParseComplete(), m.BindComplete(), m.CommandComplete(tag), ready(status))
    p.server(m.ParseComplete(), m.BindComplete(), m.CommandComplete("SELECT 1"), ready(b"I"))
    begin, insert, commit, select = p.events
    assert begin.transaction is not None
    assert begin.transaction == insert.transaction == commit.transaction
    assert select.transaction is None
    assert len({e.round_trip for e in p.events}) == 4


def test_query_in_another_client_encoding() -> None:
    """LATIN1 bytes are not UTF-8: the statement is counted as unparsable, tracking goes on."""
    p = Playbook()
    sql = b"SELECT * FROM t WHERE name = '\xe9t\xe9'".decode("utf-8", "surrogateescape")
    p.client(m.Query(sql))
    p.server(m.CommandComplete("SELECT 0"), ready())
    p.client(m.Query("SELECT 1"))
    p.server(m.CommandComplete("SELECT 1"), ready())
    assert [e.info.error is not None for e in p.events] == [True, False]


def test_a_message_that_cannot_be_read_resets_attribution_not_tracking() -> None:
    """A reply that fails to decode costs its round trip's attribution, nothing after it."""
    p = Playbook()
    p.client(m.Query("SELECT 1"))
    p.tracker.server(b"E" + struct.pack("!I", 10) + b"SERROR", p._clock())  # no terminators
    p.server(ready())
    assert p.tracker.failures == 1
    p.client(m.Query("SELECT 2"))
    p.server(columns(("n", INT4, 0)), row(b"2"), m.CommandComplete("SELECT 1"), ready())
    assert [e.rows for e in p.events] == [1]


def test_books_kept_for_the_session() -> None:
    """Given the session's round trips, the tracker keeps their server side: statuses,
    transactions ended (and timed), a FATAL error seen."""
    ended: list[float] = []
    books = RoundTrips(ended.append)
    p = Playbook()
    p.tracker.books = books
    books.awaiting = 3  # three round trips sent, as the relay counts them
    p.client(m.Query("BEGIN"), m.Query("SELECT 1"), m.Query("COMMIT"))
    p.server(m.CommandComplete("BEGIN"), ready(b"T"))
    assert books.status == b"T" and books.awaiting == 2
    p.server(m.CommandComplete("SELECT 1"), ready(b"T"), m.CommandComplete("COMMIT"), ready())
    assert books.status == b"I" and books.awaiting == 0 and books.idle
    assert len(ended) == 1 and ended[0] > 0
    p.server(m.ErrorResponse.build("FATAL", "57P01", "terminating connection"))
    assert books.fatal_seen

"""The application-scoped rules on their own: repeated_read and catalog_polling.

Several detector instances sharing one `Applications` stand for several connections of
one application; events are built by hand with the real Analyzer's facts and explicit
times, so windows are exact (the end-to-end tests are in
tests/test_advice_application_rules.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.advice import Advice
from proxy.analysis.analyzer import Analyzer
from proxy.detectors import DETECTORS, Applications, Detector, SessionIdentity
from proxy.detectors import catalog_polling as cp
from proxy.detectors import repeated_read as rr
from proxy.detectors.catalog_polling import CatalogPolling, CatalogPollingOptions
from proxy.detectors.repeated_read import RepeatedRead, RepeatedReadOptions, Repeats
from proxy.durations import Duration
from proxy.protocol import messages as m
from proxy.tracking.events import StatementEvent

WEB = SessionIdentity(user="app", database="shop", application_name="web")
WORKER = SessionIdentity(user="app", database="shop", application_name="worker")
SECRET = "s3cr3t-value-91c4"
ANALYZER = Analyzer()
MAPPING = "SELECT source, target FROM column_mappings WHERE project_id = $1"
EXISTS = (
    "SELECT EXISTS (SELECT FROM information_schema.tables "
    "WHERE table_schema = $1 AND table_name = $2)"
)


def event(
    sql: str,
    *params: str | None,
    at: float = 1000.0,
    took: float = 0.002,
    rows: int | None = 1,
    first_row: bytes = b"row",
    sqlstate: str | None = None,
    binary: bool = False,
) -> StatementEvent:
    """A finished statement started `at`, with `rows` rows in its CommandComplete."""
    (parsed,) = ANALYZER.analyze(sql)
    values = tuple(None if p is None else p.encode() for p in params)
    formats = (1,) if binary else ()
    bind = m.Bind("", "", formats, values, ()).payload() if params else None
    ev = StatementEvent(parsed, at, at, bind, tuple(25 for _ in params), 1)
    ev.finished = at + took
    ev.sqlstate = sqlstate
    if rows is not None:
        ev.tag = f"SELECT {rows}\0".encode()
        if rows:
            ev.sampled = [first_row]
            ev.bytes_returned = rows * (len(first_row) + 5)
    return ev


def write(sql: str, at: float = 1000.0) -> StatementEvent:
    ev = event(sql, at=at, rows=None)
    ev.tag = b"UPDATE 1\0"
    return ev


def observe(detector: Detector, events: Sequence[StatementEvent]) -> list[Advice]:
    found: list[Advice] = []
    for ev in events:
        found.extend(detector.observe(ev))
    return found


def reads(
    applications: Applications | None = None,
    who: SessionIdentity = WEB,
    min_repeats: int = 10,
    window: float = 60.0,
) -> RepeatedRead:
    options = RepeatedReadOptions(min_repeats=min_repeats, window=Duration(window))
    return RepeatedRead(options, who, applications)


def polls(
    applications: Applications | None = None,
    who: SessionIdentity = WEB,
    min_repeats: int = 5,
    window: float = 60.0,
) -> CatalogPolling:
    options = CatalogPollingOptions(min_repeats=min_repeats, window=Duration(window))
    return CatalogPolling(options, who, applications)


def test_both_rules_are_registered_with_their_defaults() -> None:
    assert DETECTORS["repeated_read"] is RepeatedRead
    assert DETECTORS["catalog_polling"] is CatalogPolling
    assert RepeatedReadOptions() == RepeatedReadOptions(True, 10, Duration(60.0))
    assert CatalogPollingOptions() == CatalogPollingOptions(True, 5, Duration(60.0))


def test_analyzer_tells_a_select_that_writes_in_its_with() -> None:
    for sql in (
        "WITH u AS (UPDATE t SET x = 1 RETURNING *) SELECT * FROM u",
        "WITH i AS (INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING RETURNING id) "
        "SELECT id FROM i UNION ALL SELECT id FROM t WHERE a = $1",
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING id) SELECT count(*) FROM d",
    ):
        (parsed,) = ANALYZER.analyze(sql)
        assert parsed.info.command == "SELECT" and parsed.info.modifies, sql
    for sql in ("WITH w AS (SELECT 1) SELECT * FROM w, t", "SELECT * FROM t", "SELECT 1"):
        (parsed,) = ANALYZER.analyze(sql)
        assert not parsed.info.modifies, sql


# ------------------------------------------------------------------------- repeated_read


def test_the_same_read_over_three_connections_is_reported_once_at_min_repeats() -> None:
    apps = Applications()
    connections = [reads(apps) for _ in range(3)]
    found = []
    for i in range(25):
        found += observe(connections[i % 3], [event(MAPPING, SECRET, at=1000.0 + i * 0.5)])
    (advice,) = found  # at the 10th; not again within the window
    assert advice.rule == "repeated_read" and advice.severity == "info"
    assert advice.count == 10 and advice.statement == MAPPING
    assert advice.tables == ("column_mappings",) and advice.suggested_sql is None
    assert advice.application_name == "web"
    assert advice.evidence == {
        "repeats": 10,
        "window_s": 60.0,
        "span_s": 4.5,
        "connections": 3,
        "time_ms": 20.0,
    }
    assert "10 times in 4.5 s over 3 connections" in advice.suggestion
    assert "Cache" in advice.suggestion
    assert SECRET not in repr(advice.fields())


def test_it_is_reported_again_a_window_later_and_a_warning_from_100_repeats() -> None:
    detector = reads(window=10.0)
    found = observe(detector, [event(MAPPING, "7", at=1000.0 + i * 0.05) for i in range(150)])
    assert [a.count for a in found] == [10]
    later = observe(detector, [event(MAPPING, "7", at=1010.0 + i * 0.05) for i in range(30)])
    (again,) = later  # counted from the last report: the reads of the window since
    assert again.count == 150 and again.severity == "warning"
    assert again.evidence is not None and again.evidence["connections"] == 1


def test_literals_of_the_simple_protocol_are_values_too() -> None:
    detector = reads()
    same = [
        event(f"SELECT * FROM settings WHERE key = '{SECRET}'", at=1000.0 + i) for i in range(10)
    ]
    (advice,) = observe(detector, same)
    assert advice.statement == "SELECT * FROM settings WHERE key = $1"
    assert SECRET not in repr(advice.fields())
    varied = [event(f"SELECT * FROM settings WHERE key = 'k{i}'", at=1100.0 + i) for i in range(20)]
    assert observe(reads(), varied) == []
    assert observe(reads(), [event("SELECT * FROM settings", at=1000.0 + i) for i in range(10)])


def test_values_are_kept_as_a_digest_only() -> None:
    apps = Applications()
    detector = reads(apps)
    observe(detector, [event(MAPPING, SECRET, at=1000.0 + i) for i in range(3)])
    state = apps.attach("repeated_read", WEB, rr._Reads)
    assert [type(d) for _, d in state.keys] == [int]
    assert SECRET not in repr(list(state.keys)) + repr(list(state.written))
    digest = rr.values_digest
    assert digest(event(MAPPING, SECRET)) == digest(event(MAPPING, SECRET))
    assert digest(event(MAPPING, SECRET)) != digest(event(MAPPING, "other"))
    # the same bytes sent as text or binary are different values; NULL is not ''
    assert digest(event(MAPPING, "1")) != digest(event(MAPPING, "1", binary=True))
    assert digest(event(MAPPING, None)) != digest(event(MAPPING, ""))
    # the statement's name differs between connections (asyncpg): the values do not
    named = event(MAPPING, SECRET)
    named.bind = m.Bind("", "__asyncpg_stmt_7__", (), (SECRET.encode(),), ()).payload()
    assert digest(named) == digest(event(MAPPING, SECRET))


def test_a_write_to_its_tables_from_any_connection_starts_the_count_again() -> None:
    apps = Applications()
    reader, writer = reads(apps), reads(apps)
    nine = [event(MAPPING, "1", at=1000.0 + i) for i in range(9)]
    assert observe(reader, nine) == []
    observe(writer, [write("UPDATE public.column_mappings SET target = $1 WHERE id = $2")])
    assert observe(reader, [event(MAPPING, "1", at=1010.0 + i) for i in range(9)]) == []
    observe(writer, [write("INSERT INTO other_table (a) VALUES ($1)")])  # another table
    (advice,) = observe(reader, [event(MAPPING, "1", at=1020.0)])
    assert advice.count == 10
    for sql in (
        "DELETE FROM column_mappings WHERE id = $1",
        "TRUNCATE column_mappings",
        "COPY column_mappings FROM STDIN",
        "MERGE INTO column_mappings m USING staged s ON m.id = s.id "
        "WHEN MATCHED THEN UPDATE SET target = s.target",
        "WITH n AS (INSERT INTO column_mappings (source) VALUES ($1) RETURNING id) "
        "SELECT id FROM n",
    ):
        detector = reads()
        assert observe(detector, [event(MAPPING, "1", at=1000.0 + i) for i in range(5)]) == []
        observe(detector, [write(sql, at=1005.0)])
        assert observe(detector, [event(MAPPING, "1", at=1006.0 + i) for i in range(5)]) == [], sql


def test_a_changed_result_starts_the_count_again() -> None:
    detector = reads()
    events = [event(MAPPING, "1", at=1000.0 + i, first_row=b"a%d" % (i // 5)) for i in range(20)]
    assert observe(detector, events) == []
    events = [event(MAPPING, "1", at=1100.0 + i, rows=1 + i // 5) for i in range(20)]
    assert observe(reads(), events) == []


def test_healthy_reads_stay_silent() -> None:
    cases: list[list[StatementEvent]] = [
        [event(MAPPING, str(i), at=1000.0 + i) for i in range(30)],  # different keys
        [event(MAPPING, "1", at=1000.0 + i) for i in range(9)],  # fewer than min_repeats
        [event(MAPPING, "1", at=1000.0 + i * 7) for i in range(20)],  # 10 span over 60 s
        [event("SELECT 1", at=1000.0 + i) for i in range(20)],  # health checks
        [event("SELECT now()", at=1000.0 + i) for i in range(20)],
        [event(EXISTS, "public", "t", at=1000.0 + i) for i in range(20)],  # catalog_polling's
        [event(MAPPING + " FOR UPDATE", "1", at=1000.0 + i) for i in range(20)],
        [event(MAPPING, "1", at=1000.0 + i, sqlstate="57014") for i in range(20)],
        [event(MAPPING, "1", at=1000.0 + i, rows=0) for i in range(20)],  # polling for work
        [write("UPDATE column_mappings SET target = $1", at=1000.0 + i) for i in range(20)],
    ]
    for events in cases:
        assert observe(reads(), events) == [], events[0]
    cursor = [event(MAPPING, "1", at=1000.0 + i) for i in range(20)]
    for ev in cursor:
        ev.portal_suspended = True  # chunks of one read through a cursor
    assert observe(reads(), cursor) == []


def test_each_application_counts_its_own_reads() -> None:
    apps = Applications()
    web, worker = reads(apps, WEB), reads(apps, WORKER)
    for i in range(9):
        assert observe(web, [event(MAPPING, "1", at=1000.0 + i)]) == []
        assert observe(worker, [event(MAPPING, "1", at=1000.0 + i)]) == []
    (a,) = observe(web, [event(MAPPING, "1", at=1010.0)])
    (b,) = observe(worker, [event(MAPPING, "1", at=1010.0)])
    assert (a.application_name, b.application_name) == ("web", "worker")
    # a write by another application is not one of this application's
    assert observe(web, [event(MAPPING, "2", at=1020.0 + i) for i in range(5)]) == []
    observe(reads(apps, WORKER), [write("UPDATE column_mappings SET target = $1")])
    assert observe(web, [event(MAPPING, "2", at=1030.0 + i) for i in range(5)])


def test_the_state_is_bounded() -> None:
    apps = Applications()
    detector = reads(apps, min_repeats=3)
    observe(detector, [event(MAPPING, "1", at=1000.0 + i / 10) for i in range(50)])
    state = apps.attach("repeated_read", WEB, rr._Reads)
    (read,) = state.keys.values()
    assert len(read.times) == 3  # the last min_repeats times, whatever the count
    for i in range(rr._MAX_KEYS + 10):
        observe(detector, [event(MAPPING, f"k{i}", at=1000.0)])
    assert len(state.keys) == rr._MAX_KEYS
    assert all(r is not read for r in state.keys.values())  # the oldest went
    # a forgotten table counts as written when the last forgotten write was: silence
    observe(detector, [event(MAPPING, "x", at=1001.0 + i) for i in range(2)])
    state.wrote(["column_mappings"])
    state.wrote([f"t{i}" for i in range(rr._MAX_TABLES)])
    assert len(state.written) == rr._MAX_TABLES and "column_mappings" not in state.written
    assert observe(detector, [event(MAPPING, "x", at=1003.0)]) == []


def test_a_key_last_read_over_a_window_ago_makes_room_for_a_new_one() -> None:
    apps = Applications()
    detector = reads(apps, window=60.0)
    observe(detector, [event(MAPPING, "old", at=1000.0), event(MAPPING, "recent", at=1030.0)])
    observe(detector, [event(MAPPING, "new", at=1061.0)])
    state = apps.attach("repeated_read", WEB, rr._Reads)
    assert [read.first for read in state.keys.values()] == [1030.0, 1061.0]


# ----------------------------------------------------------------------- catalog_polling


def test_an_existence_check_before_every_write_on_a_pooled_connection() -> None:
    detector = polls()
    found = []
    for i in range(10):
        found += observe(detector, [event(EXISTS, "public", "events", at=1000.0 + i)])
        observe(detector, [write("INSERT INTO events (a) VALUES ($1)", at=1000.5 + i)])
    (advice,) = found  # the first check on the connection is free, the next five count
    assert advice.rule == "catalog_polling" and advice.severity == "warning"
    assert advice.count == 5 and advice.statement == EXISTS
    assert advice.tables == ("information_schema.tables",) and advice.suggested_sql is None
    assert advice.evidence == {
        "repeats": 5,
        "window_s": 60.0,
        "span_s": 4.0,
        "connections": 1,
        "time_ms": 10.0,
    }
    assert "asked again 5 times in 4.0 s (on one connection)" in advice.suggestion
    assert "once at start-up" in advice.suggestion


def test_repeats_on_several_connections_add_up() -> None:
    apps = Applications()
    connections = [polls(apps) for _ in range(3)]
    found = []
    for round_ in range(3):  # each connection: one free first run, then two that count
        for n, detector in enumerate(connections):
            at = 1000.0 + round_ * 3 + n
            found += observe(detector, [event(EXISTS, "public", "t", at=at)])
    (advice,) = found
    assert advice.count == 5 and advice.evidence is not None
    assert advice.evidence["connections"] == 3


def test_start_up_and_first_use_queries_never_count() -> None:
    apps = Applications()
    introspect = "SELECT t.oid, t.typname FROM pg_catalog.pg_type t WHERE t.oid = ANY($1)"
    for n in range(50):  # a pool of 50 connections, each introspecting once per type
        detector = polls(apps)
        for i, oid in enumerate(("{16384}", "{16390}", "{16402}")):
            assert observe(detector, [event(introspect, oid, at=1000.0 + n + i / 10)]) == []
    has_table = polls(apps)  # SQLAlchemy's create_all: each table checked once
    checks = [event(EXISTS, "public", f"t{i}", at=1100.0 + i) for i in range(30)]
    assert observe(has_table, checks) == []
    psql = "SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relname OPERATOR(pg_catalog.~) $1"
    for n in range(20):  # psql -c '\d t', twenty runs: a connection each
        assert observe(polls(apps), [event(psql, "^(t)$", at=1200.0 + n)]) == []


def test_catalog_polling_healthy_shapes_stay_silent() -> None:
    cases: list[list[StatementEvent]] = [
        [event(EXISTS, "public", "t", at=1000.0 + i) for i in range(5)],  # 4 counted
        [event(EXISTS, "public", "t", at=1000.0 + i * 20) for i in range(10)],  # > window
        [event(EXISTS, "public", "t", at=1000.0 + i, sqlstate="42501") for i in range(10)],
        [event(MAPPING, "1", at=1000.0 + i) for i in range(10)],  # not the catalogs
        [event("SELECT version()", at=1000.0 + i) for i in range(10)],
        # running state, polled by monitoring by design
        [event("SELECT count(*) FROM pg_stat_activity", at=1000.0 + i) for i in range(10)],
        [event("SELECT * FROM pg_catalog.pg_locks", at=1000.0 + i) for i in range(10)],
        [
            event("SELECT * FROM pg_statio_user_tables s JOIN pg_class c ON c.oid = s.relid", at=t)
            for t in (1000.0 + i for i in range(10))
        ],
        [
            event("SELECT * FROM pg_catalog.pg_class c JOIN orders o ON o.id = c.oid", at=t)
            for t in (1000.0 + i for i in range(10))
        ],
    ]
    for events in cases:
        assert observe(polls(), events) == [], events[0]


def test_catalog_polling_each_application_on_its_own_and_bounded() -> None:
    apps = Applications()
    web, worker = polls(apps, WEB), polls(apps, WORKER)
    for i in range(5):
        assert observe(web, [event(EXISTS, "public", "t", at=1000.0 + i)]) == []
        assert observe(worker, [event(EXISTS, "public", "t", at=1000.0 + i)]) == []
    assert len(observe(web, [event(EXISTS, "public", "t", at=1006.0)])) == 1
    assert len(observe(worker, [event(EXISTS, "public", "t", at=1006.0)])) == 1
    detector = polls(apps)
    observe(detector, [event(EXISTS, "public", f"t{i}", at=1000.0) for i in range(1000)])
    assert len(detector._ran) == cp._MAX_RAN
    assert len(apps.attach("catalog_polling", WEB, cp._Polls).queries) == 1


def test_repeats_keep_the_last_min_repeats_times_and_count_the_run() -> None:
    repeats = Repeats(0.0, 0.001, 1)
    assert not repeats.add(1.0, 0.001, 1, 3, 10.0)
    assert repeats.add(2.0, 0.001, 2, 3, 10.0)
    assert repeats.count == 3 and repeats.connection_count() == 2
    repeats.report(2.0)
    assert not repeats.add(3.0, 0.001, 1, 3, 10.0)  # reported within the window
    assert repeats.add(12.0, 0.001, 1, 3, 10.0)  # a window later, the last three in one
    assert repeats.count == 2 and repeats.times == [2.0, 3.0, 12.0]
    repeats.report(12.0)
    assert not repeats.add(23.0, 0.001, 1, 3, 10.0)  # a gap over the window: a new run
    assert repeats.count == 1 and repeats.times == [23.0]

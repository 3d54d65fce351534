"""Each detector on its own: statement events in, advice out, no proxy and no database.

Events are built as the tracker builds them: a statement analysed by the real Analyzer,
its Bind and its result kept raw (RowDescription and DataRow bodies), its round trip,
transaction and times set from its replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from proxy.advice import Advice
from proxy.analysis.analyzer import Analyzer
from proxy.detectors import Detector, SessionIdentity
from proxy.detectors.insert_loop import InsertLoop, InsertLoopOptions
from proxy.detectors.n_plus_one import NPlusOne, NPlusOneOptions
from proxy.detectors.slow_query import SlowQuery, SlowQueryOptions
from proxy.durations import Duration
from proxy.protocol import messages as m
from proxy.tracking.events import StatementEvent

WHO = SessionIdentity(user="app", database="shop", application_name="web")
INT4, TEXT = 23, 25
AUTHORS = "SELECT id, name FROM authors ORDER BY name"
BOOKS = "SELECT id, title FROM books WHERE author_id = $1"
BOOKS_BATCHED = "SELECT id, title FROM books WHERE author_id = ANY($1)"
INSERT = "INSERT INTO books (author_id, title) VALUES ($1, $2)"
INSERT_BATCHED = (
    "INSERT INTO books (author_id, title) SELECT u.author_id, u.title "
    "FROM unnest(CAST($1 AS bigint[]), CAST($2 AS text[])) AS u (author_id, title)"
)
ANALYZER = Analyzer()


class Session:
    """One client connection's statements, with a clock and round-trip numbers."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.round_trip = 0

    def run(
        self,
        sql: str,
        *params: int | str,
        transaction: int | None = None,
        took: float = 0.002,
        pipelined: bool = False,  # sent in the round trip of the statement before
        rows: Sequence[tuple[int, str]] = (),  # an (id, name) result
        sqlstate: str | None = None,
    ) -> StatementEvent:
        if not pipelined:
            self.round_trip += 1
        (parsed,) = ANALYZER.analyze(sql)
        values = tuple(str(p).encode() for p in params)
        types = tuple(INT4 if isinstance(p, int) else TEXT for p in params)
        bind = m.Bind("", "", (), values, ()).payload() if params else None
        event = StatementEvent(parsed, self.now, self.now, bind, types, self.round_trip)
        event.finished = self.now + took
        event.transaction = transaction
        event.sqlstate = sqlstate
        if rows:
            columns = (
                m.Column("id", 0, 1, INT4, 4, -1, 0),
                m.Column("name", 0, 2, TEXT, -1, -1, 0),
            )
            event.description = m.RowDescription(columns).payload()
            event.sampled = [m.DataRow((str(i).encode(), n.encode())).payload() for i, n in rows]
        self.now = event.finished + 0.001
        return event


def feed(detector: Detector, events: Iterable[StatementEvent]) -> list[Advice]:
    """Everything `detector` says about `events`, then at the end of the session."""
    found: list[Advice] = []
    for event in events:
        found.extend(detector.observe(event))
    found.extend(detector.session_end())
    return found


def n_plus_one(min_repeats: int = 5) -> NPlusOne:
    return NPlusOne(NPlusOneOptions(min_repeats=min_repeats), WHO)


def insert_loop(min_repeats: int = 10) -> InsertLoop:
    return InsertLoop(InsertLoopOptions(min_repeats=min_repeats), WHO)


def slow_query(threshold: float = 1.0) -> SlowQuery:
    return SlowQuery(SlowQueryOptions(threshold=Duration(threshold)), WHO)


AUTHOR_ROWS = [(i, f"author {i}") for i in range(1, 7)]


# ----------------------------------------------------------------------------- n_plus_one


def test_n_plus_one_traces_lookup_values_to_an_earlier_result() -> None:
    """The ORM lazy-load loop: ids from one query, then one lookup per id, autocommit."""
    s = Session()
    events = [s.run(AUTHORS, rows=AUTHOR_ROWS)] + [s.run(BOOKS, i) for i, _ in AUTHOR_ROWS]
    (advice,) = feed(n_plus_one(), events)
    assert advice.rule == "n_plus_one"
    assert advice.severity == "warning"
    assert advice.count == 6
    assert advice.statement == BOOKS
    assert advice.tables == ("books",)
    assert advice.suggested_sql == BOOKS_BATCHED
    assert advice.source == {
        "fingerprint": events[0].info.fingerprint,
        "statement": AUTHORS,
        "column": "id",
    }
    assert (advice.database, advice.user, advice.application_name) == ("shop", "app", "web")
    assert advice.time_spent_s == pytest.approx(6 * 0.002)
    assert "using the id values of an earlier query" in advice.suggestion


def test_n_plus_one_traces_literal_values_of_the_simple_protocol() -> None:
    s = Session()
    lookups = [s.run(f"SELECT id, title FROM books WHERE author_id = {i}") for i, _ in AUTHOR_ROWS]
    (advice,) = feed(n_plus_one(), [s.run(AUTHORS, rows=AUTHOR_ROWS), *lookups])
    assert advice.count == 6
    assert advice.statement == BOOKS
    assert advice.source is not None and advice.source["column"] == "id"


def test_n_plus_one_in_one_transaction_is_reported_when_the_transaction_ends() -> None:
    s = Session()
    loop = [s.run(BOOKS, key, transaction=1) for key in (11, 12, 13, 14, 15)]
    detector = n_plus_one()
    assert [a for e in loop for a in detector.observe(e)] == []  # judged once the burst ends
    (advice,) = detector.observe(s.run("SELECT 1", transaction=2))
    assert advice.rule == "n_plus_one"
    assert advice.count == 5
    assert advice.source is None
    assert advice.suggested_sql == BOOKS_BATCHED
    assert "in one transaction" in advice.suggestion
    assert not detector.session_end()


def test_n_plus_one_is_critical_at_twenty_times_min_repeats() -> None:
    s = Session()
    (advice,) = feed(n_plus_one(min_repeats=2), [s.run(BOOKS, i, transaction=1) for i in range(40)])
    assert (advice.count, advice.severity) == (40, "critical")


def test_n_plus_one_honours_min_repeats() -> None:
    s = Session()
    assert feed(n_plus_one(), [s.run(BOOKS, i, transaction=1) for i in range(4)]) == []
    s = Session()
    (advice,) = feed(n_plus_one(min_repeats=3), [s.run(BOOKS, i, transaction=1) for i in range(3)])
    assert advice.count == 3


def test_n_plus_one_stays_silent_on_healthy_shapes() -> None:
    # independent autocommit lookups, nothing to trace their values to: a pooled web app
    s = Session()
    assert feed(n_plus_one(), [s.run(BOOKS, i) for i in range(50)]) == []
    # values that come from no earlier result
    s = Session()
    events = [s.run(AUTHORS, rows=AUTHOR_ROWS)] + [s.run(BOOKS, 100 + i) for i in range(6)]
    assert feed(n_plus_one(), events) == []
    # the batched lookup it would suggest
    s = Session()
    events = [s.run(AUTHORS, rows=AUTHOR_ROWS)] + [
        s.run(BOOKS_BATCHED, "{1,2,3}", transaction=1) for _ in range(10)
    ]
    assert feed(n_plus_one(), events) == []
    # the same key again and again: a cache's job, not a loop over keys
    s = Session()
    assert feed(n_plus_one(), [s.run(BOOKS, 7, transaction=1) for _ in range(10)]) == []
    # pipelined: one round trip for all of them
    s = Session()
    loop = [s.run(BOOKS, i, transaction=1, pipelined=i > 0) for i in range(10)]
    assert feed(n_plus_one(), loop) == []
    # lookups that failed
    s = Session()
    failed = [s.run(BOOKS, i, transaction=1, sqlstate="42P01") for i in range(10)]
    assert feed(n_plus_one(), failed) == []


# ---------------------------------------------------------------------------- insert_loop


def test_insert_loop_one_round_trip_per_row() -> None:
    s = Session()
    (advice,) = feed(insert_loop(), [s.run(INSERT, i, f"t{i}", transaction=1) for i in range(12)])
    assert advice.rule == "insert_loop"
    assert advice.severity == "warning"
    assert advice.count == 12
    assert advice.statement == INSERT
    assert advice.suggested_sql == INSERT_BATCHED
    assert "one round trip each" in advice.suggestion
    assert "commit per row" not in advice.suggestion


def test_insert_loop_pipelined_is_info() -> None:
    s = Session()
    rows = [s.run(INSERT, i, "t", transaction=1, pipelined=i > 0) for i in range(10)]
    (advice,) = feed(insert_loop(), rows)
    assert (advice.count, advice.severity) == (10, "info")
    assert "pipelined batch" in advice.suggestion


def test_insert_loop_in_autocommit_suggests_one_transaction() -> None:
    s = Session()
    (advice,) = feed(insert_loop(), [s.run(INSERT, i, "t") for i in range(10)])
    assert advice.count == 10
    assert advice.suggestion.endswith(
        "Running them in one transaction also saves a commit per row."
    )


def test_insert_loop_is_reported_when_its_transaction_ends() -> None:
    s = Session()
    detector = insert_loop(min_repeats=2)
    assert not detector.observe(s.run(INSERT, 1, "a", transaction=1))
    assert not detector.observe(s.run(INSERT, 2, "b", transaction=1))
    (advice,) = detector.observe(s.run("SELECT 1", transaction=2))
    assert advice.count == 2
    assert not detector.session_end()


def test_insert_loop_stays_silent_on_healthy_shapes() -> None:
    s = Session()
    assert feed(insert_loop(), [s.run(INSERT, i, "t", transaction=1) for i in range(9)]) == []
    multirow = "INSERT INTO books (author_id, title) VALUES ($1, $2), ($3, $4)"
    s = Session()
    assert (
        feed(insert_loop(), [s.run(multirow, i, "a", i, "b", transaction=1) for i in range(20)])
        == []
    )
    s = Session()
    failed = [s.run(INSERT, i, "t", transaction=1, sqlstate="23505") for i in range(20)]
    assert feed(insert_loop(), failed) == []
    # autocommit inserts further apart than a burst's gap are separate
    s = Session()
    apart = []
    for i in range(20):
        apart.append(s.run(INSERT, i, "t"))
        s.now += 2.0
    assert feed(insert_loop(), apart) == []


# ----------------------------------------------------------------------------- slow_query


def test_slow_query_reports_a_statement_over_the_threshold() -> None:
    s = Session()
    (advice,) = feed(slow_query(), [s.run(BOOKS, 1, took=1.5)])
    assert advice.rule == "slow_query"
    assert advice.severity == "warning"
    assert advice.count == 1
    assert advice.statement == BOOKS
    assert advice.suggested_sql is None
    assert advice.time_spent_s == pytest.approx(1.5)
    assert "took 1.50s" in advice.suggestion


def test_slow_query_is_critical_at_ten_times_the_threshold() -> None:
    s = Session()
    (advice,) = feed(slow_query(threshold=0.2), [s.run(BOOKS, 1, took=2.5)])
    assert advice.severity == "critical"


def test_slow_query_stays_silent_below_the_threshold_and_on_what_is_slow_by_nature() -> None:
    s = Session()
    assert feed(slow_query(), [s.run(BOOKS, 1, took=0.9)]) == []
    assert feed(slow_query(threshold=2.0), [s.run(BOOKS, 1, took=1.5)]) == []
    assert feed(slow_query(), [s.run(BOOKS, 1, took=5.0, sqlstate="57014")]) == []  # a timeout
    assert feed(slow_query(), [s.run("COPY books FROM STDIN", took=30.0)]) == []
    assert feed(slow_query(), [s.run("VACUUM books", took=30.0)]) == []
    batched = s.run(BOOKS, 1, took=5.0)
    batched.reply_batched = True  # its own duration is unknown
    assert feed(slow_query(), [batched]) == []


# ------------------------------------------------------------------ time passes: tick()


def ticking(detector: Detector, s: Session, events: Iterable[StatementEvent]) -> list[Advice]:
    """What `detector` says about `events` with the clock ticking, every quarter second
    from each event on until the next one; nothing at the end: the session stays open."""
    found: list[Advice] = []
    now: float | None = None
    for event in events:
        now = event.started if now is None else now
        while now + 0.25 < event.started:
            now += 0.25
            found.extend(detector.tick(now))
        found.extend(detector.observe(event))
        now = max(now, event.finished)
    assert now is not None
    for _ in range(8):  # two quiet seconds after the last statement
        now += 0.25
        found.extend(detector.tick(now))
    return found


def test_n_plus_one_autocommit_loop_is_judged_once_it_has_gone_quiet() -> None:
    """A loop on a connection that stays open: no later statement ends it, the clock does."""
    s = Session()
    detector = n_plus_one()
    events = [s.run(AUTHORS, rows=AUTHOR_ROWS)] + [s.run(BOOKS, i) for i, _ in AUTHOR_ROWS]
    assert [a for e in events for a in detector.observe(e)] == []
    last = events[-1].finished
    assert not detector.tick(last + 0.5)  # the loop may go on
    more = s.run(BOOKS, 7)  # and it does: the same burst
    assert not detector.observe(more)
    assert not detector.tick(more.finished + 0.99)
    (advice,) = detector.tick(more.finished + 1.01)
    assert advice.count == 7
    assert advice.source is not None and advice.source["column"] == "id"
    assert not detector.tick(more.finished + 5)  # judged once
    assert not detector.session_end()


def test_n_plus_one_in_a_transaction_left_open_is_judged_once_quiet() -> None:
    s = Session()
    detector = n_plus_one()
    loop = [s.run(BOOKS, key, transaction=1) for key in (11, 12, 13, 14, 15)]
    (advice,) = ticking(detector, s, loop)
    assert advice.count == 5 and advice.source is None
    assert not detector.session_end()


def test_n_plus_one_a_pause_longer_than_the_gap_ends_the_burst_with_or_without_a_tick() -> None:
    """The clock ends a burst exactly when its next execution would have: two loops of
    four, a second and a half apart, are two bursts below the threshold either way."""
    for clock in (True, False):
        s = Session()
        events = [s.run(AUTHORS, rows=AUTHOR_ROWS)] + [s.run(BOOKS, i) for i in (1, 2, 3, 4)]
        s.now += 1.5
        events += [s.run(BOOKS, i) for i in (5, 6, 1, 2)]
        found = ticking(n_plus_one(), s, events) if clock else feed(n_plus_one(), events)
        assert found == []


def test_insert_loop_autocommit_is_judged_once_quiet() -> None:
    s = Session()
    detector = insert_loop()
    rows = [s.run(INSERT, i, "t") for i in range(12)]
    assert [a for e in rows for a in detector.observe(e)] == []
    assert not detector.tick(rows[-1].finished + 0.9)
    (advice,) = detector.tick(rows[-1].finished + 1.1)
    assert (advice.count, advice.severity) == (12, "warning")
    assert "commit per row" in advice.suggestion
    assert not detector.session_end()


def test_healthy_shapes_stay_silent_with_the_clock_ticking() -> None:
    # independent autocommit lookups with a list page before them: a pooled web app
    s = Session()
    events = [s.run(AUTHORS, rows=AUTHOR_ROWS)]
    for i in range(30):
        events.append(s.run(BOOKS, 100 + i))
        s.now += 0.3
    assert ticking(n_plus_one(), s, events) == []
    # a few inserts, below the threshold, then a long quiet
    s = Session()
    assert ticking(insert_loop(), s, [s.run(INSERT, i, "t", transaction=1) for i in range(9)]) == []
    # a slow query is judged as it finishes, never again by the clock
    s = Session()
    detector = slow_query()
    assert len(ticking(detector, s, [s.run(BOOKS, 1, took=1.5)])) == 1

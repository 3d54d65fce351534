"""The transaction rules on their own: unwrapped_writes, check_then_write, long_transaction.

Statement events in, advice out, with the real Analyzer's facts, transaction ids and round
trips set as the tracker sets them, no proxy and no database (the end-to-end tests are in
tests/test_advice_transaction_rules.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from proxy.advice import Advice
from proxy.analysis.analyzer import Analyzer
from proxy.detectors import DETECTORS, Detector, SessionIdentity
from proxy.detectors.base import DetectorOptions
from proxy.detectors.check_then_write import CheckThenWrite
from proxy.detectors.long_transaction import LongTransaction, LongTransactionOptions
from proxy.detectors.transactions import TransactionTracker, param_value
from proxy.detectors.unwrapped_writes import UnwrappedWrites, UnwrappedWritesOptions
from proxy.durations import Duration
from proxy.protocol import messages as m
from proxy.rewriters.locking import for_update_sql, on_conflict_sql, unique_constraint_sql
from proxy.tracking.events import StatementEvent

WHO = SessionIdentity(user="app", database="shop", application_name="web")
INT2, INT4, TEXT = 21, 23, 25
ANALYZER = Analyzer()
SECRET = "k3y-5ecret-9a1f"


class Session:
    """One connection's statements: a clock, round trips, transaction blocks as the
    tracker numbers them (BEGIN opens one, its statements share its id)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.round_trip = 0
        self.transaction: int | None = None
        self._next_transaction = 0

    def run(
        self,
        sql: str,
        *params: int | str | bytes,
        took: float = 0.002,
        rows: int | None = None,
        pipelined: bool = False,  # sent in the round trip of the statement before
        sqlstate: str | None = None,
        binary: bool = False,
    ) -> StatementEvent:
        if not pipelined:
            self.round_trip += 1
        (parsed,) = ANALYZER.analyze(sql)
        command = parsed.info.command
        if command == "BEGIN" and self.transaction is None:
            self._next_transaction += 1
            self.transaction = self._next_transaction
        values = tuple(p if isinstance(p, bytes) else str(p).encode() for p in params)
        types = tuple(INT4 if isinstance(p, int | bytes) else TEXT for p in params)
        formats = (1,) if binary else ()
        bind = m.Bind("", "", formats, values, ()).payload() if params else None
        event = StatementEvent(parsed, self.now, self.now, bind, types, self.round_trip)
        event.finished = self.now + took
        event.transaction = self.transaction
        event.sqlstate = sqlstate
        if rows is not None:
            verb = (
                "SELECT"
                if command == "SELECT"
                else f"{command} 0"
                if command == "INSERT"
                else command
            )
            event.tag = f"{verb} {rows}".encode() + b"\0"
        if parsed.info.ends_transaction:
            self.transaction = None
        self.now = event.finished + 0.001
        return event

    def idle(self, seconds: float) -> None:
        self.now += seconds


def feed(detector: Detector, events: Iterable[StatementEvent]) -> list[Advice]:
    """Everything `detector` says about `events`, then at the end of the session."""
    found: list[Advice] = []
    for event in events:
        found.extend(detector.observe(event))
    found.extend(detector.session_end())
    return found


def unwrapped(window: float = 1.0) -> UnwrappedWrites:
    return UnwrappedWrites(UnwrappedWritesOptions(window=Duration(window)), WHO)


def check() -> CheckThenWrite:
    return CheckThenWrite(DetectorOptions(), WHO)


def long_transaction(threshold: float = 10.0) -> LongTransaction:
    return LongTransaction(LongTransactionOptions(threshold=Duration(threshold)), WHO)


def test_the_three_rules_are_registered_with_their_defaults() -> None:
    assert DETECTORS["unwrapped_writes"] is UnwrappedWrites
    assert DETECTORS["check_then_write"] is CheckThenWrite
    assert DETECTORS["long_transaction"] is LongTransaction
    assert UnwrappedWritesOptions() == UnwrappedWritesOptions(enabled=True, window=Duration(1.0))
    assert LongTransactionOptions() == LongTransactionOptions(
        enabled=True, threshold=Duration(10.0)
    )


# ---------------------------------------------------------------- analyzer facts


def test_analyzer_tells_the_end_of_a_transaction_block() -> None:
    for sql in ("COMMIT", "END", "ROLLBACK", "ABORT", "PREPARE TRANSACTION 'x'"):
        (parsed,) = ANALYZER.analyze(sql)
        assert parsed.info.ends_transaction, sql
    for sql in ("COMMIT AND CHAIN", "ROLLBACK TO SAVEPOINT a", "RELEASE a", "BEGIN", "SAVEPOINT a"):
        (parsed,) = ANALYZER.analyze(sql)
        assert not parsed.info.ends_transaction, sql


def test_analyzer_tells_a_guarded_write_and_an_advisory_lock() -> None:
    for sql, guarded in (
        ("UPDATE t SET a = $1 WHERE id = $2", False),
        ("UPDATE t SET a = $1 WHERE id = $2 AND version = $3", False),  # a lookup too
        ("UPDATE t SET a = $1 WHERE id = $2 AND updated_at < $3", True),
        ("UPDATE t SET a = 1 WHERE id = 2 AND processed IS FALSE", True),
        ("DELETE FROM t WHERE id = $1 OR id = $2", True),
    ):
        (parsed,) = ANALYZER.analyze(sql)
        assert parsed.info.guarded is guarded, sql
    for sql, advisory in (
        ("SELECT pg_advisory_xact_lock($1)", True),
        ("SELECT pg_catalog.pg_try_advisory_lock(1, 2)", True),
        ("SELECT advisory FROM notes WHERE id = 1", False),
    ):
        (parsed,) = ANALYZER.analyze(sql)
        assert parsed.info.advisory_lock is advisory, sql


# ---------------------------------------------------------------- the tracker helper


def test_transaction_tracker_follows_blocks_and_isolation_levels() -> None:
    s = Session()
    tracker = TransactionTracker()
    assert tracker.see(s.run("SELECT 1")) is None and tracker.current is None
    begin = s.run("BEGIN")
    assert tracker.see(begin) is None
    tracker.see(s.run("SET LOCAL statement_timeout = 500"))
    first = s.run("SELECT name FROM users WHERE id = $1", 1)
    tracker.see(first)
    assert tracker.current is not None
    assert tracker.current.first is first  # past BEGIN and SET
    assert tracker.current.isolation == "read committed"
    assert tracker.see(s.run("ROLLBACK TO SAVEPOINT a")) is None
    ended = tracker.see(s.run("COMMIT"))
    assert ended is not None and ended.statements == 5 and tracker.current is None

    tracker.see(s.run("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    assert tracker.current is not None and tracker.current.isolation == "repeatable read"
    tracker.see(s.run("COMMIT"))
    tracker.see(s.run("BEGIN"))
    tracker.see(s.run("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
    assert tracker.current is not None and tracker.current.isolation == "serializable"
    tracker.see(s.run("COMMIT"))
    tracker.see(s.run("SET default_transaction_isolation = 'repeatable read'"))
    assert tracker.default_isolation == "repeatable read"  # read from the literal
    tracker.see(
        s.run("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
    )
    assert tracker.default_isolation == "read committed"  # what PostgreSQL runs it as
    tracker.see(s.run("RESET default_transaction_isolation"))
    assert tracker.default_isolation == "?"  # unknown: the rules stay silent


def test_transaction_tracker_a_statement_after_commit_in_the_same_round_trip() -> None:
    """`COMMIT; SELECT 1` in one Query: the SELECT has the block's id, yet runs alone."""
    s = Session()
    tracker = TransactionTracker()
    tracker.see(s.run("BEGIN"))
    commit = s.run("COMMIT")
    after = s.run("SELECT 1", pipelined=True)
    after.transaction = commit.transaction
    assert tracker.see(commit) is not None
    assert tracker.see(after) is None and tracker.current is None


def test_param_value_reads_binds_and_literals_in_memory() -> None:
    s = Session()
    assert param_value(s.run("SELECT a FROM t WHERE id = $1", 42), 1) == "42"
    binary = s.run("SELECT a FROM t WHERE id = $1", (42).to_bytes(4, "big"), binary=True)
    assert param_value(binary, 1) == "42"
    literal = s.run("SELECT a FROM t WHERE id = 7 AND name = 'x'")
    assert (param_value(literal, 1), param_value(literal, 2)) == ("7", "x")
    assert param_value(s.run("SELECT a FROM t WHERE id = $1 AND b = 3", 1), 2) is None


# ---------------------------------------------------------------- suggested SQL builders


def test_builders_from_the_ast() -> None:
    assert for_update_sql("SELECT a FROM t WHERE id = $1 LIMIT $2", "t") == (
        "SELECT a FROM t WHERE id = $1 LIMIT $2 FOR UPDATE"
    )
    assert for_update_sql("SELECT x.a FROM t AS x JOIN u ON u.id = x.u WHERE x.id = $1", "t") == (
        "SELECT x.a FROM t AS x INNER JOIN u ON u.id = x.u WHERE x.id = $1 FOR UPDATE OF x"
    )
    assert for_update_sql("SELECT DISTINCT a FROM t WHERE id = $1", "t") is None
    assert for_update_sql("SELECT a FROM t WHERE id = $1 FOR SHARE", "t") is None
    assert on_conflict_sql("INSERT INTO t (a, b) VALUES ($1, $2) RETURNING id", ("a", "b")) == (
        "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a, b) DO NOTHING RETURNING id"
    )
    assert unique_constraint_sql("app.t", ("a", "b")) == (
        "ALTER TABLE app.t ADD CONSTRAINT t_a_b_key UNIQUE (a, b)"
    )
    assert len(unique_constraint_sql("t", ("c" * 80,)).split()[5]) == 63


# ---------------------------------------------------------------- unwrapped_writes

ENRICH: list[tuple[str, tuple[int | str, ...]]] = [
    ("INSERT INTO processed (employee_id, data) VALUES ($1, $2)", (7, "x")),
    ("DELETE FROM projects WHERE employee_id = $1", (7,)),
    ("INSERT INTO projects (employee_id, title) VALUES ($1, $2)", (7, "a")),
    ("INSERT INTO projects (employee_id, title) VALUES ($1, $2)", (7, "b")),
    ("UPDATE employees SET bio = $1 WHERE id = $2", ("bio", 7)),
    ("UPDATE raw SET processed = $1 WHERE employee_id = $2", ("t", 7)),
]


def enrichment(s: Session) -> list[StatementEvent]:
    events = [s.run("SELECT id FROM employees WHERE id = $1", 7, rows=1)]
    for sql, params in ENRICH:
        events.append(s.run(sql, *params, rows=1))
        events.append(s.run("SELECT 1"))  # reads in between do not end the run
    return events


def test_unwrapped_writes_lists_the_whole_sequence_once_it_is_over() -> None:
    s = Session()
    detector = unwrapped()
    events = enrichment(s)
    assert [a for e in events for a in detector.observe(e)] == []  # not at the threshold
    (found,) = detector.session_end()
    assert found.rule == "unwrapped_writes" and found.severity == "warning"
    assert found.count == 6
    assert found.statement == ENRICH[0][0]
    assert found.tables == ("processed", "projects", "employees", "raw")
    assert found.suggested_sql == (
        "BEGIN; INSERT INTO processed (employee_id, data) VALUES ($1, $2); "
        "DELETE FROM projects WHERE employee_id = $1; "
        "INSERT INTO projects (employee_id, title) VALUES ($1, $2); "
        "UPDATE employees SET bio = $1 WHERE id = $2; "
        "UPDATE raw SET processed = $1 WHERE employee_id = $2; COMMIT;"
    )
    assert "INSERT INTO processed; DELETE FROM projects; INSERT INTO projects (2 times); " in (
        found.suggestion
    )
    assert found.evidence == {
        "writes": 6,
        "tables": 4,
        "round_trips": 6,
        "window_s": 1.0,
        "span_ms": pytest.approx(found.evidence["span_ms"]),  # type: ignore[index]
    }


def test_unwrapped_writes_ends_with_a_gap_a_transaction_or_the_clock() -> None:
    s = Session()
    detector = unwrapped()
    a = s.run("INSERT INTO a (x) VALUES ($1)", 1)
    b = s.run("UPDATE b SET x = $1 WHERE id = $2", 1, 2)
    s.idle(1.5)
    c = s.run("INSERT INTO c (x) VALUES ($1)", 1)  # a new run: judged the first
    assert not detector.observe(a) and not detector.observe(b)
    (first,) = detector.observe(c)
    assert first.count == 2 and first.tables == ("a", "b")
    d = s.run("DELETE FROM d WHERE id = $1", 1)
    assert not detector.observe(d)
    assert not detector.tick(d.finished + 0.5)
    (second,) = detector.tick(d.finished + 1.01)  # quiet for over the window
    assert second.tables == ("c", "d")
    s.run("INSERT INTO a (x) VALUES ($1)", 1)
    events = [s.run("INSERT INTO a (x) VALUES ($1)", 1), s.run("UPDATE b SET x = $1", 1)]
    events += [s.run("BEGIN"), s.run("SELECT 1")]
    found = [x for e in events for x in detector.observe(e)]
    assert [x.tables for x in found] == [("a", "b")]


def test_unwrapped_writes_healthy_shapes_stay_silent() -> None:
    s = Session()
    in_transaction = [s.run("BEGIN")] + [s.run(sql, *p) for sql, p in ENRICH] + [s.run("COMMIT")]
    assert feed(unwrapped(), in_transaction) == []
    one = [s.run("INSERT INTO a (x) VALUES ($1)", 1), s.run("SELECT 1")]
    assert feed(unwrapped(), one) == []
    same_table = [s.run("UPDATE a SET x = $1 WHERE id = $2", i, i) for i in range(5)]
    same_table.append(s.run("INSERT INTO a (x) VALUES ($1)", 1))
    assert feed(unwrapped(), same_table) == []
    pipelined = [s.run("INSERT INTO a (x) VALUES ($1)", 1)]
    pipelined += [s.run(sql, *p, pipelined=True) for sql, p in ENRICH]
    assert feed(unwrapped(), pipelined) == []  # one Sync: one implicit transaction
    spread = [s.run("INSERT INTO a (x) VALUES ($1)", 1)]
    s.idle(2)
    spread.append(s.run("INSERT INTO b (x) VALUES ($1)", 1))
    assert feed(unwrapped(), spread) == []
    failed = [
        s.run("INSERT INTO a (x) VALUES ($1)", 1),
        s.run("INSERT INTO b (x) VALUES ($1)", 1, sqlstate="23505"),
    ]
    assert feed(unwrapped(), failed) == []


def test_unwrapped_writes_lists_at_most_twenty_steps() -> None:
    s = Session()
    events = [s.run(f"INSERT INTO t{i % 30} (x) VALUES ($1)", i) for i in range(45)]
    (found,) = feed(unwrapped(), events)
    assert found.count == 45
    assert found.suggested_sql is not None and found.suggested_sql.count("INSERT") == 20
    assert found.suggestion.endswith("and 25 more.")
    assert len(found.tables) == 20


# ---------------------------------------------------------------- check_then_write

READ = "SELECT id, balance FROM accounts WHERE id = $1"
WRITE = "UPDATE accounts SET balance = $1 WHERE id = $2"
LOOKUP = "SELECT id FROM applications WHERE candidate_id = $1 AND job_id = $2"
INSERT = "INSERT INTO applications (candidate_id, job_id, note) VALUES ($1, $2, $3)"


def lost_update(s: Session) -> list[StatementEvent]:
    return [
        s.run("BEGIN"),
        s.run(READ, 5, rows=1),
        s.run("SELECT count(*) FROM ledger WHERE account_id = $1", 5, rows=1),
        s.run(WRITE, 90, 5, rows=1),
        s.run("COMMIT"),
    ]


def test_check_then_write_lost_update() -> None:
    s = Session()
    (found,) = feed(check(), lost_update(s))
    assert found.rule == "check_then_write" and found.severity == "warning"
    assert found.statement == READ and found.tables == ("accounts",)
    assert found.suggested_sql == f"{READ} FOR UPDATE"
    assert "Lost update" in found.suggestion and "UPDATE accounts" in found.suggestion
    assert found.evidence == {
        "race": "lost_update",
        "statements_apart": 2,
        "in_transaction": 1,
        "isolation": "read committed",
    }
    # values as literals on the simple protocol, as text and as binary: the same race
    literal = [
        s.run("BEGIN"),
        s.run(f"SELECT id, balance FROM accounts WHERE id = '{SECRET}'", rows=1),
        s.run(f"UPDATE accounts SET balance = 3 WHERE id = '{SECRET}'", rows=1),
        s.run("COMMIT"),
    ]
    (found,) = feed(check(), literal)
    assert SECRET not in repr(found)
    binary = [
        s.run("BEGIN"),
        s.run(READ, (5).to_bytes(4, "big"), binary=True, rows=1),
        s.run(WRITE, 90, 5, rows=1),
        s.run("COMMIT"),
    ]
    assert len(feed(check(), binary)) == 1


def test_check_then_write_duplicate_insert() -> None:
    s = Session()
    events = [
        s.run("BEGIN"),
        s.run(LOOKUP, 3, SECRET, rows=0),
        s.run(INSERT, 3, SECRET, "hello", rows=1),
        s.run("COMMIT"),
    ]
    (found,) = feed(check(), events)
    assert found.statement == INSERT and found.tables == ("applications",)
    assert found.suggested_sql == (
        "ALTER TABLE applications ADD CONSTRAINT applications_candidate_id_job_id_key "
        "UNIQUE (candidate_id, job_id); "
        "INSERT INTO applications (candidate_id, job_id, note) VALUES ($1, $2, $3) "
        "ON CONFLICT (candidate_id, job_id) DO NOTHING"
    )
    assert found.evidence is not None and found.evidence["race"] == "duplicate_insert"
    assert found.evidence["statements_apart"] == 1
    assert SECRET not in repr(found)


def test_check_then_write_each_pair_once_per_transaction() -> None:
    s = Session()
    events = [s.run("BEGIN")]
    for key in (1, 2):
        events += [s.run(READ, key, rows=1), s.run(WRITE, 9, key, rows=1)]
    events.append(s.run("COMMIT"))
    assert len(feed(check(), events)) == 1


Step = str | tuple[str, tuple[int | str, ...], int | None]  # sql, params, rows


def script(s: Session, steps: Sequence[Step]) -> list[StatementEvent]:
    return [
        s.run(step) if isinstance(step, str) else s.run(step[0], *step[1], rows=step[2])
        for step in steps
    ]


RACE: list[Step] = [(READ, (5,), 1), (WRITE, (90, 5), 1), "COMMIT"]
OWNER_LOCK = "SELECT id FROM accounts WHERE owner = $1 FOR UPDATE"
SEEN = "UPDATE accounts SET seen = now() WHERE id = $1"


@pytest.mark.parametrize(
    "steps",
    [
        # locked: FOR UPDATE, FOR SHARE, by another key, LOCK TABLE, an earlier UPDATE
        ["BEGIN", (f"{READ} FOR UPDATE", (5,), 1), (WRITE, (90, 5), 1), "COMMIT"],
        ["BEGIN", (f"{READ} FOR SHARE", (5,), 1), (WRITE, (90, 5), 1), "COMMIT"],
        ["BEGIN", (OWNER_LOCK, ("x",), 1), *RACE],
        ["BEGIN", "LOCK TABLE accounts", *RACE],
        ["BEGIN", (WRITE, (1, 5), 1), *RACE],
        ["BEGIN", ("SELECT pg_advisory_xact_lock($1)", (9,), 1), *RACE],
        # stricter isolation: at BEGIN, by SET TRANSACTION, as the session's default
        ["BEGIN ISOLATION LEVEL REPEATABLE READ", *RACE],
        ["START TRANSACTION ISOLATION LEVEL SERIALIZABLE", *RACE],
        ["BEGIN", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", *RACE],
        ["SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", "BEGIN", *RACE],
        ["SET default_transaction_isolation TO DEFAULT", "BEGIN", *RACE],  # unknown level
        # atomic or checked writes, another key, values not from the application
        ["BEGIN", (READ, (5,), 1), ("UPDATE accounts SET n = n + $1 WHERE id = $2", (1, 5), 1)],
        ["BEGIN", (READ, (5,), 1), (WRITE, (90, 6), 1)],
        ["BEGIN", (READ, (5,), 1), (f"{WRITE} AND version = $3", (90, 5, 2), 1)],
        ["BEGIN", (READ, (5,), 1), (f"{WRITE} AND updated_at < now()", (90, 5), 1)],
        ["BEGIN", (READ, (5,), 1), (SEEN, (5,), 1)],
        ["BEGIN", (READ, (5,), 1), ("UPDATE other SET balance = $1 WHERE id = $2", (90, 5), 1)],
        # no transaction block: each statement alone
        RACE,
        # a read whose row count is unknown, of many rows, of none
        ["BEGIN", (READ, (5,), None), (WRITE, (90, 5), 1)],
        ["BEGIN", (READ, (5,), 3), (WRITE, (90, 5), 1)],
        ["BEGIN", (READ, (5,), 0), (WRITE, (90, 5), 0)],
    ],
)
def test_check_then_write_lost_update_healthy_shapes_stay_silent(steps: list[Step]) -> None:
    assert feed(check(), script(Session(), steps)) == []


INSERTED = (INSERT, (3, 4, "n"), 1)


@pytest.mark.parametrize(
    "steps",
    [
        [(LOOKUP, (3, 4), 0), INSERTED],  # autocommit
        ["BEGIN", (LOOKUP, (3, 4), 0), (f"{INSERT} ON CONFLICT DO NOTHING", (3, 4, "n"), 1)],
        ["BEGIN", (LOOKUP, (3, 4), 1), INSERTED],
        ["BEGIN", (LOOKUP, (3, 4), 0), (INSERT, (3, 5, "n"), 1)],
        ["BEGIN", (LOOKUP, (3, 4), 0), (INSERT.replace("job_id, ", ""), (3, "n"), 1)],
        ["BEGIN ISOLATION LEVEL SERIALIZABLE", (LOOKUP, (3, 4), 0), INSERTED],
        ["BEGIN", (LOOKUP, (3, 4), 0), (INSERT.replace("applications", "other"), (3, 4, "n"), 1)],
        ["BEGIN", ("SELECT pg_advisory_xact_lock($1)", (3,), 1), (LOOKUP, (3, 4), 0), INSERTED],
    ],
)
def test_check_then_write_duplicate_insert_healthy_shapes_stay_silent(steps: list[Step]) -> None:
    assert feed(check(), script(Session(), steps)) == []


def test_check_then_write_advisory_locks() -> None:
    """One taken in a transaction silences that transaction; one taken outside (held by
    the session) silences the session: what it protects is not known."""
    s = Session()
    events = ["BEGIN", ("SELECT pg_advisory_xact_lock($1)", (9,), 1), *RACE, "BEGIN", *RACE]
    assert len(feed(check(), script(s, events))) == 1
    events = [("SELECT pg_advisory_lock($1)", (9,), 1), "BEGIN", *RACE, "BEGIN", *RACE]
    assert feed(check(), script(s, events)) == []


def test_check_then_write_many_writes_in_one_transaction() -> None:
    """Inserts do not use up the locks it remembers; past that many locked keys, silence."""
    s = Session()
    inserts: list[Step] = [("INSERT INTO log (n) VALUES ($1)", (i,), 1) for i in range(100)]
    assert len(feed(check(), script(s, ["BEGIN", *inserts, *RACE]))) == 1
    updates: list[Step] = [(WRITE, (1, 100 + i), 1) for i in range(70)]
    assert feed(check(), script(s, ["BEGIN", *updates, *RACE])) == []


def test_check_then_write_state_is_per_transaction_and_bounded() -> None:
    s = Session()
    detector = check()
    events = [s.run("BEGIN"), s.run(READ, 5, rows=1), s.run("COMMIT")]
    events += [s.run("BEGIN"), s.run(WRITE, 1, 5, rows=1), s.run("COMMIT")]
    assert feed(detector, events) == []  # the read was in another transaction
    events = [s.run("BEGIN")] + [s.run(READ, i, rows=1) for i in range(40)]
    events.append(s.run(WRITE, 1, 39, rows=1))
    assert len(feed(detector, events)) == 1
    assert len(detector._reads) == 0  # forgotten at the session's end


# ---------------------------------------------------------------- long_transaction


def test_long_transaction_reported_while_open_naming_its_first_statement() -> None:
    s = Session()
    detector = long_transaction(threshold=10)
    first = "SELECT id, balance FROM accounts WHERE id = $1"
    events = [s.run("BEGIN"), s.run(first, 1, rows=1), s.run(WRITE, 1, 1, rows=1)]
    assert [a for e in events for a in detector.observe(e)] == []
    start = events[0].started
    assert not detector.tick(start + 9.9)
    (found,) = detector.tick(start + 10.5)
    assert found.rule == "long_transaction" and found.severity == "warning"
    assert found.statement == first and found.tables == ("accounts",)
    assert found.count == 3
    assert found.evidence is not None
    assert found.evidence["open_s"] == pytest.approx(10.5)
    assert found.evidence["statements"] == 3 and found.evidence["still_open"] == 1
    assert found.evidence["idle_s"] == pytest.approx(10.5 - (events[-1].finished - start))
    assert "still is" in found.suggestion
    # once per transaction: not again on the clock, nor at its end
    assert not detector.tick(start + 200)
    s.idle(20)
    assert not detector.observe(s.run("COMMIT"))
    # the next one is judged afresh; past ten times the threshold it is critical
    s.idle(1)
    begin = s.run("BEGIN")
    detector.observe(begin)
    (again,) = detector.tick(begin.started + 150)
    assert again.severity == "critical" and again.statement == "BEGIN"


def test_long_transaction_hidden_from_the_clock_is_reported_at_its_end() -> None:
    """The clock stops at the start of a running statement: one long statement is seen when
    the transaction ends (or by slow_query)."""
    s = Session()
    detector = long_transaction(threshold=1)
    events = [s.run("BEGIN"), s.run("UPDATE big SET x = $1", 1, took=3.0), s.run("COMMIT")]
    (found,) = feed(detector, events)
    assert found.statement == "UPDATE big SET x = $1"
    assert found.evidence is not None and found.evidence["still_open"] == 0
    assert found.evidence["open_s"] == pytest.approx(3.005, abs=0.01)
    # a connection closed in the middle of one
    s = Session()
    events = [s.run("BEGIN"), s.run("UPDATE big SET x = $1", 1, took=3.0)]
    (found,) = feed(long_transaction(threshold=1), events)
    assert found.evidence is not None and found.evidence["still_open"] == 0


def test_long_transaction_healthy_shapes_stay_silent() -> None:
    s = Session()
    detector = long_transaction(threshold=1)
    found: list[Advice] = []
    for _ in range(3):
        for event in (s.run("BEGIN"), s.run(WRITE, 1, 1), s.run("COMMIT")):
            found.extend(detector.observe(event))
            found.extend(detector.tick(event.finished))
        s.idle(5)  # idle between transactions: none is open
        found.extend(detector.tick(s.now))
    for _ in range(3):  # autocommit statements, however far apart
        found.extend(detector.observe(s.run(WRITE, 1, 1)))
        s.idle(5)
        found.extend(detector.tick(s.now))
    found.extend(detector.session_end())
    assert found == []


def tick_through(
    detector: Detector, events: Sequence[StatementEvent], until: float
) -> list[Advice]:
    found: list[Advice] = []
    for event in events:
        found.extend(detector.observe(event))
    now = events[-1].finished
    while now < until:
        now += 0.25
        found.extend(detector.tick(now))
    return found


def test_long_transaction_after_commit_in_one_round_trip_stays_silent() -> None:
    s = Session()
    events = [s.run("BEGIN"), s.run(WRITE, 1, 1), s.run("COMMIT")]
    after = s.run("SELECT 1", pipelined=True)
    after.transaction = events[0].transaction
    assert tick_through(long_transaction(threshold=1), [*events, after], after.finished + 5) == []

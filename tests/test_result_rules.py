"""The result rules on their own: select_star, unbounded_result and connection_churn.

Statement events in, advice out, built as the tracker builds them (the real Analyzer's
facts, the RowDescription and sampled DataRow bodies raw, the CommandComplete tag), no
proxy and no database (the end-to-end tests are in tests/test_advice_result_rules.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from proxy.advice import Advice
from proxy.analysis.analyzer import Analyzer
from proxy.detectors import DETECTORS, Applications, SessionIdentity
from proxy.detectors.connection_churn import ConnectionChurn, ConnectionChurnOptions
from proxy.detectors.select_star import SelectStar, SelectStarOptions
from proxy.detectors.unbounded_result import UnboundedResult, UnboundedResultOptions
from proxy.durations import Duration
from proxy.protocol import messages as m
from proxy.rewriters.projection import explicit_columns_sql, paginated_sql
from proxy.tracking.events import StatementEvent

WHO = SessionIdentity(user="app", database="shop", application_name="web")
INT4, TEXT, JSONB = 23, 25, 3802
SECRET = "s3cr3t-value-81c4"
ANALYZER = Analyzer()
DOCS = (("id", INT4), ("title", TEXT), ("payload", JSONB))


def event(
    sql: str,
    *,
    columns: Sequence[tuple[str, int]] = (("id", INT4), ("name", TEXT)),
    rows: Sequence[Sequence[str | None]] = (),
    count: int | None = None,  # rows in the CommandComplete; default: len(rows)
    at: float = 1000.0,
    took: float = 0.004,
    sampled: bool = True,
    sqlstate: str | None = None,
    bind: bytes | None = None,
    suspended: bool = False,
    described: bool = True,
) -> StatementEvent:
    """A finished statement whose result had `count` rows like `rows` (averaged)."""
    (parsed,) = ANALYZER.analyze(sql)
    ev = StatementEvent(parsed, at, at, bind, (), 1)
    ev.finished = at + took
    ev.sqlstate = sqlstate
    if described:
        ev.description = m.RowDescription(
            tuple(m.Column(name, 0, i + 1, oid, -1, -1, 0) for i, (name, oid) in enumerate(columns))
        ).payload()
    bodies = [
        m.DataRow(tuple(None if v is None else v.encode() for v in row)).payload() for row in rows
    ]
    total = len(rows) if count is None else count
    if bodies:
        ev.bytes_returned = sum(len(b) + 5 for b in bodies) * total // len(bodies)
        if sampled and described:
            ev.sampled = bodies
    if suspended:
        ev.portal_suspended = True
    elif sqlstate is None:
        ev.tag = f"SELECT {total}\0".encode()
    return ev


def doc_rows(n: int, payload: int = 5000, secret: str = "") -> list[tuple[str, str, str]]:
    return [(str(i), f"title {i}{secret}", "{" + "x" * payload + secret + "}") for i in range(n)]


def everything(advice: Advice) -> str:
    return repr(advice.fields())


def test_the_rules_are_registered() -> None:
    assert DETECTORS["select_star"] is SelectStar
    assert DETECTORS["unbounded_result"] is UnboundedResult
    assert DETECTORS["connection_churn"] is ConnectionChurn


# ------------------------------------------------------------------------ builders


def test_explicit_columns_replace_the_star_without_the_dropped_ones() -> None:
    sql = "SELECT * FROM docs WHERE owner = $1"
    columns = ("id", "title", "payload")
    assert explicit_columns_sql(sql, columns, frozenset({"payload"})) == (
        "SELECT id, title FROM docs WHERE owner = $1"
    )
    # qualified stars expand qualified, even in a join; other targets keep their place
    assert (
        explicit_columns_sql(
            "SELECT d.*, u.name FROM docs d JOIN users u ON u.id = d.owner_id",
            ("id", "Title", "payload", "name"),
            frozenset({"payload"}),
        )
        == 'SELECT d.id, d."Title", u.name '
        "FROM docs AS d INNER JOIN users AS u ON u.id = d.owner_id"
    )
    assert explicit_columns_sql(
        "SELECT now() AS at, * FROM public.docs", ("at", "id", "body"), frozenset({"body"})
    ) == ("SELECT now() AS at, id FROM public.docs")


def test_explicit_columns_refuse_what_is_ambiguous() -> None:
    drop = frozenset({"payload"})
    for sql, columns in (
        ("SELECT * FROM docs d JOIN users u ON u.id = d.owner_id", ("id", "payload", "name")),
        ("SELECT * FROM docs, users", ("id", "payload", "name")),
        ("SELECT d.*, u.* FROM docs d JOIN users u ON true", ("id", "payload", "id", "name")),
        ("SELECT * FROM docs UNION ALL SELECT * FROM old_docs", ("id", "payload")),
        ("SELECT * FROM (SELECT 1 AS id, 2 AS id, '' AS payload) s", ("id", "id", "payload")),
        ("SELECT * FROM docs", ("payload",)),  # nothing would be left
        ("SELECT * FROM docs", ("id", "title")),  # nothing to leave out
        ("SELECT id, payload FROM docs", ("id", "payload")),  # no star
    ):
        assert explicit_columns_sql(sql, columns, drop) is None, sql


def test_paginated_sql_adds_a_limit_and_the_keyset_condition() -> None:
    assert paginated_sql("SELECT id, name FROM users", 0) == (
        "SELECT id, name FROM users LIMIT $1",
        (),
    )
    assert paginated_sql("SELECT id FROM users WHERE org = $1 OR org = $2 ORDER BY id", 2) == (
        "SELECT id FROM users WHERE (org = $1 OR org = $2) AND id > $3 ORDER BY id LIMIT $4",
        ("id",),
    )
    assert paginated_sql(
        "SELECT * FROM events e WHERE e.kind = $1 AND e.org = $2 ORDER BY e.at DESC, e.id DESC", 2
    ) == (
        "SELECT * FROM events AS e WHERE e.kind = $1 AND e.org = $2 AND (e.at, e.id) < ($3, $4) "
        "ORDER BY e.at DESC, e.id DESC LIMIT $5",
        ("e.at", "e.id"),
    )
    # orders the keyset cannot follow in WHERE: LIMIT only
    for sql in (
        "SELECT id, name FROM users ORDER BY id, name DESC",
        "SELECT id AS key FROM users ORDER BY key",
        "SELECT count(*) FROM users GROUP BY org ORDER BY count",
        "SELECT id FROM users ORDER BY id NULLS FIRST",
        "SELECT id, rank() OVER (ORDER BY score) FROM users ORDER BY id",
        "SELECT id FROM users UNION SELECT id FROM admins ORDER BY id",
        "SELECT id FROM users ORDER BY lower(name)",
    ):
        built = paginated_sql(sql, 0)
        assert built is not None and built[1] == () and built[0].endswith(" LIMIT $1"), sql
    assert paginated_sql("SELECT id FROM users LIMIT 10", 0) is None
    assert paginated_sql("SELECT id FROM users OFFSET $1", 1) is None
    assert paginated_sql("INSERT INTO users (id) VALUES ($1)", 1) is None


# ------------------------------------------------------------------------ select_star


def select_star(min_row_bytes: int = 2048) -> SelectStar:
    return SelectStar(SelectStarOptions(min_row_bytes=min_row_bytes), WHO)


def test_select_star_of_wide_rows_names_the_widest_columns() -> None:
    ev = event(
        f"SELECT * FROM docs WHERE title <> '{SECRET}'",
        columns=DOCS,
        rows=doc_rows(4, secret=SECRET),
        count=400,
    )
    (advice,) = select_star().observe(ev)
    assert advice.rule == "select_star" and advice.severity == "warning"
    assert advice.statement == "SELECT * FROM docs WHERE title <> $1"
    assert advice.suggested_sql == "SELECT id, title FROM docs WHERE title <> $1"
    assert "payload" in advice.suggestion and "400 rows" in advice.suggestion
    evidence = advice.evidence or {}
    assert evidence["rows"] == 400 and evidence["sampled_rows"] == 4
    assert evidence["avg_row_bytes"] == ev.bytes_returned // 400 > 5000
    assert evidence["widest_columns"] == f"payload {5002 + len(SECRET)} B"  # braces included
    assert "title" not in str(evidence["widest_columns"])  # a narrow column is not named
    assert SECRET not in everything(advice) and "xxxx" not in everything(advice)


def test_select_star_stays_silent_on_narrow_rows_explicit_columns_and_failures() -> None:
    detector = select_star()
    narrow = [("1", "a", "{}"), ("2", "b", "{}")]
    assert detector.observe(event("SELECT * FROM docs", columns=DOCS, rows=narrow)) == ()
    wide = doc_rows(3)
    for ev in (
        event("SELECT id, title, payload FROM docs", columns=DOCS, rows=wide),
        event("SELECT * FROM docs", columns=DOCS, rows=wide, sqlstate="57014"),
        event("SELECT * FROM docs", columns=DOCS, rows=(), count=0),
        event("SELECT * FROM docs", columns=DOCS, rows=wide, suspended=True),
    ):
        assert detector.observe(ev) == (), ev
    # the threshold is the option
    assert len(select_star(min_row_bytes=10).observe(event("SELECT * FROM docs", rows=narrow)))


def test_select_star_is_judged_once_a_minute_per_statement() -> None:
    detector = select_star()
    sql = "SELECT * FROM docs WHERE id > $1"
    found = []
    for at in (1000.0, 1001.0, 1030.0, 1061.0, 1062.0):
        found += detector.observe(event(sql, columns=DOCS, rows=doc_rows(2), at=at))
    assert len(found) == 2
    other = event("SELECT * FROM docs WHERE id < $1", columns=DOCS, rows=doc_rows(2), at=1062.0)
    assert len(detector.observe(other)) == 1


def test_select_star_over_a_join_names_the_columns_without_sql() -> None:
    columns = (*DOCS, ("name", TEXT))
    rows = [(*row, "owner") for row in doc_rows(2)]
    (advice,) = select_star().observe(
        event("SELECT * FROM docs d JOIN users u ON u.id = d.id", columns=columns, rows=rows)
    )
    assert advice.suggested_sql is None
    assert "payload" in advice.suggestion and "name them yourself" in advice.suggestion
    (advice,) = select_star().observe(
        event(
            "SELECT d.*, u.name FROM docs d JOIN users u ON u.id = d.id", columns=columns, rows=rows
        )
    )
    assert advice.suggested_sql == (
        "SELECT d.id, d.title, u.name FROM docs AS d INNER JOIN users AS u ON u.id = d.id"
    )


def test_select_star_without_a_sample_or_a_dominant_column() -> None:
    (advice,) = select_star().observe(
        event("SELECT * FROM docs", columns=DOCS, rows=doc_rows(2), sampled=False)
    )
    assert advice.suggested_sql is None and "too large to sample" in advice.suggestion
    assert "widest_columns" not in (advice.evidence or {})
    even = [tuple("y" * 300 for _ in range(10))]
    columns = [(f"c{i}", TEXT) for i in range(10)]
    (advice,) = select_star().observe(event("SELECT * FROM wide", columns=columns, rows=even))
    assert advice.suggested_sql is None and "No one column dominates" in advice.suggestion


# ------------------------------------------------------------------- unbounded_result


def unbounded(min_rows: int = 1000) -> UnboundedResult:
    return UnboundedResult(UnboundedResultOptions(min_rows=min_rows), WHO)


def test_unbounded_result_suggests_a_limit() -> None:
    ev = event(
        f"SELECT id, name FROM users WHERE org <> '{SECRET}'",
        rows=[("1", SECRET)],
        count=5000,
        took=0.25,
    )
    (advice,) = unbounded().observe(ev)
    assert advice.rule == "unbounded_result" and advice.severity == "warning"
    assert advice.statement == "SELECT id, name FROM users WHERE org <> $1"
    assert advice.suggested_sql == "SELECT id, name FROM users WHERE org <> $1 LIMIT $2"
    assert advice.evidence == {"rows": 5000, "bytes": ev.bytes_returned, "duration_ms": 250.0}
    assert "5000 rows" in advice.suggestion and "LIMIT $2" in advice.suggestion
    assert SECRET not in everything(advice)


def test_unbounded_result_keyset_form_when_ordered() -> None:
    (advice,) = unbounded().observe(
        event(
            "SELECT id, name FROM users WHERE org = $1 ORDER BY id", rows=[("1", "a")], count=2000
        )
    )
    assert advice.suggested_sql == (
        "SELECT id, name FROM users WHERE org = $1 AND id > $2 ORDER BY id LIMIT $3"
    )
    assert "as $2" in advice.suggestion and "$3 rows" in advice.suggestion


def test_unbounded_result_stays_silent_on_healthy_shapes() -> None:
    detector = unbounded()
    row = [("1", "a")]
    for ev in (
        event("SELECT id, name FROM users LIMIT 5000", rows=row, count=5000),
        event("SELECT id, name FROM users FETCH FIRST 5000 ROWS ONLY", rows=row, count=5000),
        event("SELECT id, name FROM users", rows=row, count=999),
        event("SELECT count(*) FROM users", rows=[("5000",)], columns=[("count", 20)]),
        event("SELECT relname, oid FROM pg_class", rows=row, count=5000),
        event("SELECT table_name, 1 FROM information_schema.tables", rows=row, count=5000),
        event('FETCH FORWARD 5000 FROM "c1"', rows=row, count=5000),
        event("SELECT id, name INTO copy_users FROM users", rows=(), count=5000, described=False),
        event("SELECT id, name FROM users", rows=row, count=5000, sqlstate="57014"),
    ):
        assert detector.observe(ev) == (), ev
    assert len(unbounded(min_rows=10).observe(event("SELECT id FROM users", rows=row, count=10)))


def test_unbounded_result_leaves_a_portal_fetched_in_chunks_alone() -> None:
    """A driver executing a portal 2000 rows at a time: each chunk suspended, and the
    last Execute of that portal (its rest) is not a result of its own."""
    detector = unbounded()
    sql = "SELECT id, name FROM users WHERE org = $1"
    bind = m.Bind("c1", "s1", (), (b"7",), ()).payload()
    chunks = [event(sql, rows=[("1", "a")], count=2000, suspended=True, bind=bind)] * 3
    last = event(sql, rows=[("1", "a")], count=1500, bind=bind)
    last.parsed = chunks[0].parsed
    for ev in (*chunks, last):
        assert detector.observe(ev) == ()
    # the same statement run whole afterwards is reported
    again = event(
        sql, rows=[("1", "a")], count=1500, bind=m.Bind("", "s1", (), (b"8",), ()).payload()
    )
    again.parsed = chunks[0].parsed
    assert len(detector.observe(again)) == 1


# ------------------------------------------------------------------- connection_churn


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


def churn(
    applications: Applications,
    who: SessionIdentity = WHO,
    min_connections: int = 8,
    window: float = 10.0,
    max_lifetime: float = 1.0,
) -> ConnectionChurn:
    options = ConnectionChurnOptions(
        min_connections=min_connections,
        window=Duration(window),
        max_lifetime=Duration(max_lifetime),
    )
    return ConnectionChurn(options, who, applications)


def connection(
    clock: Clock,
    applications: Applications,
    lifetime: float = 0.05,
    gap: float = 0.05,
    who: SessionIdentity = WHO,
    sql: str = "SELECT id, name FROM users WHERE id = $1",
    **options: float,
) -> list[Advice]:
    """One connection: opened, `sql` run, closed `lifetime` later; then `gap` passes."""
    detector = churn(applications, who, **options)  # type: ignore[arg-type]
    detector.observe(event("SELECT 1", rows=[("1",)], columns=[("?column?", INT4)]))
    detector.observe(event(sql, rows=[("1", "a")]))
    clock.now += lifetime
    found = list(detector.session_end())
    detector.release()
    clock.now += gap
    return found


def test_connection_churn_a_connection_per_request(clock: Clock) -> None:
    apps = Applications()
    found = []
    for _ in range(8):
        found += connection(clock, apps)
    (advice,) = found
    assert advice.rule == "connection_churn" and advice.severity == "warning"
    assert advice.fingerprint == "connection:web"
    assert (advice.database, advice.user, advice.application_name) == ("shop", "app", "web")
    assert advice.statement == "SELECT id, name FROM users WHERE id = $1"
    assert advice.tables == ("users",)
    assert advice.suggested_sql is None
    assert "pool" in advice.suggestion and "QueuePool" in advice.suggestion
    evidence = advice.evidence or {}
    assert evidence["connections"] == 8
    assert evidence["median_lifetime_ms"] == pytest.approx(50.0)
    assert evidence["max_lifetime_ms"] == pytest.approx(50.0)
    assert evidence["window_s"] == pytest.approx(0.75)  # first opened to last closed
    assert evidence["rate_per_s"] == pytest.approx(10.7)
    # once a window, however many more
    assert sum(len(connection(clock, apps)) for _ in range(20)) == 0
    clock.now += 10.0
    assert sum(len(connection(clock, apps)) for _ in range(8)) == 1


def test_connection_churn_stays_silent_for_pools_and_spread_connections(clock: Clock) -> None:
    apps = Applications()
    # long-lived connections, however many: a pool
    assert sum(len(connection(clock, apps, lifetime=2.0, gap=0.0)) for _ in range(25)) == 0
    # a few pooled connections serving many queries
    pool = [churn(apps) for _ in range(3)]
    for i in range(30):
        assert pool[i % 3].observe(event("SELECT id, name FROM users WHERE id = $1")) == ()
    clock.now += 30.0
    assert [a for d in pool for a in d.session_end()] == []
    # short connections, but fewer than min_connections in any window
    assert sum(len(connection(clock, apps, gap=2.0)) for _ in range(20)) == 0


def test_connection_churn_counts_each_application_apart(clock: Clock) -> None:
    apps = Applications()
    other = SessionIdentity(user="app", database="shop", application_name="billing")
    found = []
    for _ in range(4):
        found += connection(clock, apps)
        found += connection(clock, apps, who=other)
    assert found == []
    found += connection(clock, apps, who=other) + connection(clock, apps, who=other)
    found += connection(clock, apps, who=other) + connection(clock, apps, who=other)
    (advice,) = found
    assert advice.application_name == "billing" and advice.fingerprint == "connection:billing"


def test_connection_churn_statement_is_empty_when_no_table_was_read(clock: Clock) -> None:
    apps = Applications()
    found = []
    for _ in range(2):
        found += connection(clock, apps, sql="SELECT now()", min_connections=2)
    (advice,) = found
    assert advice.statement == "" and advice.tables == ()

"""The parse-tree rules on their own: not_in_subquery and leading_wildcard.

Statement events in, advice out, with the real Analyzer's facts, no proxy and no
database (the end-to-end tests are in tests/test_advice_parse_rules.py).
"""

from __future__ import annotations

import pytest

from proxy.analysis.analyzer import Analyzer, LikePredicate
from proxy.detectors import DETECTORS, SessionIdentity
from proxy.detectors.leading_wildcard import LeadingWildcard, LeadingWildcardOptions
from proxy.detectors.not_in_subquery import NotInSubquery, NotInSubqueryOptions
from proxy.durations import Duration
from proxy.protocol import messages as m
from proxy.rewriters.predicates import not_exists_sql, trigram_index_sql
from proxy.tracking.events import StatementEvent

WHO = SessionIdentity(user="app", database="shop", application_name="web")
SECRET = "s3cr3t-pattern-7f2a"
ANALYZER = Analyzer()


def event(
    sql: str, *params: str | None, took: float = 0.002, binary: bool = False, oid: int = 25
) -> StatementEvent:
    (parsed,) = ANALYZER.analyze(sql)
    values = tuple(None if p is None else p.encode() for p in params)
    formats = (1,) if binary else ()
    bind = m.Bind("", "", formats, values, ()).payload() if params else None
    ev = StatementEvent(parsed, 1000.0, 1000.0, bind, tuple(oid for _ in params), 1)
    ev.finished = 1000.0 + took
    return ev


def not_in() -> NotInSubquery:
    return NotInSubquery(NotInSubqueryOptions(), WHO)


def wildcard(warn_above: float = 0.01) -> LeadingWildcard:
    return LeadingWildcard(LeadingWildcardOptions(warn_above=Duration(warn_above)), WHO)


def test_both_rules_are_registered() -> None:
    assert DETECTORS["not_in_subquery"] is NotInSubquery
    assert DETECTORS["leading_wildcard"] is LeadingWildcard


# ---------------------------------------------------------------- analyzer facts


def test_analyzer_finds_not_in_subqueries_anywhere() -> None:
    for sql in (
        "SELECT * FROM a WHERE x NOT IN (SELECT y FROM b)",
        "SELECT * FROM a WHERE NOT (x IN (SELECT y FROM b WHERE z = 3))",
        "DELETE FROM a WHERE id NOT IN (SELECT a_id FROM b)",
        "SELECT (SELECT count(*) FROM c WHERE c.k NOT IN (SELECT k FROM d)) FROM a",
        "WITH w AS (SELECT * FROM a WHERE x NOT IN (SELECT y FROM b)) SELECT * FROM w",
    ):
        (parsed,) = ANALYZER.analyze(sql)
        assert parsed.info.not_in_subquery, sql
    for sql in (
        "SELECT * FROM a WHERE x NOT IN (1, 2)",
        "SELECT * FROM a WHERE x IN (SELECT y FROM b)",
        "SELECT * FROM a WHERE NOT EXISTS (SELECT 1 FROM b WHERE b.y = a.x)",
        "SELECT * FROM a WHERE x <> ALL($1)",
    ):
        (parsed,) = ANALYZER.analyze(sql)
        assert not parsed.info.not_in_subquery, sql


def test_analyzer_lists_like_predicates_with_their_column_and_parameter() -> None:
    (parsed,) = ANALYZER.analyze("SELECT * FROM users WHERE name ILIKE $1")
    assert parsed.info.likes == (LikePredicate("name", "users", 1),)
    (parsed,) = ANALYZER.analyze(
        "SELECT * FROM users u JOIN orgs o ON o.id = u.org_id "
        "WHERE u.email NOT LIKE $1 AND o.name ~~* $2 AND lower(u.name) !~~ $3"
    )
    assert set(parsed.info.likes) == {
        LikePredicate("email", "users", 1),
        LikePredicate("name", "orgs", 2),
        LikePredicate(None, None, 3),
    }
    # a literal is lifted out as a parameter; its value is in the Parsed, not the facts
    (parsed,) = ANALYZER.analyze("SELECT * FROM users WHERE name LIKE '%x'")
    assert parsed.info.likes == (LikePredicate("name", "users", 1),)
    assert parsed.info.normalized == "SELECT * FROM users WHERE name LIKE $1"
    (plain,) = ANALYZER.analyze("SELECT * FROM users WHERE id = $1")
    assert plain.info.likes == () and not plain.info.not_in_subquery


# ---------------------------------------------------------------- not_in_subquery


def test_not_in_subquery_is_reported_with_its_not_exists_form() -> None:
    (advice,) = not_in().observe(
        event("SELECT id FROM orders WHERE customer_id NOT IN (SELECT id FROM banned WHERE k = 7)")
    )
    assert advice.rule == "not_in_subquery" and advice.severity == "warning"
    assert advice.statement == (
        "SELECT id FROM orders WHERE customer_id NOT IN (SELECT id FROM banned WHERE k = $1)"
    )
    assert advice.suggested_sql == (
        "SELECT id FROM orders WHERE NOT EXISTS "
        "(SELECT 1 FROM banned WHERE k = $1 AND id = orders.customer_id)"
    )
    assert "NULL" in advice.suggestion and "anti-join" in advice.suggestion
    assert "7" not in advice.suggested_sql


def test_not_in_subquery_stays_silent_on_healthy_shapes() -> None:
    detector = not_in()
    for sql in (
        "SELECT id FROM orders WHERE customer_id NOT IN (1, 2)",
        "SELECT id FROM orders o WHERE NOT EXISTS (SELECT 1 FROM banned b WHERE b.id = o.c)",
        "SELECT id FROM orders WHERE customer_id IN (SELECT id FROM vip)",
    ):
        assert list(detector.observe(event(sql))) == [], sql


def test_not_exists_rewrites() -> None:
    assert not_exists_sql(
        "UPDATE a SET v = $1 WHERE id NOT IN (SELECT a_id FROM b) AND w = $2"
    ) == ("UPDATE a SET v = $1 WHERE NOT EXISTS (SELECT 1 FROM b WHERE a_id = a.id) AND w = $2")
    assert not_exists_sql("SELECT * FROM a x, c WHERE x.k NOT IN (SELECT k FROM b)") == (
        "SELECT * FROM a AS x, c WHERE NOT EXISTS (SELECT 1 FROM b WHERE k = x.k)"
    )
    # no safe NOT EXISTS form: an aggregate, a set operation, a row comparison
    assert not_exists_sql("SELECT * FROM a WHERE x NOT IN (SELECT max(y) FROM b)") is None
    assert not_exists_sql("SELECT * FROM a WHERE x NOT IN (SELECT y FROM b UNION SELECT 1)") is None
    assert not_exists_sql("SELECT * FROM a WHERE (x, z) NOT IN (SELECT y, w FROM b)") is None
    assert not_exists_sql("SELECT * FROM a WHERE x NOT IN (1, 2)") is None


# ---------------------------------------------------------------- leading_wildcard


def test_leading_wildcard_parameter_is_reported_with_a_trigram_index() -> None:
    (advice,) = wildcard().observe(event("SELECT * FROM users WHERE name ILIKE $1", "%" + SECRET))
    assert advice.rule == "leading_wildcard" and advice.severity == "info"
    assert advice.suggested_sql == (
        "CREATE EXTENSION IF NOT EXISTS pg_trgm; "
        "CREATE INDEX CONCURRENTLY ON users USING gin (name gin_trgm_ops);"
    )
    assert SECRET not in repr(advice)


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT * FROM users WHERE name LIKE '%{SECRET}'",
        f"SELECT * FROM users WHERE name NOT LIKE '_{SECRET}'",
        f"SELECT * FROM users WHERE name ~~* E'%{SECRET}'",
        f"SELECT * FROM users WHERE id = $1 AND name !~~ '%{SECRET}'",
    ],
)
def test_leading_wildcard_literal_is_reported_and_never_shown(sql: str) -> None:
    params = ("5",) if "$1" in sql else ()
    (advice,) = wildcard().observe(event(sql, *params))
    assert advice.suggested_sql is not None and "users" in advice.suggested_sql
    assert SECRET not in repr(advice) and "%" not in advice.statement


def test_leading_wildcard_is_a_warning_past_warn_above() -> None:
    sql = "SELECT * FROM users WHERE name LIKE $1"
    (fast,) = wildcard().observe(event(sql, "%a", took=0.005))
    (slow,) = wildcard().observe(event(sql, "%a", took=0.02))
    assert (fast.severity, slow.severity) == ("info", "warning")
    (slow,) = wildcard(warn_above=1.0).observe(event(sql, "%a", took=0.02))
    assert slow.severity == "info"


def test_leading_wildcard_on_an_expression_has_no_suggested_sql() -> None:
    (advice,) = wildcard().observe(event("SELECT * FROM users WHERE lower(name) LIKE '%a'"))
    assert advice.suggested_sql is None
    sql = "SELECT * FROM users u, orgs o WHERE name LIKE $1"  # whose name: unknown
    (advice,) = wildcard().observe(event(sql, "%a"))
    assert advice.suggested_sql is None


def test_leading_wildcard_stays_silent_on_healthy_shapes() -> None:
    detector = wildcard()
    sql = "SELECT * FROM users WHERE name LIKE $1"
    assert list(detector.observe(event("SELECT * FROM users WHERE name LIKE 'abc%'"))) == []
    assert list(detector.observe(event(sql, "abc%"))) == []
    assert list(detector.observe(event(sql, None))) == []
    # binary values are read only for text types, whose binary form is the text
    assert list(detector.observe(event(sql, "%a", binary=True, oid=17))) == []
    assert len(detector.observe(event(sql, "%a", binary=True, oid=1043))) == 1
    assert list(detector.observe(event("SELECT * FROM users WHERE name = $1", "%a"))) == []


def test_trigram_index_quotes_names() -> None:
    assert trigram_index_sql("app.Users", "Full Name") == (
        "CREATE EXTENSION IF NOT EXISTS pg_trgm; "
        'CREATE INDEX CONCURRENTLY ON app."Users" USING gin ("Full Name" gin_trgm_ops);'
    )

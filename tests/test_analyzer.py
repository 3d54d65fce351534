"""Analyzer: statement text -> fingerprint, normalized text, command, tables and shape facts.

Unit tests, no database: every fact is checked against pglast itself or a hand-made answer.
"""

from __future__ import annotations

import re

import pytest
from pglast import parser

from proxy.analysis.analyzer import Analyzer, Lookup, StatementInfo, extract_literals


def info(sql: str) -> StatementInfo:
    """The analysis of a one-statement text."""
    (parsed,) = Analyzer().analyze(sql)
    return parsed.info


def rebuild(normalized: str, literals: tuple[str, ...]) -> str:
    """The original text back from its normalized form and the lifted literals."""
    if not literals:
        return normalized
    return re.sub(r"\$(\d+)", lambda match: literals[int(match.group(1)) - 1], normalized)


# ------------------------------------------------------------------ fingerprint, normalized


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM users WHERE id = 5",
        "SELECT * FROM users WHERE id = $1",
        "select name from users where email = 'a@b.c' and org_id = 7",
        "INSERT INTO t (a, b) VALUES (1, 'x') RETURNING id",
        "UPDATE accounts SET balance = balance - 10 WHERE id = 3",
        "DELETE FROM sessions WHERE expires < now() - interval '1 day'",
        "WITH recent AS (SELECT * FROM orders WHERE created > $1) SELECT count(*) FROM recent",
        "BEGIN",
        "SET search_path = 'public'",
    ],
)
def test_fingerprint_is_pglast_fingerprint(sql: str) -> None:
    assert info(sql).fingerprint == parser.fingerprint(sql)


def test_same_shape_same_fingerprint_whatever_the_values() -> None:
    a = info("SELECT * FROM users WHERE id = 1")
    b = info("SELECT * FROM users WHERE id = 99999")
    c = info("SELECT * FROM users WHERE id = $1")
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert a.fingerprint != info("SELECT * FROM users WHERE email = $1").fingerprint


@pytest.mark.parametrize(
    ("sql", "normalized"),
    [
        ("SELECT * FROM users WHERE id = 5", "SELECT * FROM users WHERE id = $1"),
        ("SELECT 'it''s', -5, 1.5", "SELECT $1, $2, $3"),
        ("SELECT * FROM t WHERE a = $1", "SELECT * FROM t WHERE a = $1"),
        ("SELECT * FROM t WHERE a = $1 AND b = 'x'", "SELECT * FROM t WHERE a = $1 AND b = $2"),
        ("INSERT INTO t VALUES (1, 'a'), (2, 'b')", "INSERT INTO t VALUES ($1, $2), ($3, $4)"),
        ("SELECT $$secret$$", "SELECT $1"),
        ("  SELECT 1  ", "SELECT $1"),
    ],
)
def test_normalized_text_holds_no_value(sql: str, normalized: str) -> None:
    assert info(sql).normalized == normalized


def test_normalized_text_of_bodies_and_payloads() -> None:
    """DO bodies, function bodies and NOTIFY payloads are values too."""
    for sql, command in [
        ("DO $$ BEGIN RAISE NOTICE 'hidden'; END $$", "DO"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 42 $$", "CREATE"),
        ("NOTIFY chan, 'hidden'", "NOTIFY"),
    ]:
        result = info(sql)
        assert result.command == command
        assert result.error is None
        assert "hidden" not in result.normalized and "42" not in result.normalized
        assert result.fingerprint == parser.fingerprint(sql)


# -------------------------------------------------------------------------------- command


@pytest.mark.parametrize(
    ("sql", "command"),
    [
        ("SELECT 1", "SELECT"),
        ("VALUES (1)", "SELECT"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "SELECT"),
        ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", "SELECT"),
        ("INSERT INTO t VALUES (1)", "INSERT"),
        ("UPDATE t SET a = 1", "UPDATE"),
        ("DELETE FROM t", "DELETE"),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE"),
        ("COPY t FROM STDIN", "COPY"),
        ("COPY (SELECT 1) TO STDOUT", "COPY"),
        ("BEGIN", "BEGIN"),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "BEGIN"),
        ("COMMIT", "COMMIT"),
        ("END", "COMMIT"),
        ("ROLLBACK", "ROLLBACK"),
        ("SAVEPOINT s1", "SAVEPOINT"),
        ("RELEASE SAVEPOINT s1", "RELEASE"),
        ("ROLLBACK TO SAVEPOINT s1", "ROLLBACK"),
        ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"),
        ("SET statement_timeout = 0", "SET"),
        ("SHOW server_version", "SHOW"),
        ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN"),
        ("CREATE TABLE t (a int)", "CREATE"),
        ("CREATE INDEX ON t (a)", "CREATE"),
        ("CREATE VIEW v AS SELECT 1", "CREATE"),
        ("CREATE ROLE r", "CREATE"),
        ("CREATE SEQUENCE s", "CREATE"),
        ("ALTER TABLE t ADD COLUMN b int", "ALTER"),
        ("ALTER ROLE r NOLOGIN", "ALTER"),
        ("DROP TABLE t", "DROP"),
        ("DROP ROLE r", "DROP"),
        ("TRUNCATE t", "TRUNCATE"),
        ("VACUUM ANALYZE t", "VACUUM"),
        ("LOCK TABLE t IN EXCLUSIVE MODE", "LOCK"),
        ("LISTEN c", "LISTEN"),
        ("UNLISTEN *", "UNLISTEN"),
        ("NOTIFY c", "NOTIFY"),
        ("CALL p()", "CALL"),
        ("PREPARE q AS SELECT 1", "PREPARE"),
        ("EXECUTE q", "EXECUTE"),
        ("DEALLOCATE q", "DEALLOCATE"),
        ("DECLARE c CURSOR FOR SELECT 1", "DECLARE"),
        ("FETCH 10 FROM c", "FETCH"),
        ("CLOSE c", "CLOSE"),
        ("GRANT SELECT ON t TO r", "GRANT"),
        ("", "EMPTY"),
        (";", "EMPTY"),
        ("-- only a comment", "EMPTY"),
    ],
)
def test_command(sql: str, command: str) -> None:
    assert info(sql).command == command


# --------------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("SELECT 1", ()),
        ("SELECT * FROM users", ("users",)),
        ("SELECT * FROM public.users", ("public.users",)),
        ("SELECT * FROM users u JOIN orders o ON o.user_id = u.id", ("orders", "users")),
        ("SELECT * FROM a, b LEFT JOIN c ON true", ("a", "b", "c")),
        ("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent", ("orders",)),
        (
            "WITH RECURSIVE tree AS (SELECT id FROM nodes UNION SELECT n.id FROM nodes n "
            "JOIN tree t ON n.parent = t.id) SELECT * FROM tree",
            ("nodes",),
        ),
        ("SELECT * FROM (SELECT * FROM inner_t) AS sub", ("inner_t",)),
        ("SELECT * FROM a WHERE id IN (SELECT a_id FROM b)", ("a", "b")),
        ("SELECT (SELECT max(x) FROM s.b) FROM a", ("a", "s.b")),
        ("INSERT INTO audit SELECT * FROM events", ("audit", "events")),
        ("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", ("t", "u")),
        ("DELETE FROM t USING u WHERE t.id = u.id", ("t", "u")),
        ("COPY public.t FROM STDIN", ("public.t",)),
    ],
)
def test_tables(sql: str, tables: tuple[str, ...]) -> None:
    assert info(sql).tables == tables


# -------------------------------------------------------------------------------- lookups


@pytest.mark.parametrize(
    ("sql", "lookups"),
    [
        ("SELECT * FROM users WHERE id = $1", (Lookup("id", 1, "users"),)),
        ("SELECT * FROM users WHERE $1 = id", (Lookup("id", 1, "users"),)),
        ("SELECT * FROM users WHERE id = $1::int", (Lookup("id", 1, "users"),)),
        ("SELECT * FROM users WHERE id = 42", (Lookup("id", 1, "users"),)),
        ("SELECT * FROM users u WHERE u.id = $1", (Lookup("id", 1, "users"),)),
        ("SELECT * FROM public.users WHERE users.id = $1", (Lookup("id", 1, "public.users"),)),
        (
            "SELECT * FROM users WHERE org = $1 AND email = $2",
            (Lookup("org", 1, "users"), Lookup("email", 2, "users")),
        ),
        (
            "SELECT * FROM users WHERE (org = $1 AND active) AND email = $2",
            (Lookup("org", 1, "users"), Lookup("email", 2, "users")),
        ),
        (
            "SELECT o.* FROM orders o JOIN users u ON u.id = o.user_id WHERE o.id = $1",
            (Lookup("id", 1, "orders"),),
        ),
        ("SELECT * FROM users WHERE id = $1 OR email = $2", ()),
        ("SELECT * FROM users WHERE id > $1", ()),
        ("SELECT * FROM users WHERE id = other_id", ()),
        ("SELECT * FROM users WHERE lower(email) = $1", ()),
        ("SELECT * FROM users", ()),
        ("DELETE FROM users WHERE id = $1", (Lookup("id", 1, "users"),)),
        ("UPDATE users SET name = $1 WHERE id = $2", (Lookup("id", 2, "users"),)),
    ],
)
def test_lookups(sql: str, lookups: tuple[Lookup, ...]) -> None:
    assert info(sql).lookups == lookups


@pytest.mark.parametrize(
    ("sql", "batched"),
    [
        ("SELECT * FROM users WHERE id = ANY($1)", True),
        ("SELECT * FROM users WHERE id = ANY($1::int[])", True),
        ("SELECT * FROM users WHERE id IN ($1, $2, $3)", True),
        ("SELECT * FROM users WHERE id IN (1, 2, 3)", True),
        ("SELECT * FROM users WHERE org = $1 AND id = ANY($2)", True),
        ("SELECT * FROM users WHERE id = $1", False),
        ("SELECT * FROM users WHERE id IN (SELECT user_id FROM orders)", False),
    ],
)
def test_batched_lookup(sql: str, batched: bool) -> None:
    result = info(sql)
    assert result.batched_lookup is batched
    if batched and "org" not in sql:
        assert result.lookups == ()


# ----------------------------------------------------------------------------- shape facts


@pytest.mark.parametrize(
    ("sql", "rows", "columns"),
    [
        ("INSERT INTO t (a, b) VALUES ($1, $2)", 1, ("a", "b")),
        ("INSERT INTO t (a, b) VALUES (1, 'x')", 1, ("a", "b")),
        ("INSERT INTO t VALUES ($1)", 1, ()),
        ("INSERT INTO t (a) VALUES (1), (2), (3)", 3, ("a",)),
        ("INSERT INTO t (a) SELECT x FROM s", 0, ("a",)),
        ("INSERT INTO t (a) SELECT * FROM unnest($1::int[])", 0, ("a",)),
        ("INSERT INTO t DEFAULT VALUES", 0, ()),
    ],
)
def test_values_rows_and_insert_columns(sql: str, rows: int, columns: tuple[str, ...]) -> None:
    result = info(sql)
    assert result.values_rows == rows
    assert result.insert_columns == columns
    assert result.single_row_insert is (rows == 1)


def test_select_facts() -> None:
    assert info("SELECT * FROM t").select_star
    assert info("SELECT t.* FROM t").select_star
    assert not info("SELECT a, b FROM t").select_star
    assert not info("SELECT count(*) FROM t").select_star
    assert info("SELECT a FROM t LIMIT 10").has_limit
    assert info("SELECT a FROM t FETCH FIRST 5 ROWS ONLY").has_limit
    assert not info("SELECT a FROM t").has_limit
    assert info("SELECT a FROM t WHERE id = $1 FOR UPDATE").for_update
    assert info("SELECT a FROM t FOR SHARE SKIP LOCKED").for_update
    assert not info("SELECT a FROM t").for_update
    assert info("SELECT * FROM a JOIN b ON a.id = b.a_id").has_join
    assert info("SELECT * FROM a, b").has_join
    assert not info("SELECT * FROM a").has_join
    assert info("SELECT a FROM t WHERE b = 1").has_where
    assert not info("SELECT a FROM t").has_where
    assert info("SELECT count(*) FROM t").aggregate_only
    assert not info("SELECT a, count(*) FROM t GROUP BY a").aggregate_only


def test_on_conflict() -> None:
    assert info("INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING").on_conflict
    assert info("INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET a = 1").on_conflict
    assert not info("INSERT INTO t (a) VALUES ($1)").on_conflict


def test_param_count() -> None:
    assert info("SELECT * FROM t WHERE a = $1 AND b = $3").param_count == 3
    assert info("SELECT 1, 2").param_count == 2
    assert info("SELECT now()").param_count == 0


# ---------------------------------------------------------------------- multi-statement


def test_multi_statement_query_splits_into_statements() -> None:
    parsed = Analyzer().analyze("BEGIN; SELECT * FROM users WHERE id = 7; UPDATE t SET a = 'x'")
    assert [p.info.command for p in parsed] == ["BEGIN", "SELECT", "UPDATE"]
    assert [p.info.normalized for p in parsed] == [
        "BEGIN",
        "SELECT * FROM users WHERE id = $1",
        "UPDATE t SET a = $2",
    ]
    assert parsed[1].info.fingerprint == parser.fingerprint("SELECT * FROM users WHERE id = 7")
    assert parsed[1].info.tables == ("users",)
    assert parsed[1].info.lookups == (Lookup("id", 1, "users"),)


def test_multi_statement_with_non_ascii_text() -> None:
    """Statement locations are byte offsets: text before a statement may be multi-byte."""
    parsed = Analyzer().analyze("SELECT 'é☃𝄞' AS x; SELECT * FROM t WHERE id = 1")
    assert [p.info.normalized for p in parsed] == [
        "SELECT $1 AS x",
        "SELECT * FROM t WHERE id = $2",
    ]


def test_multi_statement_with_a_body_that_does_not_normalize() -> None:
    parsed = Analyzer().analyze("SELECT * FROM t WHERE id = 5; DO $$ BEGIN NULL; END $$")
    assert [p.info.command for p in parsed] == ["SELECT", "DO"]
    assert parsed[0].info.lookups == (Lookup("id", 1, "t"),)


# ------------------------------------------------------------------------------- literals


@pytest.mark.parametrize(
    ("sql", "literals"),
    [
        ("SELECT * FROM t WHERE a = 5", ("5",)),
        ("SELECT * FROM t WHERE a = 'it''s'", ("'it''s'",)),
        ("SELECT * FROM t WHERE a = '$1' AND b = 2", ("'$1'", "2")),
        ("SELECT * FROM t WHERE a = -5 AND b = - 7.5", ("-5", "- 7.5")),
        ("SELECT $$dollar 'quoted'$$, $tag$a$b$tag$", ("$$dollar 'quoted'$$", "$tag$a$b$tag$")),
        ("SELECT E'line\\nnext', 'back\\'", ("E'line\\nnext'", "'back\\'")),
        ("SELECT 'é☃𝄞', 1e10, .5, true, NULL", ("'é☃𝄞'", "1e10", ".5", "true", "NULL")),
        # a segment of the normalized text inside a string must not end the literal
        ("INSERT INTO t (a, b) VALUES ('x, y', 'z')", ("'x, y'", "'z'")),
        ("SELECT * FROM t WHERE a = 'q AND b = ' AND b = 7", ("'q AND b = '", "7")),
        ("SELECT * FROM t WHERE a = $1", ()),
    ],
)
def test_literals_are_extracted_exactly(sql: str, literals: tuple[str, ...]) -> None:
    (parsed,) = Analyzer().analyze(sql)
    assert parsed.literals == literals
    assert rebuild(parsed.info.normalized, parsed.literals) == sql.strip()


def test_extract_literals_refuses_what_does_not_align() -> None:
    assert extract_literals("SELECT 1", "SELECT $1 + $2") is None
    assert extract_literals("SELECT 1", "SELECT 2") is None
    assert extract_literals("SELECT 1 FROM t", "SELECT $1 FROM u") is None
    assert extract_literals("SELECT x FROM t", "SELECT $1 FROM t") is None  # x is no constant
    assert extract_literals("SELECT 1", "SELECT $1") == ("1",)
    assert extract_literals("SELECT 1", "SELECT 1") == ()


def test_multi_statement_literals_are_not_split() -> None:
    """Literal positions are only known for one statement; several get None, never a guess."""
    parsed = Analyzer().analyze("SELECT 1; SELECT 2")
    assert [p.literals for p in parsed] == [None, None]


# --------------------------------------------------------------------- errors and caching


@pytest.mark.parametrize(
    "sql",
    ["SELEC 1", "SELECT FROM WHERE (", "SELECT 'unterminated", "garbage", "INSERT INTO"],
)
def test_unparsable_sets_error_and_never_raises(sql: str) -> None:
    analyzer = Analyzer()
    (parsed,) = analyzer.analyze(sql)
    assert parsed.info.error
    assert parsed.info.fingerprint == "" and parsed.info.normalized == ""
    assert analyzer.unparsed == 1


def test_too_long_statement_is_not_analysed() -> None:
    analyzer = Analyzer(max_statement_length=100)
    (parsed,) = analyzer.analyze("SELECT " + "1 + " * 100 + "1")
    assert parsed.info.error == "statement too long to analyse"
    assert parsed.info.command == "SELECT"
    assert analyzer.unparsed == 1


def test_cache_hits_and_misses() -> None:
    analyzer = Analyzer()
    first = analyzer.analyze("SELECT * FROM users WHERE id = $1")
    assert (analyzer.hits, analyzer.misses) == (0, 1)
    assert analyzer.analyze("SELECT * FROM users WHERE id = $1") is first
    assert (analyzer.hits, analyzer.misses) == (1, 1)
    # literal texts share the analysis of their normalized form, already cached here
    one = analyzer.analyze("SELECT * FROM users WHERE id = 1")
    two = analyzer.analyze("SELECT * FROM users WHERE id = 2")
    assert (analyzer.hits, analyzer.misses) == (3, 1)
    assert one[0].info is two[0].info is first[0].info
    assert (one[0].literals, two[0].literals) == (("1",), ("2",))
    analyzer.analyze("SELECT name FROM users WHERE email = 'a'")
    assert (analyzer.hits, analyzer.misses) == (3, 2)
    analyzer.analyze("SELEC")
    analyzer.analyze("SELEC")
    assert (analyzer.hits, analyzer.misses, analyzer.unparsed) == (4, 3, 1)


def test_cache_is_bounded() -> None:
    analyzer = Analyzer(cache_size=10)
    for i in range(100):
        analyzer.analyze(f"SELECT c{i} FROM t{i}")
        analyzer.analyze(f"SELECT c{i} FROM t{i} WHERE id = {i}")
    assert analyzer.misses == 200
    assert len(analyzer._by_text) <= 10
    assert len(analyzer._by_normalized) <= 10
    # the most recent entries are still served from the cache
    analyzer.analyze("SELECT c99 FROM t99")
    assert analyzer.hits == 1


def test_resize() -> None:
    analyzer = Analyzer(cache_size=100)
    analyzer.resize(5)
    for i in range(20):
        analyzer.analyze(f"SELECT c{i} FROM t")
    assert len(analyzer._by_text) <= 5


def test_text_that_is_not_utf8_is_unparsable_not_fatal() -> None:
    """A client_encoding other than UTF-8: the relay decodes with surrogateescape."""
    sql = b"SELECT * FROM t WHERE name = '\xe9t\xe9'".decode("utf-8", "surrogateescape")
    analyzer = Analyzer()
    (parsed,) = analyzer.analyze(sql)
    assert parsed.info.error == "not UTF-8 text"
    assert parsed.info.command == "SELECT"
    assert analyzer.unparsed == 1

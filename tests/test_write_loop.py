"""write_loop, the key-lookup shapes ORMs send, upsert loops and evidence: pure logic.

Events are built as tests/test_detectors_unit.py builds them (the real Analyzer, raw Bind
values, round trips, transactions, times); the batched SQL is checked by parsing it back
(tests/test_advice_write_loops.py runs it on PostgreSQL).
"""

from __future__ import annotations

import pytest
from pglast import ast, parse_sql

from proxy.advice import Advice
from proxy.analysis.analyzer import Analyzer
from proxy.detectors import DETECTORS
from proxy.detectors.insert_loop import InsertLoop, InsertLoopOptions
from proxy.detectors.leading_wildcard import LeadingWildcard, LeadingWildcardOptions
from proxy.detectors.n_plus_one import NPlusOne, NPlusOneOptions
from proxy.detectors.not_in_subquery import NotInSubquery, NotInSubqueryOptions
from proxy.detectors.slow_query import SlowQuery, SlowQueryOptions
from proxy.detectors.write_loop import WriteLoop, WriteLoopOptions
from proxy.durations import Duration
from proxy.rewriters.batching import (
    any_key_write_sql,
    batched_lookup_sql,
    multirow_insert_sql,
    unnest_write_sql,
)
from tests.test_detectors_unit import WHO, Session, feed, ticking

INT4, INT8, TEXT, UUID, ENUM = 23, 20, 25, 2950, 91234
# TypeORM's repository.update(id, {...}) and findOne({where: {id}})
TYPEORM_UPDATE = (
    'UPDATE "contacts" SET "status" = $1, "updatedAt" = CURRENT_TIMESTAMP WHERE "id" IN ($2)'
)
TYPEORM_FIND_ONE = (
    'SELECT "c"."id" AS "c_id", "c"."name" AS "c_name" FROM "contacts" "c" '
    'WHERE (("c"."id" = $1)) LIMIT 1'
)
UPDATE = "UPDATE items SET label = $1 WHERE id = $2"
DELETE = "DELETE FROM items WHERE id = $1"
EVIDENCE_KEYS = {"statements", "round_trips", "window_s", "time_ms", "in_transaction"}


def write_loop(min_repeats: int = 10) -> WriteLoop:
    return WriteLoop(WriteLoopOptions(min_repeats=min_repeats), WHO)


def parse_one(sql: str) -> ast.Node:
    (raw,) = parse_sql(sql)
    return raw.stmt


def assert_no_value(advice: Advice, *values: str) -> None:
    shown = f"{advice.statement} {advice.suggestion} {advice.suggested_sql} {advice.evidence}"
    for value in values:
        assert value not in shown


# ------------------------------------------------------------------- batched write SQL


def test_typeorm_update_with_constant_values_is_one_update_by_any() -> None:
    assert any_key_write_sql(TYPEORM_UPDATE, 2) == (
        'UPDATE contacts SET status = $1, "updatedAt" = CURRENT_TIMESTAMP WHERE id = ANY($2)'
    )


def test_update_from_unnest_maps_each_parameter_to_a_column() -> None:
    sql = unnest_write_sql(TYPEORM_UPDATE + " RETURNING *", {1: TEXT, 2: UUID})
    assert sql == (
        'UPDATE contacts SET status = v.status, "updatedAt" = CURRENT_TIMESTAMP '
        "FROM unnest(CAST($1 AS text[]), CAST($2 AS uuid[])) AS v (status, id) "
        "WHERE contacts.id = v.id RETURNING contacts.*"
    )


def test_update_reading_its_column_reads_the_table_row() -> None:
    sql = unnest_write_sql("UPDATE counters SET n = n + $1 WHERE id = $2", {1: INT4, 2: INT8})
    assert sql == (
        "UPDATE counters SET n = counters.n + v.n "
        "FROM unnest(CAST($1 AS bigint[]), CAST($2 AS bigint[])) AS v (n, id) "
        "WHERE counters.id = v.id"
    )


def test_update_with_alias_casts_and_other_conditions() -> None:
    sql = unnest_write_sql(
        "UPDATE s.docs AS d SET body = $1::jsonb, version = d.version + 1 "
        "WHERE d.id = $2 AND d.version = $3 AND deleted_at IS NULL",
        {2: INT4},
    )
    assert sql == (
        "UPDATE s.docs AS d SET body = CAST(v.body AS jsonb), version = d.version + 1 "
        "FROM unnest(CAST($1 AS jsonb[]), CAST($2 AS bigint[]), CAST($3 AS text[])) "
        "AS v (body, id, version) "
        "WHERE d.id = v.id AND d.version = v.version AND d.deleted_at IS NULL"
    )


def test_a_whole_row_reference_is_left_alone() -> None:
    sql = unnest_write_sql("UPDATE t SET doc = to_jsonb(t), n = $1 WHERE id = $2", {1: INT4})
    assert sql is not None and "doc = to_jsonb(t), n = v.n" in sql


def test_update_of_the_key_column_names_columns_apart() -> None:
    sql = unnest_write_sql("UPDATE t SET id = $1 WHERE id = $2", {1: INT4, 2: INT4})
    assert sql is not None and "AS v (id, id_2)" in sql and "WHERE t.id = v.id_2" in sql


def test_delete_forms() -> None:
    assert any_key_write_sql(DELETE, 1) == "DELETE FROM items WHERE id = ANY($1)"
    assert any_key_write_sql('DELETE FROM "t" WHERE "tenant" = $1 AND "id" IN ($2)', 2) == (
        "DELETE FROM t WHERE tenant = $1 AND id = ANY($2)"
    )
    assert unnest_write_sql("DELETE FROM t WHERE a = $1 AND b = $2", {1: INT4, 2: TEXT}) == (
        "DELETE FROM t USING unnest(CAST($1 AS bigint[]), CAST($2 AS text[])) AS v (a, b) "
        "WHERE t.a = v.a AND t.b = v.b"
    )


def test_a_table_named_v_gets_another_alias() -> None:
    sql = unnest_write_sql("DELETE FROM v WHERE id = $1", {1: INT4})
    assert sql == "DELETE FROM v USING unnest(CAST($1 AS bigint[])) AS v_ (id) WHERE v.id = v_.id"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE t SET a = (SELECT max(a) FROM t) + $1 WHERE id = $2",  # a subquery
        "UPDATE t SET a = $1 FROM u WHERE t.id = u.id AND u.k = $2",  # a FROM of its own
        "UPDATE t SET (a, b) = ($1, $2) WHERE id = $3",  # row assignment
        "WITH x AS (SELECT 1) UPDATE t SET a = $1 WHERE id = $2",
        "DELETE FROM t USING u WHERE t.id = u.id AND u.k = $1",
        "UPDATE t SET a = 1",  # no WHERE
        "UPDATE t SET a = $1 WHERE id = $3",  # $2 missing: its type cannot be told
        "SELECT * FROM t WHERE id = $1",
        "INSERT INTO t VALUES ($1)",
        "garbage",
    ],
)
def test_unsupported_write_shapes(statement: str) -> None:
    assert unnest_write_sql(statement, {1: INT4, 2: INT4, 3: INT4}) is None


def test_a_type_whose_name_is_unknown_gives_no_sql() -> None:
    assert unnest_write_sql(UPDATE, {1: ENUM, 2: INT4}) is None
    assert unnest_write_sql(UPDATE, {1: 0, 2: INT4}) is not None  # unknown: text


def test_any_form_refuses_a_key_used_twice_or_not_a_key() -> None:
    assert any_key_write_sql("UPDATE t SET a = $1 WHERE id = $1", 1) is None
    assert any_key_write_sql("UPDATE t SET a = $1 WHERE id > $2", 2) is None
    assert any_key_write_sql("UPDATE t SET a = $1 WHERE id = $2 OR b = $3", 2) is None


# ------------------------------------------------------------- lookups as ORMs write them


def test_analyzer_sees_the_typeorm_shapes_as_lookups() -> None:
    analyzer = Analyzer()
    (find,) = analyzer.analyze(TYPEORM_FIND_ONE)
    assert [(x.column, x.param, x.table) for x in find.info.lookups] == [("id", 1, "contacts")]
    assert find.info.has_limit and find.info.limit_param == 2
    (update,) = analyzer.analyze(TYPEORM_UPDATE)
    assert [(x.column, x.param) for x in update.info.lookups] == [("id", 2)]
    assert update.info.target == "contacts"
    (many,) = analyzer.analyze("SELECT * FROM t WHERE id IN ($1, $2)")
    assert not many.info.lookups and many.info.batched_lookup
    (plain,) = analyzer.analyze("SELECT * FROM t WHERE id = $1")
    assert plain.info.limit_param == 0


def test_batched_lookup_of_an_in_list_and_of_a_find_one() -> None:
    assert batched_lookup_sql('SELECT * FROM "t" WHERE "id" IN ($1)', 1) == (
        "SELECT * FROM t WHERE id = ANY($1)"
    )
    normalized = Analyzer().analyze(TYPEORM_FIND_ONE)[0].info.normalized
    assert batched_lookup_sql(normalized, 1) is None  # the LIMIT would cut the batch
    assert batched_lookup_sql(normalized, 1, drop_limit=True) == (
        "SELECT c.id AS c_id, c.name AS c_name FROM contacts AS c WHERE c.id = ANY($1)"
    )
    assert batched_lookup_sql("SELECT * FROM t WHERE id = $1 LIMIT $1", 1, drop_limit=True) is None
    assert batched_lookup_sql("SELECT * FROM t WHERE id = $1 OFFSET $2", 1, drop_limit=True) is None


def test_n_plus_one_find_one_loop_drops_the_limit_of_one() -> None:
    s = Session()
    loop = [s.run(TYPEORM_FIND_ONE.replace("$1", str(i)), transaction=1) for i in range(6)]
    (advice,) = feed(NPlusOne(NPlusOneOptions(), WHO), loop)
    assert advice.suggested_sql == (
        "SELECT c.id AS c_id, c.name AS c_name FROM contacts AS c WHERE c.id = ANY($1)"
    )
    assert "LIMIT 1" in advice.suggestion
    assert advice.evidence is not None
    assert advice.evidence["distinct_keys"] == 6 and advice.evidence["statements"] == 6
    assert set(advice.evidence) == EVIDENCE_KEYS | {"distinct_keys"}


def test_n_plus_one_with_a_limit_over_one_keeps_no_sql() -> None:
    s = Session()
    sql = "SELECT id FROM posts WHERE author_id = $1 ORDER BY id DESC LIMIT $2"
    (advice,) = feed(
        NPlusOne(NPlusOneOptions(), WHO), [s.run(sql, i, 5, transaction=1) for i in range(6)]
    )
    assert advice.suggested_sql is None
    s = Session()
    (advice,) = feed(
        NPlusOne(NPlusOneOptions(), WHO), [s.run(sql, i, 1, transaction=1) for i in range(6)]
    )
    assert advice.suggested_sql == "SELECT id FROM posts WHERE author_id = ANY($1) ORDER BY id DESC"


def test_n_plus_one_of_typeorm_in_list_lookups() -> None:
    s = Session()
    sql = 'SELECT "id" FROM "contacts" WHERE "id" IN ($1)'
    (advice,) = feed(
        NPlusOne(NPlusOneOptions(), WHO), [s.run(sql, i, transaction=1) for i in range(5)]
    )
    assert advice.suggested_sql == "SELECT id FROM contacts WHERE id = ANY($1)"


# ------------------------------------------------------------------------- write_loop


def test_write_loop_is_registered() -> None:
    assert DETECTORS["write_loop"] is WriteLoop


def test_update_loop_is_reported_when_its_transaction_ends() -> None:
    s = Session()
    loop = [s.run(TYPEORM_UPDATE, "done", i + 100, transaction=1) for i in range(12)]
    detector = write_loop()
    assert [a for e in loop for a in detector.observe(e)] == []
    (advice,) = detector.observe(s.run("SELECT 1"))
    assert advice.rule == "write_loop"
    assert advice.severity == "warning"
    assert advice.count == 12
    assert advice.tables == ("contacts",)
    assert advice.statement == TYPEORM_UPDATE
    assert advice.suggested_sql == (
        'UPDATE contacts SET status = $1, "updatedAt" = CURRENT_TIMESTAMP WHERE id = ANY($2)'
    )
    assert "one round trip each" in advice.suggestion and "in one transaction" in advice.suggestion
    assert advice.evidence == {
        "statements": 12,
        "round_trips": 12,
        "window_s": pytest.approx(loop[-1].finished - loop[0].started, abs=1e-3),
        "time_ms": pytest.approx(24.0),
        "in_transaction": True,
        "distinct_keys": 12,
    }
    assert_no_value(advice, "done", "105")
    assert not detector.session_end()


def test_update_loop_with_varying_values_gets_the_unnest_form() -> None:
    s = Session()
    loop = [s.run(UPDATE, f"label {i}", i, transaction=1) for i in range(10)]
    (advice,) = feed(write_loop(), loop)
    assert advice.suggested_sql == (
        "UPDATE items SET label = v.label "
        "FROM unnest(CAST($1 AS text[]), CAST($2 AS bigint[])) AS v (label, id) "
        "WHERE items.id = v.id"
    )
    assert "each parameter an array" in advice.suggestion
    assert_no_value(advice, "label 3")


def test_pipelined_delete_batch_is_info() -> None:
    s = Session()
    loop = [s.run(DELETE, i, pipelined=i > 0) for i in range(15)]
    (advice,) = feed(write_loop(), loop)
    assert (advice.severity, advice.count) == ("info", 15)
    assert "pipelined" in advice.suggestion
    assert advice.suggested_sql == "DELETE FROM items WHERE id = ANY($1)"
    assert advice.evidence is not None
    assert advice.evidence["round_trips"] == 1 and advice.evidence["in_transaction"] is False


def test_simple_protocol_literals_are_keys_too() -> None:
    s = Session()
    loop = [s.run(f"UPDATE items SET n = n + 1 WHERE id = {i}") for i in range(10)]
    (advice,) = feed(write_loop(), loop)
    assert advice.statement == "UPDATE items SET n = n + $1 WHERE id = $2"
    assert advice.suggested_sql == "UPDATE items SET n = n + $1 WHERE id = ANY($2)"
    s = Session()
    loop = [s.run(f"UPDATE items SET n = n + {i} WHERE id = {i}") for i in range(10)]
    (advice,) = feed(write_loop(), loop)
    assert advice.suggested_sql == (
        "UPDATE items SET n = items.n + v.n "
        "FROM unnest(CAST($1 AS bigint[]), CAST($2 AS bigint[])) AS v (n, id) "
        "WHERE items.id = v.id"
    )


def test_parameters_of_unknown_type_are_text_arrays_and_the_advice_says_so() -> None:
    s = Session()
    loop = [s.run(f"UPDATE items SET label = 'x{i}' WHERE id = {i}") for i in range(10)]
    (advice,) = feed(write_loop(), loop)
    assert advice.suggested_sql == (
        "UPDATE items SET label = v.label "
        "FROM unnest(CAST($1 AS text[]), CAST($2 AS bigint[])) AS v (label, id) "
        "WHERE items.id = v.id"
    )
    assert "use the column's type" in advice.suggestion
    assert_no_value(advice, "x4")
    s = Session()
    sql = "UPDATE items SET label = $1::varchar WHERE id = $2::integer"
    (advice,) = feed(write_loop(), [s.run(sql.replace("$2", str(i)), f"x{i}") for i in range(10)])
    assert "CAST($1 AS varchar[])" in (advice.suggested_sql or "")
    assert "column's type" not in advice.suggestion


def test_autocommit_loop_is_judged_once_quiet() -> None:
    s = Session()
    detector = write_loop()
    (advice,) = ticking(detector, s, [s.run(DELETE, i) for i in range(10)])
    assert advice.evidence is not None and advice.evidence["in_transaction"] is False
    assert "each its own transaction" in advice.suggestion


def test_healthy_writes_stay_silent() -> None:
    s = Session()
    quiet = [
        s.run(UPDATE, "x", 1, transaction=1),  # one update
        *[s.run(UPDATE, f"v{i}", 7, transaction=2) for i in range(20)],  # one key, again
        *[s.run("UPDATE items SET n = 0 WHERE id > $1", i, transaction=3) for i in range(20)],
        *[s.run("UPDATE items SET n = $1 WHERE id = ANY($2)", i, "{1,2}") for i in range(20)],
        *[s.run(DELETE, i, transaction=4) for i in range(9)],  # fewer than min_repeats
        *[s.run(DELETE, i, transaction=5, sqlstate="23503") for i in range(20)],  # failed
        *[s.run(DELETE, i % 5, transaction=6) for i in range(20)],  # 5 keys over and over
    ]
    assert feed(write_loop(), quiet) == []


def test_keys_split_across_transactions_are_separate_loops() -> None:
    s = Session()
    events = [s.run(DELETE, i, transaction=i // 5) for i in range(20)]  # 4 tx of 5
    assert feed(write_loop(), events) == []


# ------------------------------------------------------------------------ insert_loop


def test_upsert_loop_keeps_on_conflict() -> None:
    s = Session()
    sql = (
        'INSERT INTO "workflows" ("workflow_id", "title") VALUES ($1, $2) '
        'ON CONFLICT ("workflow_id") DO UPDATE SET "title" = EXCLUDED."title", '
        '"updated_at" = now()'
    )
    loop = [s.run(sql, i, f"title {i}", transaction=1) for i in range(10)]
    (advice,) = feed(InsertLoop(InsertLoopOptions(), WHO), loop)
    assert advice.suggested_sql == (
        "INSERT INTO workflows (workflow_id, title) SELECT u.workflow_id, u.title "
        "FROM unnest(CAST($1 AS bigint[]), CAST($2 AS text[])) AS u (workflow_id, title) "
        "ON CONFLICT (workflow_id) DO UPDATE SET title = excluded.title, updated_at = now()"
    )
    assert "ON CONFLICT clause is kept" in advice.suggestion
    assert advice.evidence is not None and set(advice.evidence) == EVIDENCE_KEYS
    assert advice.evidence["statements"] == 10 and advice.evidence["in_transaction"] is True


def test_upsert_parameters_in_the_conflict_clause_become_excluded() -> None:
    sql = multirow_insert_sql(
        'INSERT INTO t ("userId", n) VALUES ($1, $2) '
        'ON CONFLICT ("userId") DO UPDATE SET n = $2 WHERE t.n < $2 RETURNING id',
        {1: INT4, 2: INT4},
    )
    assert sql == (
        'INSERT INTO t ("userId", n) SELECT u."userId", u.n '
        'FROM unnest(CAST($1 AS bigint[]), CAST($2 AS bigint[])) AS u ("userId", n) '
        'ON CONFLICT ("userId") DO UPDATE SET n = excluded.n WHERE t.n < excluded.n RETURNING id'
    )
    assert (
        multirow_insert_sql("INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET b = $2")
        is None
    )  # $2 is no column's value
    assert multirow_insert_sql("INSERT INTO t VALUES ($1) ON CONFLICT DO NOTHING") is not None


# --------------------------------------------------------------------------- evidence


def test_evidence_of_the_single_statement_rules() -> None:
    s = Session()
    (slow,) = feed(
        SlowQuery(SlowQueryOptions(threshold=Duration(0.5)), WHO),
        [s.run("SELECT * FROM items WHERE id = $1", 4, took=0.75)],
    )
    assert slow.evidence == {"duration_ms": 750.0, "threshold_ms": 500.0}
    (not_in,) = feed(
        NotInSubquery(NotInSubqueryOptions(), WHO),
        [s.run("SELECT id FROM a WHERE id NOT IN (SELECT a_id FROM b)", took=0.004)],
    )
    assert not_in.evidence == {"duration_ms": 4.0}
    (like,) = feed(
        LeadingWildcard(LeadingWildcardOptions(), WHO),
        [s.run("SELECT id FROM a WHERE name LIKE $1", "%secret", took=0.003)],
    )
    assert like.evidence == {"duration_ms": 3.0, "warn_above_ms": 10.0}

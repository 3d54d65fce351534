"""The index advisor's parts on their own, without a database: the columns a statement
uses, the candidates built from them, names and DDL, plans read, parameter samples kept,
the explain budget, and the advisor's settings (its password never shown)."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from proxy.advisor.candidates import candidates, foreign_key_candidates
from proxy.advisor.catalog import ForeignKey, Index, Table
from proxy.advisor.planner import Budget, OverBudget
from proxy.advisor.plans import plan_root, reads, seq_scans, total_cost, uses_index
from proxy.advisor.predicates import ColumnUse, column_uses, delete_target
from proxy.advisor.sql import IndexSpec, quote_ident
from proxy.analysis.analyzer import Analyzer
from proxy.config import ADVISOR_PASSWORD_ENV, ConfigError, settings_from_dict
from proxy.fingerprints import ParamSamples
from proxy.protocol import messages as m
from proxy.tracking.events import StatementEvent

ANALYZER = Analyzer()


def uses(sql: str) -> list[tuple[str, str, str]]:
    """(kind, table, column) of each use, the table as the statement names it."""
    return [(u.kind, u.tables[0][1], u.column) for u in column_uses(sql)]


# ------------------------------------------------------------------ predicates


def test_filters_joins_and_sorts_are_read_with_their_tables() -> None:
    assert uses(
        "SELECT a.id FROM jobs a JOIN apps b ON b.job_id = a.id "
        "WHERE b.status = $1 AND a.n > $2 AND a.t BETWEEN $3 AND $4 ORDER BY a.created LIMIT $5"
    ) == [
        ("eq", "apps", "job_id"),
        ("eq", "jobs", "id"),
        ("eq", "apps", "status"),
        ("range", "jobs", "n"),
        ("range", "jobs", "t"),
        ("sort", "jobs", "created"),
    ]


def test_in_any_jsonb_and_like_are_read() -> None:
    assert uses(
        "SELECT 1 FROM t WHERE k IN ($1, $2) AND z = ANY($3) AND d @> $4 AND e ? $5 "
        "AND name ILIKE $6"
    ) == [
        ("eq", "t", "k"),
        ("eq", "t", "z"),
        ("contains", "t", "d"),
        ("exists", "t", "e"),
        ("like", "t", "name"),
    ]
    (like,) = [u for u in column_uses("SELECT 1 FROM t WHERE name LIKE $1::text") if u.kind]
    assert like.param == 1


def test_sort_without_limit_and_or_are_not_index_material() -> None:
    assert uses("SELECT * FROM t WHERE a = $1 ORDER BY b") == [("eq", "t", "a")]
    assert uses("SELECT * FROM t WHERE a = $1 OR b = $2") == []
    assert uses("SELECT * FROM t WHERE a <> $1 AND lower(b) = $2") == []


def test_subqueries_ctes_unions_and_writes_are_walked() -> None:
    assert uses(
        "WITH r AS (SELECT id FROM runs WHERE state = $1) "
        "SELECT * FROM c WHERE NOT EXISTS (SELECT 1 FROM jc WHERE jc.cid = c.id) "
        "UNION SELECT * FROM d WHERE d.x = $2"
    ) == [
        ("eq", "runs", "state"),
        ("eq", "jc", "cid"),
        ("eq", "c", "id"),
        ("eq", "d", "x"),
    ]
    assert uses("UPDATE t SET a = $1 WHERE b = $2") == [("eq", "t", "b")]
    assert uses("DELETE FROM t USING u WHERE t.id = u.tid AND u.k = $1") == [
        ("eq", "t", "id"),
        ("eq", "u", "tid"),
        ("eq", "u", "k"),
    ]
    assert uses("INSERT INTO a SELECT * FROM b WHERE b.k = $1") == [("eq", "b", "k")]
    assert delete_target("DELETE FROM s.parent WHERE id = $1") == ("s", "parent")
    assert delete_target("SELECT 1") is None


def test_an_unqualified_column_of_a_join_may_belong_to_either_table() -> None:
    (use,) = column_uses("SELECT 1 FROM a JOIN b ON true WHERE k = $1")
    assert use == ColumnUse("eq", "k", ((None, "a"), (None, "b")))


def test_unparsable_or_several_statements_give_nothing() -> None:
    assert column_uses("SELEC nonsense") == []
    assert column_uses("SELECT 1 FROM a WHERE x = 1; SELECT 2") == []


# ------------------------------------------------------------------ candidates


def table(
    name: str = "t",
    rows: float = 100000,
    columns: dict[str, tuple[str, float]] | None = None,
    indexes: tuple[Index, ...] = (),
    referencing: tuple[ForeignKey, ...] = (),
) -> Table:
    columns = columns or {
        "job_id": ("integer", 2000),
        "status": ("text", 5),
        "created": ("timestamp with time zone", 90000),
        "n": ("integer", 100),
        "data": ("jsonb", 1),
        "email": ("text", 100000),
    }
    return Table("public", name, rows, columns, indexes, referencing)


def specs(sql: str, t: Table, wildcard: bool = False, trigram: bool = False) -> list[str]:
    found = candidates(
        [(u, t) for u in column_uses(sql)], lambda param: wildcard and param > 0, trigram
    )
    return [c.spec.describe() for c in found]


def test_equality_columns_lead_most_distinct_first_then_range_then_sort() -> None:
    assert specs("SELECT * FROM t WHERE status = $1 AND job_id = $2", table()) == [
        "t (job_id, status)",
        "t (job_id)",
    ]
    assert specs("SELECT * FROM t WHERE status = $1 AND n > $2", table()) == [
        "t (status, n)",
        "t (status)",
    ]
    assert specs("SELECT * FROM t WHERE job_id = $1 ORDER BY created LIMIT 10", table()) == [
        "t (job_id, created)",
        "t (job_id)",
    ]


def test_an_index_with_the_same_leading_columns_covers_a_candidate() -> None:
    indexed = table(indexes=(Index("btree", ("job_id", "status", "n")),))
    assert specs("SELECT * FROM t WHERE status = $1 AND job_id = $2", indexed) == []
    other_method = table(indexes=(Index("hash", ("job_id",)),))
    assert specs("SELECT * FROM t WHERE job_id = $1", other_method) == ["t (job_id)"]
    expression = table(indexes=(Index("btree", (None,)),))
    assert specs("SELECT * FROM t WHERE job_id = $1", expression) == ["t (job_id)"]


def test_jsonb_containment_gets_gin_with_jsonb_path_ops_only_when_only_contained() -> None:
    assert specs("SELECT * FROM t WHERE data @> $1", table()) == [
        "t USING gin (data jsonb_path_ops)"
    ]
    assert specs("SELECT * FROM t WHERE data @> $1 AND data ? $2", table()) == [
        "t USING gin (data)"
    ]
    assert (
        specs("SELECT * FROM t WHERE data @> $1", table(indexes=(Index("gin", ("data",)),))) == []
    )


def test_leading_wildcards_get_a_trigram_index_when_pg_trgm_is_installed() -> None:
    sql = "SELECT * FROM t WHERE email LIKE $1"
    assert specs(sql, table(), wildcard=True, trigram=True) == ["t USING gin (email gin_trgm_ops)"]
    assert specs(sql, table(), wildcard=True, trigram=False) == []
    assert specs(sql, table(), wildcard=False, trigram=True) == []


def test_an_unindexed_foreign_key_is_a_candidate_with_its_check() -> None:
    parent = table("employees", referencing=(ForeignKey("public", "Projects", ("employeeId",)),))
    child = table("Projects", columns={"employeeId": ("integer", 1000)})
    ((candidate, check),) = foreign_key_candidates(parent, [child])
    assert candidate.spec.describe() == '"Projects" ("employeeId")'
    assert check == 'SELECT 1 FROM ONLY "Projects" WHERE "employeeId" = $1'
    indexed = dataclasses.replace(child, indexes=(Index("btree", ("employeeId", "x")),))
    assert foreign_key_candidates(parent, [indexed]) == []


# ------------------------------------------------------------------ names and DDL


def test_identifiers_are_quoted_only_where_needed() -> None:
    assert quote_ident("job_id") == "job_id"
    assert quote_ident("nodeId") == '"nodeId"'
    assert quote_ident("user") == '"user"'
    assert quote_ident('we"ird') == '"we""ird"'


def test_the_suggested_ddl() -> None:
    spec = IndexSpec("public", "job_applications", ("job_id", "status"))
    assert spec.create_sql() == (
        "CREATE INDEX CONCURRENTLY job_applications_job_id_status_idx "
        "ON job_applications USING btree (job_id, status)"
    )
    assert spec.hypothetical_sql() == (
        "CREATE INDEX ON job_applications USING btree (job_id, status)"
    )
    gin = IndexSpec("app", "Docs", ("body",), "gin", "gin_trgm_ops")
    assert gin.create_sql() == (
        'CREATE INDEX CONCURRENTLY "Docs_body_idx" ON app."Docs" USING gin (body gin_trgm_ops)'
    )
    long = IndexSpec("public", "t" * 40, ("c" * 40,))
    assert len(long.name()) == 63


def test_a_wider_btree_covers_the_indexes_it_starts_with() -> None:
    wide = IndexSpec("public", "t", ("a", "b", "c"))
    assert wide.covers(IndexSpec("public", "t", ("a", "b")))
    assert wide.covers(wide)
    assert not wide.covers(IndexSpec("public", "t", ("b",)))
    assert not wide.covers(IndexSpec("public", "u", ("a",)))
    gin = IndexSpec("public", "t", ("a",), "gin", "jsonb_path_ops")
    assert not gin.covers(gin) and not wide.covers(gin)


# ------------------------------------------------------------------ plans

PLAN = [
    {
        "Plan": {
            "Node Type": "Hash Join",
            "Total Cost": 2500.5,
            "Plans": [
                {
                    "Node Type": "Seq Scan",
                    "Relation Name": "apps",
                    "Schema": "public",
                    "Plan Rows": 12,
                    "Filter": "(status = 'secret'::text)",
                },
                {
                    "Node Type": "Index Scan",
                    "Relation Name": "jobs",
                    "Schema": "public",
                    "Index Name": "jobs_pkey",
                },
            ],
        }
    }
]


def test_plans_give_costs_scans_and_indexes_never_conditions() -> None:
    root = plan_root(PLAN)
    assert total_cost(root) == 2500.5
    (scan,) = seq_scans(root)
    assert (scan.schema, scan.table, scan.rows, scan.filtered) == ("public", "apps", 12, True)
    assert "secret" not in repr(scan)
    assert reads(root, "public", "jobs") == "Index Scan"
    assert reads(root, "public", "nope") is None
    assert uses_index(root, "jobs_pkey") and not uses_index(root, "other")
    with pytest.raises(ValueError):
        plan_root({"not": "a plan"})


# ------------------------------------------------------------------ samples


def event(
    sql: str,
    params: tuple[bytes | None, ...] = (),
    formats: tuple[int, ...] = (),
    types: tuple[int, ...] = (),
    sqlstate: str | None = None,
) -> StatementEvent:
    (parsed,) = ANALYZER.analyze(sql)
    bind = m.Bind("", "", formats, params, ()).payload() if params else None
    ev = StatementEvent(parsed, 1.0, 1.0, bind, types, 1)
    ev.sqlstate = sqlstate
    return ev


def test_samples_keep_bound_values_with_their_formats_and_types() -> None:
    samples = ParamSamples()
    binary = struct.pack("!q", 7)
    ev = event("SELECT * FROM t WHERE a = $1 AND b = $2", (binary, b"x"), (1, 0), (20, 0))
    samples.offer(ev)
    found = samples.get(ev.info.fingerprint)
    assert found is not None
    info, values = found
    assert info.normalized == "SELECT * FROM t WHERE a = $1 AND b = $2"
    assert values == [((binary, 1, 20), (b"x", 0, 0))]


def test_samples_of_the_simple_protocol_are_the_literals_values() -> None:
    samples = ParamSamples()
    sql = "SELECT * FROM t WHERE a = 42 AND b = 'it''s' AND c = -1.5 AND d = true"
    ev = event(sql)
    samples.offer(ev)
    _, values = samples.get(ev.info.fingerprint) or (None, [])
    assert values == [((b"42", 0, 0), (b"it's", 0, 0), (b"-1.5", 0, 0), (b"true", 0, 0))]
    escaped = event("SELECT * FROM t WHERE a = E'x\\n'")
    samples.offer(escaped)  # a form not read: the statement is known, without a sample
    assert samples.get(escaped.info.fingerprint) == (escaped.info, [])


def test_samples_are_kept_for_statements_an_index_can_serve_only() -> None:
    samples = ParamSamples()
    for sql, sqlstate in (
        ("INSERT INTO t (a) VALUES ($1)", None),
        ("BEGIN", None),
        ("SELECT * FROM t WHERE a = $1", "42P01"),
    ):
        ev = event(sql, (b"1",) if "$1" in sql else (), sqlstate=sqlstate)
        samples.offer(ev)
        assert samples.get(ev.info.fingerprint) is None, sql
    select = event("INSERT INTO t SELECT * FROM u WHERE a = $1", (b"1",))
    samples.offer(select)
    assert samples.get(select.info.fingerprint) is not None


def test_samples_are_bounded() -> None:
    samples = ParamSamples(max_fingerprints=3)
    events = [event(f"SELECT * FROM t{i} WHERE a = $1", (b"1",)) for i in range(5)]
    for ev in events:
        for _ in range(10):
            samples.offer(ev)
    assert [samples.get(ev.info.fingerprint) is not None for ev in events] == [
        False,
        False,
        True,
        True,
        True,
    ]
    (_, values) = samples.get(events[-1].info.fingerprint) or (None, [])
    assert len(values) == 3


# ------------------------------------------------------------------ budget


def test_the_explain_budget_refills_after_a_minute() -> None:
    now = [0.0]
    budget = Budget(2, clock=lambda: now[0])
    budget.take()
    budget.take()
    with pytest.raises(OverBudget):
        budget.take()
    now[0] = 60.0
    budget.take()


# ------------------------------------------------------------------ settings


def test_the_advisor_is_off_by_default_with_documented_defaults() -> None:
    advisor = settings_from_dict({}).advisor
    assert advisor.dsn is None and advisor.password is None
    assert (advisor.interval, advisor.min_calls, advisor.min_total_time) == (60.0, 5, 1.0)
    assert (advisor.max_explains_per_minute, advisor.statement_timeout) == (30, 2.0)


def test_the_password_comes_from_its_file_or_the_environment_and_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "advisor-password-9c1e"
    path = tmp_path / "password"
    path.write_text(secret + "\n")
    settings = settings_from_dict(
        {"advisor": {"dsn": "host=db user=advisor", "password_file": str(path)}}
    )
    assert settings.advisor.password == secret
    assert secret not in repr(settings) and secret not in str(settings.to_dict())
    monkeypatch.setenv(ADVISOR_PASSWORD_ENV, secret)
    assert settings_from_dict({"advisor": {"dsn": "host=db"}}).advisor.password == secret


@pytest.mark.parametrize(
    ("advisor", "error"),
    [
        ({"dsn": "host=db password=x"}, "advisor.dsn: leave password out"),
        ({"dsn": "postgresql://u@db/app"}, "advisor.dsn: leave dbname out"),
        ({"dsn": "host=db", "password_file": "/nonexistent"}, "advisor.password_file:"),
        ({"dsn": "host=db", "interval": 0}, "advisor.interval:"),
        ({"min_calls": 0}, "advisor.min_calls:"),
        ({"dsn": "host='unterminated"}, "advisor.dsn:"),
    ],
)
def test_bad_advisor_settings_name_the_key(advisor: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"advisor": advisor})
    assert str(caught.value).startswith(error)


def test_min_saving_is_a_number_from_0_to_1() -> None:
    rules = settings_from_dict({"detectors": {"missing_index": {"min_saving": 0.3}}})
    assert rules.detectors.rules["missing_index"].min_saving == 0.3  # type: ignore[attr-defined]
    for bad in (1.5, "half", True):
        with pytest.raises(ConfigError, match=r"detectors\.missing_index\.min_saving"):
            settings_from_dict({"detectors": {"missing_index": {"min_saving": bad}}})

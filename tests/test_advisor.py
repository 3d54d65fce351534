"""The index advisor through real clients, a real pgwarden and the test PostgreSQL.

Two databases hold the same schema, one with HypoPG installed (indexes proven: costs
before and after) and one without (only selective sequential scans on large tables,
`verified: false`). Each seed report's index is found with the right columns, order and
method, and the suggested DDL, run on the database, makes the planner use it; healthy
statements stay silent; the advisor writes nothing, never shows in /fingerprints, and a
role without rights makes it log and count, not fail.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.types.json import Jsonb

from proxy.tools.pgcluster import free_port
from tests.support.proxy import ProxyProcess, assert_secret_stays_inside, launch_with_defaults
from tests.support.util import PgServer, wait_until

HYPO = "advisor_hypo"  # HypoPG and pg_trgm installed
PLAIN = "advisor_plain"  # neither
SECRET = f"secret-{uuid.uuid4().hex}"  # a parameter value that must never leave the proxy

SCHEMA = """
CREATE TABLE employees (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE projects (id int PRIMARY KEY, employee_id int NOT NULL REFERENCES employees,
                       name text NOT NULL);
CREATE TABLE jobs (id int PRIMARY KEY, title text NOT NULL);
CREATE TABLE job_applications (id int PRIMARY KEY, job_id int NOT NULL REFERENCES jobs,
                               candidate_id int NOT NULL, status text NOT NULL);
CREATE TABLE workflows (id int PRIMARY KEY, metadata jsonb NOT NULL);
CREATE TABLE journey_node_executions (id int PRIMARY KEY, "nodeId" int NOT NULL,
    "journeyContactId" int NOT NULL, "tenantId" int NOT NULL, result text);
CREATE TABLE people (id int PRIMARY KEY, email text NOT NULL);
CREATE TABLE countries (id int PRIMARY KEY, code text NOT NULL);
INSERT INTO employees SELECT g, 'employee ' || g FROM generate_series(1, 20000) g;
INSERT INTO projects SELECT g, 1 + g % 10000, 'project ' || g FROM generate_series(1, 50000) g;
INSERT INTO jobs SELECT g, 'job ' || g FROM generate_series(1, 2000) g;
INSERT INTO job_applications
    SELECT g, 1 + g % 2000, g,
           (ARRAY['applied', 'screening', 'interview', 'offer', 'rejected'])[1 + g / 7 % 5]
    FROM generate_series(1, 100000) g;
INSERT INTO workflows
    SELECT g, jsonb_build_object('status', CASE WHEN g % 500 = 0 THEN 'failed' ELSE 'ok' END,
                                 'layer', g % 7)
    FROM generate_series(1, 50000) g;
INSERT INTO journey_node_executions
    SELECT g, g % 5003, g % 2003, g % 7, 'r' FROM generate_series(1, 100000) g;
INSERT INTO people SELECT g, 'person' || g || '@example.com' FROM generate_series(1, 50000) g;
INSERT INTO countries SELECT g, 'c' || g FROM generate_series(1, 100) g;
ANALYZE;
"""

# (statement, parameters) run through pgwarden, each several times
SEEDS: dict[str, tuple[str, list[tuple[Any, ...]]]] = {
    # 000: a foreign key nobody indexed, checked for every employee deleted
    "000": ("DELETE FROM employees WHERE id = %s", [(i,) for i in range(10001, 10011)]),
    # 001: the dashboard's filter
    "001": (
        "SELECT id, candidate_id FROM job_applications WHERE status = %s AND job_id = %s",
        [("applied", i) for i in range(1, 11)],
    ),
    # 003: JSONB containment
    "003": (
        "SELECT id FROM workflows WHERE metadata @> %s",
        [(Jsonb({"status": "failed"}),)] * 10,
    ),
    # 004: the hottest lookup, camelCase columns as TypeORM writes them
    "004": (
        'SELECT id, result FROM journey_node_executions WHERE "tenantId" = %s '
        'AND "journeyContactId" = %s AND "nodeId" = %s',
        [(i % 7, i % 2003, i % 5003) for i in range(100, 110)],
    ),
    # leading wildcard: a trigram index, when pg_trgm is there
    "pattern": (
        "SELECT id FROM people WHERE email LIKE %s",
        [(f"%{SECRET}",)] * 10,
    ),
}
EXPECTED = {  # seed -> (table, columns, method, operator class)
    "000": ("projects", ("employee_id",), "btree", None),
    "001": ("job_applications", ("job_id", "status"), "btree", None),
    "003": ("workflows", ("metadata",), "gin", "jsonb_path_ops"),
    "004": ("journey_node_executions", ("nodeId", "journeyContactId", "tenantId"), "btree", None),
    "pattern": ("people", ("email",), "gin", "gin_trgm_ops"),
}
# seed 000 again: the unindexed foreign key column, joined; the same index as the DELETE's
JOIN_000 = (
    "SELECT e.name, p.name FROM employees e JOIN projects p ON p.employee_id = e.id "
    "WHERE e.id = %s",
    [(i,) for i in range(1, 11)],
)
# seed 001 once more, on the simple protocol: the values are literals in the text
SIMPLE_001 = (
    "SELECT candidate_id FROM job_applications WHERE job_id = %s AND status = %s LIMIT 50",
    [(i, "interview") for i in range(1, 6)],
)
HELPED = {"000": 2, "001": 3}  # statements each seed's index serves (one advice for all)
HEALTHY = [
    # an index serves it already
    ("SELECT title FROM jobs WHERE id = %s", [(i,) for i in range(1, 11)]),
    # a small table
    ("SELECT id FROM countries WHERE code = %s", [(f"c{i}",) for i in range(1, 11)]),
    # reads most of the table: no index helps
    ("SELECT count(*) FROM job_applications WHERE candidate_id > %s", [(10,)] * 5),
]


def _database(pg: PgServer, name: str, extensions: tuple[str, ...]) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {name}")
    pg.psql(f"CREATE DATABASE {name}")
    for extension in extensions:
        pg.psql(f"CREATE EXTENSION {extension}", dbname=name)
    pg.psql(SCHEMA, dbname=name)


@pytest.fixture(scope="module")
def databases(pg: PgServer) -> Iterator[None]:
    try:
        _database(pg, HYPO, ("hypopg", "pg_trgm"))
    except RuntimeError as exc:
        pytest.skip(f"HypoPG is not installed on the test server: {exc}")
    _database(pg, PLAIN, ("pg_trgm",))
    yield
    for name in (HYPO, PLAIN):
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def advisor_config(pg: PgServer, user: str = "postgres") -> dict[str, Any]:
    return {
        "advisor": {
            "dsn": f"host={pg.host} port={pg.port} user={user}",
            "interval": "0.3s",
            "min_calls": 3,
            "min_total_time": 0,
            "max_explains_per_minute": 2000,
        }
    }


# asyncpg: prepared statements, values in binary; the same index as seed 001's statement
ASYNCPG_001 = "SELECT count(*) FROM job_applications WHERE job_id = $1 AND status = $2"


async def run_asyncpg(proxy: ProxyProcess, database: str) -> None:
    conn = await asyncpg.connect(
        host=proxy.host, port=proxy.port, user="postgres", database=database, timeout=5
    )
    try:
        for job in range(1, 6):
            await conn.fetchval(ASYNCPG_001, job, "offer")
    finally:
        await conn.close()


def run(proxy: ProxyProcess, database: str, workload: list[tuple[str, list[Any]]]) -> None:
    dsn = proxy.dsn(dbname=database, application_name="dashboard")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql, rows in workload:
            for params in rows:
                cursor = conn.execute(sql, params)
                if cursor.description:
                    cursor.fetchall()


@pytest.fixture(scope="module")
def proxy(
    pg: PgServer, databases: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """pgwarden with the advisor on, after the seeds' and the healthy statements ran in
    both databases."""
    process = launch_with_defaults(
        pg, tmp_path_factory.mktemp("advisor"), "advisor", advisor_config(pg)
    )
    try:
        workload = [*SEEDS.values(), JOIN_000, *HEALTHY]
        for database in (HYPO, PLAIN):
            run(process, database, workload)
            asyncio.run(run_asyncpg(process, database))
            with psycopg.connect(process.dsn(dbname=database), autocommit=True) as conn:
                cursor = psycopg.ClientCursor(conn)
                for params in SIMPLE_001[1]:
                    cursor.execute(SIMPLE_001[0], params).fetchall()
        yield process
    finally:
        process.stop()


def missing_index(proxy: ProxyProcess, database: str) -> dict[str, dict[str, Any]]:
    """The missing_index advice of `database`, by the table of its index."""
    status, body = proxy.http_get(f"/advice?rule=missing_index&database={database}")
    assert status == 200, body
    return {a["tables"][0]: a for a in json.loads(body)["advice"]}


def wait_advice(proxy: ProxyProcess, database: str, tables: set[str]) -> dict[str, Any]:
    return wait_until(
        lambda: tables <= set(found := missing_index(proxy, database)) and found,
        timeout=30,
        message=f"missing_index advice on {sorted(tables)} in {database}",
    )


def index_sql(table: str, columns: tuple[str, ...], method: str, opclass: str | None) -> str:
    keys = ", ".join(c if c.islower() else f'"{c}"' for c in columns)
    return f"USING {method} ({keys}{' ' + opclass if opclass else ''})"


def plan_uses(pg: PgServer, database: str, sql: str, name: str) -> bool:
    with psycopg.connect(pg.dsn(dbname=database), autocommit=True) as conn:
        plan = "\n".join(row[0] for row in conn.execute(sql))
    return name in plan


# one statement with sample values for each seed, as psql would run it
EXPLAINED = {
    "000": "EXPLAIN SELECT 1 FROM ONLY projects WHERE employee_id = 10005",
    "001": "EXPLAIN SELECT id FROM job_applications WHERE status = 'applied' AND job_id = 3",
    "003": """EXPLAIN SELECT id FROM workflows WHERE metadata @> '{"status": "failed"}'""",
    "004": 'EXPLAIN SELECT id FROM journey_node_executions WHERE "tenantId" = 1 '
    'AND "journeyContactId" = 101 AND "nodeId" = 101',
    "pattern": "EXPLAIN SELECT id FROM people WHERE email LIKE '%son17@%'",
}


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_each_seed_gets_its_index_proven_and_the_ddl_is_used(
    proxy: ProxyProcess, pg: PgServer, seed: str
) -> None:
    table, columns, method, opclass = EXPECTED[seed]
    helped = HELPED.get(seed, 1)
    found = wait_until(
        lambda: (
            (a := missing_index(proxy, HYPO).get(table))
            and a["evidence"]["statements_helped"] == helped
            and a
        ),
        timeout=30,
        message=f"the advice on {table} listing {helped} statement(s)",
    )
    assert found["severity"] in ("info", "warning", "critical")
    assert index_sql(table, columns, method, opclass) in found["suggested_sql"]
    assert found["suggested_sql"].startswith("CREATE INDEX CONCURRENTLY ")
    evidence = found["evidence"]
    assert evidence["table_rows"] >= 10000
    assert len(evidence["fingerprints"].split(",")) == helped
    assert evidence["statements_time_ms"] > 0
    if method == "btree":  # HypoPG proves b-tree indexes: costs before and after
        assert evidence["verified"] is True
        assert evidence["cost_after"] <= evidence["cost_before"] / 2
    else:  # HypoPG cannot build GIN: the selective sequential scan rule
        assert evidence["verified"] is False
        assert evidence["plan_node"].startswith("Seq Scan on ")
    name = found["suggested_sql"].split()[3]
    pg.psql(found["suggested_sql"], dbname=HYPO)
    try:
        assert plan_uses(pg, HYPO, EXPLAINED[seed], name)
    finally:
        pg.psql(f"DROP INDEX {name}", dbname=HYPO)


def test_without_hypopg_selective_scans_are_reported_unverified(proxy: ProxyProcess) -> None:
    found = wait_advice(proxy, PLAIN, {"job_applications", "journey_node_executions", "projects"})
    for table in ("job_applications", "journey_node_executions", "projects"):
        evidence = found[table]["evidence"]
        assert evidence["verified"] is False, table
        assert "cost_after" not in evidence
        assert evidence["plan_node"].startswith("Seq Scan on ")
        assert found[table]["severity"] != "critical"
    assert (
        '"nodeId", "journeyContactId", "tenantId"'
        in (found["journey_node_executions"]["suggested_sql"])
    )
    assert "Unverified" in found["job_applications"]["suggestion"]


def test_healthy_statements_stay_silent(proxy: ProxyProcess) -> None:
    wait_advice(proxy, HYPO, set(t for t, *_ in EXPECTED.values()))
    for database in (HYPO, PLAIN):
        tables = set(missing_index(proxy, database))
        assert not tables & {"jobs", "countries"}, tables
        assert all(
            "candidate_id" not in a["suggested_sql"]
            for a in missing_index(proxy, database).values()
        )


def test_the_advisor_stays_out_of_fingerprints_and_never_shows_a_value(
    proxy: ProxyProcess,
) -> None:
    wait_advice(proxy, HYPO, {"people"})
    status, body = proxy.http_get("/fingerprints")
    assert status == 200
    statements = json.loads(body)["fingerprints"]
    assert statements
    for row in statements:
        assert row["application_name"] != "pgwarden-advisor"
        assert "EXPLAIN" not in row["statement"] and "hypopg" not in row["statement"]
    metrics = proxy.http_get("/metrics")[1]
    assert "EXPLAIN" not in metrics and "hypopg" not in metrics and "pg_class" not in metrics
    assert_secret_stays_inside(proxy, SECRET, '"rule": "missing_index"')


def test_metrics_count_the_explains_and_rounds(proxy: ProxyProcess) -> None:
    wait_advice(proxy, HYPO, {"job_applications"})
    status, text = proxy.http_get("/metrics")
    assert status == 200
    assert 'pgwarden_advisor_explains_total{result="ok"}' in text
    assert "pgwarden_advisor_duration_seconds_count" in text


def test_the_advisor_never_writes(pg: PgServer, databases: None) -> None:
    """Its connection refuses writes: READ ONLY by default and in every transaction."""
    import asyncio

    from proxy.advisor.planner import Budget, PlanError, Planner, connect
    from proxy.config import settings_from_dict

    settings = settings_from_dict(advisor_config(pg)).advisor

    async def attempt() -> str | None:
        conn = await connect(settings, HYPO)
        try:
            planner = Planner(conn, Budget(10), lambda result: None)
            try:
                async with planner.transaction():
                    await planner.query("CREATE TABLE advisor_wrote (id int)")
            except PlanError as exc:
                return exc.sqlstate
            return None
        finally:
            await conn.close()

    assert asyncio.run(attempt()) == "25006"  # read_only_sql_transaction
    assert pg.psql("SELECT to_regclass('advisor_wrote') IS NULL", dbname=HYPO).strip() == "t"
    # its hypothetical indexes lived in its sessions only: the tables keep their keys alone
    indexes = pg.psql("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'", HYPO)
    assert all(name.endswith("_pkey") for name in indexes.split()), indexes


def test_a_failure_leaves_no_hypothetical_index_or_prepared_statement(
    pg: PgServer, databases: None
) -> None:
    from proxy.advisor.planner import Budget, PlanError, Planner, connect
    from proxy.config import settings_from_dict

    settings = settings_from_dict(advisor_config(pg)).advisor

    async def fail_midway() -> tuple[str | None, list[tuple[object, ...]]]:
        conn = await connect(settings, HYPO)
        try:
            planner = Planner(conn, Budget(10), lambda result: None)
            sqlstate = None
            try:
                async with planner.transaction():
                    await planner.generic("SELECT id FROM jobs WHERE title = $1", (), 1)
                    async with planner.hypothetical("CREATE INDEX ON jobs (title)"):
                        await planner.query("SELECT 1 / 0")
            except PlanError as exc:
                sqlstate = exc.sqlstate
            left = await planner.query(
                "SELECT (SELECT count(*) FROM hypopg_list_indexes), "
                "(SELECT count(*) FROM pg_prepared_statements)"
            )
            return sqlstate, left
        finally:
            await conn.close()

    assert asyncio.run(fail_midway()) == ("22012", [(0, 0)])  # division_by_zero


def test_a_role_without_rights_is_logged_and_counted(
    pg: PgServer, databases: None, tmp_path: Path
) -> None:
    pg.psql("DROP ROLE IF EXISTS advisor_limited; CREATE ROLE advisor_limited LOGIN")
    try:
        proxy = launch_with_defaults(
            pg, tmp_path, "limited", advisor_config(pg, user="advisor_limited")
        )
        try:
            run(proxy, HYPO, [SEEDS["001"]])
            failed = proxy.wait_log(lambda e: e.get("event") == "advisor_explain_failed", 30)
            assert failed["result"] == "denied" and failed["sqlstate"] == "42501"
            assert (
                'pgwarden_advisor_explains_total{result="denied"}' in proxy.http_get("/metrics")[1]
            )
            assert proxy.process.poll() is None
            assert not missing_index(proxy, HYPO)
        finally:
            proxy.stop()
    finally:
        pg.psql("DROP ROLE advisor_limited")


def test_without_a_dsn_the_advisor_is_off_and_says_so(pg: PgServer, tmp_path: Path) -> None:
    proxy = launch_with_defaults(pg, tmp_path, "off")
    try:
        off = proxy.wait_log(lambda e: e.get("event") == "advisor_off")
        assert off["reason"] == "advisor.dsn is not set"
    finally:
        proxy.stop()


def test_an_unreachable_database_is_one_log_line_and_a_metric(
    pg: PgServer, databases: None, tmp_path: Path
) -> None:
    config = advisor_config(pg)
    config["advisor"]["dsn"] = f"host=127.0.0.1 port={free_port()} user=postgres"
    proxy = launch_with_defaults(pg, tmp_path, "unreachable", config)
    try:
        run(proxy, HYPO, [SEEDS["001"]])
        unavailable = proxy.wait_log(lambda e: e.get("event") == "advisor_unavailable", 30)
        assert unavailable["database"] == HYPO and unavailable["error"]
        wait_until(
            lambda: (
                'pgwarden_advisor_explains_total{result="unavailable"} 3.0'
                in proxy.http_get("/metrics")[1]
            ),
            timeout=30,
            message="three rounds without a connection",
        )
        run(proxy, HYPO, [SEEDS["001"]])  # clients are served as before
        events = [e for e in proxy.log_events() if e.get("event") == "advisor_unavailable"]
        assert len(events) == 1
    finally:
        proxy.stop()


def test_a_lock_held_on_a_table_times_the_advisor_out_not_the_proxy(
    pg: PgServer, databases: None, tmp_path: Path
) -> None:
    """The advisor waits for a lock no longer than its statement_timeout, and gives up on
    that statement with a log line and a metric; clients are served meanwhile."""
    config = advisor_config(pg)
    config["advisor"] |= {"interval": "2s", "statement_timeout": "200ms"}
    proxy = launch_with_defaults(pg, tmp_path, "locked", config)
    try:
        run(proxy, HYPO, [SEEDS["001"]])
        with psycopg.connect(pg.dsn(dbname=HYPO)) as locker:
            locker.execute("LOCK TABLE job_applications IN ACCESS EXCLUSIVE MODE")
            failed = proxy.wait_log(lambda e: e.get("event") == "advisor_explain_failed", 30)
            run(proxy, HYPO, [HEALTHY[0]])  # another table: served while the lock is held
        # whichever of its statement_timeout and lock_timeout (the same) fires first
        assert failed["result"] == "timeout" and failed["sqlstate"] in ("57014", "55P03")
        assert (
            'pgwarden_advisor_explains_total{result="timeout"} 1.0' in proxy.http_get("/metrics")[1]
        )
    finally:
        proxy.stop()

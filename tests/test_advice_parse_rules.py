"""not_in_subquery and leading_wildcard through real clients and a real pgwarden.

psycopg on the extended protocol (server-side parameters) and the simple protocol
(client-side interpolation), and asyncpg's prepared statements: the shapes are reported,
the healthy ones are not, the suggested SQL runs on the test PostgreSQL, and a pattern's
value never leaves the proxy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import StartProxy
from tests.support.proxy import ProxyProcess, assert_secret_stays_inside
from tests.support.util import PgServer, wait_until
from tests.test_advice_clients import aconnect, advice, connect, run_psql, settled

NOT_IN = "SELECT id FROM pr_users WHERE id NOT IN (SELECT user_id FROM pr_banned WHERE reason = $1)"
NOT_EXISTS = (
    "SELECT id FROM pr_users WHERE NOT EXISTS "
    "(SELECT 1 FROM pr_banned WHERE reason = $1 AND user_id = pr_users.id)"
)
TRIGRAM = (
    "CREATE EXTENSION IF NOT EXISTS pg_trgm; "
    "CREATE INDEX CONCURRENTLY ON pr_users USING gin ({} gin_trgm_ops);"
)


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    pg.psql(
        """
        DROP TABLE IF EXISTS pr_users, pr_banned;
        CREATE TABLE pr_users (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL);
        CREATE TABLE pr_banned (user_id int, reason text NOT NULL);
        INSERT INTO pr_users SELECT g, 'user ' || g, g || '@example.com'
            FROM generate_series(1, 50) g;
        INSERT INTO pr_banned VALUES (3, 'spam'), (NULL, 'spam'), (7, 'abuse');
        """
    )
    yield
    pg.psql("DROP TABLE IF EXISTS pr_users, pr_banned")


@pytest.fixture
def proxy(proxy_factory: StartProxy, schema: None) -> ProxyProcess:
    """A fresh pgwarden with the default detectors, so /advice starts empty."""
    return proxy_factory()


def wait_rule(proxy: ProxyProcess, rule: str, count: int = 1) -> list[dict[str, Any]]:
    """The advice of `rule`, once `count` of them are there."""
    found = wait_until(
        lambda: len(advice(proxy, rule)) >= count and advice(proxy, rule),
        5.0,
        message=f"{rule}: {advice(proxy)}",
    )
    assert len(found) == count, found
    return list(found)


def assert_prepares(pg: PgServer, sql: str) -> None:
    """`sql`, parameters and all, is valid on the test server (PREPARE types the $n)."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        name = f"check_{uuid.uuid4().hex[:8]}"
        conn.execute(f"PREPARE {name} AS {sql}")
        conn.execute(f"DEALLOCATE {name}")


def assert_trigram_index_runs(pg: PgServer, ddl: str) -> None:
    """The index DDL runs, one statement at a time (CONCURRENTLY refuses a transaction),
    where pg_trgm can be installed on the test server."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except psycopg.Error:
            pytest.skip("pg_trgm is not available on the test PostgreSQL")
        before = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
        for statement in ddl.split(";"):
            if statement.strip():
                conn.execute(statement)
        made = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")} - before
        assert len(made) == 1, made
        for index in made:
            conn.execute(f'DROP INDEX "{index}"')


# ------------------------------------------------------------------------- not_in_subquery


def test_not_in_subquery_psycopg_extended(proxy: ProxyProcess, pg: PgServer) -> None:
    with connect(proxy) as conn:
        rows = conn.execute(NOT_IN.replace("$1", "%s"), ("spam",)).fetchall()
        assert rows == []  # the NULL in pr_banned: the very trap the advice is about
        conn.commit()
    (found,) = wait_rule(proxy, "not_in_subquery")
    assert found["severity"] == "warning"
    assert found["statement"] == NOT_IN
    assert found["suggested_sql"] == NOT_EXISTS
    assert "NULL" in found["suggestion"] and "anti-join" in found["suggestion"]
    assert_prepares(pg, found["suggested_sql"])


def test_not_in_subquery_psycopg_simple_and_asyncpg(proxy: ProxyProcess, pg: PgServer) -> None:
    with connect(proxy, cursor_factory=psycopg.ClientCursor, autocommit=True) as conn:
        conn.execute(NOT_IN.replace("$1", "%s"), ("abuse",)).fetchall()

    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            await conn.fetch(
                "DELETE FROM pr_banned WHERE user_id NOT IN (SELECT id FROM pr_users) "
                "AND reason = $1",
                "nothing",
            )
        finally:
            await conn.close()

    asyncio.run(main())
    found = {a["statement"]: a for a in wait_rule(proxy, "not_in_subquery", 2)}
    assert found[NOT_IN]["suggested_sql"] == NOT_EXISTS
    delete = found[
        "DELETE FROM pr_banned WHERE user_id NOT IN (SELECT id FROM pr_users) AND reason = $1"
    ]
    assert delete["suggested_sql"] == (
        "DELETE FROM pr_banned WHERE NOT EXISTS "
        "(SELECT 1 FROM pr_users WHERE id = pr_banned.user_id) AND reason = $1"
    )
    for entry in found.values():
        assert_prepares(pg, entry["suggested_sql"])


# ------------------------------------------------------------------------ leading_wildcard


def test_leading_wildcard_psycopg_extended_parameter(proxy: ProxyProcess, pg: PgServer) -> None:
    with connect(proxy, autocommit=True) as conn:
        conn.execute("SELECT id FROM pr_users WHERE name ILIKE %s", ("%user 1",)).fetchall()
    (found,) = wait_rule(proxy, "leading_wildcard")
    assert found["severity"] == "info"  # a 50-row table: well under warn_above
    assert found["statement"] == "SELECT id FROM pr_users WHERE name ILIKE $1"
    assert found["suggested_sql"] == TRIGRAM.format("name")
    assert_trigram_index_runs(pg, found["suggested_sql"])


def test_leading_wildcard_literal_simple_protocol_and_asyncpg(
    proxy: ProxyProcess, pg: PgServer
) -> None:
    with connect(proxy, autocommit=True) as conn:  # a literal in a psql-style Query
        conn.execute("SELECT id FROM pr_users WHERE email NOT LIKE '_@example.com'", prepare=False)

    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            stmt = await conn.prepare("SELECT id FROM pr_users WHERE name ~~ $1 AND id > $2")
            await stmt.fetch("%5", 0)
        finally:
            await conn.close()

    asyncio.run(main())
    found = {a["statement"]: a for a in wait_rule(proxy, "leading_wildcard", 2)}
    email = found["SELECT id FROM pr_users WHERE email NOT LIKE $1"]
    assert email["suggested_sql"] == TRIGRAM.format("email")
    name = found["SELECT id FROM pr_users WHERE name ~~ $1 AND id > $2"]
    assert name["suggested_sql"] == TRIGRAM.format("name")
    assert_trigram_index_runs(pg, email["suggested_sql"])


def test_leading_wildcard_slow_statement_is_a_warning(proxy: ProxyProcess) -> None:
    with connect(proxy, autocommit=True) as conn:
        conn.execute(
            "SELECT id, pg_sleep(0.05) FROM pr_users WHERE name LIKE %s AND id = 1", ("%1",)
        ).fetchall()
    (found,) = wait_rule(proxy, "leading_wildcard")
    assert found["severity"] == "warning"


# ------------------------------------------------------------------------------ healthy


def test_healthy_shapes_stay_silent(proxy: ProxyProcess) -> None:
    not_exists = NOT_EXISTS.replace("$1", "%s")
    with connect(proxy, autocommit=True) as conn:  # extended protocol
        conn.execute(not_exists, ("spam",)).fetchall()
        conn.execute("SELECT id FROM pr_users WHERE id NOT IN (1, 2)").fetchall()
        conn.execute("SELECT id FROM pr_users WHERE id NOT IN (%s, %s)", (1, 2)).fetchall()
        conn.execute("SELECT id FROM pr_users WHERE name LIKE 'abc%%'").fetchall()
        conn.execute("SELECT id FROM pr_users WHERE name LIKE %s", ("abc%",)).fetchall()
        conn.execute("SELECT id FROM pr_users WHERE name ILIKE %s", (None,)).fetchall()
    with connect(proxy, cursor_factory=psycopg.ClientCursor, autocommit=True) as conn:
        conn.execute(not_exists, ("spam",)).fetchall()
        conn.execute("SELECT id FROM pr_users WHERE id NOT IN (%s, %s)", (1, 2)).fetchall()
        conn.execute("SELECT id FROM pr_users WHERE name LIKE %s", ("abc%",)).fetchall()

    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            await conn.fetch(NOT_EXISTS, "spam")
            await conn.fetch("SELECT id FROM pr_users WHERE id <> ALL($1::int[])", [1, 2])
            await conn.fetch("SELECT id FROM pr_users WHERE name LIKE $1", "abc%")
            await conn.fetch("SELECT id FROM pr_users WHERE name LIKE $1 || '%'", "abc")
        finally:
            await conn.close()

    asyncio.run(main())
    settled(proxy)
    assert advice(proxy) == []


# ------------------------------------------------------------------------------ secrets


def test_a_pattern_value_never_leaves_the_proxy(proxy: ProxyProcess) -> None:
    """The secret in LIKE patterns, bound and written, on every client: reported, never shown."""
    secret = uuid.uuid4().hex
    with connect(proxy, autocommit=True) as conn:
        conn.execute("SELECT id FROM pr_users WHERE name LIKE %s", (f"%{secret}",)).fetchall()
        conn.execute(
            "SELECT id FROM pr_users WHERE id NOT IN (SELECT user_id FROM pr_banned "
            "WHERE reason = %s) AND email ILIKE %s",
            (secret, f"_{secret}%"),
        ).fetchall()
    with connect(proxy, cursor_factory=psycopg.ClientCursor, autocommit=True) as conn:
        conn.execute("SELECT id FROM pr_users WHERE email LIKE %s", (f"%{secret}",)).fetchall()

    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            await conn.fetch("SELECT id FROM pr_users WHERE name NOT ILIKE $1", f"%{secret}")
        finally:
            await conn.close()

    asyncio.run(main())
    run_psql(proxy, f"SELECT id FROM pr_users WHERE name ~~* E'%{secret}';\n")
    settled(proxy)

    assert len(advice(proxy, "leading_wildcard")) == 5, advice(proxy)
    assert len(advice(proxy, "not_in_subquery")) == 1
    assert_secret_stays_inside(proxy, secret, logged='"leading_wildcard"')

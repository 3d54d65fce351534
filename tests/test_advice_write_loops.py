"""write_loop, upsert loops and ORM key lookups through real clients and a real pgwarden.

psycopg (sync and async), asyncpg and a SQLAlchemy ORM session run the loops of the seed
reports (004: contacts updated one at a time; 003: batch upserts one row at a time), and
TypeORM's exact statement shapes are sent verbatim. Each suggested statement is prepared on
the test PostgreSQL, and run with the loop's values as arrays on the table as it was before
the loop: it must leave the table as the loop did.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from proxy.rewriters.batching import any_key_write_sql, multirow_insert_sql, unnest_write_sql
from tests.conftest import StartProxy
from tests.support.proxy import ProxyProcess, assert_secret_stays_inside
from tests.support.util import PgServer, wait_until
from tests.test_advice_clients import aconnect, advice, connect, settled

ITEMS = 30
CONTACTS = 12
# TypeORM 0.3 as the seed's services call it, verbatim but for %s
TYPEORM_UPDATE = (
    'UPDATE "wl_contacts" SET "status" = %s, "updatedAt" = CURRENT_TIMESTAMP WHERE "id" IN (%s)'
)
TYPEORM_FIND_ONE = (
    'SELECT "WlContact"."id" AS "WlContact_id", "WlContact"."status" AS "WlContact_status" '
    'FROM "wl_contacts" "WlContact" WHERE (("WlContact"."id" = %s)) LIMIT 1'
)
UPSERT = (
    "INSERT INTO wl_workflows (workflow_id, title) VALUES (%s, %s) "
    "ON CONFLICT (workflow_id) DO UPDATE SET title = EXCLUDED.title, updated_at = now()"
)
CONTACT_IDS = [uuid.UUID(int=i + 1) for i in range(CONTACTS)]


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    pg.psql(
        f"""
        DROP TABLE IF EXISTS wl_items, wl_contacts, wl_workflows;
        CREATE TABLE wl_items (id int PRIMARY KEY, label text NOT NULL, n int NOT NULL);
        CREATE TABLE wl_contacts (
            id uuid PRIMARY KEY, status text NOT NULL, "updatedAt" timestamptz
        );
        CREATE TABLE wl_workflows (
            workflow_id int PRIMARY KEY, title text NOT NULL, updated_at timestamptz
        );
        INSERT INTO wl_items SELECT g, 'item ' || g, g FROM generate_series(1, {ITEMS}) g;
        INSERT INTO wl_contacts
            SELECT ('00000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid, 'ACTIVE', NULL
            FROM generate_series(1, {CONTACTS}) g;
        INSERT INTO wl_workflows SELECT g, 'old ' || g FROM generate_series(1, 5) g;
        """
    )
    yield
    pg.psql("DROP TABLE IF EXISTS wl_items, wl_contacts, wl_workflows")


@pytest.fixture
def proxy(proxy_factory: StartProxy, schema: None, pg: PgServer) -> Iterator[ProxyProcess]:
    """A fresh pgwarden, and the tables as the schema made them after the test."""
    before = {t: rows(pg, t) for t in ("wl_items", "wl_contacts", "wl_workflows")}
    yield proxy_factory()
    with psycopg.connect(pg.dsn()) as conn:
        for table, content in before.items():
            restore(conn, table, content)


# --------------------------------------------------------------------------------- helpers


# what a loop and its batch must leave the same (timestamps differ between them)
COLUMNS = {
    "wl_items": "id, label, n",
    "wl_contacts": "id, status",
    "wl_workflows": "workflow_id, title",
}


def rows(pg: PgServer | psycopg.Connection[Any], table: str) -> list[tuple[Any, ...]]:
    """The table's rows in key order."""
    query = f"SELECT {COLUMNS[table]} FROM {table} ORDER BY 1"
    if isinstance(pg, psycopg.Connection):
        return pg.execute(query).fetchall()
    with psycopg.connect(pg.dsn()) as conn:
        return rows(conn, table)


def restore(conn: psycopg.Connection[Any], table: str, content: list[tuple[Any, ...]]) -> None:
    conn.execute(f"DELETE FROM {table}")
    if content:
        marks = ", ".join(["%s"] * len(content[0]))
        conn.cursor().executemany(
            f"INSERT INTO {table} ({COLUMNS[table]}) VALUES ({marks})", content
        )


def wait_rule(proxy: ProxyProcess, rule: str, count: int = 1) -> list[dict[str, Any]]:
    """The advice of `rule` (most costly first), once `count` of them are there."""
    settled(proxy)
    found = wait_until(
        lambda: len(advice(proxy, rule)) >= count and advice(proxy, rule),
        5.0,
        message=f"{rule}: {advice(proxy)}",
    )
    assert len(found) == count, found
    return list(found)


def assert_batch_does_the_loop(
    pg: PgServer,
    sql: str,
    table: str,
    before: list[tuple[Any, ...]],
    after: list[tuple[Any, ...]],
    *arrays: list[Any],
) -> None:
    """`sql` prepares; run with `arrays` as $1, $2... on `table` as it was `before` the
    loop, it leaves the table as the loop did (`after`), in a transaction rolled back."""
    with psycopg.connect(pg.dsn()) as conn:
        name = f"check_{uuid.uuid4().hex[:8]}"
        conn.execute(f"PREPARE {name} AS {sql}")
        conn.execute(f"DEALLOCATE {name}")
        restore(conn, table, before)
        assert rows(conn, table) == before
        conn.execute(
            re.sub(r"\$(\d+)", r"%(p\1)s", sql), {f"p{i + 1}": a for i, a in enumerate(arrays)}
        )
        assert rows(conn, table) == after
        assert after != before
        conn.rollback()


def assert_prepares(pg: PgServer, sql: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        name = f"check_{uuid.uuid4().hex[:8]}"
        conn.execute(f"PREPARE {name} AS {sql}")
        conn.execute(f"DEALLOCATE {name}")


# ------------------------------------------------------------------------ psycopg sync


def test_psycopg_update_loop_in_a_transaction(proxy: ProxyProcess, pg: PgServer) -> None:
    before = rows(pg, "wl_items")
    keys = list(range(1, 13))
    labels = [f"renamed {k}" for k in keys]
    with connect(proxy) as conn:
        for key, label in zip(keys, labels, strict=True):
            conn.execute("UPDATE wl_items SET label = %s WHERE id = %s", (label, key))
        conn.commit()
    after = rows(pg, "wl_items")
    (found,) = wait_rule(proxy, "write_loop")
    assert found["severity"] == "warning"
    assert found["count"] == 12
    assert found["statement"] == "UPDATE wl_items SET label = $1 WHERE id = $2"
    assert found["tables"] == ["wl_items"]
    assert found["suggested_sql"] == (
        "UPDATE wl_items SET label = v.label "
        "FROM unnest(CAST($1 AS text[]), CAST($2 AS bigint[])) AS v (label, id) "
        "WHERE wl_items.id = v.id"
    )
    evidence = found["evidence"]
    assert evidence["statements"] == 12 and evidence["round_trips"] == 12
    assert evidence["distinct_keys"] == 12 and evidence["in_transaction"] is True
    assert evidence["window_s"] >= 0 and evidence["time_ms"] > 0
    assert_batch_does_the_loop(pg, found["suggested_sql"], "wl_items", before, after, labels, keys)


def test_psycopg_executemany_delete_is_a_pipelined_batch(proxy: ProxyProcess, pg: PgServer) -> None:
    before = rows(pg, "wl_items")
    keys = list(range(11, 26))
    with connect(proxy, autocommit=True) as conn:
        conn.cursor().executemany("DELETE FROM wl_items WHERE id = %s", [(k,) for k in keys])
    after = rows(pg, "wl_items")
    (found,) = wait_rule(proxy, "write_loop")
    assert (found["severity"], found["count"]) == ("info", 15)
    assert "pipelined" in found["suggestion"]
    assert found["evidence"]["in_transaction"] is False
    assert found["evidence"]["round_trips"] < 15
    assert found["suggested_sql"] == "DELETE FROM wl_items WHERE id = ANY($1)"
    assert_batch_does_the_loop(pg, found["suggested_sql"], "wl_items", before, after, keys)


# ----------------------------------------------------------------------- psycopg async


def test_psycopg_async_counter_loop_reads_the_row(proxy: ProxyProcess, pg: PgServer) -> None:
    before = rows(pg, "wl_items")
    keys = list(range(1, 11))
    steps = [k * 10 for k in keys]

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(), connect_timeout=5)
        async with conn:
            for key, step in zip(keys, steps, strict=True):
                await conn.execute("UPDATE wl_items SET n = n + %s WHERE id = %s", (step, key))
            await conn.commit()

    asyncio.run(main())
    after = rows(pg, "wl_items")
    (found,) = wait_rule(proxy, "write_loop")
    assert found["severity"] == "warning"
    assert found["suggested_sql"] == (
        "UPDATE wl_items SET n = wl_items.n + v.n "
        "FROM unnest(CAST($1 AS bigint[]), CAST($2 AS bigint[])) AS v (n, id) "
        "WHERE wl_items.id = v.id"
    )
    assert_batch_does_the_loop(pg, found["suggested_sql"], "wl_items", before, after, steps, keys)


# ----------------------------------------------------------------------------- asyncpg


def test_asyncpg_prepared_update_and_executemany_delete(proxy: ProxyProcess, pg: PgServer) -> None:
    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            async with conn.transaction():
                stmt = await conn.prepare("UPDATE wl_items SET label = $1, n = $2 WHERE id = $3")
                for key in range(1, 11):
                    await stmt.fetch(f"asyncpg {key}", key * 2, key)
            await conn.executemany(
                "DELETE FROM wl_contacts WHERE id = $1", [(k,) for k in CONTACT_IDS]
            )
        finally:
            await conn.close()

    asyncio.run(main())
    found = {a["statement"]: a for a in wait_rule(proxy, "write_loop", 2)}
    loop = found["UPDATE wl_items SET label = $1, n = $2 WHERE id = $3"]
    assert loop["severity"] == "warning" and loop["count"] == 10
    # asyncpg asks for the parameter types: int4 comes back, as bigint arrays
    assert loop["suggested_sql"] == (
        "UPDATE wl_items SET label = v.label, n = v.n "
        "FROM unnest(CAST($1 AS text[]), CAST($2 AS bigint[]), CAST($3 AS bigint[])) "
        "AS v (label, n, id) WHERE wl_items.id = v.id"
    )
    assert_prepares(pg, loop["suggested_sql"])
    batch = found["DELETE FROM wl_contacts WHERE id = $1"]
    assert batch["severity"] == "info" and batch["count"] == CONTACTS
    assert batch["suggested_sql"] == "DELETE FROM wl_contacts WHERE id = ANY($1)"
    assert_prepares(pg, batch["suggested_sql"])


# ------------------------------------------------------------------- SQLAlchemy ORM


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "wl_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str]
    n: Mapped[int]


def test_sqlalchemy_session_loops(proxy: ProxyProcess, pg: PgServer) -> None:
    """An update statement per object in a loop (a warning), and the unit of work's
    flush of changed objects, which executemany pipelines (info)."""
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: connect(proxy), poolclass=NullPool
    )
    with Session(engine) as session:
        for key in range(1, 13):
            session.execute(update(Item).where(Item.id == key).values(n=Item.n * 2))
        session.commit()
        for item in session.scalars(select(Item).where(Item.id > 12)).all():
            item.label = f"flushed {item.id}"
        session.commit()
    engine.dispose()
    found = {a["severity"]: a for a in wait_rule(proxy, "write_loop", 2)}
    loop = found["warning"]
    assert loop["count"] == 12
    assert "wl_items.id = $" in loop["statement"]
    assert loop["suggested_sql"] is not None and "ANY(" in loop["suggested_sql"]
    assert_prepares(pg, loop["suggested_sql"])
    flush = found["info"]
    assert flush["count"] == ITEMS - 12
    assert flush["suggested_sql"] is not None and "unnest(" in flush["suggested_sql"]
    assert_prepares(pg, flush["suggested_sql"])


# ------------------------------------------------------------- TypeORM shapes (seed 004)


def test_typeorm_update_loop_of_seed_004(proxy: ProxyProcess, pg: PgServer) -> None:
    before = rows(pg, "wl_contacts")
    with connect(proxy, autocommit=True) as conn:
        for contact in CONTACT_IDS:
            conn.execute(TYPEORM_UPDATE, ("PAUSED", contact))
    after = rows(pg, "wl_contacts")
    (found,) = wait_rule(proxy, "write_loop")
    assert found["severity"] == "warning" and found["count"] == CONTACTS
    assert found["statement"] == TYPEORM_UPDATE.replace("%s", "$1", 1).replace("%s", "$2")
    assert found["suggested_sql"] == (
        'UPDATE wl_contacts SET status = $1, "updatedAt" = CURRENT_TIMESTAMP WHERE id = ANY($2)'
    )
    assert found["evidence"]["in_transaction"] is False
    assert_batch_does_the_loop(
        pg, found["suggested_sql"], "wl_contacts", before, after, "PAUSED", CONTACT_IDS
    )


def test_typeorm_find_one_loop_is_batched_without_its_limit(
    proxy: ProxyProcess, pg: PgServer
) -> None:
    with connect(proxy) as conn:
        for contact in CONTACT_IDS[:6]:
            conn.execute(TYPEORM_FIND_ONE, (contact,)).fetchone()
        conn.commit()
    (found,) = wait_rule(proxy, "n_plus_one")
    assert found["count"] == 6
    assert found["suggested_sql"] == (
        'SELECT "WlContact".id AS "WlContact_id", "WlContact".status AS "WlContact_status" '
        'FROM wl_contacts AS "WlContact" WHERE "WlContact".id = ANY($1)'
    )
    assert found["evidence"]["distinct_keys"] == 6
    with psycopg.connect(pg.dsn()) as conn:
        sql = found["suggested_sql"].replace("$1", "%s")
        assert len(conn.execute(sql, (CONTACT_IDS[:6],)).fetchall()) == 6


# ------------------------------------------------------------------ upserts (seed 003)


def test_upsert_loop_keeps_on_conflict(proxy: ProxyProcess, pg: PgServer) -> None:
    before = rows(pg, "wl_workflows")
    keys = list(range(1, 11))  # 1..5 exist: updated; 6..10 inserted
    titles = [f"title {k}" for k in keys]
    with connect(proxy) as conn:
        for key, title in zip(keys, titles, strict=True):
            conn.execute(UPSERT, (key, title))
        conn.commit()
    after = rows(pg, "wl_workflows")
    (found,) = wait_rule(proxy, "insert_loop")
    assert found["severity"] == "warning" and found["count"] == 10
    assert found["suggested_sql"] == (
        "INSERT INTO wl_workflows (workflow_id, title) SELECT u.workflow_id, u.title "
        "FROM unnest(CAST($1 AS bigint[]), CAST($2 AS text[])) AS u (workflow_id, title) "
        "ON CONFLICT (workflow_id) DO UPDATE SET title = excluded.title, updated_at = now()"
    )
    assert found["evidence"]["statements"] == 10
    assert_batch_does_the_loop(
        pg, found["suggested_sql"], "wl_workflows", before, after, keys, titles
    )


# ---------------------------------------------------------------------- healthy shapes


def test_healthy_writes_stay_silent(proxy: ProxyProcess) -> None:
    with connect(proxy) as conn:
        conn.execute("UPDATE wl_items SET n = n + 1 WHERE id = %s", (1,))  # one update
        conn.commit()
        for i in range(15):  # the same key again and again
            conn.execute("UPDATE wl_items SET label = %s WHERE id = %s", (f"v{i}", 2))
        conn.commit()
        for i in range(15):  # set-based, by range
            conn.execute("UPDATE wl_items SET n = n + 1 WHERE id BETWEEN %s AND %s", (i, i + 5))
        conn.commit()
        conn.execute("UPDATE wl_items SET n = 0 WHERE id = ANY(%s)", (list(range(1, 20)),))
        conn.commit()

    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            for i in range(15):
                await conn.execute("UPDATE wl_items SET n = $1 WHERE id = $2", i, 3)
        finally:
            await conn.close()

    asyncio.run(main())
    settled(proxy)  # every session ended: its bursts are judged
    assert advice(proxy, "write_loop") == []


# ----------------------------------------------------------------------------- secrets


def test_key_and_values_never_leave_the_proxy(proxy: ProxyProcess) -> None:
    secret = uuid.uuid4().hex
    with connect(proxy) as conn:
        for key in range(1, 11):
            conn.execute("UPDATE wl_items SET label = %s WHERE id = %s", (f"{secret}-{key}", key))
        conn.commit()
    with connect(proxy, cursor_factory=psycopg.ClientCursor, autocommit=True) as conn:
        for key in range(1, 11):
            conn.execute("DELETE FROM wl_contacts WHERE status = %s", (f"{secret}-{key}",))
    wait_rule(proxy, "write_loop", 2)
    assert_secret_stays_inside(proxy, secret, logged='"write_loop"')


# ------------------------------------------------------- every builder shape prepares


@pytest.mark.parametrize(
    "sql",
    [
        unnest_write_sql(
            "UPDATE wl_items AS i SET n = i.n + $1, label = $3::varchar "
            "WHERE i.id = $2 AND label IS NOT NULL RETURNING *",
            {1: 23, 2: 23},
        ),
        unnest_write_sql("DELETE FROM wl_items WHERE id = $1 AND label = $2 RETURNING id", {1: 23}),
        unnest_write_sql("UPDATE wl_items SET id = $1 WHERE id = $2", {1: 21, 2: 20}),
        unnest_write_sql(
            'UPDATE "wl_contacts" SET "status" = $1, "updatedAt" = $2 WHERE "id" IN ($3)',
            {1: 25, 2: 1184, 3: 2950},
        ),
        any_key_write_sql('UPDATE "wl_items" SET "n" = $1 WHERE "label" = $2 AND "id" IN ($3)', 3),
        any_key_write_sql("DELETE FROM wl_contacts WHERE id = $1 RETURNING *", 1),
        multirow_insert_sql(
            "INSERT INTO wl_workflows (workflow_id, title) VALUES ($1, $2) "
            "ON CONFLICT (workflow_id) DO UPDATE SET title = $2 "
            "WHERE wl_workflows.title <> $2 RETURNING workflow_id",
            {1: 23},
        ),
        multirow_insert_sql(
            "INSERT INTO wl_workflows VALUES ($1, $2, now()) ON CONFLICT DO NOTHING", {1: 20}
        ),
    ],
)
def test_builder_shapes_prepare(schema: None, pg: PgServer, sql: str | None) -> None:
    assert sql is not None
    assert_prepares(pg, sql)

"""select_star, unbounded_result and connection_churn through real clients and a real pgwarden.

psycopg (sync and async), asyncpg and the SQLAlchemy ORM against the test PostgreSQL: the
seed shapes are reported (a whole entity with a large JSONB column, an unbounded list, a
connection per request), the healthy ones are not (narrow or explicit columns, LIMIT,
results fetched in chunks, a pool), the suggested SQL prepares on the server, and neither
a parameter, a literal nor a result value leaves the proxy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool, QueuePool

from tests.conftest import StartProxy
from tests.support.proxy import ProxyProcess, assert_secret_stays_inside
from tests.support.util import PgServer, wait_until
from tests.test_advice_clients import aconnect, advice, connect, settled
from tests.test_advice_parse_rules import assert_prepares

DOCS = 40  # rows of about 6 KB each, most of it one JSONB column
EVENTS = 3000  # more than unbounded_result's min_rows (1000)
CHURN = 8  # connection_churn's min_connections in this file's config


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    pg.psql(
        f"""
        DROP TABLE IF EXISTS rr_docs, rr_events, rr_tags;
        CREATE TABLE rr_docs (id int PRIMARY KEY, title text NOT NULL, payload jsonb NOT NULL);
        CREATE TABLE rr_events (id int PRIMARY KEY, kind text NOT NULL, at timestamptz);
        CREATE TABLE rr_tags (id int PRIMARY KEY, name text NOT NULL);
        INSERT INTO rr_docs SELECT g, 'doc ' || g,
            jsonb_build_object('body', repeat(md5(g::text), 190)) FROM generate_series(1, {DOCS}) g;
        INSERT INTO rr_events SELECT g, 'click', now() FROM generate_series(1, {EVENTS}) g;
        INSERT INTO rr_tags SELECT g, 'tag ' || g FROM generate_series(1, 20) g;
        """
    )
    yield
    pg.psql("DROP TABLE IF EXISTS rr_docs, rr_events, rr_tags")


@pytest.fixture
def proxy(proxy_factory: StartProxy, schema: None) -> ProxyProcess:
    """A fresh pgwarden (empty /advice) counting churn from CHURN connections."""
    return proxy_factory({"detectors": {"connection_churn": {"min_connections": CHURN}}})


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "rr_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)


class Event(Base):
    __tablename__ = "rr_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]


def wait_rule(proxy: ProxyProcess, rule: str, count: int) -> dict[str, dict[str, Any]]:
    """The advice of `rule` by statement, once `count` of them are there."""
    found = wait_until(
        lambda: len(advice(proxy, rule)) >= count and advice(proxy, rule),
        5.0,
        message=f"{rule}: {advice(proxy)}",
    )
    assert len(found) == count, found
    return {a["statement"]: a for a in found}


def engine_for(proxy: ProxyProcess, application_name: str = "", **kwargs: Any) -> Any:
    return create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(proxy.dsn(application_name=application_name)),
        **kwargs,
    )


# ------------------------------------------------------------------------- select_star


def test_select_star_psycopg_sync_and_async(proxy: ProxyProcess, pg: PgServer) -> None:
    with connect(proxy, autocommit=True) as conn:
        assert len(conn.execute("SELECT * FROM rr_docs WHERE id > %s", (0,)).fetchall()) == DOCS

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT d.*, t.name FROM rr_docs d JOIN rr_tags t ON t.id = d.id"
            )
            assert len(await cur.fetchall()) == 20

    asyncio.run(main())
    found = wait_rule(proxy, "select_star", 2)
    plain = found["SELECT * FROM rr_docs WHERE id > $1"]
    assert plain["severity"] == "warning"
    assert plain["suggested_sql"] == "SELECT id, title FROM rr_docs WHERE id > $1"
    evidence = plain["evidence"]
    assert evidence["rows"] == DOCS and evidence["avg_row_bytes"] > 6000
    assert evidence["widest_columns"].startswith("payload ")
    assert "payload" in plain["suggestion"]
    joined = found["SELECT d.*, t.name FROM rr_docs d JOIN rr_tags t ON t.id = d.id"]
    assert joined["suggested_sql"] == (
        "SELECT d.id, d.title, t.name FROM rr_docs AS d INNER JOIN rr_tags AS t ON t.id = d.id"
    )
    for entry in found.values():
        assert_prepares(pg, entry["suggested_sql"])


def test_select_star_asyncpg_and_sqlalchemy_orm(proxy: ProxyProcess, pg: PgServer) -> None:
    async def main() -> None:
        conn = await aconnect(proxy)
        try:  # binary results: the lengths are the wire's, as ever
            assert len(await conn.fetch("SELECT * FROM rr_docs WHERE id <= $1", DOCS)) == DOCS
        finally:
            await conn.close()

    asyncio.run(main())
    engine = engine_for(proxy, poolclass=NullPool)
    with Session(engine) as session:
        # raw SQL loaded into entities: SELECT * with every JSONB body
        docs = session.query(Doc).from_statement(text("SELECT * FROM rr_docs")).all()
        assert len(docs) == DOCS
        # the ORM's own entity load lists the columns: explicit, so not this rule's
        assert len(session.query(Doc).all()) == DOCS
    engine.dispose()
    found = wait_rule(proxy, "select_star", 2)
    assert found["SELECT * FROM rr_docs WHERE id <= $1"]["suggested_sql"] == (
        "SELECT id, title FROM rr_docs WHERE id <= $1"
    )
    orm = found["SELECT * FROM rr_docs"]
    assert orm["suggested_sql"] == "SELECT id, title FROM rr_docs"
    for entry in found.values():
        assert_prepares(pg, entry["suggested_sql"])


# -------------------------------------------------------------------- unbounded_result


def test_unbounded_result_psycopg_asyncpg_and_orm(proxy: ProxyProcess, pg: PgServer) -> None:
    with connect(proxy, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, kind FROM rr_events WHERE kind = %s ORDER BY id", ("click",)
        ).fetchall()
        assert len(rows) == EVENTS

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as aconn:
            await (await aconn.execute("SELECT id, at FROM rr_events")).fetchall()
        conn = await aconnect(proxy)
        try:
            await conn.fetch("SELECT id FROM rr_events WHERE id > $1 ORDER BY id DESC", 0)
        finally:
            await conn.close()

    asyncio.run(main())
    engine = engine_for(proxy, poolclass=NullPool)
    with Session(engine) as session:
        assert len(session.query(Event).all()) == EVENTS
    engine.dispose()

    found = wait_rule(proxy, "unbounded_result", 4)
    keyset = found["SELECT id, kind FROM rr_events WHERE kind = $1 ORDER BY id"]
    assert keyset["severity"] == "warning"
    assert keyset["suggested_sql"] == (
        "SELECT id, kind FROM rr_events WHERE kind = $1 AND id > $2 ORDER BY id LIMIT $3"
    )
    evidence = keyset["evidence"]
    assert evidence["rows"] == EVENTS and evidence["bytes"] > EVENTS * 10
    assert evidence["duration_ms"] > 0
    assert found["SELECT id, at FROM rr_events"]["suggested_sql"] == (
        "SELECT id, at FROM rr_events LIMIT $1"
    )
    assert found["SELECT id FROM rr_events WHERE id > $1 ORDER BY id DESC"]["suggested_sql"] == (
        "SELECT id FROM rr_events WHERE id > $1 AND id < $2 ORDER BY id DESC LIMIT $3"
    )
    (orm,) = (a for s, a in found.items() if s.startswith("SELECT rr_events.id"))
    assert orm["suggested_sql"].endswith(" FROM rr_events LIMIT $1")
    for entry in found.values():
        assert_prepares(pg, entry["suggested_sql"])


def test_results_fetched_in_chunks_are_silent(proxy: ProxyProcess) -> None:
    with connect(proxy) as conn:  # a named (server-side) cursor: DECLARE, then FETCH
        with conn.cursor(name="events") as cur:
            cur.itersize = 500
            cur.execute("SELECT id, kind FROM rr_events")
            assert sum(1 for _ in cur) == EVENTS
        conn.commit()
    engine = engine_for(proxy, poolclass=NullPool)
    with Session(engine) as session:  # the ORM streaming with yield_per: the same
        events = session.scalars(select(Event).execution_options(yield_per=400))
        assert sum(1 for _ in events) == EVENTS
    engine.dispose()

    async def main() -> None:
        conn = await aconnect(proxy)
        try:  # a portal executed 2000 rows at a time: suspended, then its last 1000
            async with conn.transaction():
                cursor = conn.cursor("SELECT id FROM rr_events WHERE id > $1", 0, prefetch=2000)
                assert len([r async for r in cursor]) == EVENTS
        finally:
            await conn.close()

    asyncio.run(main())
    settled(proxy)
    assert advice(proxy) == []


# ---------------------------------------------------------------------------- healthy


def test_healthy_shapes_stay_silent(proxy: ProxyProcess) -> None:
    with connect(proxy, autocommit=True) as conn:
        conn.execute("SELECT * FROM rr_tags").fetchall()  # SELECT * of a narrow table
        conn.execute("SELECT id, title FROM rr_docs WHERE id > %s", (0,)).fetchall()
        conn.execute("SELECT id, kind FROM rr_events ORDER BY id LIMIT %s", (5000,)).fetchall()
        conn.execute("SELECT id FROM rr_events FETCH FIRST 2000 ROWS ONLY").fetchall()
        conn.execute("SELECT id FROM rr_events WHERE id < %s", (100,)).fetchall()
        conn.execute("SELECT kind, count(*) FROM rr_events GROUP BY kind").fetchall()
        conn.execute("SELECT attname, attnum FROM pg_attribute").fetchall()  # the catalog

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as aconn:
            await (await aconn.execute("SELECT * FROM rr_events LIMIT 3000")).fetchall()
        conn = await aconnect(proxy)
        try:
            await conn.fetch("SELECT * FROM rr_tags WHERE id > $1", 0)
            await conn.fetch("SELECT count(*), max(id) FROM rr_events")
        finally:
            await conn.close()

    asyncio.run(main())
    settled(proxy)
    assert advice(proxy) == []


# -------------------------------------------------------------------- connection_churn


def test_connection_churn_a_connection_per_request(proxy: ProxyProcess) -> None:
    for i in range(CHURN + 2):  # psycopg, one connection per "request"
        with psycopg.connect(proxy.dsn(application_name="orders-api"), autocommit=True) as conn:
            conn.execute("SELECT title FROM rr_docs WHERE id = %s", (i + 1,)).fetchone()
    engine = engine_for(proxy, "reports", poolclass=NullPool)  # SQLAlchemy without a pool
    for i in range(CHURN):
        with Session(engine) as session:
            session.get(Doc, i + 1)
    engine.dispose()

    async def main() -> None:
        for i in range(CHURN):
            conn = await asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user="postgres",
                database="postgres",
                server_settings={"application_name": "async-api"},
            )
            await conn.fetchval("SELECT name FROM rr_tags WHERE id = $1", i + 1)
            await conn.close()

    asyncio.run(main())
    found = wait_rule(proxy, "connection_churn", 3)
    by_app = {a["application_name"]: a for a in found.values()}
    orders = by_app["orders-api"]
    assert orders["severity"] == "warning"
    assert orders["fingerprint"] == "connection:orders-api"
    assert orders["statement"] == "SELECT title FROM rr_docs WHERE id = $1"
    assert orders["suggested_sql"] is None
    assert "pool" in orders["suggestion"]
    evidence = orders["evidence"]
    assert evidence["connections"] == CHURN
    assert 0 < evidence["median_lifetime_ms"] <= evidence["max_lifetime_ms"] < 1000
    assert evidence["window_s"] < 10 and evidence["rate_per_s"] > 0
    assert orders["occurrences"] == 1  # once a window, though 10 connections came
    assert by_app["reports"]["fingerprint"] == "connection:reports"
    assert by_app["reports"]["statement"].startswith("SELECT rr_docs.id")
    assert by_app["async-api"]["statement"] == "SELECT name FROM rr_tags WHERE id = $1"


def test_connection_churn_pools_and_long_connections_are_silent(proxy: ProxyProcess) -> None:
    engine = engine_for(proxy, "pooled", poolclass=QueuePool, pool_size=3)
    for i in range(30):  # 30 requests served by the pool's connections
        with Session(engine) as session:
            session.get(Doc, i % DOCS + 1)
    engine.dispose()
    with psycopg.connect(proxy.dsn(application_name="loop"), autocommit=True) as conn:
        for i in range(30):  # one connection reused
            conn.execute("SELECT title FROM rr_docs WHERE id = %s", (i % DOCS + 1,)).fetchone()

    async def main() -> None:
        # 2 * CHURN connections open at once, each living longer than max_lifetime (1s)
        conns = [
            await psycopg.AsyncConnection.connect(proxy.dsn(application_name="long"))
            for _ in range(2 * CHURN)
        ]
        await asyncio.sleep(1.1)
        for conn in conns:
            await conn.close()

    asyncio.run(main())
    settled(proxy)
    assert advice(proxy, "connection_churn") == []


# ----------------------------------------------------------------------------- secrets


def test_values_never_leave_the_proxy(proxy: ProxyProcess) -> None:
    """A secret as a literal, a parameter and a result value of both rules' statements."""
    secret = uuid.uuid4().hex
    with connect(proxy, cursor_factory=psycopg.ClientCursor, autocommit=True) as conn:
        conn.execute(
            "SELECT *, %s AS note FROM rr_docs WHERE title <> %s", (secret, secret)
        ).fetchall()

    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            await conn.fetch("SELECT id, $1::text AS tag FROM rr_events", secret)
        finally:
            await conn.close()

    asyncio.run(main())
    star = wait_rule(proxy, "select_star", 1)
    assert star["SELECT *, $1 AS note FROM rr_docs WHERE title <> $2"]["suggested_sql"] == (
        "SELECT id, title, $1 AS note FROM rr_docs WHERE title <> $2"
    )
    wait_rule(proxy, "unbounded_result", 1)
    assert_secret_stays_inside(proxy, secret, logged='"unbounded_result"')
    assert_secret_stays_inside(proxy, secret, logged='"select_star"')

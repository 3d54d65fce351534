"""repeated_read and catalog_polling through real clients and a real pgwarden.

Both rules look across the connections of one application (database, user and
application_name): psycopg over several connections, an asyncpg pool and SQLAlchemy's
ORM repeat a read; a pooled connection checks information_schema before every insert.
The healthy shapes stay silent, among them what drivers ask once per connection
(asyncpg's type introspection, SQLAlchemy's start-up checks, psql's `\\d`), however many
connections they open. A value read again and again never leaves the proxy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool, QueuePool

from proxy.tools.pgcluster import find_bindir
from tests.conftest import StartProxy
from tests.support.proxy import ProxyProcess, assert_secret_stays_inside, pgwarden
from tests.support.util import PgServer, wait_until
from tests.test_advice_clients import settled

MAPPING = "SELECT source, target FROM ar_mappings WHERE project_id = $1 ORDER BY source"
EXISTS = (
    "SELECT EXISTS (SELECT FROM information_schema.tables "
    "WHERE table_schema = $1 AND table_name = $2)"
)
RULES = ("repeated_read", "catalog_polling")


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    pg.psql(
        """
        DROP TABLE IF EXISTS ar_mappings, ar_events, ar_settings;
        DROP TYPE IF EXISTS ar_mood;
        CREATE TYPE ar_mood AS ENUM ('calm', 'busy');
        CREATE TABLE ar_mappings (
            id int PRIMARY KEY, project_id int NOT NULL, source text NOT NULL,
            target text NOT NULL
        );
        CREATE TABLE ar_events (
            id serial PRIMARY KEY, project_id int NOT NULL, mood ar_mood, payload jsonb
        );
        CREATE TABLE ar_settings (key text PRIMARY KEY, value text NOT NULL);
        INSERT INTO ar_mappings
            SELECT g, g % 4, 'col_' || g, 'field_' || g FROM generate_series(1, 40) g;
        INSERT INTO ar_events (project_id, mood, payload)
            SELECT g % 4, 'calm', '{"n": 1}' FROM generate_series(1, 8) g;
        """
    )
    yield
    pg.psql("DROP TABLE IF EXISTS ar_mappings, ar_events, ar_settings; DROP TYPE ar_mood")


@pytest.fixture
def proxy(proxy_factory: StartProxy, schema: None) -> ProxyProcess:
    """A fresh pgwarden with the default detectors, so /advice starts empty."""
    return proxy_factory()


def advice(proxy: ProxyProcess, rule: str | None = None) -> list[dict[str, Any]]:
    status, body = proxy.http_get("/advice")
    assert status == 200, body
    return [a for a in json.loads(body)["advice"] if rule is None or a["rule"] == rule]


def wait_rule(proxy: ProxyProcess, rule: str, count: int = 1) -> list[dict[str, Any]]:
    """The advice of `rule`, once `count` of them are there (and no more)."""

    def enough() -> list[dict[str, Any]]:
        entries = advice(proxy, rule)
        return entries if len(entries) >= count else []

    found = wait_until(enough, 5.0, message=f"{rule}: {advice(proxy)}")
    assert len(found) == count, found
    return found


def ours(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The advice of these two rules, once every session has ended and been analysed."""
    settled(proxy)
    return [a for a in advice(proxy) if a["rule"] in RULES]


def connect(proxy: ProxyProcess, app: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        proxy.dsn(application_name=app), connect_timeout=5, autocommit=True, **kwargs
    )


async def pool(proxy: ProxyProcess, app: str, size: int, **kwargs: Any) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        host=proxy.host,
        port=proxy.port,
        user="postgres",
        database="postgres",
        min_size=size,
        max_size=size,
        server_settings={"application_name": app},
        **kwargs,
    )


def psycopg_reads(proxy: ProxyProcess, app: str, times: int, project: int = 1) -> None:
    """`times` reads of one project's mappings, round robin over three connections."""
    connections = [connect(proxy, app) for _ in range(3)]
    try:
        for i in range(times):
            rows = connections[i % 3].execute(MAPPING.replace("$1", "%s"), (project,))
            assert len(rows.fetchall()) == 10
    finally:
        for conn in connections:
            conn.close()


def psql(proxy: ProxyProcess, app: str, command: str) -> None:
    """One run of `psql -c COMMAND` through the proxy as application `app`."""
    binary = shutil.which("psql") or str(find_bindir() / "psql")
    subprocess.run(
        [binary, "-X", "-q", "-d", proxy.dsn(application_name=app), "-c", command],
        capture_output=True,
        timeout=30,
        check=True,
    )


# ------------------------------------------------------------------------- repeated_read


def test_psycopg_connections_of_one_application_reading_the_same_mappings(
    proxy: ProxyProcess,
) -> None:
    psycopg_reads(proxy, "mapper", 12)
    (found,) = wait_rule(proxy, "repeated_read")
    assert found["severity"] == "info"
    assert found["statement"] == MAPPING
    assert found["tables"] == ["ar_mappings"]
    assert found["application_name"] == "mapper"
    assert found["count"] == 10 and found["suggested_sql"] is None
    evidence = found["evidence"]
    assert evidence["repeats"] == 10 and evidence["connections"] == 3
    assert evidence["window_s"] == 60.0 and evidence["time_ms"] > 0
    assert "10 times in" in found["suggestion"] and "over 3 connections" in found["suggestion"]
    assert "Cache" in found["suggestion"]

    shown = pgwarden("advice", "--admin", proxy.admin_url, "--rule", "repeated_read")
    assert shown.returncode == 0, shown.stderr
    assert "evidence: repeats 10, window_s 60.0" in shown.stdout
    assert "connections 3" in shown.stdout

    psycopg_reads(proxy, "importer", 10)  # another application: an advice of its own
    found = {a["application_name"]: a for a in wait_rule(proxy, "repeated_read", 2)}
    assert set(found) == {"mapper", "importer"}
    assert found["importer"]["fingerprint"] == found["mapper"]["fingerprint"]


def test_asyncpg_pool_psycopg_async_and_sqlalchemy_orm_repeated_get(proxy: ProxyProcess) -> None:
    async def main() -> None:
        readers = await pool(proxy, "async-mapper", 4)
        try:
            for _ in range(3):
                await asyncio.gather(*(readers.fetch(MAPPING, 2) for _ in range(4)))
        finally:
            await readers.close()
        connections = [
            await psycopg.AsyncConnection.connect(
                proxy.dsn(application_name="async-psycopg"), autocommit=True
            )
            for _ in range(2)
        ]
        try:
            for i in range(10):
                cursor = await connections[i % 2].execute(MAPPING.replace("$1", "%s"), (0,))
                assert len(await cursor.fetchall()) == 10
        finally:
            for conn in connections:
                await conn.close()

    asyncio.run(main())

    class Base(DeclarativeBase):
        pass

    class Setting(Base):
        __tablename__ = "ar_settings"
        key: Mapped[str] = mapped_column(primary_key=True)
        value: Mapped[str]

    with connect(proxy, "orm") as conn:
        conn.execute("INSERT INTO ar_settings VALUES ('theme', 'dark') ON CONFLICT DO NOTHING")
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(proxy.dsn(application_name="orm"), connect_timeout=5),
        poolclass=QueuePool,
        pool_size=2,
    )
    for _ in range(12):  # one ORM session per request: no identity map between them
        with Session(engine) as session:
            setting = session.get(Setting, "theme")
            assert setting is not None and setting.value == "dark"
    engine.dispose()

    found = {a["application_name"]: a for a in wait_rule(proxy, "repeated_read", 3)}
    assert found["async-mapper"]["statement"] == MAPPING
    assert found["async-mapper"]["evidence"]["connections"] == 4
    assert found["async-psycopg"]["statement"] == MAPPING
    assert found["async-psycopg"]["evidence"]["connections"] == 2
    orm = found["orm"]
    assert orm["tables"] == ["ar_settings"]
    assert "ar_settings.key = $1" in orm["statement"]
    assert orm["count"] == 10


def test_healthy_reads_stay_silent(proxy: ProxyProcess) -> None:
    with connect(proxy, "healthy") as conn, connect(proxy, "healthy") as other:
        for project in range(3):  # different keys
            for _ in range(3):
                conn.execute(MAPPING.replace("$1", "%s"), (project,)).fetchall()
        for i in range(20):
            conn.execute("SELECT source FROM ar_mappings WHERE id = %s", (i + 1,)).fetchall()
        for _ in range(9):  # fewer than min_repeats
            conn.execute(MAPPING.replace("$1", "%s"), (3,)).fetchall()
        other.execute("INSERT INTO ar_settings VALUES ('k', 'v') ON CONFLICT DO NOTHING")
        for _ in range(2):  # a write from another connection in between: counted again
            for _ in range(8):
                conn.execute("SELECT value FROM ar_settings WHERE key = %s", ("k",)).fetchall()
            other.execute("UPDATE ar_settings SET value = value WHERE key = 'k'")
        for _ in range(20):  # health checks, and what has no table
            conn.execute("SELECT 1").fetchall()
            conn.execute("SELECT now()").fetchall()
        for _ in range(12):  # nothing found: a poll for work that has not come
            conn.execute("SELECT id FROM ar_events WHERE project_id = %s", (99,)).fetchall()
        for _ in range(12):  # a locking read
            with conn.transaction():
                conn.execute("SELECT id FROM ar_mappings WHERE id = 1 FOR UPDATE").fetchall()
    assert ours(proxy) == []


def test_a_repeated_secret_value_never_leaves_the_proxy(proxy: ProxyProcess) -> None:
    secret = uuid.uuid4().hex
    with connect(proxy, "secretive") as conn:
        conn.execute("INSERT INTO ar_settings VALUES (%s, 'x')", (secret,))
        for _ in range(10):
            conn.execute("SELECT value FROM ar_settings WHERE key = %s", (secret,)).fetchall()
    with connect(proxy, "secretive-simple", cursor_factory=psycopg.ClientCursor) as conn:
        for _ in range(10):
            conn.execute("SELECT value FROM ar_settings WHERE key = %s", (secret,)).fetchall()
    assert len(wait_rule(proxy, "repeated_read", 2)) == 2
    assert_secret_stays_inside(proxy, secret, logged='"repeated_read"')


# ----------------------------------------------------------------------- catalog_polling


def test_existence_check_before_every_insert_on_a_pooled_connection(proxy: ProxyProcess) -> None:
    with connect(proxy, "writer") as conn:  # one connection, as a pool hands it out
        for i in range(10):
            (exists,) = conn.execute(
                EXISTS.replace("$1", "%s").replace("$2", "%s"), ("public", "ar_events")
            ).fetchone()
            assert exists
            conn.execute("INSERT INTO ar_events (project_id) VALUES (%s)", (i,))
    (found,) = wait_rule(proxy, "catalog_polling")
    assert found["severity"] == "warning"
    assert found["statement"] == EXISTS
    assert found["tables"] == ["information_schema.tables"]
    assert found["application_name"] == "writer"
    assert found["count"] == 5 and found["suggested_sql"] is None
    assert found["evidence"]["repeats"] == 5 and found["evidence"]["connections"] == 1
    assert "once at start-up" in found["suggestion"]
    assert not advice(proxy, "repeated_read")  # the catalogs are catalog_polling's

    # SQLAlchemy's has_table before each write, on a pool of one: the same, found the same
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(proxy.dsn(application_name="orm-writer")),
        poolclass=QueuePool,
        pool_size=1,
    )
    for i in range(8):
        with engine.begin() as conn:
            assert inspect(conn).has_table("ar_events")
            conn.execute(text("INSERT INTO ar_events (project_id) VALUES (:p)"), {"p": i})
    engine.dispose()
    found = {a["application_name"]: a for a in wait_rule(proxy, "catalog_polling", 2)}
    assert "pg_catalog.pg_class" in found["orm-writer"]["tables"]


def test_drivers_start_up_and_introspection_queries_stay_silent(proxy: ProxyProcess) -> None:
    """One application_name for all: asyncpg connections introspecting a custom type and
    setting a jsonb codec once each, SQLAlchemy engines connecting again and again, and
    psql's `\\d` run after run."""
    app = "boot"

    async def set_codec(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )

    async def main() -> None:
        for _ in range(2):  # two pools, like two restarts of the application
            workers = await pool(proxy, app, 8, init=set_codec)
            try:
                held = [await workers.acquire() for _ in range(8)]
                for n, conn in enumerate(held):  # each connection meets the enum once
                    rows = await conn.fetch(
                        "SELECT mood, payload FROM ar_events WHERE id = $1", n + 1
                    )
                    assert rows[0]["mood"] == "calm" and rows[0]["payload"] == {"n": 1}
                for conn in held:
                    await workers.release(conn)
            finally:
                await workers.close()

    asyncio.run(main())

    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(proxy.dsn(application_name=app)),
        poolclass=NullPool,
    )
    for _ in range(8):  # a connection per use
        with engine.connect() as conn:
            conn.execute(text("SELECT count(*) FROM ar_events")).scalar()
    engine.dispose()
    for _ in range(6):  # a script run again and again: a new engine each time
        engine = create_engine(
            "postgresql+psycopg://",
            creator=lambda: psycopg.connect(proxy.dsn(application_name=app)),
            poolclass=NullPool,
        )
        with engine.connect() as conn:
            assert inspect(conn).has_table("ar_events")
        engine.dispose()

    for _ in range(6):
        psql(proxy, app, "\\d ar_events")
    assert ours(proxy) == []
    # not for want of catalog queries: each ran on one connection after another
    status, body = proxy.http_get("/fingerprints?application_name=boot")
    assert status == 200, body
    catalog = [
        f["calls"]
        for f in json.loads(body)["fingerprints"]
        if "pg_catalog." in f["statement"] or "pg_type" in f["statement"]
    ]
    assert len([calls for calls in catalog if calls >= 6]) >= 5, catalog

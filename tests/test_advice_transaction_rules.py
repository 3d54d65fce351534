"""unwrapped_writes, check_then_write and long_transaction through real clients and a real
pgwarden: psycopg sync (autocommit, and its default of opening transactions implicitly)
and async, asyncpg, SQLAlchemy ORM. The seed shapes are reported, the healthy ones are
not, the suggested SQL is valid on the test PostgreSQL, and no key value leaves the proxy.

One pgwarden for the module (long_transaction's threshold at 1s); each test runs as its
own application_name and reads only its own advice.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from pglast.parser import split
from sqlalchemy import create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from tests.support.proxy import ProxyProcess, assert_secret_stays_inside, launch_with_defaults
from tests.support.util import PgServer, wait_until
from tests.test_advice_clients import settled

CONFIG = {"detectors": {"long_transaction": {"threshold": "1s"}}}
READ = "SELECT id, balance FROM txr_accounts WHERE id = $1"
WRITE = "UPDATE txr_accounts SET balance = $1 WHERE id = $2"
LOOKUP = "SELECT id FROM txr_applications WHERE candidate_id = $1 AND job_id = $2"
INSERT = "INSERT INTO txr_applications (candidate_id, job_id, note) VALUES ($1, $2, $3)"
ENRICH = [
    "INSERT INTO txr_processed (employee_id, data) VALUES ($1, $2)",
    "DELETE FROM txr_projects WHERE employee_id = $1",
    "INSERT INTO txr_projects (employee_id, title) VALUES ($1, $2)",
    "UPDATE txr_employees SET bio = $1 WHERE id = $2",
]


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    pg.psql(
        """
        DROP TABLE IF EXISTS txr_accounts, txr_applications, txr_processed, txr_projects,
            txr_employees;
        CREATE TABLE txr_accounts (id int PRIMARY KEY, balance int NOT NULL);
        CREATE TABLE txr_applications (
            id serial PRIMARY KEY, candidate_id int NOT NULL, job_id text NOT NULL, note text
        );
        CREATE TABLE txr_processed (employee_id int NOT NULL, data text);
        CREATE TABLE txr_projects (employee_id int NOT NULL, title text);
        CREATE TABLE txr_employees (id int PRIMARY KEY, bio text);
        INSERT INTO txr_accounts SELECT g, 100 FROM generate_series(1, 50) g;
        INSERT INTO txr_employees SELECT g, '' FROM generate_series(1, 50) g;
        """
    )
    yield
    pg.psql(
        "DROP TABLE IF EXISTS txr_accounts, txr_applications, txr_processed, txr_projects, "
        "txr_employees"
    )


@pytest.fixture(scope="module")
def proxy(
    pg: PgServer, schema: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = launch_with_defaults(pg, tmp_path_factory.mktemp("txr"), "proxy", CONFIG)
    yield process
    process.stop()


# --------------------------------------------------------------------------------- helpers


def app_name() -> str:
    return f"txr-{uuid.uuid4().hex[:8]}"


def advice(proxy: ProxyProcess, app: str, rule: str | None = None) -> list[dict[str, Any]]:
    """The advice of application `app` (of `rule`) on /advice."""
    query = {"application_name": app, **({"rule": rule} if rule else {})}
    status, body = proxy.http_get(f"/advice?{urllib.parse.urlencode(query)}")
    assert status == 200, body
    return list(json.loads(body)["advice"])


def wait_rule(proxy: ProxyProcess, app: str, rule: str, count: int = 1) -> list[dict[str, Any]]:
    """The advice of `rule` for `app`, once `count` of them are there."""

    def enough() -> list[dict[str, Any]]:
        found = advice(proxy, app, rule)
        return found if len(found) >= count else []

    found = wait_until(enough, 10.0, message=f"{rule} of {app}: {advice(proxy, app)}")
    assert len(found) == count, found
    return found


def silent(proxy: ProxyProcess, app: str, *rules: str) -> None:
    """Once every session has ended (and been judged), `app` has no advice of `rules`."""
    settled(proxy)
    found = [a for a in advice(proxy, app) if a["rule"] in rules]
    assert found == [], found
    assert "detector_failed" not in proxy.log_text()  # silent by judgement, not by a crash


def connect(proxy: ProxyProcess, app: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(application_name=app), connect_timeout=5, **kwargs)


async def aconnect(proxy: ProxyProcess, app: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user="postgres",
        database="postgres",
        timeout=5,
        server_settings={"application_name": app},
    )


def assert_prepares_in_rolled_back_transaction(pg: PgServer, sql: str) -> None:
    """Each statement of `sql` is valid on the test server: DDL run, statements with `$n`
    PREPAREd (which types them), all inside a transaction that is rolled back."""
    with psycopg.connect(pg.dsn()) as conn:  # a transaction opened by the first statement
        for statement in split(sql):
            head = statement.split(None, 1)[0].upper()
            if head in ("BEGIN", "COMMIT"):
                continue
            if head == "ALTER":
                conn.execute(statement)
            else:
                name = f"check_{uuid.uuid4().hex[:8]}"
                conn.execute(f"PREPARE {name} AS {statement}")
        conn.rollback()


# ------------------------------------------------------------------------ unwrapped_writes


def enrich(conn: psycopg.Connection[Any], employee: int, secret: str) -> None:
    """Seed 000's enrichment: several tables written one statement at a time."""
    conn.execute(ENRICH[0].replace("$1", "%s").replace("$2", "%s"), (employee, secret))
    conn.execute(ENRICH[1].replace("$1", "%s"), (employee,))
    for title in ("a", "b"):
        conn.execute(ENRICH[2].replace("$1", "%s").replace("$2", "%s"), (employee, title))
    conn.execute("SELECT bio FROM txr_employees WHERE id = %s", (employee,)).fetchone()
    conn.execute(ENRICH[3].replace("$1", "%s").replace("$2", "%s"), (secret, employee))


def test_unwrapped_writes_psycopg_autocommit(proxy: ProxyProcess, pg: PgServer) -> None:
    app, secret = app_name(), uuid.uuid4().hex
    with connect(proxy, app, autocommit=True) as conn:
        enrich(conn, 7, secret)
    (found,) = wait_rule(proxy, app, "unwrapped_writes")
    assert found["severity"] == "warning"
    assert found["count"] == 5
    assert found["statement"] == ENRICH[0]
    assert found["tables"] == ["txr_processed", "txr_projects", "txr_employees"]
    assert found["suggested_sql"] == f"BEGIN; {'; '.join(ENRICH)}; COMMIT;"
    assert "INSERT INTO txr_projects (2 times); UPDATE txr_employees." in found["suggestion"]
    assert found["evidence"]["writes"] == 5 and found["evidence"]["tables"] == 3
    assert found["evidence"]["round_trips"] == 5 and found["evidence"]["window_s"] == 1.0
    assert_prepares_in_rolled_back_transaction(pg, found["suggested_sql"])
    assert_secret_stays_inside(proxy, secret, logged='"unwrapped_writes"')


def test_unwrapped_writes_asyncpg_without_a_transaction(proxy: ProxyProcess) -> None:
    app = app_name()

    async def main() -> None:
        conn = await aconnect(proxy, app)
        try:
            await conn.execute("UPDATE txr_accounts SET balance = $1 WHERE id = $2", 5, 3)
            await conn.execute(ENRICH[0], 3, "x")
        finally:
            await conn.close()

    asyncio.run(main())
    (found,) = wait_rule(proxy, app, "unwrapped_writes")
    assert found["tables"] == ["txr_accounts", "txr_processed"]


def test_unwrapped_writes_healthy_shapes_stay_silent(proxy: ProxyProcess) -> None:
    app = app_name()
    with connect(proxy, app) as conn:  # psycopg's default: a transaction opened implicitly
        enrich(conn, 8, "x")
        conn.commit()
    with connect(proxy, app, autocommit=True) as conn:
        with conn.transaction():  # BEGIN ... COMMIT
            enrich(conn, 9, "x")
        conn.execute(ENRICH[3].replace("$1", "%s").replace("$2", "%s"), ("x", 9))  # one write
        for employee in range(10, 14):  # several to one table: the loop rules' business
            conn.execute(ENRICH[3].replace("$1", "%s").replace("$2", "%s"), ("x", employee))
    with connect(proxy, app, autocommit=True) as conn:
        # one multi-statement Query: one implicit transaction
        conn.execute(
            "INSERT INTO txr_processed (employee_id, data) VALUES (1, 'x'); "
            "UPDATE txr_employees SET bio = 'y' WHERE id = 1"
        )
    with connect(proxy, app, autocommit=True) as conn, conn.pipeline():
        # one pipeline before one Sync: one implicit transaction
        conn.execute(ENRICH[0].replace("$1", "%s").replace("$2", "%s"), (2, "x"))
        conn.execute(ENRICH[3].replace("$1", "%s").replace("$2", "%s"), ("x", 2))

    async def main() -> None:
        conn = await aconnect(proxy, app)
        try:
            async with conn.transaction():
                await conn.execute(ENRICH[0], 3, "x")
                await conn.execute(ENRICH[3], "x", 3)
        finally:
            await conn.close()

    asyncio.run(main())
    silent(proxy, app, "unwrapped_writes")


# ------------------------------------------------------------------------ check_then_write


def test_check_then_update_psycopg_default_transaction(proxy: ProxyProcess, pg: PgServer) -> None:
    """Seed 000: check-then-update without row locking, in the transaction psycopg opens."""
    app = app_name()
    with connect(proxy, app) as conn:
        _, balance = conn.execute(READ.replace("$1", "%s"), (11,)).fetchone()  # type: ignore[misc]
        conn.execute(WRITE.replace("$1", "%s").replace("$2", "%s"), (balance - 10, 11))
        conn.commit()
    (found,) = wait_rule(proxy, app, "check_then_write")
    assert found["severity"] == "warning"
    assert found["statement"] == READ
    assert found["tables"] == ["txr_accounts"]
    assert found["suggested_sql"] == f"{READ} FOR UPDATE"
    assert found["evidence"] == {
        "race": "lost_update",
        "statements_apart": 1,
        "in_transaction": 1,
        "isolation": "read committed",
    }
    assert "Lost update" in found["suggestion"]
    assert_prepares_in_rolled_back_transaction(pg, found["suggested_sql"])


def test_check_then_insert_psycopg_async(proxy: ProxyProcess, pg: PgServer) -> None:
    """Seed 001: duplicate rows from check-then-insert, the key a secret never shown."""
    app, secret = app_name(), uuid.uuid4().hex

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(application_name=app), connect_timeout=5
        ) as conn:
            cur = await conn.execute(LOOKUP.replace("$1", "%s").replace("$2", "%s"), (42, secret))
            assert await cur.fetchone() is None
            await conn.execute(
                INSERT.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"),
                (42, secret, "applied"),
            )
            await conn.commit()

    asyncio.run(main())
    (found,) = wait_rule(proxy, app, "check_then_write")
    assert found["statement"] == INSERT
    assert found["suggested_sql"] == (
        "ALTER TABLE txr_applications ADD CONSTRAINT txr_applications_candidate_id_job_id_key "
        f"UNIQUE (candidate_id, job_id); {INSERT} ON CONFLICT (candidate_id, job_id) DO NOTHING"
    )
    assert found["evidence"]["race"] == "duplicate_insert"
    assert "Duplicate-row race" in found["suggestion"]
    assert_prepares_in_rolled_back_transaction(pg, found["suggested_sql"])
    assert_secret_stays_inside(proxy, secret, logged='"check_then_write"')


def test_check_then_update_simple_protocol_literals(proxy: ProxyProcess, pg: PgServer) -> None:
    """The key written into the SQL text (psycopg's ClientCursor): compared in memory as the
    literal it is, never shown."""
    app, secret = app_name(), uuid.uuid4().hex
    pg.psql(f"INSERT INTO txr_applications (candidate_id, job_id) VALUES (1, '{secret}')")
    with connect(proxy, app, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute(
            "SELECT id, note FROM txr_applications WHERE job_id = %s", (secret,)
        ).fetchone()
        conn.execute("UPDATE txr_applications SET note = %s WHERE job_id = %s", ("x", secret))
        conn.commit()
    (found,) = wait_rule(proxy, app, "check_then_write")
    assert found["statement"] == "SELECT id, note FROM txr_applications WHERE job_id = $1"
    assert found["suggested_sql"] == f"{found['statement']} FOR UPDATE"
    assert_prepares_in_rolled_back_transaction(pg, found["suggested_sql"])
    assert_secret_stays_inside(proxy, secret, logged='"check_then_write"')


def test_check_then_write_asyncpg(proxy: ProxyProcess) -> None:
    """In `async with conn.transaction()`: reported at READ COMMITTED, silent at REPEATABLE
    READ, the same statements both times."""
    app, careful = app_name(), app_name()

    async def run(app: str, **isolation: str) -> None:
        conn = await aconnect(proxy, app)
        try:
            async with conn.transaction(**isolation):
                row = await conn.fetchrow(READ, 12)
                await conn.execute(WRITE, row["balance"] + 1, 12)
        finally:
            await conn.close()

    asyncio.run(run(app))
    asyncio.run(run(careful, isolation="repeatable_read"))
    (found,) = wait_rule(proxy, app, "check_then_write")
    assert found["statement"] == READ
    silent(proxy, careful, "check_then_write")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "txr_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


def test_check_then_write_sqlalchemy_orm(proxy: ProxyProcess, pg: PgServer) -> None:
    """The ORM's read-modify-write by primary key is the race; with_for_update() is not."""
    app, locking = app_name(), app_name()
    for name in (app, locking):
        engine = create_engine(
            "postgresql+psycopg://", creator=lambda n=name: connect(proxy, n), poolclass=NullPool
        )
        with Session(engine) as session:
            query = select(Account).where(Account.id == 13)
            account = session.scalars(query.with_for_update() if name == locking else query).one()
            account.balance -= 5
            session.commit()
        engine.dispose()
    (found,) = wait_rule(proxy, app, "check_then_write")
    assert found["statement"] == (
        "SELECT txr_accounts.id, txr_accounts.balance \nFROM txr_accounts \n"
        "WHERE txr_accounts.id = $1::INTEGER"
    )
    assert found["suggested_sql"] == (
        "SELECT txr_accounts.id, txr_accounts.balance FROM txr_accounts "
        "WHERE txr_accounts.id = CAST($1 AS integer) FOR UPDATE"
    )
    assert_prepares_in_rolled_back_transaction(pg, found["suggested_sql"])
    silent(proxy, locking, "check_then_write")


def test_check_then_write_healthy_shapes_stay_silent(proxy: ProxyProcess) -> None:
    app = app_name()
    read, write = READ.replace("$1", "%s"), WRITE.replace("$1", "%s").replace("$2", "%s")
    lookup = LOOKUP.replace("$1", "%s").replace("$2", "%s")
    insert = INSERT.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")
    with connect(proxy, app) as conn:
        conn.execute(f"{read} FOR UPDATE", (14,)).fetchone()  # locked
        conn.execute(write, (1, 14))
        conn.commit()
        conn.execute(read, (15,)).fetchone()  # atomic: computed by the UPDATE
        conn.execute("UPDATE txr_accounts SET balance = balance + %s WHERE id = %s", (1, 15))
        conn.commit()
        conn.execute(read, (16,)).fetchone()  # another row
        conn.execute(write, (1, 17))
        conn.commit()
        conn.execute(lookup, (43, "j")).fetchone()  # ON CONFLICT (no constraint needed here)
        conn.execute(f"{insert} ON CONFLICT DO NOTHING", (43, "j", "n"))
        conn.commit()
    with connect(proxy, app, autocommit=True) as conn:  # no transaction ties them
        conn.execute(read, (18,)).fetchone()
        conn.execute(write, (1, 18))
        conn.execute(lookup, (44, "j")).fetchone()
        conn.execute(insert, (44, "j", "n"))
    with connect(proxy, app) as conn:  # SERIALIZABLE as the session's default
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        conn.commit()
        conn.execute(read, (19,)).fetchone()
        conn.execute(write, (1, 19))
        conn.commit()
    silent(proxy, app, "check_then_write")


# ------------------------------------------------------------------------ long_transaction


def test_long_transaction_reported_while_still_open(proxy: ProxyProcess) -> None:
    app = app_name()
    with connect(proxy, app) as conn:  # psycopg opens the transaction implicitly
        conn.execute(READ.replace("$1", "%s"), (20,)).fetchone()
        conn.execute(WRITE.replace("$1", "%s").replace("$2", "%s"), (1, 20))
        # left idle past the 1s threshold: read /advice before the COMMIT
        (found,) = wait_rule(proxy, app, "long_transaction")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.commit()
    assert found["severity"] == "warning"
    assert found["statement"] == READ  # its first statement after BEGIN
    assert found["tables"] == ["txr_accounts"]
    assert found["evidence"]["still_open"] == 1
    assert found["evidence"]["statements"] == 3  # BEGIN, SELECT, UPDATE
    assert 1.0 < found["evidence"]["open_s"] < 5.0
    assert 0 < found["evidence"]["idle_s"] <= found["evidence"]["open_s"]
    settled(proxy)
    assert len(advice(proxy, app, "long_transaction")) == 1  # once: not again at COMMIT
    assert advice(proxy, app, "long_transaction")[0]["occurrences"] == 1


def test_long_transaction_asyncpg_idle_in_transaction(proxy: ProxyProcess) -> None:
    app = app_name()

    async def main() -> None:
        conn = await aconnect(proxy, app)
        try:
            async with conn.transaction():
                await conn.fetchrow(READ, 21)
                await asyncio.to_thread(wait_rule, proxy, app, "long_transaction")
        finally:
            await conn.close()

    asyncio.run(main())
    (found,) = advice(proxy, app, "long_transaction")
    assert found["statement"] == READ


def test_long_transaction_short_ones_stay_silent(proxy: ProxyProcess) -> None:
    """Short transactions with idle time between them, and a long autocommit statement
    (no transaction block: slow_query's business)."""
    app = app_name()
    with connect(proxy, app) as conn:
        for account in range(22, 25):
            conn.execute(READ.replace("$1", "%s"), (account,)).fetchone()
            conn.commit()
            time.sleep(0.5)  # idle outside a transaction
    with connect(proxy, app, autocommit=True) as conn:
        conn.execute("SELECT pg_sleep(1.2)")
    silent(proxy, app, "long_transaction")

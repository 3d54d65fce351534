"""Advice from real clients through a real pgwarden: the loops are found, healthy code is not.

Each test starts its own pgwarden (so /advice starts empty), runs a client the way
applications do (SQLAlchemy lazy loading, psycopg, asyncpg), closes the connection, which
ends the burst, and reads /advice, the JSON log and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import ForeignKey, create_engine, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.pool import NullPool

from proxy.tools.pgcluster import find_bindir
from tests.conftest import StartProxy
from tests.support.proxy import ProxyProcess, assert_secret_stays_inside
from tests.support.util import PgServer, wait_until

AUTHORS = 12  # more than the n_plus_one threshold (5)
INSERTS = 20  # more than the insert_loop threshold (10)
BOOKS_BY_AUTHOR = "SELECT title FROM adv_books WHERE author_id = $1"

ADVICE_FIELDS = {
    "event",
    "rule",
    "severity",
    "fingerprint",
    "statement",
    "tables",
    "count",
    "occurrences",
    "suggestion",
    "suggested_sql",
    "database",
    "user",
    "application_name",
    "source",
}


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    """Authors, their books, and a table to insert into."""
    pg.psql(
        f"""
        DROP TABLE IF EXISTS adv_books, adv_authors, adv_items, adv_tags;
        CREATE TABLE adv_authors (id int PRIMARY KEY, name text NOT NULL);
        CREATE TABLE adv_books (
            id int PRIMARY KEY, author_id int NOT NULL REFERENCES adv_authors, title text NOT NULL
        );
        CREATE TABLE adv_items (id bigserial PRIMARY KEY, n int NOT NULL, label text NOT NULL);
        CREATE TABLE adv_tags (n int NOT NULL, tag text NOT NULL);
        INSERT INTO adv_authors SELECT g, 'author ' || g FROM generate_series(1, {AUTHORS}) g;
        INSERT INTO adv_books
            SELECT g, (g % {AUTHORS}) + 1, 'book ' || g FROM generate_series(1, {AUTHORS * 3}) g;
        """
    )
    yield
    pg.psql("DROP TABLE IF EXISTS adv_books, adv_authors, adv_items, adv_tags")


@pytest.fixture
def proxy(proxy_factory: StartProxy, schema: None) -> ProxyProcess:
    """A fresh pgwarden with the default detectors, so /advice starts empty."""
    return proxy_factory()


# --------------------------------------------------------------------------------- helpers


def advice(proxy: ProxyProcess, rule: str | None = None) -> list[dict[str, Any]]:
    """/advice entries (of `rule`), in the order the endpoint ranks them."""
    status, body = proxy.http_get("/advice")
    assert status == 200, body
    entries = json.loads(body)["advice"]
    return [a for a in entries if rule is None or a["rule"] == rule]


def wait_advice(proxy: ProxyProcess, rule: str, timeout: float = 5.0) -> dict[str, Any]:
    """The one advice of `rule`, once the proxy has reported it."""
    found = wait_until(lambda: advice(proxy, rule), timeout, message=f"{rule} advice")
    assert len(found) == 1, found
    return found[0]


def settled(proxy: ProxyProcess) -> None:
    """Wait until every client session has ended, so its bursts have been judged."""

    def no_sessions() -> bool:
        _, body = proxy.http_get("/metrics")
        return re.search(r"^pgwarden_client_connections 0\.0$", body, re.MULTILINE) is not None

    wait_until(no_sessions, message="all client sessions to end")


def connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection through the proxy."""
    return psycopg.connect(proxy.dsn(), connect_timeout=5, **kwargs)


async def aconnect(proxy: ProxyProcess) -> asyncpg.Connection:
    """An asyncpg connection through the proxy."""
    return await asyncpg.connect(
        host=proxy.host, port=proxy.port, user="postgres", database="postgres", timeout=5
    )


def advice_log_lines(proxy: ProxyProcess, rule: str) -> list[dict[str, Any]]:
    """The JSON log lines of event "advice" for `rule`."""
    return [e for e in proxy.log_events() if e.get("event") == "advice" and e.get("rule") == rule]


def books_loop(proxy: ProxyProcess) -> None:
    """The classic autocommit N+1: a list, then one lookup per row of it."""
    with connect(proxy, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM adv_authors WHERE id > %s", (0,))]
        assert len(ids) == AUTHORS
        for author_id in ids:
            conn.execute("SELECT title FROM adv_books WHERE author_id = %s", (author_id,))


# ---------------------------------------------------------------------- SQLAlchemy ORM


class Base(DeclarativeBase):
    pass


class Author(Base):
    """An author whose books load lazily, one query per author: the ORM default."""

    __tablename__ = "adv_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(lazy="select", back_populates="author")


class Book(Base):
    __tablename__ = "adv_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("adv_authors.id"))
    title: Mapped[str]
    author: Mapped[Author] = relationship(back_populates="books")


def test_sqlalchemy_lazy_loading_is_n_plus_one(proxy: ProxyProcess) -> None:
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: connect(proxy), poolclass=NullPool
    )
    with Session(engine) as session:
        authors = session.scalars(select(Author).order_by(Author.id)).all()
        assert sum(len(author.books) for author in authors) == AUTHORS * 3
    engine.dispose()

    found = wait_advice(proxy, "n_plus_one")
    assert found["severity"] == "warning"
    assert found["count"] == AUTHORS
    assert found["tables"] == ["adv_books"]
    assert "adv_books.author_id" in found["statement"] and "$1" in found["statement"]
    assert "= ANY(" in found["suggested_sql"]
    source = found["source"]
    assert source is not None, found
    assert source["column"] == "id"
    assert source["statement"].startswith("SELECT adv_authors.id")
    assert "FROM adv_authors" in source["statement"]
    assert re.fullmatch(r"[0-9a-f]{16}", source["fingerprint"])
    assert found["database"] == "postgres" and found["user"] == "postgres"


# ---------------------------------------------------------------------------- psycopg


def test_psycopg_autocommit_loop_traced_to_its_source(proxy: ProxyProcess) -> None:
    """No transaction ties the lookups together: the values of the earlier result do."""
    books_loop(proxy)
    with connect(proxy, autocommit=True) as conn:  # the same with binary values both ways
        cur = conn.cursor(binary=True)
        ids = [r[0] for r in cur.execute("SELECT id FROM adv_authors WHERE id > %s", (0,))]
        for author_id in ids:
            cur.execute("SELECT id FROM adv_books WHERE author_id = %s", (author_id,))
    settled(proxy)
    wait_until(lambda: len(advice(proxy, "n_plus_one")) == 2, message="two n_plus_one advices")
    binary = next(a for a in advice(proxy) if a["statement"].startswith("SELECT id FROM"))
    assert binary["source"] is not None, binary
    assert binary["source"]["column"] == "id"
    found = next(a for a in advice(proxy) if a["statement"] == BOOKS_BY_AUTHOR)
    assert found["statement"] == BOOKS_BY_AUTHOR
    assert found["count"] == AUTHORS
    assert found["source"] == {
        "fingerprint": found["source"]["fingerprint"],
        "statement": "SELECT id FROM adv_authors WHERE id > $1",
        "column": "id",
    }
    assert found["suggested_sql"] == "SELECT title FROM adv_books WHERE author_id = ANY($1)"


def test_psycopg_lookups_in_one_transaction(proxy: ProxyProcess) -> None:
    """Keys from anywhere (here: the application), but all in one transaction."""
    with connect(proxy) as conn:
        for author_id in random.sample(range(1, AUTHORS + 1), 8):
            conn.execute("SELECT name FROM adv_authors WHERE id = %s", (author_id,)).fetchone()
        conn.commit()
    found = wait_advice(proxy, "n_plus_one")
    assert found["count"] == 8
    assert found["source"] is None
    assert found["statement"] == "SELECT name FROM adv_authors WHERE id = $1"


def test_psycopg_insert_loops(proxy: ProxyProcess, pg: PgServer) -> None:
    """One INSERT per round trip is a warning; executemany pipelines them: info.

    Two tables: pg_query fingerprints ignore column order and row counts, so two INSERTs
    into one table would be one advice.
    """
    with connect(proxy) as conn:
        for i in range(INSERTS):
            conn.execute("INSERT INTO adv_items (n, label) VALUES (%s, %s)", (i, f"row {i}"))
        conn.commit()
        conn.cursor().executemany(
            "INSERT INTO adv_tags (tag, n) VALUES (%s, %s)",
            [(f"tag {i}", i) for i in range(INSERTS + 5)],
        )
        conn.commit()
    settled(proxy)
    wait_until(lambda: len(advice(proxy, "insert_loop")) == 2, message="two insert_loop advices")
    loop, batch = advice(proxy, "insert_loop")  # most costly first: the warning
    assert loop["severity"] == "warning"
    assert loop["count"] == INSERTS
    assert loop["statement"] == "INSERT INTO adv_items (n, label) VALUES ($1, $2)"
    assert loop["tables"] == ["adv_items"]
    assert "one round trip each" in loop["suggestion"]
    assert "unnest(" in loop["suggested_sql"]
    assert loop["source"] is None
    assert batch["severity"] == "info"
    assert batch["count"] == INSERTS + 5
    assert batch["statement"] == "INSERT INTO adv_tags (tag, n) VALUES ($1, $2)"
    assert "pipelined" in batch["suggestion"]
    assert "unnest(" in batch["suggested_sql"]

    # the suggested SQL is not only valid syntax: PostgreSQL runs it with arrays
    with psycopg.connect(pg.dsn()) as direct:
        direct.execute(
            loop["suggested_sql"].replace("$1", "%(n)s").replace("$2", "%(label)s"),
            {"n": [1, 2, 3], "label": ["a", "suggested", "c"]},
        )
        count = direct.execute("SELECT count(*) FROM adv_items WHERE label = 'suggested'")
        assert count.fetchone() == (1,)
        direct.rollback()


# ---------------------------------------------------------------------------- asyncpg


def test_asyncpg_prepared_loop_and_executemany(proxy: ProxyProcess) -> None:
    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            rows = await conn.fetch("SELECT id FROM adv_authors ORDER BY id")
            stmt = await conn.prepare(BOOKS_BY_AUTHOR)
            for row in rows:
                await stmt.fetchrow(row["id"])
            await conn.executemany(
                "INSERT INTO adv_items (n, label) VALUES ($1, $2)",
                [(i, f"row {i}") for i in range(INSERTS)],
            )
        finally:
            await conn.close()

    asyncio.run(main())
    found = wait_advice(proxy, "n_plus_one")
    assert found["statement"] == BOOKS_BY_AUTHOR
    assert found["count"] == AUTHORS
    assert found["source"] is not None, found
    assert found["source"]["column"] == "id"
    assert found["source"]["statement"] == "SELECT id FROM adv_authors ORDER BY id"
    assert found["suggested_sql"] == "SELECT title FROM adv_books WHERE author_id = ANY($1)"

    batch = wait_advice(proxy, "insert_loop")
    assert batch["severity"] == "info"
    assert batch["count"] == INSERTS
    assert "unnest(" in batch["suggested_sql"]


# --------------------------------------------------------------------------- healthy code


def healthy_workloads(proxy: ProxyProcess) -> None:
    """Code that needs no advice, each shape on its own connection."""
    # batched lookups, in a transaction and in autocommit
    with connect(proxy) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM adv_authors WHERE id > %s", (0,))]
        conn.execute("SELECT title FROM adv_books WHERE author_id = ANY(%s)", (ids,)).fetchall()
        conn.commit()
    with connect(proxy, autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT title FROM adv_books WHERE author_id = ANY(%s)", (ids,))
    # a JOIN
    with connect(proxy) as conn:
        rows = conn.execute(
            "SELECT a.name, b.title FROM adv_authors a JOIN adv_books b ON b.author_id = a.id"
        ).fetchall()
        assert len(rows) == AUTHORS * 3
        conn.commit()
    # the ORM with eager loading: the fix the advice suggests
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: connect(proxy), poolclass=NullPool
    )
    with Session(engine) as session:
        query = select(Author).options(selectinload(Author.books)).order_by(Author.id)
        authors = session.scalars(query).all()
        assert sum(len(author.books) for author in authors) == AUTHORS * 3
    engine.dispose()
    # a web app's pooled connection: many requests, each its own short transaction; a list
    # page first, so the keys of the later requests are all in an earlier result
    with connect(proxy) as conn:
        conn.execute("SELECT id, name FROM adv_authors ORDER BY id").fetchall()
        conn.commit()
        for _ in range(30):
            key = random.randint(1, AUTHORS)
            conn.execute("SELECT name FROM adv_authors WHERE id = %s", (key,)).fetchone()
            conn.commit()
    # a handful of lookups and inserts, below the thresholds
    with connect(proxy) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM adv_authors WHERE id > %s", (0,))]
        for author_id in ids[:4]:
            conn.execute("SELECT title FROM adv_books WHERE author_id = %s", (author_id,))
        for i in range(9):
            conn.execute("INSERT INTO adv_items (n, label) VALUES (%s, 'x')", (i,))
        conn.rollback()
    # one key looked up again and again: not N+1 (from 10 times, repeated_read's
    # caching question: tests/test_advice_application_rules.py)
    with connect(proxy) as conn:
        for _ in range(9):
            conn.execute("SELECT title FROM adv_books WHERE id = %s", (3,)).fetchone()
        conn.commit()


def test_healthy_code_is_silent(proxy: ProxyProcess) -> None:
    healthy_workloads(proxy)
    settled(proxy)
    assert advice(proxy) == []
    assert not [e for e in proxy.log_events() if e.get("event") == "advice"]


# ------------------------------------------------------------------ log, dedup and metrics


def test_log_lines_dedup_and_metrics(proxy: ProxyProcess) -> None:
    books_loop(proxy)
    books_loop(proxy)
    with connect(proxy) as conn:  # an info, to rank below the warning
        conn.cursor().executemany(
            "INSERT INTO adv_items (n, label) VALUES (%s, %s)", [(i, "x") for i in range(INSERTS)]
        )
        conn.commit()
    settled(proxy)
    assert [(a["rule"], a["severity"]) for a in advice(proxy)] == [
        ("n_plus_one", "warning"),
        ("insert_loop", "info"),
    ]
    (found,) = advice(proxy, "n_plus_one")
    assert found["occurrences"] == 2
    assert set(found) >= ADVICE_FIELDS
    assert found["event"] == "advice"

    # one log line within advice.repeat_interval, however often the loop runs
    lines = wait_until(lambda: advice_log_lines(proxy, "n_plus_one"), message="the advice line")
    assert len(lines) == 1, lines
    (line,) = lines
    assert set(line) >= ADVICE_FIELDS
    for key in ("rule", "severity", "fingerprint", "statement", "tables", "count", "source"):
        assert line[key] == found[key]
    assert line["suggested_sql"] == found["suggested_sql"]
    assert line["occurrences"] == 1

    _, metrics = proxy.http_get("/metrics")
    assert re.search(
        r'^pgwarden_advice_total\{rule="n_plus_one",severity="warning"\} 2\.0$',
        metrics,
        re.MULTILINE,
    ), metrics


def test_config_thresholds_and_repeat_interval(proxy_factory: StartProxy, schema: None) -> None:
    proxy = proxy_factory(
        {
            "detectors": {"n_plus_one": {"min_repeats": 20}, "insert_loop": {"enabled": False}},
            "advice": {"repeat_interval": 0},
        }
    )
    books_loop(proxy)  # 12 lookups: below 20 now
    with connect(proxy) as conn:
        for i in range(INSERTS):
            conn.execute("INSERT INTO adv_items (n, label) VALUES (%s, 'x')", (i,))
        conn.rollback()
    settled(proxy)
    assert advice(proxy) == []

    for _ in range(2):  # 30 lookups in a transaction: reported, and logged every time
        with connect(proxy) as conn:
            for book_id in range(1, 31):
                conn.execute("SELECT title FROM adv_books WHERE id = %s", (book_id,))
            conn.commit()
    settled(proxy)
    (found,) = advice(proxy)
    assert found["rule"] == "n_plus_one" and found["count"] == 30
    assert found["occurrences"] == 2
    wait_until(lambda: len(advice_log_lines(proxy, "n_plus_one")) >= 2, message="2 lines")
    assert len(advice_log_lines(proxy, "n_plus_one")) == 2


# ----------------------------------------------------------------------------- secrets


def run_psql(proxy: ProxyProcess, script: str) -> None:
    """Feed `script` to psql connected through the proxy; errors in it are expected."""
    psql = shutil.which("psql") or str(find_bindir() / "psql")
    subprocess.run(
        [psql, "-X", "-q", "-d", proxy.dsn()],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


def test_no_value_ever_leaves_the_proxy(proxy: ProxyProcess) -> None:
    """A secret in parameters and literals, in loops and errors: never in log, advice, metrics."""
    secret = uuid.uuid4().hex

    # extended protocol: the secret as a parameter value
    with connect(proxy) as conn:
        for i in range(6):
            conn.execute("SELECT id FROM adv_authors WHERE name = %s", (f"{secret}-{i}",))
        for i in range(INSERTS):
            conn.execute("INSERT INTO adv_items (n, label) VALUES (%s, %s)", (i, secret))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT %s::text, 1 / 0", (secret,))
        conn.rollback()

    # simple protocol: the secret as literals interpolated by the client
    with connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        for i in range(6):
            conn.execute("SELECT id FROM adv_books WHERE title = %s", (f"{secret}-{i}",))
        for i in range(INSERTS):
            conn.execute("INSERT INTO adv_items (label, n) VALUES (%s, %s)", (secret, i))
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute(f'SELECT "{secret}" FROM adv_items')
        conn.rollback()
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute(f"SELEC '{secret}' {secret}")
        conn.rollback()

    # psql: literals in scripts, several statements per Query, errors in the middle
    lookups = "\n".join(f"SELECT * FROM adv_authors WHERE name = '{secret}{i}';" for i in range(6))
    run_psql(
        proxy,
        f"BEGIN;\n{lookups}\nROLLBACK;\n"
        f"SELECT '{secret}' AS a; SELECT 1/0, '{secret}';\n"
        f"SELECT $${secret}$$, E'{secret}\\n';\n"
        f"DO $$ BEGIN RAISE NOTICE '{secret}'; END $$;\n"
        f"NOTIFY adv_channel, '{secret}';\n"
        f"SELECT {secret} FROM;\n",
    )
    settled(proxy)

    rules = {a["rule"] for a in advice(proxy)}
    assert rules == {"n_plus_one", "insert_loop"}, advice(proxy)
    assert len(advice(proxy, "n_plus_one")) == 3  # three lookup statements
    # /fingerprints is skipped: it lists the quoted identifier "{secret}" as it should
    assert_secret_stays_inside(proxy, secret, logged='"advice"', fingerprints=False)

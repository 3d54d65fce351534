"""Advice on time: a loop on a connection that stays open (any pooled application) is
reported about a second after it stopped, without the connection closing or running
anything else; healthy code stays silent however long it sits idle.

The unit half drives an Inspector with real protocol messages and a hand-held clock: a
statement still running when the clock ticks holds the judgement back until it ends.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.advice import AdviceSink
from proxy.analysis.analyzer import Analyzer
from proxy.backlog import Backlog
from proxy.detectors import SessionIdentity
from proxy.detectors.n_plus_one import NPlusOneOptions
from proxy.inspector import Analysis, Inspector
from proxy.metrics import Metrics
from proxy.protocol import messages as m
from tests.conftest import StartProxy
from tests.support.proxy import ProxyProcess
from tests.support.util import PgServer, wait_until

AUTHORS = 12  # more than the n_plus_one threshold (5)
INSERTS = 20  # more than the insert_loop threshold (10)
# a burst is judged once quiet for a second, on a clock that ticks every quarter second
ON_TIME = 1.5


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    pg.psql(
        f"""
        DROP TABLE IF EXISTS ontime_books, ontime_authors, ontime_items;
        CREATE TABLE ontime_authors (id int PRIMARY KEY, name text NOT NULL);
        CREATE TABLE ontime_books (id int PRIMARY KEY, author_id int NOT NULL, title text);
        CREATE TABLE ontime_items (id bigserial PRIMARY KEY, n int NOT NULL, label text);
        INSERT INTO ontime_authors SELECT g, 'author ' || g FROM generate_series(1, {AUTHORS}) g;
        INSERT INTO ontime_books
            SELECT g, (g % {AUTHORS}) + 1, 'book ' || g FROM generate_series(1, {AUTHORS * 3}) g;
        """
    )
    yield
    pg.psql("DROP TABLE IF EXISTS ontime_books, ontime_authors, ontime_items")


@pytest.fixture
def proxy(proxy_factory: StartProxy, schema: None) -> ProxyProcess:
    """A fresh pgwarden with the default detectors, so /advice starts empty."""
    return proxy_factory()


def advice(proxy: ProxyProcess, rule: str) -> list[dict[str, Any]]:
    status, body = proxy.http_get("/advice")
    assert status == 200, body
    return [a for a in json.loads(body)["advice"] if a["rule"] == rule]


def on_time(proxy: ProxyProcess, rule: str, stopped: float) -> dict[str, Any]:
    """The one advice of `rule`, once /advice shows it: at most ON_TIME after `stopped`."""
    left = ON_TIME - (time.monotonic() - stopped)
    found = wait_until(
        lambda: advice(proxy, rule), max(left, 0.0), message=f"{rule} advice on time"
    )
    assert len(found) == 1, found
    return found[0]


def connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), connect_timeout=5, **kwargs)


# ------------------------------------------------------------------ through real clients


def test_autocommit_n_plus_one_on_a_connection_that_stays_open(proxy: ProxyProcess) -> None:
    with connect(proxy, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM ontime_authors WHERE id > %s", (0,))]
        for author_id in ids:
            conn.execute("SELECT title FROM ontime_books WHERE author_id = %s", (author_id,))
        stopped = time.monotonic()
        found = on_time(proxy, "n_plus_one", stopped)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # open and usable all along
    assert found["count"] == AUTHORS
    assert found["statement"] == "SELECT title FROM ontime_books WHERE author_id = $1"
    assert found["source"] is not None and found["source"]["column"] == "id"
    assert found["occurrences"] == 1


def test_insert_loops_on_a_connection_that_stays_open(proxy: ProxyProcess) -> None:
    """One row per round trip, autocommit, then the same in a transaction committed and
    left idle, the way a pool keeps its connections."""
    with connect(proxy, autocommit=True) as conn:
        for i in range(INSERTS):
            conn.execute("INSERT INTO ontime_items (n, label) VALUES (%s, 'x')", (i,))
        found = on_time(proxy, "insert_loop", time.monotonic())
        assert found["count"] == INSERTS
        assert found["severity"] == "warning"
        assert "commit per row" in found["suggestion"]
    with connect(proxy) as conn:
        for i in range(INSERTS + 3):
            conn.execute("INSERT INTO ontime_items (label, n) VALUES (%s, %s)", ("y", i))
        conn.commit()
        stopped = time.monotonic()

        def second() -> list[dict[str, Any]]:
            return [a for a in advice(proxy, "insert_loop") if a["count"] == INSERTS + 3]

        wait_until(second, ON_TIME, message="the transaction's insert_loop advice on time")
        assert time.monotonic() - stopped <= ON_TIME
        assert not conn.closed


def test_healthy_code_stays_silent_on_open_connections(proxy: ProxyProcess) -> None:
    with connect(proxy) as pooled, connect(proxy, autocommit=True) as batched:
        # a pooled web connection: a list page, then requests that each look up one key
        pooled.execute("SELECT id, name FROM ontime_authors ORDER BY id").fetchall()
        pooled.commit()
        for _ in range(20):
            key = random.randint(1, AUTHORS)
            pooled.execute("SELECT name FROM ontime_authors WHERE id = %s", (key,)).fetchone()
            pooled.commit()
        # lookups batched as the advice suggests, and a loop below the threshold
        ids = [r[0] for r in batched.execute("SELECT id FROM ontime_authors WHERE id > %s", (0,))]
        batched.execute("SELECT title FROM ontime_books WHERE author_id = ANY(%s)", (ids,))
        for author_id in ids[:4]:
            batched.execute("SELECT title FROM ontime_books WHERE author_id = %s", (author_id,))
        time.sleep(ON_TIME + 0.5)  # idle, connections open: whatever is judged, is by now
        status, body = proxy.http_get("/advice")
        assert (status, json.loads(body)) == (200, {"advice": []})


# ------------------------------------------------------- the Inspector and a running statement


def query(sql: str) -> bytes:
    return m.Query(sql).encode()


def rows(*values: int) -> bytes:
    """The reply to a Query of one int4 column `id`: its rows, CommandComplete, ready."""
    description = m.RowDescription((m.Column("id", 0, 1, 23, 4, -1, 0),))
    return b"".join(
        [
            description.encode(),
            *(m.DataRow((str(v).encode(),)).encode() for v in values),
            m.CommandComplete(f"SELECT {len(values)}").encode(),
            m.ReadyForQuery(b"I").encode(),
        ]
    )


def test_a_statement_still_running_holds_the_judgement_until_it_ends() -> None:
    """The next lookup of the loop may be the statement running now, so the clock counts
    from when it started, not from the last one that finished."""
    sink = AdviceSink(600)
    analysis = Analysis(
        Analyzer(), sink, Metrics(), {"n_plus_one": NPlusOneOptions()}, backlog=Backlog()
    )
    inspector = Inspector(analysis, SessionIdentity("app", "shop", "web"))
    now = 100.0
    inspector.client(query("SELECT id FROM authors"), now)
    inspector.server(rows(*range(1, 7)), now + 0.001)
    for key in range(1, 7):  # literal values, traced to the ids above
        now += 0.01
        inspector.client(query(f"SELECT title FROM books WHERE author_id = {key}"), now)
        inspector.server(rows(key), now + 0.001)
    now += 0.01
    inspector.client(query("SELECT pg_sleep(5)"), now)
    inspector.tick(now + 3.0)  # the loop stopped 3 s ago, but something runs since `now`
    assert sink.snapshot() == []
    inspector.server(rows(), now + 5.0)  # it was not the loop's: the loop has been quiet
    inspector.tick(now + 5.01)
    (found,) = sink.snapshot()
    assert found["rule"] == "n_plus_one" and found["count"] == 6
    assert found["application_name"] == "web"
    inspector.close()

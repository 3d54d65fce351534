"""Statement and transaction timeouts end to end: real clients (psycopg, asyncpg, psql, a raw
socket) through a pgwarden process against real PostgreSQL.

A statement over its limit is cancelled with the session's backend key and ends with
SQLSTATE 57014 and a message naming the pgwarden rule; the connection stays usable. A
transaction over its limit, or idle in it too long, ends the session and releases its locks.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from psycopg import errors

from tests.support.proxy import (
    REPO_ROOT,
    ProxyProcess,
    launch_with_defaults,
)
from tests.support.rawpg import RawClient, error_fields, query_message
from tests.support.util import PgServer, wait_until

ROLE = "tm_timeout_user"
REPORTS = "tm_reports"  # one row: `SELECT pg_sleep(n) FROM tm_reports` sleeps n seconds
LOCKS = "tm_locks"
WRITES = "tm_writes"
SLEEP = f"SELECT pg_sleep(5) FROM {REPORTS}"

# First match wins: the application and user rules come before the table rule, and the
# second table rule is never reached.
RULES: dict[str, Any] = {
    "timeouts": {
        "rules": [
            {"name": "race", "match": {"application_name": "tm-race"}, "statement": "200ms"},
            {"name": "batch", "match": {"application_name": "tm-batch"}, "statement": "400ms"},
            {"name": "by-user", "match": {"user": ROLE}, "statement": "500ms"},
            {"name": "reports", "match": {"tables": [REPORTS]}, "statement": "300ms"},
            {"name": "reports-later", "match": {"tables": [REPORTS]}, "statement": "10s"},
        ]
    }
}


def cancelled(rule: str, limit: str) -> str:
    """The message of a statement pgwarden cancelled."""
    return f'canceling statement due to statement timeout (pgwarden rule "{rule}", {limit})'


REPORTS_MESSAGE = cancelled("reports", "300ms")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def objects(pg: PgServer) -> Iterator[None]:
    """The tables the rules match and a role to match by user."""
    pg.psql(
        f"""
        DROP TABLE IF EXISTS {REPORTS}, {LOCKS}, {WRITES};
        DROP ROLE IF EXISTS {ROLE};
        CREATE ROLE {ROLE} LOGIN;
        CREATE TABLE {REPORTS} (id int PRIMARY KEY, v text NOT NULL);
        INSERT INTO {REPORTS} VALUES (1, 'one');
        GRANT SELECT ON {REPORTS} TO {ROLE};
        CREATE TABLE {LOCKS} (id int PRIMARY KEY, v int NOT NULL);
        INSERT INTO {LOCKS} VALUES (1, 0);
        CREATE TABLE {WRITES} (id int PRIMARY KEY);
        """
    )
    yield
    pg.psql(f"DROP TABLE IF EXISTS {REPORTS}, {LOCKS}, {WRITES}; DROP ROLE IF EXISTS {ROLE};")


def module_proxy(
    pg: PgServer, factory: pytest.TempPathFactory, name: str, config: dict[str, Any]
) -> Iterator[ProxyProcess]:
    """One pgwarden with `config` over the test defaults, for a whole module."""
    process = launch_with_defaults(pg, factory.mktemp(name), name, config)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def proxy(
    pg: PgServer, objects: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """pgwarden with the statement rules of RULES and no default limit."""
    yield from module_proxy(pg, tmp_path_factory, "rules", RULES)


@pytest.fixture(scope="module")
def tx_proxy(
    pg: PgServer, objects: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """pgwarden with transaction limits: 1.5s per transaction (800ms for tm-tx), 1s idle."""
    config = {
        "timeouts": {
            "transaction": "1500ms",
            "idle_in_transaction": "1s",
            "rules": [
                {"name": "tx-app", "match": {"application_name": "tm-tx"}, "transaction": 0.8}
            ],
        }
    }
    yield from module_proxy(pg, tmp_path_factory, "tx", config)


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg, never waiting long for a connection."""
    return psycopg.connect(dsn, connect_timeout=5, **kwargs)


def direct(pg: PgServer) -> psycopg.Connection[Any]:
    """A connection straight to PostgreSQL, past pgwarden."""
    return connect(pg.dsn(), autocommit=True)


async def aconnect(proxy: ProxyProcess, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg through `proxy`."""
    return await asyncpg.connect(
        host=proxy.host, port=proxy.port, user="postgres", database="postgres", timeout=10, **kwargs
    )


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    status, body = proxy.http_get("/metrics")
    assert status == 200
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name:
            found = ",".join(sorted((match[2] or "").split(","))) if match[2] else ""
            if found == wanted:
                return float(match[3])
    return 0.0


def backend_gone(conn: psycopg.Connection[Any], application_name: str) -> bool:
    """No backend serves `application_name` any more (asked on a direct connection)."""
    rows = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
    ).fetchone()
    return rows == (0,)


def expect_cancel(
    conn: psycopg.Connection[Any], sql: str, message: str, params: Any = None
) -> float:
    """Run `sql`, which must be cancelled with `message`; how long that took."""
    began = time.monotonic()
    with pytest.raises(errors.QueryCanceled) as caught:
        conn.execute(sql, params)
    assert caught.value.sqlstate == "57014"
    assert caught.value.diag.message_primary == message
    return time.monotonic() - began


# ------------------------------------------------------------ statement timeouts: rules


@pytest.mark.parametrize(
    ("user", "application_name", "rule", "limit"),
    [
        ("postgres", "tm-plain", "reports", "300ms"),
        ("postgres", "tm-batch", "batch", "400ms"),
        (ROLE, "tm-plain", "by-user", "500ms"),
        (ROLE, "tm-batch", "batch", "400ms"),  # both match: the first rule wins
    ],
)
def test_rule_by_table_application_and_user(
    proxy: ProxyProcess, user: str, application_name: str, rule: str, limit: str
) -> None:
    with connect(proxy.dsn(user=user), autocommit=True, application_name=application_name) as conn:
        took = expect_cancel(conn, SLEEP, cancelled(rule, limit))
        seconds = float(limit.removesuffix("ms")) / 1000
        assert seconds <= took < seconds + 1.0, took
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
        if rule == "reports":  # a statement no rule matches runs as long as it likes
            assert conn.execute("SELECT pg_sleep(0.6), 'free'").fetchone() == ("", "free")


def test_extended_protocol_and_prepared_statements(proxy: ProxyProcess) -> None:
    with connect(proxy.dsn(), autocommit=True) as conn:
        sql = f"SELECT pg_sleep(%s) FROM {REPORTS} WHERE v <> %s"
        expect_cancel(conn, sql, REPORTS_MESSAGE, (5, "x"))
        for _ in range(3):  # prepared on the server from the second run on
            with pytest.raises(errors.QueryCanceled) as caught:
                conn.execute(sql, (5, "x"), prepare=True)
            assert caught.value.diag.message_primary == REPORTS_MESSAGE
        assert conn.execute(sql, (0.05, "x"), prepare=True).fetchone() == ("",)
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)


def test_timeout_inside_a_transaction(proxy: ProxyProcess) -> None:
    """The cancel aborts the transaction like any error: ROLLBACK works, nothing is kept."""
    with connect(proxy.dsn()) as conn:
        conn.execute(f"INSERT INTO {WRITES} VALUES (1)")
        expect_cancel(conn, SLEEP, REPORTS_MESSAGE)
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {WRITES} WHERE id = 1").fetchone() == (0,)
        conn.execute(f"INSERT INTO {WRITES} VALUES (2)")
        conn.commit()
        assert conn.execute(f"SELECT id FROM {WRITES} WHERE id < 10").fetchall() == [(2,)]
        conn.execute(f"DELETE FROM {WRITES} WHERE id < 10")
        conn.commit()


def test_multi_statement_query(proxy: ProxyProcess) -> None:
    """One simple Query with several statements: the one on the rule's table is timed."""
    with connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        began = time.monotonic()
        with pytest.raises(errors.QueryCanceled) as caught:
            cur.execute(f"SELECT 'first'; {SLEEP}; SELECT 'third'")
        assert time.monotonic() - began < 1.5
        assert caught.value.diag.message_primary == REPORTS_MESSAGE
        cur.execute("SELECT 'one'; SELECT 'two'")  # fine afterwards, both results there
        assert cur.fetchone() == ("one",)
        assert cur.nextset() and cur.fetchone() == ("two",)


def test_copy_out(proxy: ProxyProcess) -> None:
    with connect(proxy.dsn(), autocommit=True) as conn:
        began = time.monotonic()
        with (
            pytest.raises(errors.QueryCanceled) as caught,
            conn.cursor().copy(f"COPY ({SLEEP}) TO STDOUT") as copy,
        ):
            for _ in copy:
                pass
        assert time.monotonic() - began < 1.5
        assert caught.value.diag.message_primary == REPORTS_MESSAGE
        with conn.cursor().copy(f"COPY (SELECT v FROM {REPORTS}) TO STDOUT") as copy:
            assert b"".join(bytes(block) for block in copy) == b"one\n"


def test_pipeline_cancels_only_the_statement_over_its_limit(proxy: ProxyProcess) -> None:
    """Results before the slow statement arrive; it gets the rule's 57014; the rest up to
    Sync is skipped (and the implicit transaction rolled back); after Sync all is normal."""
    with connect(proxy.dsn(), autocommit=True) as conn:
        began = time.monotonic()
        with pytest.raises(errors.QueryCanceled) as caught, conn.pipeline() as pipeline:
            synced = conn.execute(f"INSERT INTO {WRITES} VALUES (10) RETURNING id")
            pipeline.sync()
            first = conn.execute("SELECT 'before', %s::int", (1,))
            conn.execute(f"INSERT INTO {WRITES} VALUES (11)")
            conn.execute(f"SELECT pg_sleep(%s) FROM {REPORTS}", (5,))
            conn.execute(f"INSERT INTO {WRITES} VALUES (12)")  # skipped
            pipeline.sync()
        assert time.monotonic() - began < 1.5
        assert caught.value.diag.message_primary == REPORTS_MESSAGE
        assert synced.fetchone() == (10,)
        assert first.fetchone() == ("before", 1)
        kept = conn.execute(f"SELECT id FROM {WRITES} WHERE id BETWEEN 10 AND 19 ORDER BY id")
        assert kept.fetchall() == [(10,)]
        with conn.pipeline():
            after = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(20)]
        assert [c.fetchone() for c in after] == [(i * 2,) for i in range(20)]
        conn.execute(f"DELETE FROM {WRITES} WHERE id BETWEEN 10 AND 19")


def test_asyncpg(proxy: ProxyProcess) -> None:
    async def main() -> None:
        conn = await aconnect(proxy)
        try:
            for args in [(), (5.0,)]:  # simple Query, then a prepared statement
                sql = SLEEP if not args else f"SELECT pg_sleep($1) FROM {REPORTS}"
                with pytest.raises(asyncpg.QueryCanceledError) as caught:
                    await (conn.execute(sql) if not args else conn.fetch(sql, *args))
                assert caught.value.sqlstate == "57014"
                assert str(caught.value) == REPORTS_MESSAGE
            with pytest.raises(asyncpg.QueryCanceledError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {WRITES} VALUES (20)")
                    await conn.fetchval(f"SELECT pg_sleep($1) FROM {REPORTS}", 5.0)
            assert await conn.fetchval(f"SELECT count(*) FROM {WRITES} WHERE id = 20") == 0
            assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        finally:
            await conn.close(timeout=5)

    asyncio.run(main())


def psql(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """psql with unaligned tuples-only output and SQLSTATEs in its error messages."""
    program = shutil.which("psql")
    if program is None:
        pytest.skip("psql is not installed")
    command = [program, dsn, "-X", "-q", "-A", "-t", "-v", "VERBOSITY=verbose", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_psql(proxy: ProxyProcess) -> None:
    began = time.monotonic()
    result = psql(proxy.dsn(), "-c", f"SELECT 'first'; {SLEEP}; SELECT 'third'")
    assert time.monotonic() - began < 3
    assert result.returncode == 1
    assert f"ERROR:  57014: {REPORTS_MESSAGE}" in result.stderr
    # a script goes on after the error, on the same connection
    result = psql(proxy.dsn(), "-c", f"{SLEEP};", "-c", "SELECT 'after', pg_backend_pid() > 0")
    assert f"ERROR:  57014: {REPORTS_MESSAGE}" in result.stderr
    assert result.stdout.strip() == "after|t"


# ------------------------------------------------------------- statement timeouts: load


def test_many_sessions_time_out_while_others_run_unharmed(proxy: ProxyProcess) -> None:
    """50 sessions each over their 300ms limit, 50 others querying all along."""

    async def main() -> None:
        sleepers = await asyncio.gather(*(aconnect(proxy) for _ in range(50)))
        workers = await asyncio.gather(*(aconnect(proxy) for _ in range(50)))
        done = asyncio.Event()
        counts: list[int] = []

        async def sleep(conn: asyncpg.Connection) -> float:
            began = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError) as caught:
                await conn.fetchval(f"SELECT pg_sleep($1) FROM {REPORTS}", 3.0)
            assert str(caught.value) == REPORTS_MESSAGE
            took = time.monotonic() - began
            assert await conn.fetchval("SELECT $1::text", "usable") == "usable"
            return took

        async def work(conn: asyncpg.Connection, seed: int) -> None:
            n = 0
            while not done.is_set() or n < 5:
                value = seed * 1000 + n
                assert await conn.fetchval("SELECT $1::int * 2", value) == value * 2
                assert await conn.fetchval(f"SELECT id FROM {REPORTS}") == 1
                n += 1
            counts.append(n)

        try:
            began = time.monotonic()
            working = asyncio.gather(*(work(c, i) for i, c in enumerate(workers)))
            took = await asyncio.gather(*(sleep(c) for c in sleepers))
            done.set()
            await working
            assert time.monotonic() - began < 4, time.monotonic() - began
            assert all(0.3 <= t < 2.5 for t in took), sorted(took)
            assert len(counts) == 50 and min(counts) >= 5, counts
        finally:
            await asyncio.gather(*(c.close(timeout=5) for c in [*sleepers, *workers]))

    asyncio.run(main())
    assert metric(proxy, "pgwarden_statement_timeouts_total", rule="reports") >= 50


def test_late_timer_never_cancels_the_next_statement(proxy: ProxyProcess) -> None:
    """Statements ending right around their 200ms limit, each followed at once by a quick
    one: the quick ones must never fail; the slept ones may, with the rule's message."""
    sessions, rounds = 40, 10
    outcomes: list[str] = []
    failures: list[str] = []

    async def session(index: int) -> None:
        conn = await aconnect(proxy, server_settings={"application_name": "tm-race"})
        rng = random.Random(index)
        try:
            for n in range(rounds):
                seconds = round(rng.uniform(0.19, 0.21), 4)
                try:
                    if index % 2:
                        await conn.execute(f"SELECT pg_sleep({seconds})")  # simple Query
                    else:
                        await conn.fetchval("SELECT pg_sleep($1)", seconds)  # extended
                    outcomes.append("completed")
                except asyncpg.QueryCanceledError as exc:
                    outcomes.append("cancelled")
                    if str(exc) != cancelled("race", "200ms"):
                        failures.append(f"session {index}, {seconds}s sleep: {exc}")
                value = index * 100 + n
                try:
                    got = await conn.fetchval("SELECT $1::int", value)
                    if got != value:
                        failures.append(f"session {index}: {got} for {value}")
                except asyncpg.PostgresError as exc:
                    failures.append(f"session {index} after {seconds}s: {exc!r}")
        finally:
            await conn.close(timeout=5)

    async def main() -> None:
        await asyncio.gather(*(session(i) for i in range(sessions)))

    began = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - began < 15
    assert not failures, failures
    assert len(outcomes) == sessions * rounds
    assert outcomes.count("cancelled") > 0, "no statement went over its limit"


# ----------------------------------------------------------- observability of timeouts


def test_metrics_and_log_events_without_values(proxy: ProxyProcess) -> None:
    app = f"tm-observe-{uuid.uuid4().hex[:8]}"
    before = metric(proxy, "pgwarden_statement_timeouts_total", rule="reports")
    with connect(proxy.dsn(), autocommit=True, application_name=app) as conn:
        expect_cancel(
            conn,
            f"SELECT pg_sleep(5) FROM {REPORTS} WHERE v <> 'tm-literal-secret'",
            REPORTS_MESSAGE,
        )
        expect_cancel(
            conn,
            f"SELECT pg_sleep(%s) FROM {REPORTS} WHERE v <> %s",
            REPORTS_MESSAGE,
            (5, "tm-param-secret"),
        )
    wait_until(
        lambda: metric(proxy, "pgwarden_statement_timeouts_total", rule="reports") == before + 2,
        message="the statement timeout counter to count both",
    )

    def events() -> list[dict[str, Any]]:
        return [
            e
            for e in proxy.log_events()
            if e.get("event") == "statement_timeout" and e.get("application_name") == app
        ]

    found = wait_until(lambda: len(events()) == 2 and events(), message="two statement_timeout")
    assert [e["statement"] for e in found] == [
        f"SELECT pg_sleep($1) FROM {REPORTS} WHERE v <> $2"
    ] * 2
    for event in found:
        assert event["rule"] == "reports"
        assert event["limit_s"] == 0.3
        assert event["command"] == "SELECT"
        assert 0.25 <= event["running_s"] < 1.5, event
    log = proxy.log_text()
    assert "tm-literal-secret" not in log
    assert "tm-param-secret" not in log


def test_default_limit_and_server_side(
    pg: PgServer, objects: None, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    """The default limit's rule is "default"; server_side also gives it to PostgreSQL."""
    client = proxy_factory({"timeouts": {"statement": "700ms"}})
    with connect(client.dsn(), autocommit=True) as conn:
        took = expect_cancel(conn, "SELECT pg_sleep(5)", cancelled("default", "700ms"))
        assert 0.7 <= took < 1.7
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    server = proxy_factory({"timeouts": {"statement": "5s", "server_side": True}})
    with connect(server.dsn(), autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
    with connect(server.dsn(), autocommit=True, options="-c search_path=pg_catalog") as conn:
        # the client's own options are kept
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
        assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog",)
    with direct(pg) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_slow_query_advice_only_for_statements_not_cancelled(
    objects: None, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    """A 1.2s statement with a 1s threshold is advice; one cancelled at 1.1s is not."""
    slow = proxy_factory(
        {
            "detectors": {"slow_query": {"threshold": "1s"}},
            "timeouts": {
                "rules": [{"name": "late", "match": {"tables": [REPORTS]}, "statement": "1100ms"}]
            },
        }
    )

    def advice() -> list[dict[str, Any]]:
        status, body = slow.http_get("/advice")
        assert status == 200
        return [a for a in json.loads(body)["advice"] if a["rule"] == "slow_query"]

    def run_cancelled() -> None:
        with connect(slow.dsn(), autocommit=True) as conn:
            with pytest.raises(errors.QueryCanceled) as caught:
                conn.execute(f"SELECT pg_sleep(3) FROM {REPORTS}")
            assert caught.value.diag.message_primary == cancelled("late", "1.1s")

    thread = threading.Thread(target=run_cancelled)
    thread.start()
    with connect(slow.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT pg_sleep(1.2), 'slow'").fetchone() == ("", "slow")
    thread.join(10)
    assert not thread.is_alive()
    wait_until(advice, message="slow_query advice")
    time.sleep(0.3)  # time for any advice about the cancelled statement to show up too
    found = advice()
    assert [a["statement"] for a in found] == ["SELECT pg_sleep($1), $2"], found
    assert found[0]["severity"] == "warning"
    logged = wait_until(
        lambda: [e for e in slow.log_events() if e.get("event") == "advice"], message="advice"
    )
    assert [e["statement"] for e in logged if e["rule"] == "slow_query"] == [found[0]["statement"]]


# --------------------------------------------------------------- transaction timeouts


def test_idle_in_transaction_releases_the_lock(pg: PgServer, tx_proxy: ProxyProcess) -> None:
    """A holds a row lock and goes idle; B's UPDATE (direct) waits until pgwarden ends A."""
    before = metric(tx_proxy, "pgwarden_transaction_timeouts_total", kind="idle_in_transaction")
    with direct(pg) as b, RawClient(tx_proxy.host, tx_proxy.port, timeout=5) as a:
        a.login(application_name="tm-idle")
        a.send(query_message(f"BEGIN; SELECT v FROM {LOCKS} WHERE id = 1 FOR UPDATE"))
        assert a.read_until_ready()[-1] == (b"Z", b"T")
        idle_since = time.monotonic()
        b.execute("SET lock_timeout = '5s'")
        b.execute(f"UPDATE {LOCKS} SET v = v + 1 WHERE id = 1")
        waited = time.monotonic() - idle_since
        assert 0.8 < waited < 2.5, waited
        messages = a.read_until_closed(timeout=2)
        assert [kind for kind, _ in messages] == [b"E"], messages
        fields = error_fields(messages[0][1])
        assert (fields["S"], fields["C"]) == ("FATAL", "25P03")
        assert fields["M"] == (
            "terminating connection due to idle-in-transaction timeout (pgwarden, 1s)"
        )
        wait_until(lambda: backend_gone(b, "tm-idle"), message="A's backend to exit")
    event = tx_proxy.wait_log(
        lambda e: e.get("event") == "transaction_timeout" and e.get("application_name") == "tm-idle"
    )
    assert (event["kind"], event["rule"], event["limit_s"]) == ("idle_in_transaction", "default", 1)
    wait_until(
        lambda: (
            metric(tx_proxy, "pgwarden_transaction_timeouts_total", kind="idle_in_transaction")
            == before + 1
        ),
        message="the idle_in_transaction counter",
    )


def test_idle_in_transaction_psycopg_both_through_the_proxy(tx_proxy: ProxyProcess) -> None:
    with (
        connect(tx_proxy.dsn(), application_name="tm-idle-a") as a,
        connect(tx_proxy.dsn(), autocommit=True, application_name="tm-idle-b") as b,
    ):
        assert a.execute(f"SELECT v FROM {LOCKS} WHERE id = 1 FOR UPDATE").fetchone() is not None
        idle_since = time.monotonic()
        b.execute("SET lock_timeout = '5s'")
        b.execute(f"UPDATE {LOCKS} SET v = v + 1 WHERE id = 1")
        assert 0.8 < time.monotonic() - idle_since < 2.5
        with pytest.raises(psycopg.Error) as caught:
            a.execute("SELECT 1")
        assert isinstance(caught.value, psycopg.OperationalError) or (
            caught.value.sqlstate == "25P03"
        ), repr(caught.value)
        assert a.closed or a.broken
        assert b.execute("SELECT 'b still fine'").fetchone() == ("b still fine",)


def _run_until_ended(conn: psycopg.Connection[Any], statement: str) -> tuple[float, psycopg.Error]:
    """Short statements in one transaction until the session is ended: (elapsed, error)."""
    began = time.monotonic()
    while time.monotonic() - began < 5:
        try:
            conn.execute(statement)
        except psycopg.Error as exc:
            return time.monotonic() - began, exc
    raise AssertionError("the transaction was never ended")


@pytest.mark.parametrize(
    ("application_name", "rule", "limit", "seconds"),
    [("tm-tx-default", "default", "1.5s", 1.5), ("tm-tx", "tx-app", "800ms", 0.8)],
)
def test_transaction_timeout_many_short_statements(
    pg: PgServer,
    tx_proxy: ProxyProcess,
    application_name: str,
    rule: str,
    limit: str,
    seconds: float,
) -> None:
    with connect(tx_proxy.dsn(), application_name=application_name) as conn:
        took, exc = _run_until_ended(conn, "SELECT pg_sleep(0.05)")
    assert seconds <= took < seconds + 1.0, took
    assert exc.sqlstate in (None, "57014"), repr(exc)
    if exc.sqlstate:  # it ended a running statement: the FATAL is the statement's error
        assert exc.diag.message_primary == (
            f'terminating connection due to transaction timeout (pgwarden rule "{rule}", {limit})'
        )
    event = tx_proxy.wait_log(
        lambda e: (
            e.get("event") == "transaction_timeout"
            and e.get("application_name") == application_name
        )
    )
    assert (event["kind"], event["rule"], event["limit_s"]) == ("transaction", rule, seconds)
    with direct(pg) as admin:
        wait_until(lambda: backend_gone(admin, application_name), message="the backend to exit")


@pytest.mark.parametrize("one_query", [False, True], ids=["begin_first", "one_query"])
def test_transaction_timeout_cancels_the_running_statement(
    pg: PgServer, tx_proxy: ProxyProcess, one_query: bool
) -> None:
    """The statement running at the deadline is cancelled, the session ended with a FATAL
    57014 naming pgwarden, and the transaction's row lock released; also when BEGIN and
    the long statement come in one Query (no ReadyForQuery until it all ends)."""
    app = f"tm-tx-running-{one_query}"
    with direct(pg) as b, RawClient(tx_proxy.host, tx_proxy.port, timeout=5) as a:
        a.login(application_name=app)
        opening = f"BEGIN; UPDATE {LOCKS} SET v = v WHERE id = 1"
        if one_query:
            began = time.monotonic()
            a.send(query_message(f"{opening}; SELECT pg_sleep(30)"))
        else:
            a.send(query_message(opening))
            assert a.read_until_ready()[-1] == (b"Z", b"T")
            began = time.monotonic()
            a.send(query_message("SELECT pg_sleep(30)"))
        wait_until(lambda: not backend_gone(b, app), message="A's backend")
        b.execute("SET lock_timeout = '5s'")
        b.execute(f"UPDATE {LOCKS} SET v = v + 1 WHERE id = 1")  # waits for A's lock
        assert 1.2 < time.monotonic() - began < 3.0
        messages = a.read_until_closed(timeout=3)
        fatal = [error_fields(body) for kind, body in messages if kind == b"E"]
        assert fatal and fatal[-1]["S"] == "FATAL" and fatal[-1]["C"] == "57014", messages
        assert fatal[-1]["M"] == (
            'terminating connection due to transaction timeout (pgwarden rule "default", 1.5s)'
        )
        wait_until(lambda: backend_gone(b, app), message="A's backend to exit")


def test_short_transactions_are_left_alone(tx_proxy: ProxyProcess) -> None:
    """Many transactions, each well inside the limits, add up to more than any of them."""
    with connect(tx_proxy.dsn(), application_name="tm-tx") as conn:
        began = time.monotonic()
        while time.monotonic() - began < 2.0:
            conn.execute("SELECT pg_sleep(0.05)")
            conn.execute("SELECT pg_sleep(0.05)")
            conn.commit()
        time.sleep(1.2)  # idle outside a transaction: fine
        assert conn.execute("SELECT 'alive'").fetchone() == ("alive",)
        conn.commit()


# -------------------------------------------------------------------- configuration


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`pgwarden check-config PATH` as a user runs it."""
    command = [sys.executable, "-m", "proxy", "check-config", str(path)]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("timeouts", "key"),
    [
        (
            {"rules": [{"name": "a", "statement": "1s"}, {"name": "a", "statement": "2s"}]},
            "timeouts.rules[1].name",
        ),
        (
            {"rules": [{"name": "a", "match": {"tabels": ["x"]}, "statement": "1s"}]},
            "timeouts.rules[0].match.tabels",
        ),
        ({"rules": [{"name": "a", "statement": "5 seconds"}]}, "timeouts.rules[0].statement"),
        ({"rules": [{"match": {"user": "x"}, "statement": "1s"}]}, "timeouts.rules[0].name"),
        ({"idle_in_transaction": "forever"}, "timeouts.idle_in_transaction"),
    ],
    ids=["duplicate_name", "unknown_match_field", "bad_duration", "missing_name", "bad_default"],
)
def test_check_config_rejects(tmp_path: Path, timeouts: dict[str, Any], key: str) -> None:
    path = tmp_path / "pgwarden.yaml"
    path.write_text(yaml.safe_dump({"timeouts": timeouts}))
    result = check_config(path)
    assert result.returncode == 2, result
    assert f"{key}:" in result.stdout + result.stderr


def test_check_config_accepts_the_timeouts(tmp_path: Path) -> None:
    path = tmp_path / "pgwarden.yaml"
    path.write_text(yaml.safe_dump(RULES | {"timeouts": RULES["timeouts"] | {"statement": "2m"}}))
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert "reports-later" in result.stdout

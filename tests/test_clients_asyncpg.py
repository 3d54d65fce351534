"""asyncpg through pgwarden: binary protocol, prepared statements, portals fetched a few rows
at a time (Execute with max_rows), COPY, cancellation by CancelRequest, and listeners."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from tests.support.proxy import ProxyProcess
from tests.support.util import PgServer

Scenario = Callable[[asyncpg.Connection], Awaitable[None]]


@pytest.fixture(scope="module")
def proxy(module_proxy: ProxyProcess) -> ProxyProcess:
    """One pgwarden for the whole module (overrides the per-test fixture)."""
    return module_proxy


def run(proxy: ProxyProcess, scenario: Scenario) -> None:
    """Run `scenario` on an asyncpg connection through the proxy, then check it still works."""

    async def main() -> None:
        conn = await asyncpg.connect(
            host=proxy.host, port=proxy.port, user="postgres", database="postgres", timeout=5
        )
        try:
            await scenario(conn)
            assert await conn.fetchval("SELECT 'still usable'") == "still usable"
        finally:
            await conn.close(timeout=5)

    asyncio.run(main())


def test_fetch(proxy: ProxyProcess) -> None:
    async def scenario(conn: asyncpg.Connection) -> None:
        assert await conn.fetchval("SELECT 1 + $1::int", 41) == 42
        rows = await conn.fetch("SELECT g, g::text AS t FROM generate_series(1, 5000) g")
        assert [(r["g"], r["t"]) for r in rows] == [(i, str(i)) for i in range(1, 5001)]
        assert await conn.fetchrow("SELECT NULL::int AS a, 'x' AS b") == (None, "x")
        assert await conn.execute("CREATE TEMP TABLE t (x int)") == "CREATE TABLE"
        assert await conn.execute("INSERT INTO t SELECT generate_series(1, 3)") == "INSERT 0 3"
        with pytest.raises(asyncpg.UndefinedTableError) as info:
            await conn.fetch("SELECT * FROM no_such_table")
        assert info.value.sqlstate == "42P01"

    run(proxy, scenario)


def test_binary_types_round_trip(proxy: ProxyProcess, pg: PgServer) -> None:
    values: list[tuple[str, Any]] = [
        ("int2", -32768),
        ("int8", 2**63 - 1),
        ("numeric", Decimal("-98765432109876543210.0123456789")),
        ("float8", 1e-300),
        ("text", "é ☃ 𝄞 'quoted' \\"),
        ("bytea", bytes(range(256))),
        ("bool", False),
        ("date", dt.date(1999, 12, 31)),
        ("timestamptz", dt.datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)),
        ("interval", dt.timedelta(days=-3, microseconds=1)),
        ("uuid", uuid.UUID("0fbd8f1e-2b3a-4c5d-9e8f-7a6b5c4d3e2f")),
        ("jsonb", '{"a": [1, null, "é"]}'),
        ("int4[]", [[1, 2], [3, None]]),
        ("text[]", ["a", None, ""]),
        ("inet", ipaddress.ip_interface("10.1.2.3/16")),
        ("int4range", asyncpg.Range(1, 10)),
        ("point", asyncpg.Point(1.5, -2.5)),
    ]
    query = "SELECT " + ", ".join(f"${i}::{kind}" for i, (kind, _) in enumerate(values, 1))
    results: dict[str, list[Any]] = {}

    async def main() -> None:
        for name, (host, port) in {
            "proxy": (proxy.host, proxy.port),
            "direct": (pg.host, pg.port),
        }.items():
            conn = await asyncpg.connect(host=host, port=port, user="postgres", timeout=5)
            try:
                row = await conn.fetchrow(query, *[value for _, value in values])
                assert row is not None
                results[name] = list(row)
            finally:
                await conn.close()

    asyncio.run(main())
    assert results["proxy"] == [value for _, value in values]
    assert results["proxy"] == results["direct"]


def test_prepared_statements_and_executemany(proxy: ProxyProcess) -> None:
    async def scenario(conn: asyncpg.Connection) -> None:
        statement = await conn.prepare("SELECT $1::int * 2 AS doubled, $2::text AS label")
        assert [a.name for a in statement.get_attributes()] == ["doubled", "label"]
        assert [p.name for p in statement.get_parameters()] == ["int4", "text"]
        for i in range(50):
            assert await statement.fetchrow(i, f"l{i}") == (i * 2, f"l{i}")
        named = await conn.fetch("SELECT name FROM pg_prepared_statements")
        assert any(r["name"].startswith("__asyncpg_stmt_") for r in named)
        await conn.execute("CREATE TEMP TABLE many (id int PRIMARY KEY, v text)")
        await conn.executemany(
            "INSERT INTO many VALUES ($1, $2)", [(i, f"v{i}") for i in range(2000)]
        )
        assert await conn.fetchval("SELECT count(*) FROM many") == 2000
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany("INSERT INTO many VALUES ($1, $2)", [(5000, "a"), (1, "dup")])
        assert await conn.fetchval("SELECT count(*) FROM many WHERE id = 5000") == 0

    run(proxy, scenario)


def test_copy_records_and_copy_from_query(proxy: ProxyProcess) -> None:
    async def scenario(conn: asyncpg.Connection) -> None:
        await conn.execute("CREATE TEMP TABLE target (id int, payload text, at date)")
        records = [(i, f"payload {i} " + "y" * 200, dt.date(2024, 1, 1)) for i in range(20000)]
        assert await conn.copy_records_to_table("target", records=records) == "COPY 20000"
        assert await conn.fetchval("SELECT sum(length(payload))::int FROM target") == sum(
            len(r[1]) for r in records
        )
        out = io.BytesIO()
        status = await conn.copy_from_query(
            "SELECT id, payload FROM target WHERE id < $1 ORDER BY id", 20000, output=out
        )
        assert status == "COPY 20000"
        expected = "".join(f"{r[0]}\t{r[1]}\n" for r in records).encode()
        assert len(expected) > 4_000_000 and out.getvalue() == expected
        binary = io.BytesIO()
        await conn.copy_from_table("target", output=binary, format="binary")
        assert binary.getvalue().startswith(b"PGCOPY\n\xff\r\n\0")
        await conn.execute("TRUNCATE target")
        binary.seek(0)
        assert await conn.copy_to_table("target", source=binary, format="binary") == "COPY 20000"

    run(proxy, scenario)


def test_transaction(proxy: ProxyProcess) -> None:
    async def scenario(conn: asyncpg.Connection) -> None:
        await conn.execute("CREATE TEMP TABLE tx (x int)")
        async with conn.transaction():
            await conn.execute("INSERT INTO tx VALUES (1)")
            assert conn.is_in_transaction()
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute("INSERT INTO tx VALUES (2)")
                raise ZeroDivisionError
        async with conn.transaction():
            await conn.execute("INSERT INTO tx VALUES (3)")
            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():  # a savepoint
                    await conn.execute("INSERT INTO tx VALUES (4)")
                    await conn.execute("SELECT 1/0")
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT array_agg(x ORDER BY x) FROM tx") == [1, 3]

    run(proxy, scenario)


def test_cursor_iteration_fetches_portal_in_chunks(proxy: ProxyProcess) -> None:
    """Cursors run a portal with Execute(max_rows); PortalSuspended must reach asyncpg."""

    async def scenario(conn: asyncpg.Connection) -> None:
        query = "SELECT g, md5(g::text) FROM generate_series(1, 3000) g"
        async with conn.transaction():
            seen = [record[0] async for record in conn.cursor(query, prefetch=7)]
            assert seen == list(range(1, 3001))
            cursor = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
            assert [r[0] for r in await cursor.fetch(5)] == [1, 2, 3, 4, 5]
            await cursor.forward(10)
            assert await cursor.fetchrow() == (16,)
            assert [r[0] for r in await cursor.fetch(200)] == list(range(17, 101))

    run(proxy, scenario)


def test_cancel_on_timeout(proxy: ProxyProcess) -> None:
    """asyncpg cancels a timed-out query with a CancelRequest sent to the proxy."""

    async def scenario(conn: asyncpg.Connection) -> None:
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(10)"), 0.5)
            assert await conn.fetchval("SELECT 1", timeout=3) == 1
            assert time.monotonic() - began < 4
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetch("SELECT pg_sleep(10)", timeout=0.5)
        assert await conn.fetchval("SELECT 2", timeout=3) == 2
        assert time.monotonic() - began < 4

    run(proxy, scenario)


def test_listener(proxy: ProxyProcess) -> None:
    async def scenario(conn: asyncpg.Connection) -> None:
        received: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()

        def on_notify(_: Any, pid: int, channel: str, payload: str) -> None:
            received.put_nowait((channel, payload, pid))

        await conn.add_listener("asyncpg_channel", on_notify)
        sender = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres", timeout=5)
        try:
            sender_pid = sender.get_server_pid()
            await sender.execute("NOTIFY asyncpg_channel, 'one'")
            await sender.execute("SELECT pg_notify('asyncpg_channel', 'two é')")
            got = [await asyncio.wait_for(received.get(), 5) for _ in range(2)]
        finally:
            await sender.close()
        assert got == [
            ("asyncpg_channel", "one", sender_pid),
            ("asyncpg_channel", "two é", sender_pid),
        ]
        await conn.remove_listener("asyncpg_channel", on_notify)

    run(proxy, scenario)

"""psycopg 3 through pgwarden behaves exactly as it does against PostgreSQL directly.

Every assertion goes through the driver: values, cursor descriptions, SQLSTATEs, notices,
parameter statuses, notifications, COPY data, cancellation and pipelines. Where a result
can be compared, it is compared with the same query run on a direct connection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from tests.support.proxy import ProxyProcess
from tests.support.util import PgServer, assert_cancel_works, wait_until

# Many types, with the awkward values: NULLs, extremes, non-ASCII text, nested arrays.
TYPES_SQL = r"""
SELECT 1::int2 AS i2, '-2147483648'::int4 AS i4, 9223372036854775807::int8 AS i8,
    '-12345678901234567890.123456789'::numeric AS num, '0.000100'::numeric AS small,
    1.5::float4 AS f4, '-Infinity'::float8 AS f8, 'text é ☃ 𝄞'::text AS t,
    'v'::varchar(5) AS vc, 'c'::char(3) AS ch, '\x00ff10'::bytea AS ba, true AS b,
    NULL::int AS nul, '2024-02-29'::date AS d,
    '23:59:59.999999'::time AS tm, '12:00+05:30'::timetz AS ttz,
    '2024-01-01 12:34:56.789'::timestamp AS ts, '2024-01-01 12:34:56.789+00'::timestamptz AS tstz,
    '1 year 2 mons 3 days 04:05:06.789'::interval AS iv,
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
    '{"a": [1, 2.5, {"b": null}], "é": "☃"}'::json AS js,
    '{"a": [1, 2.5, {"b": null}], "é": "☃"}'::jsonb AS jsb,
    ARRAY[1, NULL, 3]::int[] AS ia, ARRAY[['a', 'b'], ['c', NULL]]::text[] AS ta,
    '{}'::int8[] AS empty_array, '192.168.0.1/24'::inet AS ip, '10.0.0.0/8'::cidr AS net,
    '08:00:2b:01:02:03'::macaddr AS mac, '[1,10)'::int4range AS r,
    '[2024-01-01,2024-02-01)'::daterange AS dr, '{[1,2], [5,7)}'::int4multirange AS mr,
    '(1,2)'::point AS pt, 12.34::money AS m, 'pg_class'::regclass AS rc, 42::oid AS o,
    B'1010'::bit(4) AS bits, 'a & b'::tsquery AS tq, 'fat cats'::tsvector AS tv,
    ROW(1, 'x', NULL) AS rec, '<a>x</a>'::xml AS x, 'abc'::name AS nm, 'x'::"char" AS c1
"""

# Statements whose results (values and descriptions) must not depend on the path taken.
FAITHFUL_QUERIES = [
    "SELECT 1",
    "SELECT NULL",
    "SELECT '' AS empty, repeat('x', 100000) AS big",
    "SELECT g, g::text AS t, g * 1.5 AS f FROM generate_series(1, 50) g",
    "SELECT * FROM generate_series(1, 0) g",  # no rows, one column
    "SELECT relname, relkind FROM pg_class WHERE relname LIKE 'pg_am%' ORDER BY 1",
    "VALUES (1, 'a'), (2, 'b'), (NULL, NULL)",
    "SELECT current_user, current_database(), current_setting('server_version_num')",
    "SHOW standard_conforming_strings",
    "SELECT 'a' AS \"same\", 'b' AS \"same\"",  # duplicate column names
]


@pytest.fixture(scope="module")
def proxy(module_proxy: ProxyProcess) -> ProxyProcess:
    """One pgwarden for the whole module (overrides the per-test fixture)."""
    return module_proxy


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, connect_timeout=5, **kwargs)


def fetch_everything(
    dsn: str, query: str, *, binary: bool = False
) -> tuple[list[Any], list[tuple[Any, ...]], str | None]:
    """(description as tuples, rows, status message) of one query on a fresh connection."""
    with connect(dsn, autocommit=True) as conn, conn.cursor(binary=binary) as cur:
        cur.execute(query)
        rows = cur.fetchall() if cur.description is not None else []
        description = [tuple(column) for column in cur.description or []]
        return description, rows, cur.statusmessage


def raw_result(dsn: str, query: str, result_format: int) -> list[Any]:
    """Everything libpq parsed from one result, down to the bytes of each value."""
    with connect(dsn, autocommit=True) as conn:
        pgconn = conn.pgconn
        res = pgconn.exec_params(query.encode(), [], result_format=result_format)
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
        columns = [
            (res.fname(c), res.ftype(c), res.fmod(c), res.fsize(c), res.fformat(c))
            for c in range(res.nfields)
        ]
        values = [[res.get_value(r, c) for c in range(res.nfields)] for r in range(res.ntuples)]
        return [columns, values, res.command_status]


@pytest.fixture
def table(pg: PgServer) -> Iterator[str]:
    """A fresh table name (id int, payload text) visible to every connection; dropped after."""
    name = f"clients_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, payload text)")
    yield name
    pg.psql(f"DROP TABLE IF EXISTS {name}")


# ------------------------------------------------------------------- faithfulness


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_data_types_round_trip_identically(proxy: ProxyProcess, pg: PgServer, binary: bool) -> None:
    through = fetch_everything(proxy.dsn(), TYPES_SQL, binary=binary)
    direct = fetch_everything(pg.dsn(), TYPES_SQL, binary=binary)
    assert through == direct
    row = dict(zip([c[0] for c in through[0]], through[1][0], strict=True))
    assert row["t"] == "text é ☃ 𝄞"
    assert row["ba"] == b"\x00\xff\x10"
    assert row["i8"] == 9223372036854775807
    assert row["num"] == Decimal("-12345678901234567890.123456789")
    assert row["nul"] is None
    assert row["ta"] == [["a", "b"], ["c", None]]


@pytest.mark.parametrize("result_format", [0, 1], ids=["text", "binary"])
def test_raw_value_bytes_equal_direct(
    proxy: ProxyProcess, pg: PgServer, result_format: int
) -> None:
    """Byte for byte, as libpq received them: names, type oids, modifiers, formats, values."""
    through = raw_result(proxy.dsn(), TYPES_SQL, result_format)
    assert through == raw_result(pg.dsn(), TYPES_SQL, result_format)
    assert {column[4] for column in through[0]} == {result_format}


@pytest.mark.parametrize("query", FAITHFUL_QUERIES)
def test_results_and_descriptions_equal_direct(
    proxy: ProxyProcess, pg: PgServer, query: str
) -> None:
    assert fetch_everything(proxy.dsn(), query) == fetch_everything(pg.dsn(), query)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_large_result_identical(proxy: ProxyProcess, pg: PgServer, binary: bool) -> None:
    query = "SELECT g, md5(g::text), g * 0.5 AS half FROM generate_series(1, 100000) g"
    through = fetch_everything(proxy.dsn(), query, binary=binary)
    assert len(through[1]) == 100_000
    assert through[1][-1] == (100000, hashlib.md5(b"100000").hexdigest(), Decimal("50000.0"))
    assert through == fetch_everything(pg.dsn(), query, binary=binary)


# ---------------------------------------------------------------------- queries


def test_simple_queries(proxy: ProxyProcess) -> None:
    with connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        cur = conn.execute("SELECT 'a'; SELECT 'b', 'c'")  # several statements, one Query
        assert cur.fetchall() == [("a",)]
        assert cur.nextset()
        assert cur.fetchall() == [("b", "c")]
        assert conn.execute("").statusmessage is None  # EmptyQueryResponse
        conn.execute("CREATE TEMP TABLE t (x int)")
        cur = conn.execute("INSERT INTO t SELECT generate_series(1, 7)")
        assert (cur.rowcount, cur.statusmessage) == (7, "INSERT 0 7")


@pytest.mark.skipif(psycopg.pq.version() < 180000, reason="libpq 18 asks for protocol 3.2")
def test_protocol_version_negotiation(proxy: ProxyProcess, pg: PgServer) -> None:
    """A client asking for a newer minor protocol gets NegotiateProtocolVersion relayed, and
    its cancel key, whatever its length, still routes through pgwarden."""
    with connect(proxy.dsn(max_protocol_version="latest"), autocommit=True) as conn:
        assert conn.execute("SELECT 'negotiated'").fetchone() == ("negotiated",)
        server_version = int(pg.psql("SHOW server_version_num"))
        assert conn.info.server_version == server_version
        for _ in range(20):
            # Nothing running: a no-op that must not break the session, nor cancel the next
            # statement (libpq returns when pgwarden closes the cancel connection, which it
            # may do only once the server has read the cancel).
            conn.cancel_safe()
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_parameters_round_trip(proxy: ProxyProcess, binary: bool) -> None:
    values: list[Any] = [
        None,
        0,
        -(2**63),
        3.25,
        Decimal("1234567890.0987654321"),
        "quote ' and backslash \\ and é",
        b"\x00\x01\xfe\xff",
        True,
        dt.date(2000, 2, 29),
        dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
        dt.timedelta(days=3, seconds=5, microseconds=7),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        [1, 2, None, 4],
        Jsonb({"k": [1, "v", None]}),
    ]
    placeholders = ", ".join(["%s"] * len(values))
    with connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute(f"SELECT {placeholders}", values, binary=binary).fetchone()
    assert row is not None
    expected = [v.obj if isinstance(v, Jsonb) else v for v in values]
    assert list(row) == expected


def test_large_messages_both_ways(proxy: ProxyProcess) -> None:
    """Bind and DataRow messages of several MB, far over what pgwarden inspects."""
    blob = bytes(range(256)) * 20_000  # 5 MB
    with connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT md5(%s), length(%s), %s", (blob, blob, blob)).fetchone()
        assert row == (hashlib.md5(blob).hexdigest(), len(blob), blob)
        text = "é" * 2_000_000
        assert conn.execute("SELECT %s::text", (text,), binary=True).fetchone() == (text,)
        assert conn.execute("SELECT 'small after large'").fetchone() == ("small after large",)


def test_named_prepared_statements(proxy: ProxyProcess) -> None:
    query = "SELECT %s::int * 2, %s::text || '!'"
    with connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(20):
            row = conn.execute(query, (i, f"v{i}"), prepare=True).fetchone()
            assert row == (i * 2, f"v{i}!")
        prepared = conn.execute(
            "SELECT name, statement FROM pg_prepared_statements WHERE from_sql = false"
        ).fetchall()
        assert any(name.startswith("_pg3_") and "$1" in text for name, text in prepared)
        conn.execute("DEALLOCATE ALL")
        assert conn.execute(query, (5, "again"), prepare=True).fetchone() == (10, "again!")


def test_prepare_threshold_zero_prepares_everything(proxy: ProxyProcess) -> None:
    with connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(5):
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        count = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
        assert count is not None and count[0] >= 1


def test_server_side_cursor(proxy: ProxyProcess) -> None:
    with connect(proxy.dsn()) as conn:
        with conn.cursor(name="walker") as cur:
            cur.itersize = 37
            cur.execute("SELECT g, repeat('x', g % 50) FROM generate_series(1, 1000) g")
            assert cur.fetchone() == (1, "x")
            assert [r[0] for r in cur.fetchmany(3)] == [2, 3, 4]
            rest = list(cur)
        assert [r[0] for r in rest] == list(range(5, 1001))
        with conn.cursor(name="scroller", scrollable=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 100) g")
            cur.scroll(90, mode="absolute")
            assert cur.fetchone() == (91,)
        conn.commit()
        with conn.cursor(name="held", withhold=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 10) g")
            conn.commit()  # WITH HOLD survives the commit
            assert [r[0] for r in cur.fetchall()] == list(range(1, 11))


@pytest.mark.parametrize("size", [1, 100], ids=["single-row", "chunked"])
def test_stream(proxy: ProxyProcess, size: int) -> None:
    with connect(proxy.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        rows = list(cur.stream("SELECT g FROM generate_series(1, 5000) g", size=size))
        assert [r[0] for r in rows] == list(range(1, 5001))
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)


def test_transactions_commit_and_rollback(proxy: ProxyProcess, pg: PgServer, table: str) -> None:
    ins = sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(sql.Identifier(table))
    count = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
    with connect(proxy.dsn()) as conn, connect(pg.dsn(), autocommit=True) as observer:
        conn.execute(ins, (1, "committed"))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert observer.execute(count).fetchone() == (0,)  # not visible before COMMIT
        conn.commit()
        assert observer.execute(count).fetchone() == (1,)
        conn.execute(ins, (2, "rolled back"))
        conn.rollback()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with conn.transaction():
            conn.execute(ins, (3, "outer"))
            with pytest.raises(errors.UniqueViolation), conn.transaction():  # a savepoint
                conn.execute(ins, (3, "duplicate"))
        conn.commit()
    assert pg.psql(f"SELECT id, payload FROM {table} ORDER BY id") == "1|committed\n3|outer\n"


def error_details(dsn: str, query: str) -> tuple[Any, ...]:
    """What the client learns from a failing statement."""
    with connect(dsn) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(query)
        diag = info.value.diag
        return (
            type(info.value),
            info.value.sqlstate,
            diag.severity,
            diag.severity_nonlocalized,
            diag.message_primary,
            diag.message_detail,
            diag.message_hint,
            diag.statement_position,
            diag.context,
        )


@pytest.mark.parametrize(
    ("query", "error", "sqlstate"),
    [
        ("SELECT 1/0", errors.DivisionByZero, "22012"),
        ("SELECT * FROM no_such_table", errors.UndefinedTable, "42P01"),
        ("SELEC 1", errors.SyntaxError, "42601"),
        ("SELECT 'x'::int", errors.InvalidTextRepresentation, "22P02"),
        (
            "DO $$ BEGIN RAISE EXCEPTION 'custom' USING ERRCODE = 'P0042', "
            "DETAIL = 'd', HINT = 'h'; END $$",
            psycopg.Error,
            "P0042",
        ),
    ],
)
def test_errors_preserved_and_connection_usable(
    proxy: ProxyProcess, pg: PgServer, query: str, error: type[Exception], sqlstate: str
) -> None:
    through = error_details(proxy.dsn(), query)
    assert issubclass(through[0], error)
    assert through[1] == sqlstate
    assert through == error_details(pg.dsn(), query)
    with connect(proxy.dsn()) as conn:
        with pytest.raises(error):
            conn.execute(query)
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_notice_reaches_handler(proxy: ProxyProcess) -> None:
    notices: list[tuple[str | None, str | None, str | None]] = []

    def keep(diag: psycopg.errors.Diagnostic) -> None:  # valid only during the call
        notices.append((diag.severity_nonlocalized, diag.sqlstate, diag.message_primary))

    with connect(proxy.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(keep)
        conn.execute(
            "DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; "
            "RAISE DEBUG 'hidden'; END $$"
        )
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert notices == [("NOTICE", "00000", "hello 42"), ("WARNING", "01000", "careful")]


def test_parameter_status_follows_set(proxy: ProxyProcess) -> None:
    with connect(proxy.dsn(), autocommit=True, application_name="before") as conn:
        info = conn.info
        assert info.parameter_status("application_name") == "before"
        assert info.parameter_status("server_encoding") == "UTF8"
        conn.execute("SET application_name = 'pgwarden-test'")
        assert info.parameter_status("application_name") == "pgwarden-test"
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        assert info.parameter_status("TimeZone") == "Asia/Kolkata"
        value = conn.execute("SELECT '2024-01-01 00:00+00'::timestamptz").fetchone()
        assert value is not None and value[0].utcoffset() == dt.timedelta(hours=5, minutes=30)


def test_listen_notify_between_connections(proxy: ProxyProcess) -> None:
    with (
        connect(proxy.dsn(), autocommit=True) as listener,
        connect(proxy.dsn(), autocommit=True) as sender,
    ):
        listener.execute("LISTEN pgwarden_channel")
        sender.execute("NOTIFY pgwarden_channel, 'first'")
        sender.execute("SELECT pg_notify('pgwarden_channel', 'second é')")
        got = list(listener.notifies(timeout=5, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [
            ("pgwarden_channel", "first"),
            ("pgwarden_channel", "second é"),
        ]
        assert {n.pid for n in got} == {sender.info.backend_pid}
        # A notification arriving while idle reaches the handlers with the next query.
        received: list[psycopg.Notify] = []
        listener.add_notify_handler(received.append)
        sender.execute("NOTIFY pgwarden_channel, 'third'")
        wait_until(lambda: listener.execute("SELECT 1") and received, 5)
        assert [n.payload for n in received] == ["third"]


def copy_payload(rows: int) -> bytes:
    """COPY text data of `rows` rows, about 120 bytes each, with characters COPY escapes."""
    lines = [f"{i}\tline {i} tab\\there é {'x' * 100}\n" for i in range(rows)]
    return "".join(lines).encode()


def test_copy_from_stdin_and_to_stdout_text(proxy: ProxyProcess, pg: PgServer, table: str) -> None:
    payload = copy_payload(30_000)  # a few MB
    assert len(payload) > 3_000_000
    with connect(proxy.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {table} FROM STDIN") as copy:
            for start in range(0, len(payload), 65536):
                copy.write(payload[start : start + 65536])
        assert cur.rowcount == 30_000
        out = bytearray()
        with cur.copy(f"COPY {table} TO STDOUT") as copy:
            for block in copy:
                out += block
        assert bytes(out) == payload
        assert conn.execute(f"SELECT payload FROM {table} WHERE id = 7").fetchone() == (
            "line 7 tab\there é " + "x" * 100,
        )
    with connect(pg.dsn()) as direct, direct.cursor() as cur:
        direct_out = bytearray()
        with cur.copy(f"COPY {table} TO STDOUT") as copy:
            for block in copy:
                direct_out += block
    assert direct_out == out


def test_copy_binary_both_ways(proxy: ProxyProcess, pg: PgServer, table: str) -> None:
    pg.psql(
        f"INSERT INTO {table} SELECT g, repeat(md5(g::text), 10) FROM generate_series(1, 20000) g"
    )
    query = f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT (FORMAT binary)"

    def copy_out(dsn: str) -> bytes:
        with connect(dsn) as conn, conn.cursor() as cur, cur.copy(query) as copy:
            return b"".join(bytes(block) for block in copy)

    data = copy_out(proxy.dsn())
    assert len(data) > 6_000_000 and data.startswith(b"PGCOPY\n\xff\r\n\0")
    assert data == copy_out(pg.dsn())
    with connect(proxy.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE copy_target (id int, payload text)")
        with cur.copy("COPY copy_target FROM STDIN (FORMAT binary)") as copy:
            copy.write(data)
        assert cur.rowcount == 20000
        check = f"SELECT count(*) FROM copy_target c JOIN {table} t USING (id, payload)"
        assert conn.execute(check).fetchone() == (20000,)
        with cur.copy("COPY copy_target (id, payload) FROM STDIN (FORMAT binary)") as copy:
            copy.set_types(["int4", "text"])
            copy.write_row((-1, "row by row"))
        assert conn.execute("SELECT payload FROM copy_target WHERE id = -1").fetchone() == (
            "row by row",
        )


def test_copy_failures_leave_connection_usable(proxy: ProxyProcess) -> None:
    with connect(proxy.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE c (x int)")
        with pytest.raises(errors.InvalidTextRepresentation), cur.copy("COPY c FROM STDIN") as copy:
            copy.write(b"1\nnot a number\n3\n")
        # An exception in the block makes psycopg send CopyFail; the server ends the COPY.
        with pytest.raises(RuntimeError, match="boom"), cur.copy("COPY c FROM STDIN") as copy:
            copy.write(b"1\n")
            raise RuntimeError("boom")
        assert conn.execute("SELECT count(*) FROM c").fetchone() == (0,)


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_running_query(proxy: ProxyProcess, pg: PgServer, method: str) -> None:
    assert_cancel_works(proxy.dsn(), pg, method)


def test_pipeline_many_statements_with_error(proxy: ProxyProcess, table: str) -> None:
    ins = f"INSERT INTO {table} VALUES (%s, %s)"
    with connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int * 3", (i,)) for i in range(200)]
            with conn.cursor() as cur:
                cur.executemany(ins, [(i, f"p{i}") for i in range(300)])
        assert [c.fetchone() for c in cursors] == [(i * 3,) for i in range(200)]
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (300,)

        # An error aborts the implicit transaction up to the next Sync: 1000 is rolled back
        # and 1001 skipped; 1003, synced before the error, stays.
        with pytest.raises(errors.DivisionByZero), conn.pipeline() as pipeline:
            conn.execute(ins, (1003, "synced"))
            pipeline.sync()
            first = conn.execute("SELECT 'before'")
            conn.execute(ins, (1000, "rolled back"))
            conn.execute("SELECT 1/0")
            conn.execute(ins, (1001, "skipped"))
            pipeline.sync()
        assert first.fetchone() == ("before",)
        kept = conn.execute(f"SELECT id FROM {table} WHERE id >= 1000").fetchall()
        assert kept == [(1003,)]
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        with conn.pipeline():
            again = conn.execute("SELECT 'pipeline again'")
        assert again.fetchone() == ("pipeline again",)


# --------------------------------------------------------------------- async


async def async_basics(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT %s::int + %s", (40, 2))
        assert await cur.fetchone() == (42,)
        cur = await conn.execute("SELECT %s, %s", (b"\x00\xff", "é"), binary=True)
        assert await cur.fetchone() == (b"\x00\xff", "é")
        cur = await conn.execute("SELECT g FROM generate_series(1, 20000) g")
        assert [r[0] for r in await cur.fetchall()] == list(range(1, 20001))
        with pytest.raises(errors.UndefinedColumn) as info:
            await conn.execute("SELECT nope")
        assert info.value.sqlstate == "42703"
        assert await (await conn.execute("SELECT 'ok'")).fetchone() == ("ok",)
        await conn.set_autocommit(False)
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE a (x int)")
            await conn.execute("INSERT INTO a VALUES (1)")
        async with conn.transaction(force_rollback=True):
            await conn.execute("INSERT INTO a VALUES (2)")
        assert await (await conn.execute("SELECT array_agg(x) FROM a")).fetchone() == ([1],)
        async with conn.cursor(name="async_cursor") as scur:
            await scur.execute("SELECT g FROM generate_series(1, 500) g")
            assert [r[0] async for r in scur] == list(range(1, 501))
        await conn.commit()


def test_async_basics(proxy: ProxyProcess) -> None:
    asyncio.run(async_basics(proxy.dsn()))


async def async_pipeline(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.pipeline():
            cursors = [await conn.execute("SELECT %s::text", (f"v{i}",)) for i in range(300)]
        assert [await c.fetchone() for c in cursors] == [(f"v{i}",) for i in range(300)]
        with pytest.raises(errors.UndefinedTable):
            async with conn.pipeline() as pipeline:
                ok = await conn.execute("SELECT 1")
                await conn.execute("SELECT * FROM no_such_table")
                await conn.execute("SELECT 2")
                await pipeline.sync()
        assert await ok.fetchone() == (1,)
        assert await (await conn.execute("SELECT 'usable'")).fetchone() == ("usable",)


def test_async_pipeline(proxy: ProxyProcess) -> None:
    asyncio.run(async_pipeline(proxy.dsn()))


async def async_notify_and_cancel(dsn: str, direct_dsn: str) -> None:
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as worker,
        await psycopg.AsyncConnection.connect(direct_dsn, autocommit=True) as observer,
    ):
        await listener.execute("LISTEN async_channel")
        await worker.execute("NOTIFY async_channel, 'hi'")
        got = [n async for n in listener.notifies(timeout=5, stop_after=1)]
        assert [(n.channel, n.payload) for n in got] == [("async_channel", "hi")]

        async def cancel_when_running() -> None:
            running = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
            while not await (
                await observer.execute(running, (worker.info.backend_pid,))
            ).fetchone():
                await asyncio.sleep(0.05)
            await worker.cancel_safe()

        began = time.monotonic()
        task = asyncio.ensure_future(asyncio.wait_for(cancel_when_running(), 5))
        with pytest.raises(errors.QueryCanceled):
            await worker.execute("SELECT pg_sleep(10)")
        await task
        assert time.monotonic() - began < 5
        assert await (await worker.execute("SELECT 'usable'")).fetchone() == ("usable",)


def test_async_notify_and_cancel(proxy: ProxyProcess, pg: PgServer) -> None:
    asyncio.run(async_notify_and_cancel(proxy.dsn(), pg.dsn()))

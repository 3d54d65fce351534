"""Faults on purpose: a hop between pgwarden and PostgreSQL (tests/support/faulty_hop.py)
cuts, stalls and delays the connection mid-result, mid-COPY, mid-authentication and
mid-pipeline. Each client gets its result or an error within its bounds, never a hang;
afterwards pgwarden serves a fresh connection and has no session left open.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.support.faulty_hop import BOTH, TO_CLIENT, TO_SERVER, Direction, FaultyHop
from tests.support.proxy import ProxyProcess
from tests.support.util import PgServer, wait_until

StartProxy = Callable[..., ProxyProcess]

pytestmark = pytest.mark.timeout(60)

BOUND = 15.0  # seconds any client may wait for its result or error
LARGE_RESULT = "SELECT n, repeat('x', 1000) FROM generate_series(1, 20000) AS n"  # ~20 MB


@pytest.fixture
def hop(pg: PgServer) -> Iterator[FaultyHop]:
    with FaultyHop(pg.host, pg.port) as running:
        yield running


@pytest.fixture
def through_hop(proxy_factory: StartProxy, hop: FaultyHop) -> Callable[..., ProxyProcess]:
    """start(config=None): pgwarden whose upstream is the hop."""

    def start(config: dict[str, Any] | None = None) -> ProxyProcess:
        return proxy_factory({"upstream": {"address": hop.address}, **(config or {})})

    return start


def connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5, **kwargs)


def gauge(proxy: ProxyProcess, name: str) -> float:
    status, body = proxy.http_get("/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def no_sessions(proxy: ProxyProcess) -> bool:
    """pgwarden counts no client and no upstream connection open."""
    return (
        gauge(proxy, "pgwarden_client_connections") == 0
        and gauge(proxy, "pgwarden_server_connections") == 0
    )


def assert_recovered(proxy: ProxyProcess, hop: FaultyHop) -> None:
    """pgwarden let go of every session the fault hit, even before the hop heals; healed,
    it serves a fresh connection and then has no session and no upstream connection left."""
    wait_until(lambda: no_sessions(proxy), 10, message="the faulted sessions released")
    hop.heal()
    assert proxy.process.poll() is None, proxy.log_text()
    with connect(proxy) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)
    wait_until(lambda: no_sessions(proxy), 5, message="pgwarden's connection gauges at zero")
    wait_until(lambda: hop.links_open == 0, 5, message="every upstream connection closed")


class Bounded:
    """Times a block that must end (with its result or an error) within BOUND seconds."""

    def __enter__(self) -> Bounded:
        self.began = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.elapsed = time.monotonic() - self.began
        assert self.elapsed < BOUND, f"took {self.elapsed:.1f}s"


# ------------------------------------------------------------------------- cuts


def test_cut_mid_result(through_hop: Callable[..., ProxyProcess], hop: FaultyHop) -> None:
    proxy = through_hop()
    with connect(proxy) as conn:
        hop.cut(TO_CLIENT, after=2_000_000)
        with Bounded(), pytest.raises(psycopg.OperationalError):
            conn.execute(LARGE_RESULT).fetchall()
    proxy.wait_log(lambda e: e["event"] == "upstream_lost")
    assert_recovered(proxy, hop)


def test_cut_mid_copy_from_stdin(through_hop: Callable[..., ProxyProcess], hop: FaultyHop) -> None:
    proxy = through_hop()
    with connect(proxy) as conn:
        conn.execute("CREATE TEMP TABLE copied (n int, s text)")
        hop.cut(TO_SERVER, after=1_000_000)
        with (
            Bounded(),
            pytest.raises(psycopg.OperationalError),
            conn.cursor().copy("COPY copied (n, s) FROM STDIN") as copy,
        ):
            for n in range(300_000):
                copy.write_row((n, "y" * 50))
    assert_recovered(proxy, hop)


@pytest.mark.parametrize("after", [1, 12, 60], ids=["first-byte", "mid-message", "later"])
def test_cut_mid_authentication(
    through_hop: Callable[..., ProxyProcess], hop: FaultyHop, after: int
) -> None:
    """The server's first bytes arrive, then the connection is gone (trust: AuthenticationOk,
    then ParameterStatus messages)."""
    proxy = through_hop()
    hop.cut(TO_CLIENT, after=after)
    with Bounded(), pytest.raises(psycopg.OperationalError):
        connect(proxy)
    assert_recovered(proxy, hop)


def test_cut_mid_scram(
    through_hop: Callable[..., ProxyProcess], hop: FaultyHop, password_roles: dict[str, str]
) -> None:
    """Cut right after AuthenticationSASL (24 bytes: no channel binding on the plain hop):
    the client answered, the server never will."""
    proxy = through_hop()
    hop.cut(TO_CLIENT, after=24)
    with Bounded(), pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            proxy.dsn(user="scram_user", password=password_roles["scram_user"]), connect_timeout=5
        )
    assert_recovered(proxy, hop)


@pytest.mark.parametrize("direction", [TO_SERVER, TO_CLIENT], ids=lambda d: d.value)
def test_cut_mid_pipeline_psycopg(
    through_hop: Callable[..., ProxyProcess], hop: FaultyHop, direction: Direction
) -> None:
    proxy = through_hop()
    with connect(proxy) as conn:
        conn.execute("CREATE TEMP TABLE piped (n int, s text)")
        hop.cut(direction, after=100_000)
        with Bounded(), pytest.raises(psycopg.OperationalError), conn.pipeline():
            cur = conn.cursor()
            for n in range(20_000):
                cur.execute("INSERT INTO piped VALUES (%s, %s) RETURNING n", (n, "z" * 20))
    assert_recovered(proxy, hop)


def test_cut_mid_executemany_asyncpg(
    through_hop: Callable[..., ProxyProcess], hop: FaultyHop
) -> None:
    proxy = through_hop()

    async def run() -> BaseException | None:
        conn = await asyncpg.connect(
            host=proxy.host, port=proxy.port, user="postgres", database="postgres", timeout=5
        )
        try:
            await conn.execute("CREATE TEMP TABLE many (n int, s text)")
            hop.cut(TO_SERVER, after=200_000)
            rows = [(n, "w" * 20) for n in range(50_000)]
            try:
                await asyncio.wait_for(
                    conn.executemany("INSERT INTO many VALUES ($1, $2)", rows), BOUND
                )
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                return exc
            return None
        finally:
            conn.terminate()

    raised = asyncio.run(run())
    assert raised is not None, "executemany succeeded through a cut connection"
    assert not isinstance(raised, TimeoutError), "executemany hung"
    assert_recovered(proxy, hop)


# ------------------------------------------------------------------------ stalls


@pytest.mark.parametrize(
    "direction", [TO_CLIENT, TO_SERVER, BOTH], ids=["to_client", "to_server", "both"]
)
def test_stall_ends_at_the_statement_timeout(
    through_hop: Callable[..., ProxyProcess],
    hop: FaultyHop,
    direction: Direction | tuple[Direction, ...],
) -> None:
    """PostgreSQL stops answering (or never hears the statement): with `timeouts.statement`
    the client gets 57014 or a connection error within its bound, even though the cancel
    itself is lost too."""
    proxy = through_hop({"timeouts": {"statement": "1s"}})
    with connect(proxy) as conn:
        hop.stall(direction)
        with Bounded() as bounded, pytest.raises(psycopg.OperationalError) as raised:
            conn.execute("SELECT 1")
    assert bounded.elapsed >= 1.0
    sqlstate = getattr(raised.value, "sqlstate", None)
    assert sqlstate in (None, "57014", "08006"), raised.value
    proxy.wait_log(lambda e: e["event"] == "statement_timeout")
    assert_recovered(proxy, hop)


def test_stall_mid_copy_ends_at_the_statement_timeout(
    through_hop: Callable[..., ProxyProcess], hop: FaultyHop
) -> None:
    """PostgreSQL stops reading a COPY: pgwarden's buffers to it fill, the client gets
    backpressure, and the statement timeout still ends it; the upstream connection, its
    unsent bytes included, is released without waiting for the hung server."""
    proxy = through_hop({"timeouts": {"statement": "1s"}})
    with connect(proxy) as conn:
        conn.execute("CREATE TEMP TABLE stalled (n int, s text)")
        hop.stall(TO_SERVER, after=1_000_000)
        with (
            Bounded(),
            pytest.raises(psycopg.OperationalError),
            conn.cursor().copy("COPY stalled (n, s) FROM STDIN") as copy,
        ):
            for n in range(1_000_000):
                copy.write_row((n, "v" * 50))
    proxy.wait_log(lambda e: e["event"] == "statement_timeout")
    assert_recovered(proxy, hop)


def test_stall_in_authentication_ends_at_the_startup_timeout(
    through_hop: Callable[..., ProxyProcess], hop: FaultyHop
) -> None:
    proxy = through_hop({"limits": {"startup_timeout": "1s"}})
    hop.stall(TO_CLIENT, after=9)  # AuthenticationOk passes, the rest never comes
    with Bounded(), pytest.raises(psycopg.OperationalError, match="startup"):
        connect(proxy)
    proxy.wait_log(lambda e: e["event"] == "startup_timeout")
    assert_recovered(proxy, hop)


# ------------------------------------------------------------------------ delays


def test_delays_keep_results_correct(
    through_hop: Callable[..., ProxyProcess], hop: FaultyHop
) -> None:
    """Every chunk 20 ms late both ways: results, COPY and a pipeline come out right, and
    a statement timeout well above the delay never fires."""
    proxy = through_hop({"timeouts": {"statement": "5s"}})
    table = f"delayed_{uuid.uuid4().hex[:8]}"
    hop.delay(0.02)
    with connect(proxy) as conn:
        rows = conn.execute("SELECT n, md5(n::text) FROM generate_series(1, 5000) AS n").fetchall()
        assert rows == [(n, _md5(n)) for n in range(1, 5001)]
        assert conn.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
        conn.execute(f"CREATE TEMP TABLE {table} (n int, s text)")
        with conn.cursor().copy(f"COPY {table} (n, s) FROM STDIN") as copy:
            for n in range(20_000):
                copy.write_row((n, str(n)))
        with conn.pipeline():
            cur = conn.cursor()
            for n in range(100):
                cur.execute(f"INSERT INTO {table} VALUES (%s, %s)", (-n, "p"))
        assert conn.execute(f"SELECT count(*), sum(n) FROM {table}").fetchone() == (
            20_100,
            sum(range(20_000)) - sum(range(100)),
        )
        with conn.cursor().copy(f"COPY (SELECT n FROM {table} ORDER BY n) TO STDOUT") as copy:
            out = b"".join(bytes(block) for block in copy)
        assert out.count(b"\n") == 20_100

    async def with_asyncpg() -> list[int]:
        conn = await asyncpg.connect(
            host=proxy.host, port=proxy.port, user="postgres", database="postgres", timeout=10
        )
        try:
            return [r[0] for r in await conn.fetch("SELECT generate_series(1, 3000)")]
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == list(range(1, 3001))
    assert not [e for e in proxy.log_events() if e.get("event") == "statement_timeout"]
    assert_recovered(proxy, hop)


def _md5(n: int) -> str:
    return hashlib.md5(str(n).encode()).hexdigest()

"""pgwarden's memory per connection: an open idle session costs at most 100 KB of RSS,
waves of connections leave nothing behind (bench/memory.py measures the same, larger),
and a closed session is freed at once, by reference counting alone."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from proxy.config import deep_merge, settings_from_dict
from proxy.detectors.n_plus_one import _SOURCE_BYTES, NPlusOne, NPlusOneOptions
from proxy.inspector import Inspector
from proxy.server import ProxyServer
from proxy.session.relay import Relay
from proxy.session.session import Session
from tests.support.proxy import REPO_ROOT, ProxyProcess
from tests.support.util import PgServer, free_port
from tests.test_detectors_unit import BOOKS, WHO, feed
from tests.test_detectors_unit import Session as Statements

sys.path.insert(0, str(REPO_ROOT / "bench"))
try:
    import memory as bench_memory
finally:
    sys.path.pop(0)

CONNECTIONS = 200
WAVES = 3
StartProxy = Callable[..., ProxyProcess]

# Every hook on: statement timeouts (one short enough to cancel), and rules that block.
HOOKS: dict[str, Any] = {
    "timeouts": {
        "statement": "30s",
        "idle_in_transaction": "60s",
        "rules": [{"name": "short", "match": {"application_name": "mem-short"}, "statement": 0.2}],
    },
    "blocks": [{"name": "no-delete-all", "match": {"command": "DELETE", "without_where": True}}],
}
CONFIGS = {"default": {}, "hooks": HOOKS, "analysis-off": {"analysis": {"enabled": False}}}


def _free_connections(pg: PgServer) -> int:
    """How many more connections the server accepts now."""
    limit = int(pg.psql("SHOW max_connections"))
    reserved = int(pg.psql("SHOW superuser_reserved_connections"))
    used = int(
        pg.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
    )
    return limit - reserved - used


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", ["default", "hooks"])
def test_idle_sessions_are_cheap_and_waves_leave_nothing(
    proxy_factory: StartProxy, pg: PgServer, config: str
) -> None:
    """Each connection runs an application's statements (bench/memory.py's `app`), then
    idles; then all close; three times."""
    if _free_connections(pg) < CONNECTIONS + 10:
        pytest.skip(f"the test server cannot take {CONNECTIONS} more connections")
    proxy = proxy_factory(CONFIGS[config])
    try:
        report = asyncio.run(
            bench_memory.measure(proxy.dsn(), proxy.pid, connections=CONNECTIONS, waves=WAVES)
        )
    finally:
        pg.psql("DROP TABLE IF EXISTS memory_authors, memory_books, memory_notes")
    figures = bench_memory.render(report, f"{config}: {CONNECTIONS} x {WAVES}")
    assert report.per_session <= bench_memory.PER_SESSION_TARGET, figures
    assert report.retained <= bench_memory.RETAINED_TARGET, figures


# ------------------------------------------------------------- what a session keeps


def _kept_rows(detector: NPlusOne) -> list[bytes]:
    return [row for source in detector._sources.values() for row in source.sample.rows]


def test_n_plus_one_sources_keep_a_bounded_sample() -> None:
    """An idle session keeps its latest multi-row results to trace loops to: 16 results of
    1000 rows kept whole took 300 KB a session. Together they keep at most _SOURCE_BYTES
    (each row counted with its bytes object), the oldest going first, and the first rows
    of a result larger than that alone."""
    s = Statements()
    detector = NPlusOne(NPlusOneOptions(), WHO)
    rows = [(n, f"name {n} " + "x" * 100) for n in range(1, 1001)]
    for table in range(16):
        last = s.run(f"SELECT id, name FROM authors_{table}", rows=rows)
        detector.observe(last)
    kept = _kept_rows(detector)
    assert sum(len(row) + 48 for row in kept) <= _SOURCE_BYTES
    assert len(detector._sources) == 1  # the latest, cut to its first rows
    assert last.sampled is not None and kept == last.sampled[: len(kept)]
    assert len(kept) > 150

    # a loop over those first rows is still traced to them
    lookups = [s.run(BOOKS, n) for n in range(1, 8)]
    (advice,) = feed(detector, lookups)
    assert advice.source is not None and advice.source["column"] == "id"


# ----------------------------------------------------- freed without the cycle collector


async def _session_life(port: int, how: str, hooks: bool) -> None:
    """One client's life through pgwarden, ending the way `how` says; `hooks`: with the
    HOOKS config, whose rules cancel and block."""
    app = "mem-short" if how == "cancelled" else "mem"
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        database="postgres",
        server_settings={"application_name": app},
        timeout=10,
    )
    await conn.fetch("SELECT n, md5(n::text) FROM generate_series(1, 200) AS n")
    await conn.execute("CREATE TEMP TABLE mem_t (n int)")
    if how == "cancelled" and hooks:  # a statement over its limit: cancelled, error edited
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute("SELECT pg_sleep(5)")
    elif how == "blocked" and hooks:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM mem_t")
    if how == "vanished":  # gone mid-transaction, without a Terminate
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO mem_t VALUES (1)")
        conn.terminate()
    else:
        await conn.close()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_closed_sessions_are_freed_by_reference_counting(pg: PgServer, config: str) -> None:
    """pgwarden's cycle collector runs seldom (cli.py tunes it for speed), so a session
    caught in a reference cycle when it closes stays in memory, with its analysis state and
    result samples, until a full collection, hours later: with the collector off, every
    closed session must be gone once its connections are."""

    async def main() -> list[object]:
        base = {
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": {"address": f"{pg.host}:{pg.port}", "sslmode": "disable"},
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
        }
        server = ProxyServer(settings_from_dict(deep_merge(base, CONFIGS[config])))
        await server.start()
        port = server.settings.listen.port
        gc.collect()
        gc.disable()
        try:
            lives = ["closed", "cancelled", "blocked", "vanished"] * 3
            hooks = config == "hooks"
            await asyncio.gather(*(_session_life(port, how, hooks) for how in lives))
            deadline = time.monotonic() + 5
            while True:
                left = [o for o in gc.get_objects() if isinstance(o, Session | Relay | Inspector)]
                if not left or time.monotonic() > deadline:
                    return left
                del left
                await asyncio.sleep(0.05)
        finally:
            gc.enable()
            await server.drain()

    left = asyncio.run(main())
    assert not left, f"{len(left)} objects of closed sessions left: {left[:5]}"

"""pgwarden's memory with many idle connections: what one open session costs, and what
waves of connections leave behind.

Starts a throwaway PostgreSQL (max_connections to fit) and pgwarden on it, the way
bench/run.py does, then for each wave opens N connections through pgwarden (each
authenticated, runs `SELECT 1` and an application's statements, see SETUP_SQL, then
idles), closes them all, and reads the proxy's VmRSS (/proc/PID/status) before the wave,
with all N open, and once pgwarden closed them all (its open file descriptors back to what
they were). A few connections come and go before the first reading, so lazily imported
code is not charged to the sessions.

    .venv/bin/python bench/memory.py [--connections 300] [--waves 5] [--client asyncpg|psycopg]
                                     [--workload app|idle] [--extra-config FILE] [--json]
    PGWARDEN_PURE=1 .venv/bin/python bench/memory.py       # analysis modules interpreted

Targets (exit 1 when missed): at most 100 KB of RSS per open idle session, and every wave
leaves RSS within 10 MB of what the first wave left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from psycopg.conninfo import conninfo_to_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.tools.pgcluster import LocalCluster, tcp_dsn

ROOT = Path(__file__).resolve().parent.parent
KB = 1024
MB = 1024 * 1024
PER_SESSION_TARGET = 100 * KB
RETAINED_TARGET = 10 * MB
WARMUP_CONNECTIONS = 5
CONCURRENCY = 50  # connections being opened at once
SETTLE = 0.3  # seconds after the last close before RSS is read (the backlog's timer is 50 ms)
CLOSE_TIMEOUT = 30.0

Close = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Wave:
    """RSS in bytes before the wave, with its connections open, and after they closed."""

    before: int
    open: int
    after: int


@dataclass(frozen=True)
class Report:
    connections: int
    baseline: int  # RSS after the warm-up, before the first wave
    waves: list[Wave]

    @property
    def per_session(self) -> float:
        """Bytes per open idle session: the worst wave's RSS over the baseline, per session."""
        return max(wave.open - self.baseline for wave in self.waves) / self.connections

    @property
    def retained(self) -> int:
        """How far above what the first wave left any later wave left RSS."""
        first = self.waves[0].after
        return max(wave.after - first for wave in self.waves)

    @property
    def meets_targets(self) -> bool:
        return self.per_session <= PER_SESSION_TARGET and self.retained <= RETAINED_TARGET


def rss(pid: int) -> int:
    """VmRSS of `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# What each connection runs before it goes idle, as an application's pooled connection
# would: a multi-row result whose ids it then looks up one by one (an N+1 loop), a
# row-by-row insert in a transaction, and a larger result. What the analysis keeps of
# them (the result samples, the open loops) is what an idle session holds.
SETUP_SQL = """
CREATE TABLE IF NOT EXISTS memory_authors (id int PRIMARY KEY, name text);
CREATE TABLE IF NOT EXISTS memory_books (id serial PRIMARY KEY, author_id int, title text);
CREATE TABLE IF NOT EXISTS memory_notes (author_id int, note text);
INSERT INTO memory_authors SELECT n, 'author ' || n FROM generate_series(1, 50) AS n
    ON CONFLICT DO NOTHING;
INSERT INTO memory_books (author_id, title)
    SELECT n % 50 + 1, 'book ' || n FROM generate_series(1, 200) AS n
    WHERE NOT EXISTS (SELECT FROM memory_books);
"""
AUTHORS = "SELECT id, name FROM memory_authors ORDER BY id"
BOOKS = "SELECT id, title FROM memory_books WHERE author_id = {}"
NOTE = "INSERT INTO memory_notes (author_id, note) VALUES ({}, {})"
LARGE = "SELECT n, repeat('x', 200) FROM generate_series(1, 2000) AS n"
LOOKUPS = 8
INSERTS = 12
WORKLOADS = ("idle", "app")


async def _connect_asyncpg(dsn: str, workload: str) -> Close:
    params = conninfo_to_dict(dsn)
    conn = await asyncpg.connect(
        host=params["host"],
        port=int(params["port"]),
        user=params["user"],
        database=params["dbname"],
        password=params.get("password"),
        ssl=False,
        timeout=30,
    )
    await conn.fetchval("SELECT 1")
    if workload == "app":
        authors = await conn.fetch(AUTHORS)
        for author in authors[:LOOKUPS]:
            await conn.fetch(BOOKS.format("$1"), author["id"])
        async with conn.transaction():
            for n in range(INSERTS):
                await conn.execute(NOTE.format("$1", "$2"), n, "note")
        await conn.fetch(LARGE)
    return conn.close


async def _connect_psycopg(dsn: str, workload: str) -> Close:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=30)
    await conn.execute("SELECT 1")
    if workload == "app":
        authors = await (await conn.execute(AUTHORS)).fetchall()
        for author_id, _ in authors[:LOOKUPS]:
            await conn.execute(BOOKS.format("%s"), (author_id,))
        async with conn.transaction():
            for n in range(INSERTS):
                await conn.execute(NOTE.format("%s", "%s"), (n, "note"))
        await (await conn.execute(LARGE)).fetchall()
    return conn.close


CLIENTS: dict[str, Callable[[str, str], Awaitable[Close]]] = {
    "asyncpg": _connect_asyncpg,
    "psycopg": _connect_psycopg,
}


async def _wait(what: str, predicate: Callable[[], bool], timeout: float = CLOSE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _open_all(dsn: str, count: int, client: str, workload: str) -> list[Close]:
    connect = CLIENTS[client]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> Close:
        async with gate:
            return await connect(dsn, workload)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    closes = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await asyncio.gather(*(close() for close in closes), return_exceptions=True)
        raise RuntimeError(f"{len(failed)} of {count} connections failed: {failed[0]!r}")
    return closes


async def _wave(dsn: str, pid: int, count: int, client: str, workload: str, idle_fds: int) -> Wave:
    before = rss(pid)
    closes = await _open_all(dsn, count, client, workload)
    # each session holds two sockets: the client's and the upstream's
    await _wait("the sessions to open", lambda: open_fds(pid) >= idle_fds + 2 * count)
    await asyncio.sleep(SETTLE)
    opened = rss(pid)
    await asyncio.gather(*(close() for close in closes))
    await _wait("pgwarden to close every session", lambda: open_fds(pid) <= idle_fds)
    await asyncio.sleep(SETTLE)
    return Wave(before, opened, rss(pid))


async def measure(
    dsn: str,
    pid: int,
    *,
    connections: int,
    waves: int,
    client: str = "asyncpg",
    workload: str = "app",
    progress: Callable[[int, Wave], None] | None = None,
) -> Report:
    """Runs the waves against the pgwarden process `pid` that `dsn` reaches; it must have
    no other connections meanwhile."""
    if workload == "app":
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(SETUP_SQL)
    closes = await _open_all(dsn, WARMUP_CONNECTIONS, client, workload)
    await asyncio.gather(*(close() for close in closes))
    await asyncio.sleep(SETTLE)
    idle_fds = open_fds(pid)
    baseline = rss(pid)
    done: list[Wave] = []
    for number in range(1, waves + 1):
        wave = await _wave(dsn, pid, connections, client, workload, idle_fds)
        done.append(wave)
        if progress is not None:
            progress(number, wave)
    return Report(connections, baseline, done)


def render(report: Report, what: str) -> str:
    n = report.connections
    lines = [
        what,
        f"baseline (after {WARMUP_CONNECTIONS} warm-up connections): {report.baseline / MB:.1f} MB",
        "",
        "| wave | before (MB) | open (MB) | after (MB) | per open session (KB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for number, wave in enumerate(report.waves, 1):
        lines.append(
            f"| {number} | {wave.before / MB:.1f} | {wave.open / MB:.1f} | {wave.after / MB:.1f} "
            f"| {(wave.open - report.baseline) / n / KB:.1f} |"
        )
    verdict = "targets met" if report.meets_targets else "TARGETS MISSED"
    lines += [
        "",
        f"per open idle session: {report.per_session / KB:.1f} KB (target "
        f"{PER_SESSION_TARGET // KB} KB); waves 2-{len(report.waves)} left "
        f"{report.retained / MB:+.1f} MB over wave 1 (target {RETAINED_TARGET // MB} MB): "
        f"{verdict}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300, help="per wave (300)")
    parser.add_argument("--waves", type=int, default=5, help="(5)")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="asyncpg")
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="app",
        help="what each connection runs before it idles: `SELECT 1` (idle), or that and an "
        "application's statements (app, the default)",
    )
    parser.add_argument("--extra-config", type=Path, help="YAML merged into pgwarden's config")
    parser.add_argument(
        "--checkout",
        type=Path,
        default=ROOT,
        help="run the pgwarden of this tree, with its own .venv (this one by default)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    from run import _load_yaml, start_pgwarden

    args = parse_args(argv)
    # two sockets per session, and the client's own: raise the soft limit for all of us
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    config = _load_yaml(args.extra_config) if args.extra_config else {}
    with contextlib.ExitStack() as stack:
        settings = {"max_connections": str(args.connections + 20)}
        cluster = stack.enter_context(
            LocalCluster(ssl=False, password_roles=False, settings=settings)
        )
        workdir = Path(tempfile.mkdtemp(prefix="pgwarden-memory-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        target = start_pgwarden(
            stack, "pgwarden", config, cluster.port, workdir, checkout=args.checkout.resolve()
        )
        assert target.pid is not None
        dsn = tcp_dsn(("127.0.0.1", target.port), cluster.superuser)
        what = (
            f"pgwarden ({_listening(workdir)}), {args.connections} connections x "
            f"{args.waves} waves, {args.client}, workload {args.workload}"
        )

        def progress(number: int, wave: Wave) -> None:
            print(
                f"wave {number}: before {wave.before / MB:.1f} MB, open {wave.open / MB:.1f} MB,"
                f" after {wave.after / MB:.1f} MB",
                file=sys.stderr,
            )

        report = asyncio.run(
            measure(
                dsn,
                target.pid,
                connections=args.connections,
                waves=args.waves,
                client=args.client,
                workload=args.workload,
                progress=progress,
            )
        )
    if args.json:
        record: dict[str, Any] = asdict(report) | {
            "what": what,
            "per_session": report.per_session,
            "retained": report.retained,
            "meets_targets": report.meets_targets,
        }
        print(json.dumps(record, indent=2))
    else:
        print(render(report, what))
    return 0 if report.meets_targets else 1


def _listening(workdir: Path) -> str:
    """How the pgwarden measured runs, as its `listening` log line says."""
    for line in (workdir / "pgwarden.log").read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "listening":
                code = str(event.get("analysis_code"))
                return f"analysis {code.split(' (')[0]}"  # without why it is interpreted
    return "analysis code unknown"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:
        sys.exit(f"bench/memory: {exc}")

"""Logging never touches the relay: a standard output that breaks (`pgwarden run | head -1`),
stalls (a reader that stops reading) or fails (a full disk) costs log lines, counted in
pgwarden_log_lines_dropped_total{reason}, never a connection, a signal or the event loop.

The process tests run a real pgwarden whose stdout is a pipe the test controls; the unit
tests drive proxy.logs.LogSink with pipes and /dev/full.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.logs import DROP_REASONS, LogSink
from tests.support.proxy import ProxyProcess, launch_with_defaults
from tests.support.util import PgServer, wait_until

# An impossible message length: pgwarden logs protocol_violation and connection_closed
# (two lines, about 500 bytes) and closes, without ever reaching PostgreSQL.
GARBAGE = b"\xde\xad\xbe\xef\x00\x01garbage\xff" * 4
PIPE_BUFFER = 65536  # Linux's default pipe capacity


def dropped(proxy: ProxyProcess) -> dict[str, float]:
    """pgwarden_log_lines_dropped_total by reason, from /metrics."""
    status, text = proxy.http_get("/metrics")
    assert status == 200, text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "pgwarden_log_lines_dropped"
        for sample in family.samples
        if sample.name == "pgwarden_log_lines_dropped_total"
    }


def query_once(proxy: ProxyProcess) -> None:
    """A new connection through the proxy, one query, closed: two log lines."""
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def stop_within(proxy: ProxyProcess, seconds: float) -> None:
    """SIGTERM ends the process, exit 0, within `seconds`."""
    started = time.monotonic()
    code = proxy.stop(timeout=seconds + 10)
    elapsed = time.monotonic() - started
    assert code == 0, f"exit {code}\n{proxy.log_text()}"
    assert elapsed < seconds, f"SIGTERM took {elapsed:.1f}s"


def garbage_connections(proxy: ProxyProcess, count: int) -> None:
    """`count` clients sending garbage, four at a time; each waits for pgwarden to close."""

    def one(_: int) -> None:
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            sock.sendall(GARBAGE)
            while sock.recv(4096):
                pass

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(count)))


class Prober:
    """SELECT 1 through the proxy in a thread, on one connection, for the whole block: the
    slowest round trip (the one still waiting included) shows whether the relay stalled."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
        self.queries = 0
        self.errors: list[BaseException] = []
        self._slowest = 0.0
        self._since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._since = time.monotonic()
            try:
                self.conn.execute("SELECT 1").fetchone()
            except BaseException as exc:
                self.errors.append(exc)
                return
            self._slowest = max(self._slowest, time.monotonic() - self._since)
            self._since = None
            self.queries += 1
            self._stop.wait(0.005)

    def slowest(self) -> float:
        since = self._since
        waiting = time.monotonic() - since if since is not None else 0.0
        return max(self._slowest, waiting)

    def __enter__(self) -> Prober:
        self._thread.start()
        wait_until(lambda: self.queries >= 3 or self.errors, message="the prober to query")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        if not self._thread.is_alive():
            self.conn.close()


# ------------------------------------------------------------------ through pgwarden


def test_a_reader_that_leaves_costs_log_lines_not_connections(pg: PgServer, tmp_path: Path) -> None:
    """`pgwarden run | head -1`: once head has its line and exits, clients still connect,
    /readyz answers, the lost lines are counted, and SIGTERM still drains and exits 0."""
    read_end, write_end = os.pipe()
    head_out = tmp_path / "head.out"
    with head_out.open("wb") as out:
        head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=out)
    os.close(read_end)
    try:
        proxy = launch_with_defaults(pg, tmp_path, "proxy", stdout=write_end)
    finally:
        os.close(write_end)
    try:
        head.wait(10)
        assert "event" in json.loads(head_out.read_text())  # head got pgwarden's first line
        for _ in range(5):
            query_once(proxy)
        assert proxy.http_get("/readyz")[0] == 200
        lost = dropped(proxy)
        assert lost["broken_pipe"] >= 10, lost  # opened and closed, for each connection
        assert lost["full"] == lost["error"] == 0, lost
        stop_within(proxy, 5)
        assert "Traceback" not in proxy.log_text(), proxy.log_text()
    finally:
        proxy.stop()
        head.kill()
        head.wait()


def test_a_stdout_nobody_reads_does_not_stall_the_relay(pg: PgServer, tmp_path: Path) -> None:
    """Nobody reads stdout: the pipe fills, then pgwarden's log queue; lines are dropped
    and counted while a client's queries keep their latency, and SIGTERM still exits."""
    read_end, write_end = os.pipe()  # read_end stays open, never read
    try:
        proxy = launch_with_defaults(pg, tmp_path, "proxy", stdout=write_end)
    finally:
        os.close(write_end)
    try:
        with Prober(proxy.dsn()) as prober:
            clients = 0
            while not dropped(proxy)["full"]:
                assert clients < 20_000, f"the log queue never filled: {dropped(proxy)}"
                garbage_connections(proxy, 500)
                clients += 500
            query_once(proxy)
            before = prober.queries
            wait_until(lambda: prober.queries >= before + 3 or prober.errors, 5)
            assert not prober.errors, prober.errors
            assert prober.slowest() < 2.0, f"a query waited {prober.slowest():.2f}s"
        lost = dropped(proxy)
        assert lost["full"] > 0 and lost["broken_pipe"] == lost["error"] == 0, lost
        stop_within(proxy, 8)  # the drain, then at most 2 s for the queued lines
        assert "Traceback" not in proxy.log_text(), proxy.log_text()
    finally:
        proxy.stop()
        os.close(read_end)


# ------------------------------------------------------------------ the sink alone


def lines(count: int, width: int = 200) -> list[str]:
    return [f"line {i:06d} {'x' * width}" for i in range(count)]


def test_sink_writes_every_line_in_order() -> None:
    read_end, write_end = os.pipe()
    sink = LogSink(write_end)
    try:
        sent = lines(100, width=20)
        for line in sent:
            sink.write(line)
        assert sink.flush(5)
        received = os.read(read_end, PIPE_BUFFER).decode().splitlines()
        assert received == sent
        assert sink.dropped() == dict.fromkeys(DROP_REASONS, 0)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_sink_counts_lines_after_the_reader_left_and_never_raises() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` after head exited: every write gets EPIPE
    sink = LogSink(write_end)
    try:
        for line in lines(100):
            sink.write(line)
        assert sink.flush(5)
        for line in lines(50):  # the sink has given up: counted without a write
            sink.write(line)
        assert sink.flush(5)
        assert sink.dropped() == {"broken_pipe": 150, "error": 0, "full": 0}
    finally:
        os.close(write_end)


def test_sink_counts_failed_writes_and_keeps_trying() -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC, like a full disk
    sink = LogSink(fd)
    try:
        for line in lines(10):
            sink.write(line)
        assert sink.flush(5)
        for line in lines(5):  # a full disk may get room again: still written, still lost
            sink.write(line)
        assert sink.flush(5)
        assert sink.dropped() == {"broken_pipe": 0, "error": 15, "full": 0}
    finally:
        os.close(fd)


def test_sink_with_a_stalled_reader_drops_without_blocking_then_catches_up() -> None:
    """A reader that stops reading: writes stay fast, lines past the queue's bound are
    dropped as full, flush gives up at its timeout; when the reader comes back it gets
    every queued line, in order, and every line is either read or counted."""
    read_end, write_end = os.pipe()
    sink = LogSink(write_end, max_lines=1000, max_chars=10**6)
    sent = lines(5000)
    try:
        started = time.monotonic()
        for line in sent:
            sink.write(line)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        assert not sink.flush(0.2)
        assert time.monotonic() - started < 1.0
        full = sink.dropped()["full"]
        # what the pipe holds, the batch the writer is stuck on, and the queue
        assert full >= len(sent) - PIPE_BUFFER // 200 - 2 * 1000

        received: list[str] = []

        def read_all() -> None:
            with os.fdopen(read_end, "rb", closefd=False) as pipe:
                received.extend(line.decode().rstrip("\n") for line in pipe)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        assert sink.flush(5)
        os.close(write_end)  # the reader's end of file
        reader.join(5)
        assert len(received) + full == len(sent)
        assert received == sorted(received) and set(received) <= set(sent)
        assert sink.dropped() == {"broken_pipe": 0, "error": 0, "full": full}
    finally:
        os.close(read_end)

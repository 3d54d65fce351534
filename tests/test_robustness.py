"""pgwarden under abuse: malformed input, connection limits, cancels, vanishing clients and
servers, and slow readers. Every test runs a real pgwarden process against real PostgreSQL.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import errors

from proxy.tools.pgcluster import LocalCluster
from tests.support.proxy import ProxyProcess
from tests.support.rawpg import (
    PROTOCOL_3_0,
    Message,
    RawClient,
    error_fields,
    query_message,
    ssl_request,
    startup_message,
)
from tests.support.util import PgServer, free_port, wait_until

StartProxy = Callable[..., ProxyProcess]


# ----------------------------------------------------------------------------- helpers


class Bystander:
    """A well-behaved client querying through the proxy in a thread the whole time."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="bystander")
        self.queries = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                row = self.conn.execute("SELECT 1").fetchone()
                assert row == (1,), row
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.queries += 1
            self._stop.wait(0.01)

    def start(self) -> None:
        self._thread.start()
        wait_until(lambda: self.queries >= 3 or self.errors, message="the bystander to query")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.close()

    def finish(self) -> None:
        """Stop, and fail if the bystander saw an error or stopped making progress."""
        before = self.queries
        wait_until(lambda: self.queries >= before + 3 or self.errors, message="bystander progress")
        self.stop()
        assert not self.errors, f"the bystander connection was disturbed: {self.errors!r}"


@contextmanager
def bystander(proxy: ProxyProcess) -> Iterator[Bystander]:
    """Runs a Bystander around the block; a disturbed bystander fails the test."""
    watcher = Bystander(proxy.dsn())
    watcher.start()
    try:
        yield watcher
    except BaseException:
        watcher.stop()
        raise
    watcher.finish()


def only_fatal(messages: list[Message], *sqlstates: str) -> dict[str, str]:
    """The fields of the single FATAL ErrorResponse `messages` must consist of."""
    assert [kind for kind, _ in messages] == [b"E"], f"expected one ErrorResponse: {messages}"
    fields = error_fields(messages[0][1])
    assert fields.get("S") == "FATAL", fields
    assert fields.get("C") in sqlstates, fields
    return fields


def assert_serves(proxy: ProxyProcess) -> None:
    """The process is alive and a new client gets answers."""
    assert proxy.process.poll() is None, proxy.log_text()
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)


def direct(pg: PgServer) -> psycopg.Connection[Any]:
    """A connection straight to PostgreSQL, for looking at pg_stat_activity."""
    return psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=5)


def backends(conn: psycopg.Connection[Any], application_name: str) -> list[tuple[int, str]]:
    """(pid, state) of the backends serving clients with this application_name."""
    rows = conn.execute(
        "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
        (application_name,),
    ).fetchall()
    return [(pid, state) for pid, state in rows]


def wait_active(conn: psycopg.Connection[Any], application_name: str, timeout: float = 5) -> int:
    """Wait until a backend of `application_name` runs a statement; its pid."""

    def active() -> int | None:
        rows = [pid for pid, state in backends(conn, application_name) if state == "active"]
        return rows[0] if rows else None

    return wait_until(active, timeout, message=f"an active backend for {application_name}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------- malformed input

MALFORMED_STARTUP: dict[str, bytes] = {
    "garbage": b"\xde\xad\xbe\xef\x00\x01garbage\xff" * 4,
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n\r\n",
    "startup_too_long": struct.pack("!iI", 10001, PROTOCOL_3_0) + b"user\0postgres\0\0",
    "startup_too_short": struct.pack("!iI", 4, PROTOCOL_3_0),
    "startup_negative_length": struct.pack("!iI", -8, PROTOCOL_3_0),
    "protocol_2_0": startup_message(2 << 16, user="postgres", database="postgres"),
    "protocol_9_9": startup_message(9 << 16 | 9, user="postgres", database="postgres"),
    "startup_without_user": startup_message(database="postgres"),
    "ssl_request_with_trailing_data": ssl_request() + startup_message(user="postgres"),
}


@pytest.mark.parametrize("payload", MALFORMED_STARTUP.values(), ids=MALFORMED_STARTUP.keys())
def test_malformed_startup_is_refused(proxy: ProxyProcess, payload: bytes) -> None:
    """A FATAL 08P01 (0A000 for a protocol version), a close, a log event; nobody else hurt."""
    with bystander(proxy):
        began = time.monotonic()
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(payload)
            messages = raw.read_until_closed(timeout=3)
        assert time.monotonic() - began < 2
        only_fatal(messages, "08P01", "0A000")
        event = proxy.wait_log(lambda e: e["event"] == "protocol_violation")
        assert event["side"] == "client"
    assert_serves(proxy)


@pytest.mark.parametrize(
    "payload",
    [
        b"Q\xff\xff\xff\xff",
        b"Q" + struct.pack("!I", 0x40000000),
        b"Q\x00\x00\x00\x03",
        b"X\x00\x00\x00\x00",
    ],
    ids=["length_4gb", "length_1gb", "length_3", "length_0"],
)
def test_bad_message_length_after_authentication(
    proxy: ProxyProcess, pg: PgServer, payload: bytes
) -> None:
    """Refused before anything reaches PostgreSQL, whose backend then goes away."""
    app = unique("badlen")
    with bystander(proxy), direct(pg) as admin:
        with RawClient(proxy.host, proxy.port) as raw:
            raw.login(application_name=app)
            assert len(backends(admin, app)) == 1
            raw.send(payload)
            only_fatal(raw.read_until_closed(timeout=3), "08P01")
        event = proxy.wait_log(lambda e: e["event"] == "protocol_violation")
        assert (event["side"], event["application_name"]) == ("client", app)
        wait_until(lambda: not backends(admin, app), message="the backend to exit")
    assert_serves(proxy)


@pytest.mark.parametrize("sent", [b"", b"\x00\x00\x00\x30"], ids=["silent", "four_bytes"])
def test_stalled_startup_is_closed_at_startup_timeout(
    proxy_factory: StartProxy, sent: bytes
) -> None:
    proxy = proxy_factory({"limits": {"startup_timeout": "1s"}})
    with bystander(proxy):
        with RawClient(proxy.host, proxy.port) as raw:
            began = time.monotonic()
            raw.send(sent)
            messages = raw.read_until_closed(timeout=4)
            waited = time.monotonic() - began
        assert 0.8 < waited < 2, waited
        only_fatal(messages, "08P01")
        event = proxy.wait_log(lambda e: e["event"] == "startup_timeout")
        assert event["phase"] == "startup"
        # the bystander itself has been connected longer than startup_timeout by now
    assert_serves(proxy)


def test_client_stalled_in_authentication_is_closed_at_startup_timeout(
    proxy_factory: StartProxy, password_roles: dict[str, str]
) -> None:
    """A password is asked for and never given: the startup timeout covers this phase too."""
    proxy = proxy_factory({"limits": {"startup_timeout": "1s"}})
    with bystander(proxy):
        with RawClient(proxy.host, proxy.port) as raw:
            began = time.monotonic()
            raw.send(startup_message(user="scram_user", database="postgres"))
            kind, body = raw.read_message()
            assert (kind, struct.unpack_from("!i", body)[0]) == (b"R", 10)  # AuthenticationSASL
            messages = raw.read_until_closed(timeout=4)
            waited = time.monotonic() - began
        assert 0.8 < waited < 2, waited
        only_fatal(messages, "08P01")
        event = proxy.wait_log(lambda e: e["event"] == "startup_timeout")
        assert (event["phase"], event["user"]) == ("auth", "scram_user")
    assert_serves(proxy)


def test_proxy_survives_a_barrage_of_malformed_input(proxy: ProxyProcess) -> None:
    """Every kind at once, several times over, from parallel sockets."""
    with bystander(proxy):
        clients = []
        for _ in range(5):
            for payload in MALFORMED_STARTUP.values():
                raw = RawClient(proxy.host, proxy.port)
                raw.send(payload)
                clients.append(raw)
        for raw in clients:
            with raw:
                only_fatal(raw.read_until_closed(timeout=5), "08P01", "0A000")

        def violations() -> list[dict[str, object]]:  # the log is written asynchronously
            return [e for e in proxy.log_events() if e["event"] == "protocol_violation"]

        wait_until(lambda: len(violations()) >= len(clients), message="every violation logged")
        assert len(violations()) == len(clients)
    assert_serves(proxy)


# ------------------------------------------------------------------ connection limit


def test_max_client_connections(proxy_factory: StartProxy) -> None:
    proxy = proxy_factory({"limits": {"max_client_connections": 3}})
    conns = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(proxy.dsn(), connect_timeout=5)
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(startup_message(user="postgres", database="postgres"))
            only_fatal(raw.read_until_closed(), "53300")
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        conns.pop().close()

        def connects() -> psycopg.Connection[Any] | None:
            try:
                return psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5)
            except psycopg.OperationalError:
                return None

        conns.append(wait_until(connects, message="a free slot after a client left"))
        assert conns[-1].execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(proxy.dsn(), connect_timeout=5)
    finally:
        for conn in conns:
            conn.close()


# ------------------------------------------------------------------------- cancelling


def _run_in_thread(conn: psycopg.Connection[Any], sql: str) -> tuple[threading.Thread, dict]:
    """Runs `sql` on `conn` in a thread; the dict gets "error" (or None) and "at"."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            conn.execute(sql)
            outcome["error"] = None
        except BaseException as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_cancel_reaches_the_right_backend(proxy: ProxyProcess, pg: PgServer) -> None:
    apps = unique("cancel-a"), unique("cancel-b")
    a, b = (psycopg.connect(proxy.dsn(application_name=app), autocommit=True) for app in apps)
    with a, b, direct(pg) as admin:
        thread_a, outcome_a = _run_in_thread(a, "SELECT pg_sleep(30)")
        thread_b, outcome_b = _run_in_thread(b, "SELECT pg_sleep(30)")
        pid_a, pid_b = (wait_active(admin, app) for app in apps)
        assert (pid_a, pid_b) == (a.info.backend_pid, b.info.backend_pid)

        # A cancel with b's pid but a wrong secret key must be ignored.
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(struct.pack("!iIi", 16, 80877102, pid_b) + b"\x00\x00\x00\x00")
            assert raw.read_until_closed() == []
        proxy.wait_log(lambda e: e["event"] == "cancel_ignored")

        began = time.monotonic()
        a.cancel_safe()
        thread_a.join(3)
        assert isinstance(outcome_a.get("error"), errors.QueryCanceled), outcome_a
        assert outcome_a["at"] - began < 2
        assert a.execute("SELECT 1").fetchone() == (1,)  # the session survives its cancel

        assert "error" not in outcome_b
        assert backends(admin, apps[1]) == [(pid_b, "active")]
        b.cancel_safe()
        thread_b.join(3)
        assert isinstance(outcome_b.get("error"), errors.QueryCanceled), outcome_b


# ------------------------------------------------------------ clients that go away


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_gone_mid_query_ends_the_backend(
    proxy: ProxyProcess, pg: PgServer, how: str
) -> None:
    app = unique(f"gone-{how}")
    with direct(pg) as admin:
        raw = RawClient(proxy.host, proxy.port)
        raw.login(application_name=app)
        raw.send(query_message("SELECT pg_sleep(60)"))
        wait_active(admin, app)
        began = time.monotonic()
        raw.close() if how == "close" else raw.reset()
        wait_until(lambda: not backends(admin, app), 3, message="the backend to exit")
        assert time.monotonic() - began < 1.5
    event = proxy.wait_log(
        lambda e: e["event"] == "connection_closed" and e.get("application_name") == app
    )
    assert event["reason"] == ("client_closed" if how == "close" else "client_error")
    assert_serves(proxy)


def test_killed_client_process_ends_the_backend(proxy: ProxyProcess, pg: PgServer) -> None:
    app = unique("gone-kill")
    script = "import sys, psycopg; psycopg.connect(sys.argv[1]).execute('SELECT pg_sleep(60)')"
    child = subprocess.Popen([sys.executable, "-c", script, proxy.dsn(application_name=app)])
    try:
        with direct(pg) as admin:
            wait_active(admin, app, timeout=15)
            began = time.monotonic()
            child.kill()
            child.wait(5)
            wait_until(lambda: not backends(admin, app), 3, message="the backend to exit")
            assert time.monotonic() - began < 1.5
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------- servers that go away


def test_terminated_backend_gives_the_client_an_error(proxy: ProxyProcess, pg: PgServer) -> None:
    app = unique("terminated")
    conn = psycopg.connect(proxy.dsn(application_name=app), autocommit=True)
    with conn, direct(pg) as admin:
        thread, outcome = _run_in_thread(conn, "SELECT pg_sleep(30)")
        pid = wait_active(admin, app)
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        thread.join(3)
        assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
        assert conn.broken or conn.closed
    event = proxy.wait_log(
        lambda e: e["event"] == "connection_closed" and e.get("application_name") == app
    )
    assert event["reason"] == "server_closed"
    assert_serves(proxy)


def _pg_ctl(cluster: LocalCluster, *args: str) -> None:
    result = cluster.run_as_owner(
        [str(cluster.bindir / "pg_ctl"), *args, "-D", str(cluster.datadir)]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_upstream_stops_and_comes_back(proxy_factory: StartProxy) -> None:
    """Clients get errors, never hangs, while PostgreSQL is down; served again once it's up."""
    cluster = LocalCluster(ssl=False, password_roles=False).start()
    try:
        proxy = proxy_factory(
            {
                "upstream": {"address": f"{cluster.host}:{cluster.port}"},
                "admin": {"ready_requires_upstream": True},  # /readyz follows PostgreSQL
            }
        )
        assert proxy.http_get("/readyz")[0] == 200
        app = unique("upstream-stops")
        conn = psycopg.connect(proxy.dsn(application_name=app), autocommit=True)
        with conn:
            thread, outcome = _run_in_thread(conn, "SELECT pg_sleep(30)")
            with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
                wait_active(admin, app)
            _pg_ctl(cluster, "stop", "-m", "immediate")
            thread.join(5)
            assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
            assert conn.broken or conn.closed

        with pytest.raises(psycopg.OperationalError, match="pgwarden"):
            psycopg.connect(proxy.dsn(), connect_timeout=5)
        assert proxy.http_get("/readyz")[0] == 503

        log = str(cluster.datadir.parent / "restart.log")
        _pg_ctl(cluster, "start", "-w", "-t", "60", "-l", log)

        def served() -> bool:
            try:
                assert_serves(proxy)
            except psycopg.OperationalError:
                return False
            return True

        wait_until(served, 10, interval=0.2, message="a client served after the restart")
        assert proxy.http_get("/readyz")[0] == 200
    finally:
        cluster.stop()


def test_unreachable_upstream(proxy_factory: StartProxy) -> None:
    proxy = proxy_factory({"upstream": {"address": f"127.0.0.1:{free_port()}"}})
    assert proxy.http_get("/healthz")[0] == 200
    status, body = proxy.http_get("/readyz")  # admin.ready_requires_upstream is off
    assert status == 200, body
    with pytest.raises(psycopg.OperationalError, match="pgwarden"):
        psycopg.connect(proxy.dsn(), connect_timeout=5)
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(startup_message(user="postgres", database="postgres"))
        fields = only_fatal(raw.read_until_closed(), "08001")
    assert "pgwarden" in fields["M"]
    proxy.wait_log(lambda e: e["event"] == "upstream_connect_failed")
    assert proxy.process.poll() is None


# ------------------------------------------------------------------- flow control

ROWS = 220_000
ROW_WIDTH = 1000


def test_slow_reader_of_a_large_result_gets_backpressure(proxy: ProxyProcess) -> None:
    """220 MB read at ~50 MB/s: the proxy must pause the server instead of buffering."""
    with RawClient(proxy.host, proxy.port, rcvbuf=1 << 16, timeout=30) as raw:
        raw.login(application_name="slow-reader")
        baseline = peak = proxy.rss_bytes()
        raw.send(query_message(f"SELECT repeat('x', {ROW_WIDTH}) FROM generate_series(1, {ROWS})"))
        rows = payload = reads = 0
        tag = b""
        buf = bytearray()
        pos = 0
        done = False
        began = time.monotonic()
        while not done:
            chunk = raw.sock.recv(1 << 16)
            assert chunk, "the proxy closed the connection mid-result"
            buf += chunk
            reads += 1
            while len(buf) - pos >= 5:
                kind = buf[pos]
                (length,) = struct.unpack_from("!I", buf, pos + 1)
                end = pos + 1 + length
                if end > len(buf):
                    break
                if kind == 0x44:  # DataRow: 2-byte column count, 4-byte length, value
                    rows += 1
                    payload += struct.unpack_from("!i", buf, pos + 7)[0]
                elif kind == 0x43:  # CommandComplete
                    tag = bytes(buf[pos + 5 : end - 1])
                elif kind == 0x45:
                    raise AssertionError(error_fields(bytes(buf[pos + 5 : end])))
                elif kind == 0x5A:
                    done = True
                pos = end
            del buf[:pos]
            pos = 0
            if reads % 50 == 0:
                peak = max(peak, proxy.rss_bytes())
                time.sleep(0.05)  # ~64 kB per ms at most: a few seconds for the whole result
        elapsed = time.monotonic() - began
    assert (rows, payload, tag) == (ROWS, ROWS * ROW_WIDTH, f"SELECT {ROWS}".encode())
    assert elapsed > 2, f"read too fast ({elapsed:.1f}s) to show backpressure"
    growth = peak - baseline
    assert growth < 50 * 2**20, f"proxy RSS grew by {growth / 2**20:.0f} MB"

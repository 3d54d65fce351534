"""Running pgwarden: drain on SIGTERM, reload on SIGHUP, the command line and its config
checks, and the admin HTTP endpoints and connection log events.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from tests.support.proxy import REPO_ROOT, ProxyProcess, default_config, pgwarden
from tests.support.util import PgServer, free_port, wait_until

StartProxy = Callable[..., ProxyProcess]


def direct(pg: PgServer) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=5)


@pytest.fixture
def table(pg: PgServer) -> Iterator[str]:
    """A fresh table `(n int)`, dropped afterwards."""
    name = f"ops_{uuid.uuid4().hex[:10]}"
    with direct(pg) as conn:
        conn.execute(f"CREATE TABLE {name} (n int)")
    yield name
    with direct(pg) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def events(proxy: ProxyProcess, name: str, **fields: object) -> list[dict[str, Any]]:
    """Log events called `name` whose fields include `fields`."""
    return [
        e
        for e in proxy.log_events()
        if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]


def refused(proxy: ProxyProcess) -> bool:
    """Whether a new TCP connection to the client port is refused."""
    try:
        socket.create_connection((proxy.host, proxy.port), timeout=2).close()
    except OSError:
        return True
    return False


# ----------------------------------------------------------------------------- drain


def test_sigterm_drains_open_transactions(
    proxy_factory: StartProxy, pg: PgServer, table: str
) -> None:
    proxy = proxy_factory({"shutdown": {"drain_timeout": "5s"}})
    busy = psycopg.connect(proxy.dsn(application_name="drain-busy"), autocommit=True)
    idle = psycopg.connect(proxy.dsn(application_name="drain-idle"), autocommit=True)
    with busy, idle:
        busy.execute("BEGIN")
        busy.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.signal(signal.SIGTERM)

        closed = proxy.wait_log(
            lambda e: e["event"] == "connection_closed" and e["application_name"] == "drain-idle",
            timeout=1,
        )
        assert closed["reason"] == "drained"
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")

        assert wait_until(lambda: refused(proxy), 2, message="new connections refused")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(), connect_timeout=3)
        status, body = proxy.http_get("/readyz")
        assert (status, "draining" in body) == (503, True)

        busy.execute(f"INSERT INTO {table} VALUES (2)")  # still working, mid-transaction
        assert proxy.process.poll() is None
        busy.execute("COMMIT")
        committed = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as raised:
            busy.execute("SELECT 1")
        assert isinstance(raised.value, errors.AdminShutdown) or busy.closed, raised.value

    assert proxy.process.wait(5) == 0
    assert time.monotonic() - committed < 2, "did not exit once the last transaction ended"
    with direct(pg) as conn:
        assert conn.execute(f"SELECT n FROM {table} ORDER BY n").fetchall() == [(1,), (2,)]
    assert events(proxy, "stopped", closed_at_deadline=0)


def test_drain_timeout_cuts_open_transactions(
    proxy_factory: StartProxy, pg: PgServer, table: str
) -> None:
    proxy = proxy_factory({"shutdown": {"drain_timeout": "1s"}})
    with psycopg.connect(proxy.dsn(application_name="drain-stuck"), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        began = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.process.wait(5) == 0
        assert 0.8 < time.monotonic() - began < 3
        with pytest.raises(psycopg.OperationalError):
            conn.execute("COMMIT")
    closed = events(proxy, "connection_closed", application_name="drain-stuck")
    assert [e["reason"] for e in closed] == ["drain_timeout"]
    assert events(proxy, "stopped", closed_at_deadline=1)

    def rolled_back() -> bool:
        with direct(pg) as admin:
            return admin.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)

    wait_until(rolled_back, message="the cut transaction to be rolled back")


def test_sigterm_with_no_clients_exits_at_once(proxy: ProxyProcess) -> None:
    began = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - began < 2


# ---------------------------------------------------------------------------- reload


def _rewrite_config(proxy: ProxyProcess, change: Callable[[dict[str, Any]], None]) -> None:
    config = yaml.safe_load(proxy.config_path.read_text())
    change(config)
    proxy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def _sighup(proxy: ProxyProcess, event: str) -> dict[str, Any]:
    """SIGHUP, then the new `event` (reloaded / reload_failed) it caused."""
    seen = len(events(proxy, event))
    proxy.signal(signal.SIGHUP)
    return wait_until(lambda: events(proxy, event)[seen:], message=f"a new {event} event")[0]


def test_sighup_applies_a_new_limit_without_dropping_clients(proxy_factory: StartProxy) -> None:
    proxy = proxy_factory({"limits": {"max_client_connections": 10}})
    first = psycopg.connect(proxy.dsn(), autocommit=True)
    second: psycopg.Connection[Any] | None = None
    try:
        first.execute("BEGIN")
        first.execute("SELECT 1")

        def limit_two(config: dict[str, Any]) -> None:
            config["limits"]["max_client_connections"] = 2

        _rewrite_config(proxy, limit_two)
        _sighup(proxy, "reloaded")
        assert first.execute("SELECT 2").fetchone() == (2,)  # same transaction, still open
        first.execute("COMMIT")
        second = psycopg.connect(proxy.dsn(), autocommit=True)
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(proxy.dsn(), connect_timeout=5)

        broken_files = [
            ("limits:\n  max_client_connections: lots\n", "limits.max_client_connections"),
            ("limits: [unclosed\n", "not valid YAML"),
        ]
        for broken, named in broken_files:
            proxy.config_path.write_text(broken)
            failed = _sighup(proxy, "reload_failed")
            assert named in failed["error"], failed
            assert proxy.process.poll() is None
            assert first.execute("SELECT 3").fetchone() == (3,)
            assert second.execute("SELECT 4").fetchone() == (4,)
            with pytest.raises(psycopg.OperationalError, match="too many clients"):
                psycopg.connect(proxy.dsn(), connect_timeout=5)  # the limit of 2 stays
    finally:
        first.close()
        if second is not None:
            second.close()


def test_sighup_applies_a_new_log_level(proxy_factory: StartProxy) -> None:
    proxy = proxy_factory({"logging": {"level": "info"}})
    with psycopg.connect(proxy.dsn(application_name="before-reload")):
        pass
    proxy.wait_log(lambda e: e["event"] == "connection_closed")

    def quieter(config: dict[str, Any]) -> None:
        config["logging"]["level"] = "warning"

    _rewrite_config(proxy, quieter)
    _sighup(proxy, "reloaded")
    with psycopg.connect(proxy.dsn(application_name="after-reload")) as conn:
        conn.execute("SELECT 1")
    wait_until(lambda: _gauge(proxy, "pgwarden_client_connections") == 0)
    # a warning-level event is still logged, and comes after any event of that client
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        while raw.recv(1024):
            pass
    proxy.wait_log(lambda e: e["event"] == "protocol_violation")
    assert not events(proxy, "connection_opened", application_name="after-reload")
    assert not events(proxy, "connection_closed", application_name="after-reload")


# ------------------------------------------------------------------ command line


VALID_CONFIG = {
    "listen": "127.0.0.1:6432",
    "upstream": {"address": "127.0.0.1:5432", "sslmode": "prefer"},
    "admin": {"listen": "127.0.0.1:9930"},
    "shutdown": {"drain_timeout": "30s"},
    "limits": {"max_client_connections": 100, "startup_timeout": "500ms"},
    "logging": {"format": "json", "level": "info"},
}


def write_config(path: Path, config: dict[str, Any] | str) -> Path:
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    result = pgwarden("check-config", str(write_config(tmp_path / "ok.yaml", VALID_CONFIG)))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    effective = yaml.safe_load(result.stdout.split("\n", 1)[1])
    assert effective["limits"]["startup_timeout"] == "0.5s"
    assert effective["upstream"]["address"] == "127.0.0.1:5432"


def test_check_config_accepts_the_shipped_config() -> None:
    shipped = REPO_ROOT / "config" / "pgwarden.yaml"
    if not shipped.exists():
        pytest.skip("config/pgwarden.yaml is not in the repository yet")
    result = pgwarden("check-config", str(shipped))
    assert result.returncode == 0, result.stderr


BAD_CONFIGS: dict[str, tuple[object, str]] = {
    "unknown_top_key": ({"lisen": "127.0.0.1:6432"}, "lisen"),
    "unknown_nested_key": ({"limits": {"max_clients": 5}}, "limits.max_clients"),
    "bad_duration": ({"shutdown": {"drain_timeout": "5 parsecs"}}, "shutdown.drain_timeout"),
    "negative_duration": ({"limits": {"startup_timeout": "-1s"}}, "limits.startup_timeout"),
    "bad_sslmode": ({"upstream": {"sslmode": "sometimes"}}, "upstream.sslmode"),
    "port_too_high": ({"listen": "127.0.0.1:70000"}, "listen"),
    "port_zero": ({"admin": {"listen": "127.0.0.1:0"}}, "admin.listen"),
    "bad_upstream_port": ({"upstream": {"address": "db:port"}}, "upstream.address"),
    "zero_limit": ({"limits": {"max_client_connections": 0}}, "limits.max_client_connections"),
    "not_a_mapping": ({"limits": 5}, "limits"),
    "bad_yaml": ("listen: [unclosed\n", "YAML"),
}


@pytest.mark.parametrize(("config", "key"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, command: str, config: object, key: str
) -> None:
    path = write_config(tmp_path / "bad.yaml", config)  # type: ignore[arg-type]
    args = (
        ["check-config", str(path)] if command == "check-config" else ["run", "--config", str(path)]
    )
    result = pgwarden(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = pgwarden("run", "--config", str(tmp_path / "nowhere.yaml"))
    assert result.returncode == 2
    assert "nowhere.yaml" in result.stderr


def test_bad_flag_value_exits_2_naming_the_key() -> None:
    result = pgwarden("run", "--listen", "127.0.0.1:99999")
    assert result.returncode == 2
    assert "listen" in result.stderr


def _healthz(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("via", ["--config", "PGWARDEN_CONFIG"])
def test_flags_override_the_file(tmp_path: Path, pg: PgServer, via: str) -> None:
    """--listen, --upstream and --admin win over the file (named by flag or environment)."""
    file_ports = free_port(), free_port()
    config = default_config(f"127.0.0.1:{free_port()}")  # nothing listens there
    config["listen"] = f"127.0.0.1:{file_ports[0]}"
    config["admin"]["listen"] = f"127.0.0.1:{file_ports[1]}"
    path = write_config(tmp_path / "file.yaml", config)
    listen, admin = free_port(), free_port()
    flags = ["--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"]
    flags += ["--upstream", f"{pg.host}:{pg.port}"]
    env = dict(os.environ)
    if via == "--config":
        flags += ["--config", str(path)]
    else:
        env["PGWARDEN_CONFIG"] = str(path)
    log = (tmp_path / "flags.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", *flags],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _healthz(admin) or process.poll() is not None, 15)
        assert process.poll() is None, (tmp_path / "flags.log").read_text()
        with psycopg.connect(pg.dsn(host="127.0.0.1", port=str(listen)), connect_timeout=5) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        assert not _healthz(file_ports[1])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", file_ports[0]), timeout=1).close()
        started = next(e for e in _json_lines(tmp_path / "flags.log") if e["event"] == "listening")
        assert started["config"] == str(path)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        finally:
            process.kill()
            process.wait()
            log.close()
    assert process.returncode == 0


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            yield json.loads(line)


# -------------------------------------------------------------------------- admin


def test_health_and_readiness(proxy: ProxyProcess) -> None:
    assert proxy.http_get("/healthz") == (200, "ok\n")
    status, body = proxy.http_get("/readyz")
    assert status == 200, body
    assert proxy.http_get("/no-such-page")[0] == 404
    request = urllib.request.Request(proxy.admin_url + "/metrics", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5)
    assert raised.value.code == 405


def _gauge(proxy: ProxyProcess, name: str) -> float:
    status, body = proxy.http_get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_open_clients(proxy: ProxyProcess) -> None:
    wait_until(lambda: _gauge(proxy, "pgwarden_client_connections") == 0)
    first = psycopg.connect(proxy.dsn())
    second = psycopg.connect(proxy.dsn())
    with first:
        with second:
            assert _gauge(proxy, "pgwarden_client_connections") == 2
            assert _gauge(proxy, "pgwarden_server_connections") == 2
        wait_until(lambda: _gauge(proxy, "pgwarden_client_connections") == 1)
    wait_until(lambda: _gauge(proxy, "pgwarden_client_connections") == 0)
    assert _gauge(proxy, "pgwarden_server_connections") == 0


def test_metrics_openmetrics_on_request(proxy: ProxyProcess) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        proxy.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    with opener.open(request, timeout=5) as response:
        content_type = response.headers["Content-Type"]
        body = response.read().decode()
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert body.endswith("# EOF\n")
    assert "pgwarden_client_connections " in body
    with opener.open(proxy.admin_url + "/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")


def test_connection_events_name_the_client(proxy: ProxyProcess) -> None:
    app = f"logged-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(proxy.dsn(dbname="template1", application_name=app)) as conn:
        conn.execute("SELECT repeat('y', 5000)").fetchone()
        local = socket.socket(fileno=os.dup(conn.pgconn.socket))
        client = "{}:{}".format(*local.getsockname())
        local.close()
    opened = proxy.wait_log(
        lambda e: e["event"] == "connection_opened" and e.get("application_name") == app
    )
    closed = proxy.wait_log(
        lambda e: e["event"] == "connection_closed" and e.get("application_name") == app
    )
    for event in (opened, closed):
        assert (event["client"], event["user"], event["database"]) == (
            client,
            "postgres",
            "template1",
        )
    assert closed["reason"] == "client_closed"
    assert 0 < closed["duration_s"] < 10
    assert closed["bytes_in"] > len("SELECT repeat('y', 5000)")
    assert closed["bytes_out"] > 5000


@pytest.mark.parametrize("analysis", [True, False], ids=["analysis-on", "relay-only"])
def test_transactions_are_counted_and_timed(proxy_factory: StartProxy, analysis: bool) -> None:
    """Whether the server stream is read as relayed (relay only) or later by analysis, the
    round trips come out the same: transactions counted and timed, the session idle after."""
    proxy = proxy_factory({"analysis": {"enabled": analysis}})
    with psycopg.connect(proxy.dsn()) as conn:
        for _ in range(3):
            conn.execute("SELECT pg_sleep(0.05)")
            conn.commit()
        conn.execute("SELECT 1")
        conn.rollback()
        conn.autocommit = True
        conn.execute("SELECT 1")  # no transaction block: not counted
    assert _gauge(proxy, "pgwarden_transactions_total") == 4
    assert _gauge(proxy, "pgwarden_transaction_duration_seconds_count") == 4
    assert _gauge(proxy, "pgwarden_transaction_duration_seconds_sum") >= 0.15
    # and drain sees the session idle: SIGTERM ends the process at once
    with psycopg.connect(proxy.dsn(), autocommit=True) as idle:
        idle.execute("SELECT 1")
        began = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.process.wait(10) == 0
        assert time.monotonic() - began < 3

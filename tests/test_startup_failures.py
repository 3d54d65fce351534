"""Startups that fail are visible: each refusal logged with its SQLSTATE and counted by kind
in pgwarden_connection_errors_total; an unreachable upstream is warned of once at start;
/readyz depends on the upstream only when asked to, and then through a protocol exchange;
a port in use stops `pgwarden run` with exit code 3 and a line naming the listener."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import CONNECTION_ERROR_KINDS
from tests.support.proxy import REPO_ROOT, ProxyProcess
from tests.support.util import PgServer, free_port, wait_until

StartProxy = Callable[..., ProxyProcess]
CONNECT_TIMEOUT = 5
DEPLOY = REPO_ROOT / "deploy"


def connection_errors(proxy: ProxyProcess) -> dict[str, float]:
    """pgwarden_connection_errors_total by kind, as /metrics shows it now."""
    status, body = proxy.http_get("/metrics")
    assert status == 200
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "pgwarden_connection_errors_total"
    }


def events(proxy: ProxyProcess, name: str, **fields: object) -> list[dict[str, Any]]:
    """Log events called `name` whose fields include `fields`."""
    return [
        e
        for e in proxy.log_events()
        if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]


def refused_startup(proxy: ProxyProcess, kind: str, **fields: object) -> dict[str, Any]:
    """The one startup_failed event of `kind` (with `fields`), once its connection_closed
    says the same reason, the count of `kind` 1 and every other kind still 0."""
    failed = proxy.wait_log(
        lambda e: (
            e["event"] == "startup_failed"
            and e.get("kind") == kind
            and all(e.get(k) == v for k, v in fields.items())
        )
    )
    proxy.wait_log(lambda e: e["event"] == "connection_closed" and e.get("reason") == kind)
    assert len(events(proxy, "startup_failed")) == 1, events(proxy, "startup_failed")
    counts = connection_errors(proxy)
    assert counts[kind] == 1, counts
    assert sum(counts.values()) == 1, counts
    return failed


# ------------------------------------------------------------------ failed startups


@pytest.mark.parametrize("role", ["md5_user", "scram_user", "clear_user"])
def test_wrong_password_is_logged_and_counted_as_auth_failed(
    proxy: ProxyProcess, password_roles: dict[str, str], role: str
) -> None:
    secret = f"not-{password_roles[role]}-9f3k"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user=role, password=secret), connect_timeout=CONNECT_TIMEOUT)
    failed = refused_startup(proxy, "auth_failed", sqlstate="28P01", user=role)
    assert failed["level"] == "warning"
    assert failed["error"] == f'password authentication failed for user "{role}"'
    assert failed["database"] == "postgres" and failed["client"].startswith("127.0.0.1:")
    assert secret not in proxy.log_text()


def test_role_refused_by_pg_hba_is_auth_failed(
    proxy: ProxyProcess, password_roles: dict[str, str]
) -> None:
    """pg_hba.conf admits this role over TLS only; pgwarden's upstream hop is plain here."""
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf"):
        psycopg.connect(proxy.dsn(user="ssl_only_user"), connect_timeout=CONNECT_TIMEOUT)
    failed = refused_startup(proxy, "auth_failed", sqlstate="28000")
    assert "pg_hba.conf" in failed["error"]


def test_unknown_database_is_logged_and_counted(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError, match="no_such_db_3k9"):
        psycopg.connect(proxy.dsn(dbname="no_such_db_3k9"), connect_timeout=CONNECT_TIMEOUT)
    failed = refused_startup(proxy, "unknown_database", sqlstate="3D000")
    assert failed["error"] == 'database "no_such_db_3k9" does not exist'
    assert failed["database"] == "no_such_db_3k9"


def test_other_refusal_is_startup_failed_without_the_value(proxy: ProxyProcess) -> None:
    """PostgreSQL's message quotes the bad value of a startup option: the SQLSTATE is logged,
    the message is not."""
    value = "s3cr3t-v4lue"
    with pytest.raises(psycopg.OperationalError, match=value):  # the client itself is told
        psycopg.connect(proxy.dsn(options=f"-c work_mem={value}"), connect_timeout=CONNECT_TIMEOUT)
    failed = refused_startup(proxy, "startup_failed", sqlstate="22023")
    assert failed["error"] is None
    assert value not in proxy.log_text()


def test_client_requiring_tls_is_counted_as_tls_refused(proxy: ProxyProcess) -> None:
    """libpq with sslmode=require sends SSLRequest, is told N (pgwarden has no tls.cert) and
    closes without a startup packet."""
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy.dsn(sslmode="require"), connect_timeout=CONNECT_TIMEOUT)
    failed = refused_startup(proxy, "tls_refused")
    assert failed["sqlstate"] is None and "TLS" in failed["error"]
    # a client that prefers TLS goes on in plain text: nothing refused
    with psycopg.connect(proxy.dsn(sslmode="prefer"), connect_timeout=CONNECT_TIMEOUT) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert connection_errors(proxy)["tls_refused"] == 1


def test_successful_startups_count_nothing(proxy: ProxyProcess) -> None:
    for _ in range(2):
        with psycopg.connect(proxy.dsn(), connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.execute("SELECT 1")
    proxy.wait_log(lambda e: e["event"] == "connection_closed")
    assert not events(proxy, "startup_failed")
    assert set(connection_errors(proxy).values()) == {0}
    assert {"auth_failed", "unknown_database", "startup_failed", "tls_refused"} <= set(
        connection_errors(proxy)
    )


# ------------------------------------------------------------- an absent upstream


def test_unreachable_upstream_is_warned_of_once_at_start(proxy_factory: StartProxy) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    proxy = proxy_factory({"upstream": {"address": address}})
    warned = proxy.wait_log(lambda e: e["event"] == "upstream_unreachable")
    assert warned["level"] == "warning" and warned["upstream"] == address
    assert address in warned["error"]
    for _ in range(2):
        with pytest.raises(psycopg.OperationalError, match="pgwarden"):
            psycopg.connect(proxy.dsn(), connect_timeout=CONNECT_TIMEOUT)
    wait_until(lambda: len(events(proxy, "upstream_connect_failed")) == 2)
    assert len(events(proxy, "upstream_unreachable")) == 1


def test_reachable_upstream_is_not_warned_of(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), connect_timeout=CONNECT_TIMEOUT) as conn:
        conn.execute("SELECT 1")
    proxy.wait_log(lambda e: e["event"] == "connection_closed")
    assert not events(proxy, "upstream_unreachable")


def test_readyz_does_not_follow_the_upstream_by_default(proxy_factory: StartProxy) -> None:
    """A database blip must not pull every replica out of the Service at once."""
    proxy = proxy_factory({"upstream": {"address": f"127.0.0.1:{free_port()}"}})
    status, body = proxy.http_get("/readyz")
    assert (status, body) == (200, '{"ready": true}')


class SilentServer:
    """A TCP listener that accepts and then either says nothing or answers like a web
    server: something listens, but not PostgreSQL."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.answer:
                conn.sendall(self.answer)
            self.held.append(conn)  # open until close(): a probe must give up on its own

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def not_postgres(request: pytest.FixtureRequest) -> Iterator[SilentServer]:
    server = SilentServer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize(
    "not_postgres",
    [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"],
    ids=["silent", "http"],
    indirect=True,
)
def test_readyz_requiring_the_upstream_wants_a_protocol_answer(
    proxy_factory: StartProxy, not_postgres: SilentServer
) -> None:
    """A TCP connect alone would call anything listening on the port ready."""
    proxy = proxy_factory(
        {
            "upstream": {"address": f"127.0.0.1:{not_postgres.port}"},
            "admin": {"ready_requires_upstream": True},
        }
    )
    status, body = proxy.http_get("/readyz")
    assert status == 503, body
    assert "upstream unreachable" in body
    assert ("no answer" if not not_postgres.answer else "answered") in body


def test_readyz_requiring_the_upstream_follows_it(proxy_factory: StartProxy, pg: PgServer) -> None:
    up = proxy_factory({"admin": {"ready_requires_upstream": True}})
    assert up.http_get("/readyz") == (200, '{"ready": true}')
    down = proxy_factory(
        {
            "upstream": {"address": f"127.0.0.1:{free_port()}"},
            "admin": {"ready_requires_upstream": True},
        }
    )
    status, body = down.http_get("/readyz")
    assert status == 503 and "upstream unreachable" in body, body


# ------------------------------------------------------------------ a port in use


@pytest.mark.parametrize("taken", ["clients", "admin"])
def test_port_in_use_exits_3_naming_the_listener(taken: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        busy = f"127.0.0.1:{blocker.getsockname()[1]}"
        free = f"127.0.0.1:{free_port()}"
        listen, admin = (busy, free) if taken == "clients" else (free, busy)
        flags = ["--listen", listen, "--admin", admin, "--upstream", f"127.0.0.1:{free_port()}"]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "run", *flags],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 3, (result.stdout, result.stderr)
    what = "clients (listen)" if taken == "clients" else "the admin HTTP server (admin.listen)"
    assert (
        result.stderr == f"pgwarden: cannot listen for {what} on {busy}: Address already in use\n"
    )


# ------------------------------------------------------------ alert and dashboard

STARTUP_KINDS = ("auth_failed", "unknown_database", "startup_failed", "tls_refused")


def test_refusals_have_an_alert_and_a_dashboard_panel() -> None:
    """promtool runs the alert's unit tests (tests/test_prometheus.py); here: the alert and
    a panel take in every kind of refused startup, and those kinds are counted."""
    assert set(STARTUP_KINDS) <= set(CONNECTION_ERROR_KINDS)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"][0]
    (alert,) = [r for r in rules["rules"] if r["alert"] == "PgwardenStartupsRefused"]
    panels = json.loads((DEPLOY / "grafana" / "pgwarden.json").read_text())["panels"]
    (panel,) = [p for p in panels if p["title"] == "Startups refused by kind"]
    (target,) = panel["targets"]
    for kind in STARTUP_KINDS:
        assert kind in alert["expr"] and kind in target["expr"], kind

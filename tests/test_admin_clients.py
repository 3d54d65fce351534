"""What an operator finds on pgwarden's admin server: its sessions (GET /clients and
`pgwarden clients`, like PgBouncer's SHOW CLIENTS), ending one (`pgwarden terminate`,
an action only the holder of the admin token may take), the index at GET / and the
process_* metrics. A real pgwarden, real PostgreSQL, real clients."""

from __future__ import annotations

import http.client
import json
import secrets
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from proxy.config import ADMIN_TOKEN_ENV
from tests.support.proxy import ProxyProcess, launch_with_defaults, pgwarden
from tests.support.util import PgServer, wait_until

StartProxy = Callable[..., ProxyProcess]

TOKEN = secrets.token_hex(24)
SECRET = "pgwarden-secret-literal"  # a literal that must never leave pgwarden
NO_ENV_TOKEN = {ADMIN_TOKEN_ENV: ""}  # whatever the environment of the test run holds
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # a server with a token answers only its holders
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def admin_proxy(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """pgwarden with an admin token, read from a file as a mounted secret would be."""
    workdir = tmp_path_factory.mktemp("admin")
    token_file = workdir / "admin-token"
    token_file.write_text(f"{TOKEN}\n")
    config = {"admin": {"token_file": str(token_file)}}
    process = launch_with_defaults(pg, workdir, "proxy", config, env=NO_ENV_TOKEN)
    yield process
    process.stop()


def clients(proxy: ProxyProcess) -> list[dict[str, Any]]:
    status, body = proxy.http_get("/clients", AUTH)
    assert status == 200, body
    listed: list[dict[str, Any]] = json.loads(body)["clients"]
    return listed


def listed_as(proxy: ProxyProcess, app: str, state: str) -> dict[str, Any]:
    """The /clients entry of the session named `app`, once it is in `state`."""

    def found() -> dict[str, Any] | None:
        entry = next((c for c in clients(proxy) if c["application_name"] == app), None)
        return entry if entry is not None and entry["state"] == state else None

    return wait_until(found, message=f"{app} listed as {state!r} by GET /clients")


def post(
    proxy: ProxyProcess, path: str, token: str | None = None, scheme: str = "Bearer"
) -> tuple[int, dict[str, Any], Message]:
    """POST to the admin server: (status, JSON answer or {}, response headers)."""
    request = urllib.request.Request(proxy.admin_url + path, data=b"", method="POST")
    if token is not None:
        request.add_header("Authorization", f"{scheme} {token}")
    try:
        with _OPENER.open(request, timeout=5) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if body.startswith(b"{") else {}, error.headers


def app_name() -> str:
    return f"admin-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------- the sessions view


def test_a_running_statement_is_listed_normalized_and_terminate_ends_it(
    admin_proxy: ProxyProcess, pg: PgServer
) -> None:
    app = app_name()
    conn = psycopg.connect(admin_proxy.dsn(application_name=app))  # in a transaction
    pid = conn.info.backend_pid
    conn.execute("SELECT 1")
    failed: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute(f"SELECT pg_sleep(%s), '{SECRET}'", (30,))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=sleep, daemon=True)
    thread.start()
    try:
        entry = listed_as(admin_proxy, app, "active")
        assert entry["statement"] == "SELECT pg_sleep($1), $2"
        assert entry["pid"] == pid
        assert (entry["user"], entry["database"]) == ("postgres", "postgres")
        assert entry["client"].startswith("127.0.0.1:")
        assert entry["transaction_age_s"] >= entry["statement_age_s"] >= 0
        assert entry["age_s"] >= entry["transaction_age_s"]
        assert entry["bytes_in"] > 0 and entry["bytes_out"] > 0
        assert SECRET not in admin_proxy.http_get("/clients", AUTH)[1]

        url = admin_proxy.admin_url
        ended = pgwarden(
            "terminate", str(entry["id"]), "--admin", url, env={ADMIN_TOKEN_ENV: TOKEN}
        )
        assert ended.returncode == 0, ended.stderr
        assert f"terminated client {entry['id']} (backend pid {pid}," in ended.stdout
        thread.join(10)
        assert not thread.is_alive(), "the client did not see its session end"
    finally:
        conn.close()
    assert len(failed) == 1 and isinstance(failed[0], errors.AdminShutdown), failed
    assert failed[0].diag.message_primary == "terminating connection due to administrator command"
    wait_until(lambda: all(c["application_name"] != app for c in clients(admin_proxy)))
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        wait_until(
            lambda: (
                not direct.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchall()
            ),
            message="the backend to end with its session",
        )
    logged = admin_proxy.wait_log(
        lambda e: e.get("event") == "client_terminated" and e.get("client_id") == entry["id"]
    )
    assert (logged["backend_pid"], logged["application_name"]) == (pid, app)
    admin_proxy.wait_log(
        lambda e: (
            e.get("event") == "connection_closed"
            and e.get("application_name") == app
            and e.get("reason") == "admin_terminate"
        )
    )
    log = admin_proxy.log_text()
    assert SECRET not in log and TOKEN not in log


def test_clients_table_and_terminate_by_backend_pid(admin_proxy: ProxyProcess) -> None:
    app = app_name()
    with psycopg.connect(admin_proxy.dsn(application_name=app)) as conn:
        conn.execute("SELECT 1")  # opens a transaction and leaves it open
        pid = conn.info.backend_pid
        entry = listed_as(admin_proxy, app, "idle in transaction")
        assert entry["pid"] == pid and entry["statement"] is None
        assert entry["transaction_age_s"] > 0

        table = pgwarden("clients", "--admin", admin_proxy.admin_url, env={ADMIN_TOKEN_ENV: TOKEN})
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split()[:3] == ["id", "pid", "state"]
        assert header.split()[-3:] == ["app", "client", "statement"]
        (row,) = [r for r in rows if app in r]
        assert row.split()[:2] == [str(entry["id"]), str(pid)]
        assert "idle in transaction" in row and "postgres@postgres" in row
        raw = pgwarden(
            "clients", "--json", "--admin", admin_proxy.admin_url, env={ADMIN_TOKEN_ENV: TOKEN}
        )
        assert raw.returncode == 0, raw.stderr
        assert app in [c["application_name"] for c in json.loads(raw.stdout)["clients"]]

        status, answer, _ = post(admin_proxy, f"/clients/pid:{pid}/terminate", TOKEN)
        assert status == 200, answer
        assert answer["terminated"]["id"] == entry["id"]
        # an idle client reads the FATAL, or only the close, with its next statement
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert all(c["application_name"] != app for c in clients(admin_proxy))


def test_terminate_needs_the_right_token(admin_proxy: ProxyProcess) -> None:
    app = app_name()
    with psycopg.connect(admin_proxy.dsn(application_name=app), autocommit=True) as conn:
        conn.execute("SELECT 1")
        entry = listed_as(admin_proxy, app, "idle")
        path = f"/clients/{entry['id']}/terminate"
        for token, scheme in ((None, ""), ("x" * 48, "Bearer"), (TOKEN, "Basic")):
            status, answer, headers = post(admin_proxy, path, token, scheme)
            assert status == 401, (scheme, answer)
            assert headers["WWW-Authenticate"].startswith("Bearer")
        url = admin_proxy.admin_url
        wrong = pgwarden("terminate", str(entry["id"]), "--admin", url, "--token", "y" * 32)
        assert wrong.returncode == 1
        assert "the admin token is missing or wrong" in wrong.stderr
        missing = pgwarden("terminate", str(entry["id"]), "--admin", url, env=NO_ENV_TOKEN)
        assert missing.returncode == 2 and ADMIN_TOKEN_ENV in missing.stderr
        unknown = pgwarden("terminate", "id:999999", "--admin", url, env={ADMIN_TOKEN_ENV: TOKEN})
        assert unknown.returncode == 1 and "no open client with id 999999" in unknown.stderr
        assert admin_proxy.http_get(path, AUTH)[0] == 405
        assert conn.execute("SELECT 1").fetchone() == (1,), "refused attempts end nothing"

    def refused() -> set[object]:  # the log is written asynchronously
        events = admin_proxy.log_events()
        return {e["reason"] for e in events if e.get("event") == "admin_action_refused"}

    wait_until(lambda: refused() >= {"no token", "wrong token"}, message="refusals logged")
    assert TOKEN not in admin_proxy.log_text()


def test_an_action_body_is_bounded(admin_proxy: ProxyProcess) -> None:
    """An announced body past the bound is refused without being read."""
    host, port = admin_proxy.admin_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.putrequest("POST", "/clients/1/terminate")
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.putheader("Content-Length", str(10**9))
        connection.endheaders()
        assert connection.getresponse().status == 413
    finally:
        connection.close()


def test_without_a_token_nothing_can_be_terminated(proxy_factory: StartProxy) -> None:
    proxy = proxy_factory(env=NO_ENV_TOKEN)
    app = app_name()
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:
        entry = listed_as(proxy, app, "idle")
        status, answer, _ = post(proxy, f"/clients/{entry['id']}/terminate", TOKEN)
        assert status == 403
        assert "admin.token_file" in answer["error"] and ADMIN_TOKEN_ENV in answer["error"]
        cli = pgwarden(
            "terminate", str(entry["id"]), "--admin", proxy.admin_url, env={ADMIN_TOKEN_ENV: TOKEN}
        )
        assert cli.returncode == 1 and "no admin token is configured" in cli.stderr
        assert conn.execute("SELECT 1").fetchone() == (1,)
    status, body = proxy.http_get("/", {"Accept": "application/json"})
    assert status == 200
    assert all(e["method"] == "GET" for e in json.loads(body)["endpoints"])


def test_a_busy_session_is_active_with_analysis_off(proxy_factory: StartProxy) -> None:
    """Without a tracker the statement is unknown, but the state still is."""
    proxy = proxy_factory({"analysis": {"enabled": False}}, env=NO_ENV_TOKEN)
    app = app_name()
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:
        thread = threading.Thread(target=conn.execute, args=("SELECT pg_sleep(1)",), daemon=True)
        thread.start()
        entry = listed_as(proxy, app, "active")
        assert entry["statement"] is None and entry["statement_age_s"] is None
        thread.join(5)


# ------------------------------------------------------------- index, metrics, config


def test_the_index_lists_the_endpoints(admin_proxy: ProxyProcess) -> None:
    """GET / is the advice page (tests/test_advice_page.py); asked for JSON, the index."""
    status, body = admin_proxy.http_get("/", {**AUTH, "Accept": "application/json"})
    assert status == 200
    endpoints = {(e["method"], e["path"]) for e in json.loads(body)["endpoints"]}
    assert endpoints >= {
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/advice"),
        ("GET", "/clients"),
        ("POST", "/clients/{id}/terminate"),
    }


def test_process_metrics_describe_pgwarden(admin_proxy: ProxyProcess) -> None:
    def samples() -> dict[str, float]:
        status, body = admin_proxy.http_get("/metrics", AUTH)
        assert status == 200
        return {
            s.name: s.value
            for family in text_string_to_metric_families(body)
            if family.name.startswith("process_")
            for s in family.samples
        }

    before = samples()
    assert {
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    } <= set(before)
    rss = admin_proxy.rss_bytes()
    assert rss / 2 < before["process_resident_memory_bytes"] < rss * 2
    assert 0 < before["process_open_fds"] < before["process_max_fds"]
    connections = [psycopg.connect(admin_proxy.dsn()) for _ in range(3)]
    try:
        # each session holds two sockets: the client's and the upstream's
        assert samples()["process_open_fds"] >= before["process_open_fds"] + 4
    finally:
        for conn in connections:
            conn.close()


def test_the_token_is_never_shown(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = tmp_path / "admin.yaml"
    config.write_text(yaml.safe_dump({"admin": {"token_file": str(token_file)}}))
    checked = pgwarden("check-config", str(config), env={ADMIN_TOKEN_ENV: "z" * 40})
    assert checked.returncode == 0, checked.stderr
    assert TOKEN not in checked.stdout and "z" * 40 not in checked.stdout
    shown = yaml.safe_load(checked.stdout.split("\n", 1)[1])["admin"]
    assert shown["token_file"] == str(token_file) and "token" not in shown


TOO_WEAK = "the admin token must be at least 16 printable ASCII characters without spaces"


@pytest.mark.parametrize(
    ("admin", "token_file", "env", "error"),
    [
        # a secret is not written into the config
        ({"token": TOKEN}, None, "", "admin.token: unknown key"),
        ({"token_file": "/nonexistent/pgwarden-token"}, None, "", "admin.token_file: cannot read"),
        ({}, "abc\n", "", f"admin.token_file: {TOO_WEAK}"),
        ({}, None, "short", f"{ADMIN_TOKEN_ENV}: {TOO_WEAK}"),
        ({}, None, "has a space in the middle", f"{ADMIN_TOKEN_ENV}: {TOO_WEAK}"),
    ],
    ids=["literal", "missing_file", "short_file", "short_env", "space_env"],
)
def test_a_bad_token_setting_exits_2_naming_it(
    tmp_path: Path, admin: dict[str, str], token_file: str | None, env: str, error: str
) -> None:
    if token_file is not None:
        (tmp_path / "token").write_text(token_file)
        admin = {"token_file": str(tmp_path / "token")}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"admin": admin}))
    checked = pgwarden("check-config", str(config), env={ADMIN_TOKEN_ENV: env})
    assert checked.returncode == 2, checked.stdout
    assert error in checked.stderr
    assert TOKEN not in checked.stderr + checked.stdout

"""The test harness itself: the `pg` server and its roles behave as the other tests assume."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest

from proxy.tools.pgcluster import SSL_ONLY_ROLE, LocalCluster, find_bindir, free_port, make_dsn
from tests.support.proxy import deep_merge
from tests.support.util import PgServer, wait_until


def _connect(dsn: str) -> tuple[str, bool]:
    """(current_user, whether the connection uses TLS)."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_superuser_connects(pg: PgServer) -> None:
    assert _connect(pg.dsn(user=pg.superuser))[0] == pg.superuser


@pytest.mark.parametrize("role", ["md5_user", "scram_user", "clear_user"])
def test_password_role_authenticates(
    pg: PgServer, password_roles: dict[str, str], role: str
) -> None:
    dsn = pg.dsn(user=role, password=password_roles[role], sslmode="disable")
    assert _connect(dsn) == (role, False)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(user=role, password="wrong", sslmode="disable"))


def test_md5_role_stores_an_md5_hash(pg: PgServer, password_roles: dict[str, str]) -> None:
    """Otherwise the server would quietly answer md5 clients with SCRAM."""
    stored = pg.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5_user'")
    assert stored.strip() == "md5"


def test_ssl_only_role(pg: PgServer, password_roles: dict[str, str]) -> None:
    if pg.ca_file is None:
        pytest.skip("the test server's TLS setup is unknown")
    assert _connect(pg.dsn(user=SSL_ONLY_ROLE, sslmode="require")) == (SSL_ONLY_ROLE, True)
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(pg.dsn(user=SSL_ONLY_ROLE, sslmode="disable"))


def test_verify_full_against_ca_file(pg: PgServer, ca_file: Path) -> None:
    dsn = pg.dsn(host="localhost", sslmode="verify-full", sslrootcert=str(ca_file))
    assert _connect(dsn) == (pg.superuser, True)


def test_psql_returns_output_and_raises_on_error(pg: PgServer) -> None:
    assert pg.psql("SELECT 40 + 2; SELECT 'a' || 'b'") == "42\nab\n"
    with pytest.raises(RuntimeError, match="no_such_table"):
        pg.psql("SELECT * FROM no_such_table")


def test_make_dsn_quotes_values() -> None:
    dsn = make_dsn(host="127.0.0.1", password="it's a \\ pass", sslmode=None, application_name="")
    assert dsn == r"host=127.0.0.1 password='it\'s a \\ pass' application_name=''"
    assert psycopg.conninfo.conninfo_to_dict(dsn)["password"] == "it's a \\ pass"


def test_deep_merge() -> None:
    base = {"upstream": {"address": "a:1", "sslmode": "disable"}, "admin": {"listen": "x"}}
    merged = deep_merge(base, {"upstream": {"sslmode": "require"}, "admin": None})
    assert merged == {"upstream": {"address": "a:1", "sslmode": "require"}, "admin": None}
    assert base["upstream"]["sslmode"] == "disable"


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_wait_until() -> None:
    calls = iter([0, 0, 7])
    assert wait_until(lambda: next(calls), timeout=1, interval=0) == 7
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.1, message="the impossible")


def test_local_cluster_lifecycle() -> None:
    """Settings apply, ssl and roles are optional, and stop() is idempotent and cleans up."""
    try:
        find_bindir()
    except RuntimeError as error:
        pytest.skip(str(error))
    with LocalCluster(ssl=False, password_roles=False, settings={"work_mem": "7MB"}) as cluster:
        assert cluster.ca_file is None
        assert cluster.psql("SHOW work_mem; SHOW ssl") == "7MB\noff\n"
        assert cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'md5_user'") == "0\n"
        base = cluster.datadir.parent
    assert not base.exists()
    cluster.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.dsn(), connect_timeout=2)

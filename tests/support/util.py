"""Helpers shared by the tests: waiting for a condition, free ports, and the interface of the
PostgreSQL server the `pg` fixture provides, whichever way it was obtained."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from proxy.tools.pgcluster import PASSWORD_ROLES, SSL_ONLY_ROLE, find_bindir, free_port

__all__ = ["ExternalServer", "PgServer", "free_port", "wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.05,
    message: str | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy and return that; tests wait on
    another process's progress, which a fixed sleep would either slow down or miss."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class PgServer(Protocol):
    """What tests may rely on from the `pg` fixture (proxy.tools.pgcluster.LocalCluster has it)."""

    host: str
    port: int
    superuser: str
    ca_file: Path | None  # sslrootcert for verify-full; None when TLS is not known to work
    password_roles: bool  # PASSWORD_ROLES and SSL_ONLY_ROLE exist and pg_hba.conf fits them

    def dsn(
        self, user: str = ..., dbname: str = ..., password: str | None = None, **extra: str
    ) -> str: ...

    def psql(self, sql: str, dbname: str = "postgres") -> str: ...


class ExternalServer:
    """A server someone else runs (PGWARDEN_TEST_DSN, a container), behind PgServer.

    It is reached over TCP with the DSN's superuser; its TLS setup is unknown, so ca_file is
    None, and the password roles count only if an administrator created them all.
    """

    ca_file: Path | None = None

    def __init__(self, dsn: str) -> None:
        self._params = conninfo_to_dict(dsn)
        self.host = str(self._params.get("host") or "localhost")
        if self.host.startswith("/") or "," in self.host:
            raise ValueError(f"the test server must be one TCP host, not {self.host!r}: {dsn}")
        self.port = int(self._params.get("port") or 5432)
        self.superuser = str(self._params.get("user") or getpass.getuser())
        roles = ", ".join(f"'{role}'" for role in [*PASSWORD_ROLES, SSL_ONLY_ROLE])
        count = self.psql(f"SELECT count(*) FROM pg_roles WHERE rolname IN ({roles})")
        self.password_roles = int(count) == len(PASSWORD_ROLES) + 1

    def dsn(
        self,
        user: str | None = None,
        dbname: str | None = None,
        password: str | None = None,
        **extra: str,
    ) -> str:
        """The given DSN for another user or database; the superuser keeps its password."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self._params.get("password")
        params = self._params | {"host": self.host, "port": self.port, "user": user}
        params |= {"dbname": dbname or self._params.get("dbname") or "postgres"}
        params["password"] = password
        return make_conninfo(**{k: v for k, v in (params | extra).items() if v is not None})

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser through psql; unaligned tuples-only output, like
        LocalCluster.psql; raises RuntimeError on the first error."""
        psql = shutil.which("psql") or str(find_bindir() / "psql")
        args = [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"]
        result = subprocess.run(
            [*args, self.dsn(dbname=dbname)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed (exit {result.returncode}):\n{result.stderr}")
        return result.stdout


def assert_cancel_works(dsn: str, pg: PgServer, method: str = "cancel_safe") -> None:
    """A pg_sleep cancelled through `dsn` ends at once with 57014; the session goes on."""
    with (
        psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn,
        psycopg.connect(pg.dsn(), autocommit=True) as observer,
    ):
        running = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"

        def cancel_when_running() -> None:
            wait_until(lambda: observer.execute(running, (conn.info.backend_pid,)).fetchone())
            getattr(conn, method)()

        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        began = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
        finally:
            canceller.join()
        assert time.monotonic() - began < 5
        assert conn.execute("SELECT 1").fetchone() == (1,)

"""A throwaway local PostgreSQL cluster for tests, `pgwarden demo` and the benchmarks.

It needs only the server binaries a distribution ships (no Docker, no running service):
initdb into a temp dir, start with pg_ctl on a free port, tear everything down on stop.
PostgreSQL refuses to run as root, so when we are root every server binary runs as the
`postgres` OS user through `runuser`. The cluster is tuned for speed, not durability, and
optionally carries TLS and one role per password authentication method, so the proxy's
authentication relay can be tested against every method the server offers.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any, Self

__all__ = [
    "PASSWORD_ROLES",
    "SSL_ONLY_ROLE",
    "LocalCluster",
    "find_bindir",
    "free_port",
    "make_dsn",
    "tcp_dsn",
]

OWNER = "postgres"
"""The OS user that owns and runs the cluster when we are root."""

PASSWORD_ROLES: dict[str, str] = {
    "md5_user": "md5_pass",
    "scram_user": "scram_pass",
    "clear_user": "clear_pass",
}
"""Roles (and their passwords) that pg_hba.conf authenticates with md5, SCRAM and cleartext."""

SSL_ONLY_ROLE = "ssl_only_user"
"""A role without a password that pg_hba.conf admits over TLS only."""

_HBA_PASSWORD_LINES = """\
host all md5_user 127.0.0.1/32 md5
host all scram_user 127.0.0.1/32 scram-sha-256
host all clear_user 127.0.0.1/32 password
hostssl all ssl_only_user 127.0.0.1/32 trust
hostnossl all ssl_only_user 127.0.0.1/32 reject
"""

_CREATE_ROLES_SQL = """\
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5_pass';
SET password_encryption = 'scram-sha-256';
CREATE ROLE scram_user LOGIN PASSWORD 'scram_pass';
CREATE ROLE clear_user LOGIN PASSWORD 'clear_pass';
CREATE ROLE ssl_only_user LOGIN;
"""

_START_ATTEMPTS = 3  # only when we picked the port: another process may take it meanwhile
_LOG_TAIL_LINES = 40
_TIMEOUT = 60  # seconds for any one command; initdb and start take a second or two


def find_bindir() -> Path:
    """Where the PostgreSQL server binaries are: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/*/bin (Debian installs the client's pg_config without the server)."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and (bindir / "pg_ctl").is_file():
            return bindir
    candidates = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if (path / "pg_ctl").is_file() and path.parent.name.isdigit()
    ]
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries not found: no pg_ctl next to `pg_config --bindir` "
            "nor in /usr/lib/postgresql/*/bin; install the server package "
            "(e.g. apt-get install postgresql) or point PGWARDEN_TEST_DSN at a server"
        )
    return max(candidates, key=lambda path: int(path.parent.name))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_dsn(**params: object) -> str:
    """A libpq keyword/value connection string; None values are left out.

    Values are quoted as libpq requires, so passwords and paths may hold spaces or quotes.
    """
    return " ".join(
        f"{key}={_quote(str(value))}" for key, value in params.items() if value is not None
    )


def tcp_dsn(
    address: tuple[str, int],
    user: str = "postgres",
    dbname: str = "postgres",
    password: str | None = None,
    **extra: str,
) -> str:
    """A connection string for the server at (host, port); `extra` adds or overrides
    keywords, host and port included."""
    params = {"host": address[0], "port": address[1], "user": user, "dbname": dbname}
    return make_dsn(**(params | {"password": password} | extra))


def _quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _as_owner(args: list[str]) -> list[str]:
    """The command line that runs `args` as the cluster owner (needed only when root)."""
    return ["runuser", "-u", OWNER, "--", *args] if os.geteuid() == 0 else args


def _check(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def _openssl(cwd: Path, args: str) -> None:
    """Run the openssl CLI (always present where PostgreSQL is; no Python crypto needed)."""
    cmd = ["openssl", *args.split()]
    _check(subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False), cmd[1])


def _cleanup(bindir: Path, datadir: Path, base: Path) -> None:
    """Stop the server, if one runs, and remove its files; run once, by stop(), the garbage
    collector or atexit, so an aborted test run leaves no postgres behind."""
    if (datadir / "postmaster.pid").exists():
        subprocess.run(
            _as_owner([str(bindir / "pg_ctl"), "stop", "-D", str(datadir), "-m", "immediate"]),
            capture_output=True,
            cwd=base,
            timeout=_TIMEOUT,
            check=False,
        )
    shutil.rmtree(base, ignore_errors=True)


class LocalCluster:
    """A PostgreSQL cluster in a temp dir, listening on 127.0.0.1 only, removed on stop()."""

    host = "127.0.0.1"
    superuser = "postgres"

    def __init__(
        self,
        *,
        port: int | None = None,
        ssl: bool = True,
        password_roles: bool = True,
        settings: dict[str, str] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        """Only reserve the temp dir (the finalizer must know it); start() does the work.
        `base_dir` is the temp dir's parent; when root, the postgres user must enter it."""
        self.bindir = find_bindir()
        self.port = port if port is not None else free_port()
        self.ssl = ssl
        self.password_roles = password_roles
        self._fixed_port = port is not None
        self._settings = dict(settings or {})
        self._base = Path(tempfile.mkdtemp(prefix="pgwarden-pg-", dir=base_dir))
        self.datadir = self._base / "data"
        self.ca_file: Path | None = self._base / "ssl" / "ca.crt" if ssl else None
        self._log = self._base / "server.log"
        self._finalizer = weakref.finalize(self, _cleanup, self.bindir, self.datadir, self._base)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Self:
        """initdb, configure, start, and create the test roles; raises with the log tail."""
        try:
            self._prepare_base()
            initdb = [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.superuser]
            flags = ["-A", "trust", "--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C"]
            _check(self.run_as_owner([*initdb, *flags]), "initdb")
            if self.ssl:
                self._make_certificates()
            self._write_hba()
            self._start_server()
            if self.password_roles:
                self.psql(_CREATE_ROLES_SQL)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server at once (its data is disposable) and remove all its files."""
        self._finalizer()

    def dsn(
        self,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        **extra: str,
    ) -> str:
        """A libpq connection string for TCP on 127.0.0.1; `extra` may override host too."""
        return tcp_dsn((self.host, self.port), user, dbname, password, **extra)

    def run_as_owner(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary as the cluster owner, from a directory it can enter
        (initdb aborts when it cannot read the working directory); output is captured."""
        kw.setdefault("cwd", self._base)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", _TIMEOUT)
        kw.setdefault("check", False)
        return subprocess.run(_as_owner(args), **kw)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; returns unaligned tuples-only
        output (`SELECT 1` gives "1\\n"); raises RuntimeError on the first error."""
        psql = self.bindir / "psql"
        where = ["-h", str(self._socket_dir), "-p", str(self.port), "-U", self.superuser]
        flags = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dbname]
        args = [str(psql if psql.is_file() else "psql"), *where, *flags]
        result = self.run_as_owner(args, input=sql)
        return _check(result, "psql")

    @property
    def _socket_dir(self) -> Path:
        return self._base / "sock"

    def _prepare_base(self) -> None:
        """Hand the temp dir to the owner; others may enter it to read the CA certificate."""
        self._socket_dir.mkdir()
        self._base.chmod(0o755)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OWNER)
            for path in (self._base, self._socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _make_certificates(self) -> None:
        """A throwaway CA and a server certificate it signs, valid for localhost and
        127.0.0.1, so clients can test sslmode=verify-full against `ca_file`."""
        ssl_dir = self._base / "ssl"
        ssl_dir.mkdir()
        ec_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        _openssl(ssl_dir, f"req -x509 {ec_key} -keyout ca.key -out ca.crt -days 30 -subj /CN=ca")
        _openssl(
            ssl_dir, f"req -new {ec_key} -keyout server.key -out server.csr -subj /CN=localhost"
        )
        (ssl_dir / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(
            ssl_dir,
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30"
            " -extfile san.ext -out server.crt",
        )
        key = ssl_dir / "server.key"
        key.chmod(0o600)  # PostgreSQL refuses a key others can read
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OWNER)
            os.chown(key, owner.pw_uid, owner.pw_gid)
        for public in ("ca.crt", "server.crt"):
            (ssl_dir / public).chmod(0o644)

    def _write_hba(self) -> None:
        lines = "local all all trust\n"
        if self.password_roles:
            lines += _HBA_PASSWORD_LINES
        lines += "host all all 127.0.0.1/32 trust\n"
        (self.datadir / "pg_hba.conf").write_text(lines)

    def _write_settings(self) -> None:
        """Append our settings to postgresql.conf (the last occurrence wins, so a retry
        with another port simply appends again)."""
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self._socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
        }
        if self.ssl:
            ssl_dir = self._base / "ssl"
            settings |= {
                "ssl": "on",
                "ssl_cert_file": str(ssl_dir / "server.crt"),
                "ssl_key_file": str(ssl_dir / "server.key"),
            }
        settings |= self._settings
        with (self.datadir / "postgresql.conf").open("a") as conf:
            for name, value in settings.items():
                quoted = value.replace("'", "''")
                conf.write(f"{name} = '{quoted}'\n")

    def _start_server(self) -> None:
        """pg_ctl start -w; when we chose the port and lost it to a race, pick another."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._write_settings()
            pg_ctl = [str(self.bindir / "pg_ctl"), "start", "-w", "-t", str(_TIMEOUT)]
            result = self.run_as_owner([*pg_ctl, "-D", str(self.datadir), "-l", str(self._log)])
            if result.returncode == 0:
                return
            log = self._log_tail()
            if self._fixed_port or "could not bind" not in log or attempt == _START_ATTEMPTS:
                raise RuntimeError(
                    f"PostgreSQL did not start on port {self.port} "
                    f"(pg_ctl exit {result.returncode}):\n{result.stdout}{result.stderr}"
                    f"--- server log tail ---\n{log}"
                )
            self.port = free_port()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])
        return "(no server log)"

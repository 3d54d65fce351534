"""Authentication is relayed untouched and TLS works on both sides of pgwarden.

Upstream: every password method the server offers, with and without TLS, certificate
verification, and roles pg_hba.conf admits over TLS only. Client side: pgwarden's own
certificate, clients that require, prefer or refuse TLS. SCRAM channel binding cannot cross
a proxy (each side sees a different certificate), so pgwarden withholds SCRAM-SHA-256-PLUS.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.tools.pgcluster import SSL_ONLY_ROLE
from tests.conftest import StartProxy
from tests.support.proxy import ProxyProcess
from tests.support.util import PgServer, assert_cancel_works

CONNECT_TIMEOUT = 5


def session_info(dsn: str) -> tuple[str, bool]:
    """(current_user, whether the client's own connection is encrypted) through `dsn`."""
    with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT) as conn:
        row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        return row[0], bool(conn.pgconn.ssl_in_use)


def upstream_ssl(proxy: ProxyProcess, pg: PgServer, user: str, password: str | None) -> bool:
    """Whether the server sees the proxy's connection for `user` as TLS (via pg_stat_ssl)."""
    with (
        psycopg.connect(proxy.dsn(user=user, password=password), connect_timeout=5) as conn,
        psycopg.connect(pg.dsn(), connect_timeout=5) as observer,
    ):
        pid = conn.info.backend_pid
        row = observer.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = %s", (pid,)).fetchone()
        assert row is not None
        return bool(row[0])


def make_certificate(directory: Path, name: str = "proxy") -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost, made with the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


@pytest.fixture
def tls_proxy(proxy_factory: StartProxy, certificate: tuple[Path, Path]) -> ProxyProcess:
    """pgwarden with client-side TLS; the upstream connection stays plain."""
    cert, key = certificate
    return proxy_factory({"tls": {"cert": str(cert), "key": str(key)}})


# ------------------------------------------------------------ password methods


@pytest.mark.parametrize("sslmode", ["disable", "require"])
@pytest.mark.parametrize("role", ["md5_user", "scram_user", "clear_user"])
def test_password_methods_relayed(
    proxy_factory: StartProxy,
    pg: PgServer,
    password_roles: dict[str, str],
    role: str,
    sslmode: str,
) -> None:
    if sslmode != "disable" and pg.ca_file is None:
        pytest.skip("the test server's TLS setup is unknown")
    proxy = proxy_factory({"upstream": {"sslmode": sslmode}})
    password = password_roles[role]
    assert session_info(proxy.dsn(user=role, password=password)) == (role, False)
    assert upstream_ssl(proxy, pg, role, password) is (sslmode == "require")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user=role, password="wrong"), connect_timeout=CONNECT_TIMEOUT)
    with pytest.raises(psycopg.OperationalError, match="password"):  # none given at all
        psycopg.connect(proxy.dsn(user=role, password=""), connect_timeout=CONNECT_TIMEOUT)
    # The failures left nothing behind: the next client authenticates as usual.
    assert session_info(proxy.dsn(user=role, password=password))[0] == role


@pytest.mark.parametrize("role", ["md5_user", "scram_user", "clear_user"])
def test_password_methods_with_asyncpg(
    proxy: ProxyProcess, password_roles: dict[str, str], role: str
) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=role,
            password=password_roles[role],
            database="postgres",
            timeout=5,
        )
        try:
            assert await conn.fetchval("SELECT current_user") == role
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user=role,
                password="wrong",
                database="postgres",
                timeout=5,
            )

    asyncio.run(main())


@pytest.fixture
def tls_both_sides(
    proxy_factory: StartProxy, pg: PgServer, certificate: tuple[Path, Path]
) -> ProxyProcess:
    """pgwarden with TLS towards its clients and towards PostgreSQL."""
    if pg.ca_file is None:
        pytest.skip("the test server's TLS setup is unknown")
    cert, key = certificate
    return proxy_factory(
        {"upstream": {"sslmode": "require"}, "tls": {"cert": str(cert), "key": str(key)}}
    )


def test_scram_over_upstream_tls(
    proxy_factory: StartProxy, pg: PgServer, password_roles: dict[str, str]
) -> None:
    """Over TLS the server offers SCRAM-SHA-256-PLUS too; a plain client still logs in."""
    if pg.ca_file is None:
        pytest.skip("the test server's TLS setup is unknown")
    proxy = proxy_factory({"upstream": {"sslmode": "require"}})
    password = password_roles["scram_user"]
    assert session_info(proxy.dsn(user="scram_user", password=password)) == ("scram_user", False)
    assert upstream_ssl(proxy, pg, "scram_user", password)


def test_channel_binding_required_is_refused_cleanly(
    tls_both_sides: ProxyProcess, password_roles: dict[str, str]
) -> None:
    """SCRAM-SHA-256-PLUS binds to the certificate the client sees, pgwarden's, so it cannot
    cross a proxy: pgwarden withholds it and a client that insists on channel binding gives
    up at once, by its own decision, instead of failing the server's check or hanging."""
    password = password_roles["scram_user"]
    dsn = tls_both_sides.dsn(
        user="scram_user", password=password, sslmode="require", channel_binding="require"
    )
    began = time.monotonic()
    with pytest.raises(
        psycopg.OperationalError,
        match="server did not offer an authentication method that supports channel binding",
    ):
        psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT)
    assert time.monotonic() - began < CONNECT_TIMEOUT - 1  # refused, not timed out
    plain = tls_both_sides.dsn(user="scram_user", password=password, sslmode="disable")
    assert session_info(plain) == ("scram_user", False)


def test_scram_tls_both_sides_without_channel_binding(
    tls_both_sides: ProxyProcess, password_roles: dict[str, str]
) -> None:
    """The workaround for the limitation below: the client turns channel binding off."""
    dsn = tls_both_sides.dsn(
        user="scram_user",
        password=password_roles["scram_user"],
        sslmode="require",
        channel_binding="disable",
    )
    assert session_info(dsn) == ("scram_user", True)


def test_scram_tls_both_sides_fails_cleanly_by_default(
    tls_both_sides: ProxyProcess, password_roles: dict[str, str]
) -> None:
    """A known limit of any relay: a TLS client that can bind but is not offered -PLUS says so
    in its first SCRAM message (gs2 flag "y"), which a TLS server takes as a downgrade attack;
    offering -PLUS fails too, as it binds to pgwarden's certificate. The flag is covered by
    the client's proof, so it cannot be edited: the server's error is relayed, at once."""
    dsn = tls_both_sides.dsn(
        user="scram_user", password=password_roles["scram_user"], sslmode="require"
    )
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="channel binding negotiation error"):
        psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT)
    assert time.monotonic() - began < CONNECT_TIMEOUT - 1


def test_upstream_verify_full(
    proxy_factory: StartProxy, pg: PgServer, ca_file: Path, password_roles: dict[str, str]
) -> None:
    proxy = proxy_factory(
        {
            "upstream": {
                "address": f"localhost:{pg.port}",
                "sslmode": "verify-full",
                "sslrootcert": str(ca_file),
            }
        }
    )
    assert session_info(proxy.dsn())[0] == "postgres"
    assert upstream_ssl(proxy, pg, "scram_user", password_roles["scram_user"])


def test_upstream_verify_full_rejects_unknown_ca(
    proxy_factory: StartProxy, pg: PgServer, ca_file: Path, tmp_path: Path
) -> None:
    other_ca, _ = make_certificate(tmp_path, "other")
    proxy = proxy_factory(
        {
            "upstream": {
                "address": f"localhost:{pg.port}",
                "sslmode": "verify-full",
                "sslrootcert": str(other_ca),
            }
        }
    )
    with pytest.raises(psycopg.OperationalError, match="pgwarden") as info:
        psycopg.connect(proxy.dsn(), connect_timeout=CONNECT_TIMEOUT)
    assert "certificate" in str(info.value).lower()
    assert proxy.process.poll() is None


def test_ssl_only_role_needs_upstream_tls(
    proxy_factory: StartProxy, pg: PgServer, password_roles: dict[str, str]
) -> None:
    if pg.ca_file is None:
        pytest.skip("the test server's TLS setup is unknown")
    encrypted = proxy_factory({"upstream": {"sslmode": "require"}})
    assert session_info(encrypted.dsn(user=SSL_ONLY_ROLE)) == (SSL_ONLY_ROLE, False)
    plain = proxy_factory({"upstream": {"sslmode": "disable"}})
    with pytest.raises(psycopg.OperationalError, match="no encryption") as info:
        psycopg.connect(plain.dsn(user=SSL_ONLY_ROLE), connect_timeout=CONNECT_TIMEOUT)
    assert 'pg_hba.conf rejects connection for host "127.0.0.1"' in str(info.value)
    assert f'user "{SSL_ONLY_ROLE}"' in str(info.value)


# ----------------------------------------------------------------- client TLS


def test_client_tls_psycopg(tls_proxy: ProxyProcess) -> None:
    assert session_info(tls_proxy.dsn(sslmode="require")) == ("postgres", True)
    assert session_info(tls_proxy.dsn(sslmode="prefer")) == ("postgres", True)
    assert session_info(tls_proxy.dsn(sslmode="disable")) == ("postgres", False)
    with psycopg.connect(tls_proxy.dsn(sslmode="require"), autocommit=True) as conn:
        rows = conn.execute("SELECT g, md5(g::text) FROM generate_series(1, 50000) g").fetchall()
        assert len(rows) == 50000 and rows[-1][0] == 50000
        with conn.cursor() as cur, cur.copy("COPY (SELECT repeat('z', 1000000)) TO STDOUT") as copy:
            assert b"".join(bytes(b) for b in copy) == b"z" * 1000000 + b"\n"
        conn.execute("CREATE TEMP TABLE upload (line text)")
        payload = b"".join(b"line %d %s\n" % (i, b"w" * 200) for i in range(20000))
        with conn.cursor() as cur, cur.copy("COPY upload FROM STDIN") as copy:
            copy.write(payload)
        total = conn.execute("SELECT sum(length(line) + 1) FROM upload").fetchone()
        assert total == (len(payload),)


def test_client_tls_verify_full(tls_proxy: ProxyProcess, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    dsn = tls_proxy.dsn(host="localhost", sslmode="verify-full", sslrootcert=str(cert))
    assert session_info(dsn) == ("postgres", True)


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_client_tls_cancel(tls_proxy: ProxyProcess, pg: PgServer, method: str) -> None:
    """libpq's newer cancel connection negotiates TLS too; pgwarden must still route it."""
    assert_cancel_works(tls_proxy.dsn(sslmode="require"), pg, method)


def test_cancel_over_upstream_tls(tls_both_sides: ProxyProcess, pg: PgServer) -> None:
    """pgwarden's own CancelRequest to a TLS upstream goes over TLS as well."""
    assert_cancel_works(tls_both_sides.dsn(sslmode="require"), pg)


def test_client_tls_asyncpg(tls_proxy: ProxyProcess, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate

    async def main() -> None:
        verified = ssl.create_default_context(cafile=str(cert))
        for option in (verified, "require"):
            host = "localhost" if option is verified else tls_proxy.host
            conn = await asyncpg.connect(
                host=host, port=tls_proxy.port, user="postgres", ssl=option, timeout=5
            )
            try:
                assert await conn.fetchval("SELECT 40 + $1::int", 2) == 42
                transport = conn._transport  # type: ignore[attr-defined]
                assert transport.get_extra_info("ssl_object") is not None
            finally:
                await conn.close()

    asyncio.run(main())


def test_without_client_tls(proxy: ProxyProcess) -> None:
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy.dsn(sslmode="require"), connect_timeout=CONNECT_TIMEOUT)
    assert time.monotonic() - began < CONNECT_TIMEOUT
    assert session_info(proxy.dsn(sslmode="prefer")) == ("postgres", False)
    assert session_info(proxy.dsn(sslmode="allow")) == ("postgres", False)

    async def main() -> None:
        with pytest.raises((ConnectionError, asyncpg.PostgresError, OSError)):
            await asyncpg.connect(
                host=proxy.host, port=proxy.port, user="postgres", ssl="require", timeout=5
            )
        conn = await asyncpg.connect(
            host=proxy.host, port=proxy.port, user="postgres", ssl="prefer", timeout=5
        )
        await conn.close()

    asyncio.run(main())
    assert proxy.process.poll() is None

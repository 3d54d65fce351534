"""Fixtures: one PostgreSQL for the whole run, and pgwarden processes per test against it.

The server is, in order of preference: PGWARDEN_TEST_DSN (a server you run), a testcontainers
PostgreSQL when a Docker engine answers, or a throwaway cluster from the local binaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from proxy.tools.pgcluster import PASSWORD_ROLES, LocalCluster, make_dsn
from tests.support.proxy import (
    ProxyProcess,
    deep_merge,
    default_config,
    launch_proxy,
    launch_with_defaults,
)
from tests.support.util import ExternalServer, PgServer

CONTAINER_IMAGE = "postgres:16-alpine"

StartProxy = Callable[..., ProxyProcess]


def _docker_answers() -> bool:
    """Whether testcontainers could start a container: ask the engine it would use."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _container_server() -> Iterator[PgServer]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before 4.10
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(
        CONTAINER_IMAGE, username="postgres", password="postgres", dbname="postgres", driver=None
    )
    with container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5432)
        yield ExternalServer(
            make_dsn(host=host, port=port, user="postgres", password="postgres", dbname="postgres")
        )


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """The PostgreSQL every test talks to, directly or through pgwarden."""
    if dsn := os.environ.get("PGWARDEN_TEST_DSN"):
        yield ExternalServer(dsn)
    elif _docker_answers():
        yield from _container_server()
    else:
        with LocalCluster() as cluster:
            yield cluster


@pytest.fixture
def password_roles(pg: PgServer) -> dict[str, str]:
    """Role -> password for the md5, SCRAM and cleartext roles; skips where they are missing."""
    if not pg.password_roles:
        pytest.skip("the test server lacks the password roles of proxy.tools.pgcluster")
    return PASSWORD_ROLES


@pytest.fixture
def ca_file(pg: PgServer) -> Path:
    """The CA that signed the server's certificate; skips where TLS is not set up by us."""
    if pg.ca_file is None:
        pytest.skip("the test server's TLS certificate authority is unknown")
    return pg.ca_file


@pytest.fixture
def proxy_factory(pg: PgServer, tmp_path: Path) -> Iterator[StartProxy]:
    """start_proxy(config=None, *, extra_args=None, env=None) -> ProxyProcess: pgwarden on
    free ports against `pg`, `config` merged over the defaults; all stopped after the test."""
    started: list[ProxyProcess] = []

    def start_proxy(
        config: Mapping[str, Any] | None = None,
        *,
        extra_args: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ProxyProcess:
        name = f"proxy-{len(started) + 1}"
        process = launch_with_defaults(pg, tmp_path, name, config, extra_args=extra_args, env=env)
        started.append(process)
        return process

    yield start_proxy
    for process in started:
        process.stop()


@pytest.fixture
def proxy(proxy_factory: StartProxy) -> ProxyProcess:
    """pgwarden with the default test configuration."""
    return proxy_factory()


@pytest.fixture(scope="module")
def module_proxy(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One pgwarden with the default test configuration for a whole module, for modules
    whose tests only need a proxy (starting one per test would cost more than the tests)."""
    process = launch_with_defaults(pg, tmp_path_factory.mktemp("proxy"), "proxy")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def metrics_proxy(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One pgwarden for the metrics tests, after a workload that gives every metric family
    samples (tests.support.metrics_workload); tests may add traffic but change no config."""
    from tests.support.metrics_workload import WORKLOAD_CONFIG, run_full_workload

    config = deep_merge(default_config(f"{pg.host}:{pg.port}"), WORKLOAD_CONFIG)
    process = launch_proxy(tmp_path_factory.mktemp("metrics-proxy"), "metrics", config)
    try:
        run_full_workload(process)
        yield process
    finally:
        process.stop()

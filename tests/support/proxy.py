"""pgwarden run the way users run it: `python -m proxy run --config FILE` in a subprocess.

A subprocess keeps each test's proxy apart (its own config, port, log and signals) and lets
tests check what only a process shows: exit codes, shutdown on SIGTERM, memory, its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, overload

import yaml

from proxy.config import deep_merge
from proxy.tools.pgcluster import free_port, tcp_dsn
from tests.support.util import PgServer, wait_until

__all__ = [
    "REPO_ROOT",
    "ProxyProcess",
    "deep_merge",
    "default_config",
    "launch_proxy",
    "launch_with_defaults",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 15.0

# Admin requests must never go through an HTTP proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def default_config(upstream: str) -> dict[str, Any]:
    """Free ports for clients and the admin endpoint, no TLS upstream, JSON logs to parse."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "upstream": {"address": upstream, "sslmode": "disable"},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "logging": {"format": "json"},
    }


def _split_address(address: str) -> tuple[str, int]:
    """Where a client connects for "host:port"; a wildcard listener is reached on loopback."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), int(port)


class ProxyProcess:
    """A running pgwarden and what tests ask of it; create it with launch_proxy()."""

    def __init__(
        self,
        config: Mapping[str, Any],
        config_path: Path,
        log_path: Path,
        process: subprocess.Popen[bytes],
    ) -> None:
        self.host, self.port = _split_address(config["listen"])
        admin_host, admin_port = _split_address(config["admin"]["listen"])
        self.admin_url = f"http://{admin_host}:{admin_port}"
        self.config_path = config_path
        self.log_path = log_path
        self.process = process
        self.pid = process.pid

    def dsn(
        self,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        **extra: str,
    ) -> str:
        """A libpq connection string to the proxy; `extra` adds or overrides keywords."""
        return tcp_dsn((self.host, self.port), user, dbname, password, **extra)

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines parsed; other output (tracebacks, warnings) is skipped."""
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    @overload
    def wait_log(self, match: str, timeout: float = 5.0) -> str: ...

    @overload
    def wait_log(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]: ...

    def wait_log(
        self, match: str | Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> str | dict[str, Any]:
        """Wait for the first log line containing `match`, or the first JSON event that
        `match` accepts, and return it; the log is written asynchronously to the test."""

        def found() -> str | dict[str, Any] | None:
            if isinstance(match, str):
                return next((line for line in self.log_text().splitlines() if match in line), None)
            return next((event for event in self.log_events() if match(event)), None)

        return wait_until(found, timeout, message=f"{match!r} in the log of pid {self.pid}")

    def http_get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, str]:
        """GET from the admin endpoint, with `headers` (e.g. Authorization): (status, body),
        error statuses included."""
        request = urllib.request.Request(self.admin_url + path, headers=dict(headers or {}))
        try:
            with _OPENER.open(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def signal(self, sig: int) -> None:
        """Send `sig`, e.g. SIGHUP to reload the config or SIGINT to test shutdown."""
        self.process.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, as an orchestrator would, and the exit code; SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def rss_bytes(self) -> int:
        """Resident memory now, for tests that bound what a session costs."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until clients can connect and /healthz answers 200 (after a start or a
        reload); raises RuntimeError with the log if the process exits or times out."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with code {self.process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                return self.http_get("/healthz")[0] == 200
            except OSError:
                return False

        try:
            wait_until(ready, timeout, message="clients to be accepted and /healthz to be 200")
        except (AssertionError, RuntimeError) as error:
            raise RuntimeError(
                f"pgwarden ({self.config_path}) is not ready: {error}\n"
                f"--- log ---\n{self.log_text()}"
            ) from None


def launch_proxy(
    workdir: Path,
    name: str,
    config: Mapping[str, Any],
    *,
    extra_args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    stdout: int | None = None,
) -> ProxyProcess:
    """Write `config` to WORKDIR/NAME.yaml, start pgwarden on it with its output in
    WORKDIR/NAME.log, and return once it accepts clients and /healthz answers 200; if it does
    not come up, stop it and raise with its log, usually the only clue to why. `stdout` (a
    file descriptor, e.g. a pipe's end) takes its standard output; the log then gets only
    its standard error."""
    config_path = workdir / f"{name}.yaml"
    log_path = workdir / f"{name}.log"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    command = [sys.executable, "-m", "proxy", "run", "--config", str(config_path)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, *(extra_args or [])],
            stdout=log if stdout is None else stdout,
            stderr=subprocess.STDOUT if stdout is None else log,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    proxy = ProxyProcess(config, config_path, log_path, process)
    try:
        proxy.wait_ready()
    except RuntimeError as exc:
        proxy.stop()
        if process.returncode == EXIT_CANNOT_LISTEN:
            raise PortTaken(str(exc)) from None
        raise
    return proxy


EXIT_CANNOT_LISTEN = 3  # pgwarden run's exit code when a port is taken


class PortTaken(RuntimeError):
    """A free port picked for the proxy was taken by someone else before it listened."""


def launch_with_defaults(
    pg: PgServer,
    workdir: Path,
    name: str,
    config: Mapping[str, Any] | None = None,
    *,
    extra_args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    stdout: int | None = None,
) -> ProxyProcess:
    """launch_proxy() in front of `pg`, with `config` laid over the test defaults; ports
    are picked afresh if one was taken between picking and listening (a race of the
    parallel test processes and the system's own)."""
    for attempt in range(3):
        merged = deep_merge(default_config(f"{pg.host}:{pg.port}"), config or {})
        try:
            return launch_proxy(
                workdir,
                f"{name}-{attempt}" if attempt else name,
                merged,
                extra_args=extra_args,
                env=env,
                stdout=stdout,
            )
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def pgwarden(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` as an operator runs it; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def assert_secret_stays_inside(
    proxy: ProxyProcess, secret: str, logged: str, *, fingerprints: bool = True
) -> None:
    """Neither `secret` nor its start appears in anything pgwarden shows: its log (once
    the line `logged` was written: the log is written asynchronously), /advice,
    /fingerprints (normalized SQL: identifiers stay, so skip it when the secret is also
    used as one) or /metrics."""
    log = wait_until(lambda: logged in proxy.log_text() and proxy.log_text(), message=logged)
    shown = [("log", log)]
    paths = ("/advice", "/fingerprints", "/metrics") if fingerprints else ("/advice", "/metrics")
    for path in paths:
        shown.append((path, proxy.http_get(path)[1]))
    for where, text in shown:
        assert secret not in text, f"the secret leaked into {where}"
        assert secret[:12] not in text, f"part of the secret leaked into {where}"

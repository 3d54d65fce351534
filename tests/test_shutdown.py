"""A drain tells clients why their connection ends: 57P01 (pgwarden is shutting down), for
a client whose transaction ends during the drain as for one idle when it began, whichever
reader keeps the session's round trips, and whenever the client speaks next."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.support.proxy import ProxyProcess

StartProxy = Callable[..., ProxyProcess]

# Who reads the server stream for the round trips (proxy/session/relay.py)
READERS: dict[str, dict[str, Any]] = {
    "deferred": {},
    "realtime": {"timeouts": {"statement": "30s"}},
    "plain": {"analysis": {"enabled": False}},
}
SHUTTING_DOWN = "pgwarden is shutting down"


def closed_reasons(proxy: ProxyProcess, application_name: str) -> list[str]:
    return [
        e["reason"]
        for e in proxy.log_events()
        if e.get("event") == "connection_closed" and e.get("application_name") == application_name
    ]


@pytest.mark.parametrize("pause", [0.0, 0.5], ids=["next-at-once", "next-later"])
@pytest.mark.parametrize("config", READERS.values(), ids=READERS.keys())
def test_transaction_ending_in_a_drain_gets_57p01(
    proxy_factory: StartProxy, config: dict[str, Any], pause: float
) -> None:
    """SIGTERM inside BEGIN…; the COMMIT goes through; the next statement, sent at once or
    after the session was closed, fails with AdminShutdown, not a bare lost connection."""
    proxy = proxy_factory({"shutdown": {"drain_timeout": "10s"}, **config})
    with psycopg.connect(proxy.dsn(application_name="drain-commit"), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        proxy.signal(signal.SIGTERM)
        proxy.wait_log(lambda e: e["event"] == "draining")
        conn.execute("COMMIT")
        committed = time.monotonic()
        time.sleep(pause)
        with pytest.raises(errors.AdminShutdown, match=SHUTTING_DOWN) as raised:
            conn.execute("SELECT 1")
        assert raised.value.sqlstate == "57P01"
    assert proxy.process.wait(5) == 0
    assert time.monotonic() - committed < 2 + pause, "did not exit once the transaction ended"
    assert closed_reasons(proxy, "drain-commit") == ["drained"]


@pytest.mark.parametrize("config", READERS.values(), ids=READERS.keys())
def test_idle_client_in_a_drain_gets_57p01(
    proxy_factory: StartProxy, config: dict[str, Any]
) -> None:
    proxy = proxy_factory(config)
    with psycopg.connect(proxy.dsn(application_name="drain-idle"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        proxy.signal(signal.SIGTERM)
        assert proxy.process.wait(5) == 0
        with pytest.raises(errors.AdminShutdown, match=SHUTTING_DOWN):
            conn.execute("SELECT 1")
    assert closed_reasons(proxy, "drain-idle") == ["drained"]

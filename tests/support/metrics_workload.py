"""A workload that gives every metric family of pgwarden samples, and the config it needs.

Used by the metrics tests (promtool lint, the README reference, a real Prometheus): a
labelled family only has samples once something happened, so this makes each thing
happen once: statements of several commands, an error, an N+1 advice, a rewrite, a
block, a statement timeout, and a client that leaves mid-query (a cancel request).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from tests.support.proxy import ProxyProcess
from tests.support.rawpg import RawClient, query_message
from tests.support.util import wait_until

__all__ = ["WORKLOAD_CONFIG", "light_queries", "run_full_workload"]

TABLE = "pgwarden_metrics_items"
TIMEOUT_APP = "pgwarden-metrics-timeout"
REWRITE_PROBE = "SELECT $1::text AS pgwarden_rewrite_probe"

WORKLOAD_CONFIG: dict[str, Any] = {
    "timeouts": {
        "rules": [
            {
                "name": "metrics-probe",
                "match": {"application_name": TIMEOUT_APP},
                "statement": "200ms",
            }
        ]
    },
    "rewrites": [
        {
            "name": "upper-probe",
            "match": {"statement": REWRITE_PROBE},
            "replace": "SELECT upper($1::text) AS pgwarden_rewrite_probe",
        }
    ],
    "blocks": [{"name": "no-truncate-items", "match": {"command": "TRUNCATE", "tables": [TABLE]}}],
}


def run_full_workload(proxy: ProxyProcess) -> None:
    """Exercises every metric pgwarden has; `proxy` must run with WORKLOAD_CONFIG."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, v text)")
        conn.execute(
            f"INSERT INTO {TABLE} SELECT g, 'v' || g FROM generate_series(1, 20) g "
            "ON CONFLICT DO NOTHING"
        )
        with conn.transaction():  # an N+1: one lookup per id, in one transaction
            for i in range(1, 9):
                conn.execute(f"SELECT v FROM {TABLE} WHERE id = %s", (i,))
        row = conn.execute("SELECT 'probe'::text AS pgwarden_rewrite_probe").fetchone()
        assert row == ("PROBE",), f"the rewrite rule did not apply: {row}"
        for sql, sqlstate in (
            (f"SELECT * FROM {TABLE}_missing", "42P01"),
            (f"TRUNCATE {TABLE}", "42501"),
        ):
            try:
                conn.execute(sql)
            except psycopg.Error as error:
                assert error.sqlstate == sqlstate, (sql, error)
            else:
                raise AssertionError(f"{sql!r} did not fail")
    with psycopg.connect(proxy.dsn(application_name=TIMEOUT_APP), autocommit=True) as conn:
        try:
            conn.execute("SELECT pg_sleep(5)")
        except psycopg.errors.QueryCanceled:
            pass
        else:
            raise AssertionError("the statement timeout rule did not cancel pg_sleep(5)")
    with RawClient(proxy.host, proxy.port) as raw:  # leaves mid-query: pgwarden cancels
        raw.login()
        raw.send(query_message("SELECT pg_sleep(5)"))
        time.sleep(0.3)
    wait_until(
        lambda: "pgwarden_cancel_requests_total{" in proxy.http_get("/metrics")[1],
        message="the cancel request of a client gone mid-query to be counted",
    )


def light_queries(conn: psycopg.Connection[Any], n: int = 5) -> None:
    """A few quick statements of different durations, for rates and latency quantiles."""
    for i in range(n):
        conn.execute(f"SELECT v FROM {TABLE} WHERE id = %s", (i % 20 + 1,))
    conn.execute("SELECT pg_sleep(0.002)")

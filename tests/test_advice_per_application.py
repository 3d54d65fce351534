"""Advice and fingerprints per application: the same loop in two services is two advices,
each naming its own; /advice, `pgwarden advice` and /fingerprints filter by who ran it;
Prometheus keeps one series per fingerprint and names its SQL in pgwarden_fingerprint_info.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.prometheus_tools import require
from tests.support.proxy import REPO_ROOT, ProxyProcess
from tests.support.util import PgServer, wait_until

AUTHORS = 12
LOOKUP = "SELECT title FROM perapp_books WHERE author_id = $1"
BATCH = "INSERT INTO perapp_items (n, label) VALUES ($1, $2)"
APPS = ("orders-api", "billing-worker")


@pytest.fixture(scope="module")
def schema(pg: PgServer) -> Iterator[None]:
    pg.psql(
        f"""
        DROP TABLE IF EXISTS perapp_books, perapp_authors, perapp_items;
        CREATE TABLE perapp_authors (id int PRIMARY KEY, name text NOT NULL);
        CREATE TABLE perapp_books (id int PRIMARY KEY, author_id int NOT NULL, title text);
        CREATE TABLE perapp_items (n int NOT NULL, label text NOT NULL);
        INSERT INTO perapp_authors SELECT g, 'author ' || g FROM generate_series(1, {AUTHORS}) g;
        INSERT INTO perapp_books
            SELECT g, (g % {AUTHORS}) + 1, 'book ' || g FROM generate_series(1, {AUTHORS * 2}) g;
        """
    )
    yield
    pg.psql("DROP TABLE IF EXISTS perapp_books, perapp_authors, perapp_items")


@pytest.fixture(scope="module")
def proxy(module_proxy: ProxyProcess, schema: None) -> ProxyProcess:
    """A pgwarden after both applications ran the same N+1 loop, and billing-worker an
    executemany as well (an insert_loop of severity info), all connections closed; the
    tests only read it (and add statements of one more application, "odd")."""
    proxy = module_proxy
    for app in APPS:
        with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM perapp_authors WHERE id > %s", (0,))]
            for author_id in ids:
                conn.execute("SELECT title FROM perapp_books WHERE author_id = %s", (author_id,))
            if app == "billing-worker":
                with conn.transaction():
                    conn.cursor().executemany(
                        "INSERT INTO perapp_items (n, label) VALUES (%s, %s)",
                        [(i, "x") for i in range(15)],
                    )
    wait_until(lambda: len(get(proxy, "/advice")["advice"]) == 3, message="three advices")
    return proxy


def get(proxy: ProxyProcess, path: str, **query: str) -> dict[str, Any]:
    """The JSON answer of GET `path` with `query`, which must be a 200."""
    status, body = proxy.http_get(f"{path}?{urllib.parse.urlencode(query)}" if query else path)
    assert status == 200, body
    return json.loads(body)


def advice(proxy: ProxyProcess, **query: str) -> list[tuple[str, str, str]]:
    """(rule, severity, application_name) of each advice /advice?`query` lists."""
    return sorted(
        (a["rule"], a["severity"], a["application_name"])
        for a in get(proxy, "/advice", **query)["advice"]
    )


# ---------------------------------------------------------------------------- /advice


def test_the_same_loop_in_two_applications_is_two_advices(proxy: ProxyProcess) -> None:
    loops = [a for a in get(proxy, "/advice")["advice"] if a["rule"] == "n_plus_one"]
    assert sorted(a["application_name"] for a in loops) == sorted(APPS)
    assert len({a["fingerprint"] for a in loops}) == 1  # one statement, two owners
    for found in loops:
        assert found["statement"] == LOOKUP
        assert found["count"] == AUTHORS and found["occurrences"] == 1
        assert (found["database"], found["user"]) == ("postgres", "postgres")


def test_each_filter_narrows_and_unknown_values_match_nothing(proxy: ProxyProcess) -> None:
    everything = advice(proxy)
    assert everything == [
        ("insert_loop", "info", "billing-worker"),
        ("n_plus_one", "warning", "billing-worker"),
        ("n_plus_one", "warning", "orders-api"),
    ]
    assert advice(proxy, application_name="orders-api") == [("n_plus_one", "warning", "orders-api")]
    assert advice(proxy, rule="n_plus_one") == everything[1:]
    assert advice(proxy, severity="info") == everything[:1]
    assert advice(proxy, application_name="billing-worker", severity="warning") == [
        ("n_plus_one", "warning", "billing-worker")
    ]
    assert advice(proxy, database="postgres", user="postgres") == everything
    for unknown in (
        {"application_name": "nobody"},
        {"database": "elsewhere"},
        {"rule": "no_such_rule"},
        {"severity": "dire"},
        {"application_name": ""},  # a client that set none
    ):
        assert advice(proxy, **unknown) == [], unknown


def test_bad_filter_names_are_refused(proxy: ProxyProcess) -> None:
    status, body = proxy.http_get("/advice?application=orders-api")
    assert status == 400
    assert "application" in json.loads(body)["error"]
    assert "application_name" in json.loads(body)["error"]  # says what would work
    for path in ("/fingerprints?rule=n_plus_one", "/fingerprints?severity=info"):
        status, body = proxy.http_get(path)
        assert status == 400, path
        assert "does not apply to /fingerprints" in json.loads(body)["error"]


def test_pgwarden_advice_application_prints_only_that_application(proxy: ProxyProcess) -> None:
    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "advice", "--admin", proxy.admin_url, *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_ROOT,
            check=True,
        )
        return result.stdout

    table = run("--application", "orders-api")
    assert "application orders-api" in table
    assert "billing-worker" not in table
    assert table.count("n_plus_one") == 2  # its row in the table and its detail
    payload = json.loads(run("--json", "--application", "billing-worker", "--rule", "n_plus_one"))
    assert [(a["rule"], a["application_name"]) for a in payload["advice"]] == [
        ("n_plus_one", "billing-worker")
    ]
    payload = json.loads(run("--json", "--severity", "info", "--database", "postgres"))
    assert [a["rule"] for a in payload["advice"]] == ["insert_loop"]
    assert json.loads(run("--json", "--user", "somebody"))["advice"] == []


# ------------------------------------------------------------------------- /fingerprints


def test_fingerprints_per_application_and_one_series_per_fingerprint(
    proxy: ProxyProcess,
) -> None:
    lookups = [r for r in get(proxy, "/fingerprints")["fingerprints"] if r["statement"] == LOOKUP]
    assert sorted(r["application_name"] for r in lookups) == sorted(APPS)
    for row in lookups:
        assert row["calls"] == AUTHORS
        assert (row["database"], row["user"], row["command"]) == ("postgres", "postgres", "SELECT")
    mine = get(proxy, "/fingerprints", application_name="orders-api")["fingerprints"]
    assert {r["application_name"] for r in mine} == {"orders-api"}
    assert LOOKUP in {r["statement"] for r in mine}
    assert BATCH not in {r["statement"] for r in mine}  # billing-worker's only
    assert get(proxy, "/fingerprints", database="elsewhere")["fingerprints"] == []

    status, text = proxy.http_get("/metrics")
    assert status == 200
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    fingerprint = lookups[0]["fingerprint"]
    (calls,) = [
        s.value
        for s in samples
        if s.name == "pgwarden_fingerprint_queries_total"
        and s.labels == {"fingerprint": fingerprint}
    ]
    assert calls == 2 * AUTHORS  # Prometheus sums the applications: one series
    info = {s.labels["fingerprint"]: s for s in samples if s.name == "pgwarden_fingerprint_info"}
    assert info[fingerprint].labels["statement"] == LOOKUP
    assert info[fingerprint].value == 1


def test_fingerprint_info_carries_any_sql_as_a_valid_label(proxy: ProxyProcess) -> None:
    """Quotes, backslashes, newlines and more than 200 characters: escaped and cut, and
    the scrape stays valid for Prometheus' own lint."""
    promtool = require("promtool")
    columns = ", ".join(f"{i} AS c{i}" for i in range(60))
    nasty = f'SELECT 1 AS "a ""quoted"" \\ name",\n  {columns}'
    with psycopg.connect(proxy.dsn(application_name="odd"), autocommit=True) as conn:
        conn.execute(nasty)
    (row,) = get(proxy, "/fingerprints", application_name="odd")["fingerprints"]
    statement = row["statement"]
    assert '""quoted""' in statement and "\\" in statement and "\n" in statement
    assert len(statement) > 200
    _, text = proxy.http_get("/metrics")
    info = {
        s.labels["fingerprint"]: s.labels["statement"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "pgwarden_fingerprint_info"
    }
    assert info[row["fingerprint"]] == statement[:200]
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check

"""Rewrite and block rules end to end: psycopg (simple and extended protocol, pipelines),
asyncpg (prepared statements, whose Describe must report the replacement's columns), psql
and a raw-socket client, against a real PostgreSQL; plus `check-config` refusing bad rules.

A statement no rule matches must reach the client byte for byte as without rules, and a
rewritten one exactly as the replacement sent directly would.
"""

from __future__ import annotations

import asyncio
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from psycopg import errors

from proxy.config import settings_from_dict
from tests.support.proxy import (
    REPO_ROOT,
    ProxyProcess,
    launch_with_defaults,
)
from tests.support.rawpg import Message, RawClient, error_fields, query_message
from tests.support.util import PgServer, wait_until
from tests.test_clients_cli import psql

ITEMS_QUERY = "SELECT id, v FROM rules_items ORDER BY id"
EMAIL_QUERY = "SELECT id, name FROM rules_users WHERE lower(email) = $1"
EMAIL_REPLACEMENT = "SELECT id, name, 'rewritten' AS via FROM rules_users WHERE email = $1"
REORDER_REPLACEMENT = "SELECT $3 AS rw_c, $1 AS rw_a, $2 AS rw_b, 'rewritten' AS rw_via"

RULES: dict[str, Any] = {
    "rewrites": [
        {
            "name": "limit-items",
            "match": {"statement": ITEMS_QUERY},
            "replace": f"{ITEMS_QUERY} LIMIT 3",
        },
        {"name": "email-index", "match": {"statement": EMAIL_QUERY}, "replace": EMAIL_REPLACEMENT},
        {
            "name": "reorder",
            "match": {"statement": "SELECT $1 AS rw_a, $2 AS rw_b, $3 AS rw_c"},
            "replace": REORDER_REPLACEMENT,
        },
        {
            "name": "only-for-nobody",
            "match": {"statement": "SELECT id FROM rules_items WHERE id = $1", "user": "nobody"},
            "replace": "SELECT -id FROM rules_items WHERE id = $1",
        },
    ],
    "blocks": [
        {"name": "no-unqualified-delete", "match": {"command": "DELETE", "without_where": True}},
        {"name": "no-drop", "match": {"command": "DROP"}},
        {"name": "no-truncate", "match": {"command": "TRUNCATE"}},
    ],
}

LOG_RULES: dict[str, Any] = {
    "rewrites": [{**RULES["rewrites"][0], "mode": "log"}],
    "blocks": [{**RULES["blocks"][2], "mode": "log"}],
}

# Values a client may send as literals; psycopg's ClientCursor quotes them itself.
TRICKY = [
    ("it's", 'say "hi"', None),
    ("back\\slash", "E'not an escape'", -5),
    ("naïve ☃ 日本 𝄞", "$$dollar$$ $1", 0),
    ("x'); DROP TABLE rules_items; --", "", -2147483648),
    (None, "tab\there\nnewline", 42),
]


@pytest.fixture(scope="module")
def tables(pg: PgServer) -> Iterator[None]:
    """rules_items (10 rows), rules_users (one mixed-case email) and rules_victims."""
    pg.psql(
        "DROP TABLE IF EXISTS rules_items, rules_users, rules_victims;"
        "CREATE TABLE rules_items (id int PRIMARY KEY, v text);"
        "INSERT INTO rules_items SELECT g, 'item ' || g FROM generate_series(1, 10) g;"
        "CREATE TABLE rules_users (id int PRIMARY KEY, email text, name text);"
        "CREATE INDEX ON rules_users (email);"
        "INSERT INTO rules_users VALUES (1, 'Mixed@Example.com', 'mixed'),"
        " (2, 'lower@example.com', 'lower');"
        "CREATE TABLE rules_victims (id int, note text);"
    )
    yield
    pg.psql("DROP TABLE IF EXISTS rules_items, rules_users, rules_victims")


def _launch(pg: PgServer, workdir: Path, name: str, rules: dict[str, Any]) -> ProxyProcess:
    return launch_with_defaults(pg, workdir, name, rules)


@pytest.fixture(scope="module")
def proxy(
    pg: PgServer, tables: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """pgwarden with RULES, shared by the module (tests only read its log and counters for
    rules and statements of their own); overrides the per-test fixture."""
    process = _launch(pg, tmp_path_factory.mktemp("rules"), "rules", RULES)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def plain(
    pg: PgServer, tables: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """pgwarden without rules, to compare bytes with."""
    process = _launch(pg, tmp_path_factory.mktemp("plain"), "plain", {})
    yield process
    process.stop()


@pytest.fixture
def victims(pg: PgServer, tables: None) -> Iterator[str]:
    """rules_victims with three rows, emptied again afterwards."""
    pg.psql("TRUNCATE rules_victims; INSERT INTO rules_victims VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    yield "rules_victims"
    pg.psql("TRUNCATE rules_victims")


def victim_ids(pg: PgServer) -> list[int]:
    out = pg.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM rules_victims")
    return [int(x) for x in out.strip().split(",") if x]


def blocked(rule: str) -> str:
    return re.escape(f'pgwarden: statement blocked by rule "{rule}"')


def counter(proxy: ProxyProcess, family: str, rule: str, mode: str) -> float:
    """The value of pgwarden_<family>_total{rule, mode}, 0 when absent."""
    status, text = proxy.http_get("/metrics")
    assert status == 200
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name == f"pgwarden_{family}_total":
            labels, _, value = rest.rpartition("} ")
            if dict(re.findall(r'(\w+)="([^"]*)"', labels)) == {"rule": rule, "mode": mode}:
                return float(value)
    return 0.0


# ---------------------------------------------------------------- rewrites: psycopg


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_rewritten_query_returns_the_replacement_results(
    proxy: ProxyProcess, pg: PgServer, protocol: str
) -> None:
    cursor_class = psycopg.ClientCursor if protocol == "simple" else psycopg.Cursor
    with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=cursor_class) as conn:
        rows = conn.execute(ITEMS_QUERY).fetchall()
        near = conn.execute("SELECT id, v FROM rules_items ORDER BY id DESC").fetchall()
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        assert rows == direct.execute(f"{ITEMS_QUERY} LIMIT 3").fetchall()
        assert near == direct.execute("SELECT id, v FROM rules_items ORDER BY id DESC").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3] and len(near) == 10


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_literals_are_carried_into_the_replacement(
    proxy: ProxyProcess, pg: PgServer, protocol: str
) -> None:
    """ClientCursor sends values as literals (quoted by psycopg, E'' for backslashes,
    ` -5` for negatives); the server-side cursor as parameters. Either way the replacement
    gets them, in its own order, and the columns are the replacement's."""
    query = "SELECT %s AS rw_a, %s AS rw_b, %s AS rw_c"
    cursor_class = psycopg.ClientCursor if protocol == "simple" else psycopg.Cursor
    with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=cursor_class) as conn:
        for a, b, c in TRICKY:
            cur = conn.execute(query, (a, b, c))
            assert [col.name for col in cur.description or []] == ["rw_c", "rw_a", "rw_b", "rw_via"]
            assert cur.fetchall() == [(c, a, b, "rewritten")], (a, b, c)
    with psycopg.connect(pg.dsn(), autocommit=True, cursor_factory=cursor_class) as direct:
        cur = direct.execute(query, TRICKY[0])
        assert [col.name for col in cur.description or []] == ["rw_a", "rw_b", "rw_c"]


def test_multi_statement_query_replaces_only_the_matching_statement(
    proxy: ProxyProcess, pg: PgServer
) -> None:
    text = "SELECT 'first;' AS a; {}; SELECT 'last' AS z"
    with psycopg.ClientCursor(psycopg.connect(proxy.dsn(), autocommit=True)) as cur:
        cur.execute(text.format(ITEMS_QUERY))
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
        cur.connection.close()
    with psycopg.ClientCursor(psycopg.connect(pg.dsn(), autocommit=True)) as cur:
        cur.execute(text.format(f"{ITEMS_QUERY} LIMIT 3"))
        expected = [cur.fetchall()]
        while cur.nextset():
            expected.append(cur.fetchall())
        cur.connection.close()
    assert results == expected
    assert results[0] == [("first;",)] and len(results[1]) == 3 and results[2] == [("last",)]


def test_pipeline_with_rewrites(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.pipeline():
        items = conn.execute(ITEMS_QUERY)
        echo = conn.execute("SELECT %s AS rw_a, %s AS rw_b, %s AS rw_c", ("a", "b", "c"))
        other = conn.execute("SELECT count(*) FROM rules_items")
        email = conn.execute(
            "SELECT id, name FROM rules_users WHERE lower(email) = %s", ("mixed@example.com",)
        )
    assert len(items.fetchall()) == 3
    assert echo.fetchall() == [("c", "a", "b", "rewritten")]
    assert other.fetchall() == [(10,)]
    assert email.fetchall() == []  # the replacement compares email as stored: no such row


def test_identity_narrows_a_rule(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT id FROM rules_items WHERE id = %s", (4,)).fetchall() == [(4,)]


# ---------------------------------------------------------------- rewrites: asyncpg


def test_prepared_statement_describes_the_replacement(proxy: ProxyProcess, pg: PgServer) -> None:
    async def main() -> None:
        through = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres")
        direct = await asyncpg.connect(host=pg.host, port=pg.port, user=pg.superuser)
        try:
            statement = await through.prepare(EMAIL_QUERY)
            assert [a.name for a in statement.get_attributes()] == ["id", "name", "via"]
            assert [a.type.name for a in statement.get_attributes()] == ["int4", "text", "text"]
            assert await statement.fetch("mixed@example.com") == []  # lower() is gone
            rows = await statement.fetch("lower@example.com")
            assert [tuple(r) for r in rows] == [(2, "lower", "rewritten")]
            expected = await direct.fetch(EMAIL_REPLACEMENT, "lower@example.com")
            assert [tuple(r) for r in rows] == [tuple(r) for r in expected]
            # the original, sent directly, finds the mixed-case address
            assert len(await direct.fetch(EMAIL_QUERY, "mixed@example.com")) == 1
            echo = await through.fetchrow(
                "SELECT $1::text AS rw_a, $2::text AS rw_b, $3::text AS rw_c", "a", None, "c"
            )
            assert echo is not None and list(echo.keys()) == ["rw_a", "rw_b", "rw_c"]  # a cast
            cursor_rows = []
            async with through.transaction():
                async for record in through.cursor(ITEMS_QUERY, prefetch=1):
                    cursor_rows.append(record["id"])
            assert cursor_rows == [1, 2, 3]
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no-unqualified-delete"):
                await through.prepare("DELETE FROM rules_victims RETURNING id")
            assert await through.fetchval("SELECT count(*) FROM rules_items") == 10
        finally:
            await through.close()
            await direct.close()

    asyncio.run(main())


# ------------------------------------------------------------------- rewrites: psql


def test_psql_command_with_literals_and_several_statements(
    proxy: ProxyProcess, pg: PgServer
) -> None:
    original = (
        "SELECT 1 AS one; "
        "SELECT 'it''s' AS rw_a, E'back\\\\slash ☃' AS rw_b, NULL AS rw_c; "
        f"{ITEMS_QUERY}"
    )
    replacement = (
        "SELECT 1 AS one; "
        "SELECT NULL AS rw_c, 'it''s' AS rw_a, E'back\\\\slash ☃' AS rw_b, 'rewritten' AS rw_via; "
        f"{ITEMS_QUERY} LIMIT 3"
    )
    through = psql(proxy.dsn(), "-c", original)
    assert through.returncode == 0, through.stderr
    direct = psql(pg.dsn(), "-c", replacement)
    assert through.stdout == direct.stdout
    assert "back\\slash ☃" in through.stdout and "(3 rows)" in through.stdout


# ------------------------------------------------------------------------ blocks


def test_delete_without_where_is_blocked_and_with_where_passes(
    proxy: ProxyProcess, pg: PgServer, victims: str
) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match=blocked("no-unqualified-delete")):
            conn.execute(f"DELETE FROM {victims}")
        assert victim_ids(pg) == [1, 2, 3]
        assert conn.execute(f"DELETE FROM {victims} WHERE id = %s", (2,)).rowcount == 1
        assert victim_ids(pg) == [1, 3]
        with pytest.raises(errors.InsufficientPrivilege):  # in the simple protocol too
            psycopg.ClientCursor(conn).execute(f"delete from public.{victims}")
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
    assert victim_ids(pg) == [1, 3]


@pytest.mark.parametrize(
    ("sql", "rule"),
    [("DROP TABLE rules_victims", "no-drop"), ("TRUNCATE rules_victims", "no-truncate")],
)
def test_block_by_command(
    proxy: ProxyProcess, pg: PgServer, victims: str, sql: str, rule: str
) -> None:
    result = psql(proxy.dsn(), "-c", sql)
    assert result.returncode == 1
    assert f'ERROR:  pgwarden: statement blocked by rule "{rule}"' in result.stderr
    assert "pgwarden_blocked_" not in result.stderr  # the marker never shows
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match=blocked(rule)) as info:
            conn.execute(sql)
        assert info.value.diag.sqlstate == "42501"
    assert victim_ids(pg) == [1, 2, 3]


def test_block_inside_a_transaction_fails_it(
    proxy: ProxyProcess, pg: PgServer, victims: str
) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute(f"INSERT INTO {victims} VALUES (4, 'd')")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(f"DELETE FROM {victims}")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {victims}").fetchone() == (3,)
    assert victim_ids(pg) == [1, 2, 3]


def test_block_in_the_middle_of_a_pipeline(proxy: ProxyProcess, victims: str) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match=blocked("no-truncate")):  # noqa: SIM117
            with conn.pipeline():
                before = conn.execute("SELECT 'before'")
                conn.execute(f"TRUNCATE {victims}")
                after = conn.execute("SELECT 'after'")
        assert before.fetchall() == [("before",)]
        with pytest.raises(psycopg.ProgrammingError, match="no result available"):
            after.fetchall()  # skipped by the server until Sync
        with conn.pipeline():
            again = conn.execute(f"SELECT count(*) FROM {victims}")
        assert again.fetchall() == [(3,)]


# ------------------------------------------------- the wire, byte for byte (raw socket)


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", 4 + len(body)) + body


def extended(sql: str, *params: str | None) -> bytes:
    """Parse, Bind (text parameters), Describe portal, Execute of the unnamed statement."""
    values = b"".join(
        struct.pack("!i", -1) if p is None else struct.pack("!i", len(p.encode())) + p.encode()
        for p in params
    )
    bind = b"\0\0" + struct.pack("!hh", 0, len(params)) + values + struct.pack("!h", 0)
    return (
        _msg(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))
        + _msg(b"B", bind)
        + _msg(b"D", b"P\0")
        + _msg(b"E", b"\0" + struct.pack("!i", 0))
    )


SYNC = _msg(b"S", b"")


def exchange(proxy: ProxyProcess, *requests: bytes) -> list[list[Message]]:
    """The messages answering each request, on one connection, up to its ReadyForQuery."""
    with RawClient(proxy.host, proxy.port) as client:
        client.login()
        answers = []
        for request in requests:
            client.send(request)
            answers.append(client.read_until_ready())
        return answers


UNMATCHED = [
    query_message("SELECT id, v FROM rules_items WHERE id < 4 ORDER BY id"),
    query_message("SELECT 1 AS x, 2 AS y, 3 AS z"),  # the fingerprint of rule `reorder`
    query_message("SELECT 'a' AS rw_a, 'b' AS rw_b"),
    query_message("SELECT id FROM rules_items WHERE id = 5"),  # a rule for user nobody only
    query_message("DELETE FROM rules_victims WHERE id = -1; SELECT 1/0"),
    query_message("SELECT * FROM rules_items WHERE"),  # not SQL: never matched
    extended("SELECT v, id FROM rules_items ORDER BY id") + SYNC,
    extended("SELECT $1::int AS rw_a, $2::text AS rw_b, $3 AS rw_c", "7", None, "z") + SYNC,
]


def test_unmatched_statements_pass_byte_for_byte(
    proxy: ProxyProcess, plain: ProxyProcess, victims: str
) -> None:
    assert exchange(proxy, *UNMATCHED) == exchange(plain, *UNMATCHED)


def test_rewritten_response_equals_the_replacement_sent_directly(
    proxy: ProxyProcess, plain: ProxyProcess
) -> None:
    pairs = [
        (query_message(ITEMS_QUERY), query_message(f"{ITEMS_QUERY} LIMIT 3")),
        (
            query_message("SELECT 'it''s' AS rw_a, -5 AS rw_b, NULL AS rw_c"),
            query_message(
                "SELECT NULL AS rw_c, 'it''s' AS rw_a, -5 AS rw_b, 'rewritten' AS rw_via"
            ),
        ),
        (
            extended(EMAIL_QUERY, "lower@example.com") + SYNC,
            extended(EMAIL_REPLACEMENT, "lower@example.com") + SYNC,
        ),
    ]
    rewritten = exchange(proxy, *(original for original, _ in pairs))
    assert rewritten == exchange(plain, *(replacement for _, replacement in pairs))
    assert sum(kind == b"D" for kind, _ in rewritten[0]) == 3


def test_pipelined_block_reports_earlier_results_and_skips_later_ones(
    proxy: ProxyProcess, victims: str
) -> None:
    (answer, after) = exchange(
        proxy,
        extended("SELECT 'before'")
        + extended("DELETE FROM rules_victims")
        + extended("SELECT 'after'")
        + SYNC,
        query_message("SELECT count(*) FROM rules_victims"),
    )
    kinds = [kind for kind, _ in answer]
    assert kinds == [b"1", b"2", b"T", b"D", b"C", b"E", b"Z"]
    assert error_fields(answer[5][1])["C"] == "42501"
    assert answer[3][1].endswith(b"before")
    assert answer[-1][1] == b"I"
    assert after[1][1].endswith(b"3")


def test_each_block_reports_its_own_rule(proxy: ProxyProcess, victims: str) -> None:
    """A block PostgreSQL skipped (after an earlier error, before Sync) produces no error;
    the next block must still name its own rule."""
    skipped, dropped, truncated = exchange(
        proxy,
        extended("SELECT 1/0") + extended("DELETE FROM rules_victims") + SYNC,
        query_message("DROP TABLE rules_victims"),
        extended("TRUNCATE rules_victims") + SYNC,
    )
    assert [error_fields(body)["C"] for kind, body in skipped if kind == b"E"] == ["22012"]
    assert [error_fields(body)["M"] for kind, body in dropped if kind == b"E"] == [
        'pgwarden: statement blocked by rule "no-drop"'
    ]
    assert [error_fields(body)["M"] for kind, body in truncated if kind == b"E"] == [
        'pgwarden: statement blocked by rule "no-truncate"'
    ]


# ----------------------------------------------------------- log mode, metrics, logs


def test_log_mode_changes_nothing_but_logs_and_counts(
    pg: PgServer, tables: None, victims: str, tmp_path: Path
) -> None:
    proxy = _launch(pg, tmp_path, "log-mode", LOG_RULES)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert len(conn.execute(ITEMS_QUERY).fetchall()) == 10
            assert len(conn.execute(ITEMS_QUERY).fetchall()) == 10
            conn.execute(f"TRUNCATE {victims}")
        assert victim_ids(pg) == []
        rewrite = proxy.wait_log(
            lambda e: e.get("event") == "rule_would_apply" and e["kind"] == "rewrite"
        )
        block = proxy.wait_log(
            lambda e: e.get("event") == "rule_would_apply" and e["kind"] == "block"
        )
        assert (rewrite["rule"], rewrite["statement"]) == ("limit-items", ITEMS_QUERY)
        assert (block["rule"], block["statement"]) == ("no-truncate", "TRUNCATE rules_victims")
        assert not [e for e in proxy.log_events() if e.get("event") == "rule_applied"]
        assert counter(proxy, "rewrites", "limit-items", "log") == 2
        assert counter(proxy, "rewrites", "limit-items", "enforce") == 0
        assert counter(proxy, "blocks", "no-truncate", "log") == 1
    finally:
        proxy.stop()


def test_metrics_and_log_events_without_values(proxy: ProxyProcess, victims: str) -> None:
    secret = "s3cret-value-\u2603"
    before = counter(proxy, "rewrites", "email-index", "enforce")
    blocks_before = counter(proxy, "blocks", "no-unqualified-delete", "enforce")
    with psycopg.connect(proxy.dsn(), autocommit=True, application_name="rules-test") as conn:
        cur = psycopg.ClientCursor(conn)
        for value in (secret, "other", secret + "2"):
            cur.execute("SELECT id, name FROM rules_users WHERE lower(email) = %s", (value,))
        with pytest.raises(errors.InsufficientPrivilege):
            cur.execute(f"WITH s AS (SELECT %s) DELETE FROM {victims}", (secret,))
    assert counter(proxy, "rewrites", "email-index", "enforce") == before + 3
    assert counter(proxy, "blocks", "no-unqualified-delete", "enforce") == blocks_before + 1
    statement = "WITH s AS (SELECT $1) DELETE FROM rules_victims"
    block = proxy.wait_log(
        lambda e: e.get("event") == "rule_applied" and e["statement"] == statement
    )
    assert (block["kind"], block["rule"]) == ("block", "no-unqualified-delete")
    assert block["application_name"] == "rules-test"
    # once per rule and statement shape, whichever test (or protocol) ran it first
    rewrites = wait_until(
        lambda: [e for e in proxy.log_events() if e.get("rule") == "email-index"],
        message="the rewrite logged",
    )
    assert len(rewrites) == 1, rewrites
    assert rewrites[0]["event"] == "rule_applied" and rewrites[0]["kind"] == "rewrite"
    assert rewrites[0]["statement"] == EMAIL_QUERY and rewrites[0]["fingerprint"]
    assert secret not in proxy.log_text() and "s3cret" not in proxy.log_text()


def test_rules_reload_on_sighup_even_with_a_block_in_flight(
    pg: PgServer, tables: None, victims: str, tmp_path: Path
) -> None:
    """A blocked statement queued behind a slow one is answered after a reload: its error
    is still recognised and named, and new rules apply from then on."""
    proxy = _launch(pg, tmp_path, "reload", RULES)
    try:
        with RawClient(proxy.host, proxy.port) as client:
            client.login()
            client.send(query_message("SELECT pg_sleep(0.6)") + query_message("DROP TABLE rules_x"))
            config = yaml.safe_load(proxy.config_path.read_text())
            config["blocks"] = [{"name": "no-select-items", "match": {"tables": ["rules_items"]}}]
            config["rewrites"] = []
            proxy.config_path.write_text(yaml.safe_dump(config))
            proxy.signal(signal.SIGHUP)
            proxy.wait_log('"reloaded"')
            client.read_until_ready()
            second = client.read_until_ready()
            errors_ = [error_fields(body) for kind, body in second if kind == b"E"]
            assert [e["M"] for e in errors_] == ['pgwarden: statement blocked by rule "no-drop"']
            client.send(query_message(ITEMS_QUERY))
            third = client.read_until_ready()
            assert [error_fields(b)["M"] for k, b in third if k == b"E"] == [
                'pgwarden: statement blocked by rule "no-select-items"'
            ]
    finally:
        proxy.stop()


def test_rules_added_by_a_reload_apply_to_open_connections(
    pg: PgServer, tables: None, victims: str, tmp_path: Path
) -> None:
    """An operator adding a block in a hurry means the application's pooled connections."""
    proxy = _launch(pg, tmp_path, "added", {})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM rules_victims").fetchone() == (3,)
            config = yaml.safe_load(proxy.config_path.read_text())
            config["blocks"] = [RULES["blocks"][2]]
            proxy.config_path.write_text(yaml.safe_dump(config))
            proxy.signal(signal.SIGHUP)
            proxy.wait_log('"reloaded"')
            with pytest.raises(errors.InsufficientPrivilege, match=blocked("no-truncate")):
                conn.execute(f"TRUNCATE {victims}")
            assert conn.execute("SELECT count(*) FROM rules_victims").fetchone() == (3,)
    finally:
        proxy.stop()


# ---------------------------------------------------------------------- check-config


def check_config(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
        check=False,
    )


STATEMENT = "SELECT * FROM t WHERE id = $1"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            {"rewrites": [{"name": "r", "match": {"statement": STATEMENT}, "replace": "SELEC 1"}]},
            "rewrites[0].replace: not valid SQL",
            id="not-sql",
        ),
        pytest.param(
            {
                "rewrites": [
                    {"name": "r", "match": {"statement": STATEMENT}, "replace": "SELECT $1, $2"}
                ]
            },
            "rewrites[0].replace: must use the same parameters",
            id="other-parameters",
        ),
        pytest.param(
            {
                "rewrites": [
                    {
                        "name": "r",
                        "match": {"statement": STATEMENT},
                        "replace": "SELECT $1; SELECT 1",
                    }
                ]
            },
            "rewrites[0].replace: must be exactly one statement",
            id="two-statements",
        ),
        pytest.param(
            {
                "rewrites": [
                    {"name": "same", "match": {"statement": STATEMENT}, "replace": "SELECT $1"}
                ],
                "blocks": [{"name": "same", "match": {"command": "DROP"}}],
            },
            "blocks[0].name: duplicate rule name 'same'",
            id="duplicate-name",
        ),
        pytest.param(
            {"blocks": [{"name": "b", "match": {"user": "app"}}]},
            "blocks[0].match: a block needs something to match on",
            id="block-matching-nothing",
        ),
        pytest.param(
            {"blocks": [{"name": "b", "match": {"command": "DROP"}, "when": "always"}]},
            "blocks[0].when: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            {
                "rewrites": [
                    {
                        "name": "r",
                        "match": {"statement": STATEMENT},
                        "replace": "SELECT $1",
                        "mode": "warn",
                    }
                ]
            },
            "rewrites[0].mode: expected one of enforce, log",
            id="bad-mode",
        ),
    ],
)
def test_check_config_refuses_bad_rules(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    result = check_config(tmp_path, config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"pgwarden: config error: {message}" in result.stderr


def test_check_config_accepts_rules_and_the_shipped_file(tmp_path: Path) -> None:
    result = check_config(tmp_path, RULES)
    assert result.returncode == 0, result.stderr
    assert "no-unqualified-delete" in result.stdout
    shipped = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "config/pgwarden.yaml"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
        check=False,
    )
    assert shipped.returncode == 0, shipped.stderr
    effective = yaml.safe_load(shipped.stdout.split("\n", 1)[1])
    assert effective["rewrites"] == [] and effective["blocks"] == []


def test_documented_examples_are_valid() -> None:
    """The rules in README.md and the commented examples in config/pgwarden.yaml load."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Rewrite and block rules") :]
    example = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert example is not None
    settings = settings_from_dict(yaml.safe_load(example.group(1)))
    assert [r.name for r in settings.rewrites] == ["cap-order-history", "email-lookup-uses-index"]
    assert [b.name for b in settings.blocks] == ["no-unqualified-delete"]
    shipped = (REPO_ROOT / "config" / "pgwarden.yaml").read_text()
    for key in ("rewrites", "blocks"):
        commented = re.search(rf"^# {key}:\n((?:#   .*\n)+)", shipped, re.MULTILINE)
        assert commented is not None, key
        text = f"{key}:\n" + "".join(line[2:] + "\n" for line in commented.group(1).splitlines())
        assert getattr(settings_from_dict(yaml.safe_load(text)), key)

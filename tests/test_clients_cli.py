"""The command-line clients through pgwarden: psql (commands, scripts, \\copy) and pgbench in
each of its query modes."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tools.pgcluster import find_bindir
from tests.support.proxy import ProxyProcess
from tests.support.util import PgServer

PGBENCH_DB = "pgwarden_pgbench"


@pytest.fixture(scope="module")
def proxy(module_proxy: ProxyProcess) -> ProxyProcess:
    """One pgwarden for the whole module (overrides the per-test fixture)."""
    return module_proxy


def tool(name: str) -> str:
    """The path of a PostgreSQL client program; skips the test when it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    try:
        candidate = find_bindir() / name
    except RuntimeError:
        candidate = Path("/nonexistent")
    if not candidate.is_file():
        pytest.skip(f"{name} is not installed")
    return str(candidate)


def psql(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [tool("psql"), dsn, "-X", "-v", "ON_ERROR_STOP=1", *args]
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


def test_psql_command(proxy: ProxyProcess, pg: PgServer) -> None:
    sql = "SELECT g, repeat('é', g) AS s FROM generate_series(1, 5) g"
    through = psql(proxy.dsn(), "-c", sql)
    assert through.returncode == 0, through.stderr
    assert "(5 rows)" in through.stdout and "ééééé" in through.stdout
    assert through.stdout == psql(pg.dsn(), "-c", sql).stdout
    failed = psql(proxy.dsn(), "-c", "SELECT 1/0")
    assert failed.returncode == 1
    assert "ERROR:  division by zero" in failed.stderr


def test_psql_script_with_copy(proxy: ProxyProcess, pg: PgServer, tmp_path: Path) -> None:
    table = f"psql_{uuid.uuid4().hex[:12]}"
    source = tmp_path / "in.tsv"
    source.write_text("".join(f"{i}\tvalue {i}\n" for i in range(1, 5001)))
    exported = tmp_path / "out.tsv"
    script = f"""
\\set ON_ERROR_STOP 1
CREATE TABLE {table} (id int PRIMARY KEY, v text);
\\copy {table} FROM '{source}'
BEGIN;
UPDATE {table} SET v = upper(v) WHERE id <= 10;
SAVEPOINT s;
DELETE FROM {table};
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*), min(v), max(id) FROM {table};
\\copy (SELECT * FROM {table} ORDER BY id) TO '{exported}'
\\copy (SELECT * FROM {table} ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)
SET application_name = 'from-psql';
SHOW application_name;
DO $$ BEGIN RAISE NOTICE 'notice from script'; END $$;
DROP TABLE {table};
"""
    try:
        result = psql(proxy.dsn(), "-q", "-A", "-t", stdin=script)
        assert result.returncode == 0, result.stderr
    finally:
        pg.psql(f"DROP TABLE IF EXISTS {table}")
    lines = result.stdout.splitlines()
    assert lines[0] == "5000|VALUE 1|5000"
    assert lines[1] == "id,v"
    assert lines[2:5002] == [f"{i},{'VALUE' if i <= 10 else 'value'} {i}" for i in range(1, 5001)]
    assert lines[5002:] == ["from-psql"]
    assert "NOTICE:  notice from script" in result.stderr
    expected = source.read_text().splitlines()
    expected[:10] = [line.replace("value", "VALUE") for line in expected[:10]]
    assert exported.read_text().splitlines() == expected


def test_psql_stops_on_error_in_script(proxy: ProxyProcess) -> None:
    result = psql(proxy.dsn(), "-q", "-A", "-t", stdin="SELECT 'one';\nSELEC 2;\nSELECT 'three';\n")
    assert result.returncode == 3
    assert result.stdout == "one\n"
    assert 'syntax error at or near "SELEC"' in result.stderr


@pytest.fixture(scope="module")
def pgbench_db(pg: PgServer) -> Iterator[str]:
    """A database initialised by pgbench at scale 1, over a direct connection."""
    pg.psql(f"DROP DATABASE IF EXISTS {PGBENCH_DB}")
    pg.psql(f"CREATE DATABASE {PGBENCH_DB}")
    init = subprocess.run(
        [
            tool("pgbench"),
            "-i",
            "-s",
            "1",
            "-q",
            *("-h", pg.host, "-p", str(pg.port)),
            *("-U", pg.superuser, PGBENCH_DB),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    yield PGBENCH_DB
    pg.psql(f"DROP DATABASE IF EXISTS {PGBENCH_DB} WITH (FORCE)")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(proxy: ProxyProcess, pgbench_db: str, mode: str) -> None:
    result = subprocess.run(
        [
            tool("pgbench"),
            "-M",
            mode,
            "-T",
            "3",
            "-c",
            "4",
            "-j",
            "2",
            "-n",
            *("-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", pgbench_db),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"query mode: {mode}" in output
    assert not [line for line in output.splitlines() if "error" in line.lower()], output
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    assert processed is not None and int(processed.group(1)) > 0, output
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert failed is not None and failed.group(1) == "0", output

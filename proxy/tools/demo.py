"""`pgwarden demo`: a throwaway PostgreSQL, pgwarden in front of it, and a leaky little app.

Everything runs for real: the cluster from the local PostgreSQL binaries, pgwarden as its
own process, and an app written the way real apps go wrong (a lazy-loading list page,
row-by-row imports). What the demo prints is what pgwarden itself reports. With `keep`,
all of it stays up until SIGINT or SIGTERM, so the addresses it prints can be opened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from proxy.tools.pgcluster import LocalCluster, free_port
from proxy.tools.report import format_advice

if TYPE_CHECKING:
    import psycopg

__all__ = ["run_demo"]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pgwarden exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("pgwarden did not start listening in time")


# What the operator of the demo configured: a time limit for reports, a guard rail.
_RULES = {
    "timeouts": {
        "rules": [{"name": "reports", "match": {"tables": ["sales_report"]}, "statement": "1s"}]
    },
    "blocks": [
        {"name": "no-unqualified-delete", "match": {"command": "DELETE", "without_where": True}}
    ],
}


def _app(dsn: str) -> list[str]:
    """A bookshop app with the two loops pgwarden exists to catch, healthy queries, and
    two statements pgwarden stops; returns what the app was told about those two."""
    import psycopg

    stopped = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The orders page: a lookup on columns no index serves, on a table big enough for
        # it to matter; pgwarden's index advisor proves the index (with HypoPG, if there).
        conn.execute(
            "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL,"
            " status text NOT NULL, total numeric NOT NULL);"
            "INSERT INTO orders (customer_id, status, total) SELECT g % 5000,"
            " (ARRAY['new', 'paid', 'shipped'])[1 + g % 3], g FROM generate_series(1, 50000) g;"
            "ANALYZE orders"
        )
        with contextlib.suppress(psycopg.Error):  # not installed: the advice is unverified
            conn.execute("CREATE EXTENSION hypopg")
        for customer in range(1, 6):
            conn.execute(
                "SELECT id, total FROM orders WHERE customer_id = %s AND status = %s",
                [customer, "paid"],
            ).fetchall()
        conn.execute(
            "CREATE TABLE authors (id serial PRIMARY KEY, name text NOT NULL);"
            "CREATE TABLE books (id serial PRIMARY KEY, author_id int NOT NULL"
            " REFERENCES authors, title text NOT NULL);"
            "CREATE INDEX ON books (author_id);"
            "CREATE VIEW sales_report AS SELECT 1 AS total"
        )
        # Import, row by row inside one transaction: an insert loop.
        with conn.transaction():
            for i in range(1, 13):
                conn.execute("INSERT INTO authors (name) VALUES (%s)", [f"Author {i}"])
        # Import with executemany: pipelined, cheaper, still one statement per row.
        conn.cursor().executemany(
            "INSERT INTO books (author_id, title) VALUES (%s, %s)",
            [(i % 12 + 1, f"Book {i}") for i in range(60)],
        )
        # The list page: authors, then each author's books, one query per author (N+1).
        authors = conn.execute("SELECT id, name FROM authors ORDER BY name").fetchall()
        for author_id, _ in authors:
            conn.execute("SELECT id, title FROM books WHERE author_id = %s", [author_id]).fetchall()
        # The same page done right: one batched query and one JOIN. No advice for these.
        ids = [a[0] for a in authors]
        conn.execute("SELECT id, title FROM books WHERE author_id = ANY(%s)", [ids]).fetchall()
        conn.execute(
            "SELECT a.name, b.title FROM authors a JOIN books b ON b.author_id = a.id"
        ).fetchall()
        # A report that hangs, and a DELETE that forgot its WHERE: pgwarden stops both.
        for sql in ("SELECT pg_sleep(30), total FROM sales_report", "DELETE FROM books"):
            try:
                conn.execute(sql)
            except psycopg.Error as exc:
                stopped.append(f"{sql}\n    -> SQLSTATE {exc.sqlstate}: {exc}")
        conn.execute("SELECT count(*) FROM books").fetchone()  # and the connection still works
        _back_office(conn, dsn)
    return stopped


def _back_office(conn: psycopg.Connection[Any], dsn: str) -> None:
    """The shop's back office, written the ways the seed reports found by hand: loops of
    writes, writes without a transaction, races, wide and unbounded reads, polling, no
    pool, a transaction left open. Each is one of pgwarden's rules."""
    import psycopg

    # Restock: one UPDATE per book, in one transaction (write_loop; TypeORM's `IN ($n)`).
    with conn.transaction():
        for book_id in range(1, 13):
            conn.execute(
                'UPDATE "books" SET "title" = %s WHERE "id" IN (%s)',
                [f"Book {book_id}, 2nd edition", book_id],
            )
    # Catalogue sync: one upsert per author (insert_loop; the fix keeps ON CONFLICT).
    with conn.transaction():
        for i in range(1, 13):
            conn.execute(
                "INSERT INTO authors (id, name) VALUES (%s, %s)"
                " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
                [i, f"Author {i}"],
            )
    # Every request re-reads the shop's settings and checks that a table exists before
    # it writes: a cache candidate (repeated_read) and schema polling (catalog_polling).
    conn.execute(
        "CREATE TABLE settings (key text PRIMARY KEY, value text NOT NULL);"
        "INSERT INTO settings VALUES ('currency', 'EUR')"
    )
    for _ in range(12):
        conn.execute("SELECT value FROM settings WHERE key = %s", ["currency"]).fetchone()
        conn.execute(
            "SELECT EXISTS (SELECT FROM information_schema.tables"
            " WHERE table_schema = %s AND table_name = %s)",
            ["public", "settings"],
        ).fetchone()
    # Enrichment without a transaction: two tables, each write committed on its own
    # (unwrapped_writes).
    row = conn.execute("INSERT INTO authors (name) VALUES (%s) RETURNING id", ["Ann"]).fetchone()
    author = row[0] if row else 0
    conn.execute("INSERT INTO books (author_id, title) VALUES (%s, %s)", [author, "Ann's"])
    conn.execute("UPDATE authors SET name = %s WHERE id = %s", ["Ann B.", author])
    # Read, then write back what was read, without a row lock: a lost update
    # (check_then_write).
    with conn.transaction():
        found = conn.execute("SELECT name FROM authors WHERE id = %s", [author]).fetchone()
        name = found[0] if found else ""
        conn.execute("UPDATE authors SET name = %s WHERE id = %s", [f"{name} (ed.)", author])
    # Book covers as JSONB, loaded with SELECT * by a list that shows titles only
    # (select_star); every sale on one page, no LIMIT (unbounded_result).
    with conn.transaction():
        conn.execute(
            "ALTER TABLE books ADD COLUMN cover jsonb;"
            "UPDATE books SET cover = jsonb_build_object('png', repeat(md5(id::text), 100));"
            "CREATE TABLE sales (id serial PRIMARY KEY, book_id int NOT NULL, at timestamptz);"
            "INSERT INTO sales (book_id, at) SELECT g % 60 + 1, now()"
            " FROM generate_series(1, 2000) g"
        )
    conn.execute("SELECT * FROM books WHERE author_id > %s", [0]).fetchall()
    conn.execute("SELECT id, book_id, at FROM sales ORDER BY id").fetchall()
    # A transaction left open past long_transaction's threshold (1s in the demo's config).
    with conn.transaction():
        conn.execute("SELECT count(*) FROM books WHERE author_id = %s", [author]).fetchone()
        time.sleep(1.5)
    # A connection per request, no pool (connection_churn: 20 in well under 10 s).
    for i in range(20):
        with psycopg.connect(dsn, autocommit=True) as request:
            request.execute("SELECT title FROM books WHERE id = %s", [i + 1]).fetchone()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals() -> None:
    """Cleaning up has begun: a second Ctrl-C must not leave half of it undone."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def run_demo(keep: bool = False) -> int:
    """Runs the demo; with `keep`, leaves PostgreSQL and pgwarden running until SIGINT or
    SIGTERM. Either signal, at any point, stops and removes everything the demo started."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        print("pgwarden demo drives its app with psycopg: pip install 'pgwarden[demo]'")
        return 1
    # SIGTERM too ends the demo through its cleanup (by default it would kill it outright)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in _STOP_SIGNALS}
    try:
        return _demo(keep)
    except KeyboardInterrupt:
        print("\nInterrupted: PostgreSQL and pgwarden are stopped and their files removed.")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _demo(keep: bool) -> int:
    print("Starting a throwaway PostgreSQL from the local binaries ...")
    with (
        tempfile.TemporaryDirectory(prefix="pgwarden-demo-") as tmp,
        LocalCluster(ssl=False, password_roles=False, base_dir=_enterable(tmp)) as pg,
    ):
        port, admin = free_port(), free_port()
        config = Path(tmp) / "pgwarden.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{port}",
                    "upstream": {"address": f"127.0.0.1:{pg.port}", "sslmode": "disable"},
                    "admin": {"listen": f"127.0.0.1:{admin}"},
                    # the index advisor, on a connection of its own to the same PostgreSQL
                    "advisor": {
                        "dsn": f"host=127.0.0.1 port={pg.port} user=postgres",
                        "interval": "0.5s",
                        "min_calls": 3,
                        "min_total_time": 0,
                    },
                    # so that the demo's open transaction is long enough to be reported
                    "detectors": {"long_transaction": {"threshold": "1s"}},
                    **_RULES,
                }
            )
        )
        log_path = Path(tmp) / "pgwarden.log"
        with log_path.open("wb") as log:
            # In a session of its own, so a Ctrl-C meant for the demo reaches only the demo,
            # which then stops pgwarden as an orchestrator would (SIGTERM, drain)
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for_port(port, proc)
            print(f"pgwarden listens on 127.0.0.1:{port} in front of it\n")
            print("Running a small bookshop app through pgwarden ...\n")
            stopped = _app(f"host=127.0.0.1 port={port} user=postgres dbname=postgres")
            time.sleep(0.3)
            base = f"http://127.0.0.1:{admin}"
            with urllib.request.urlopen(f"{base}/advice", timeout=5) as response:
                advice = json.load(response)["advice"]
            print("What pgwarden saw (the same as `pgwarden advice`):\n")
            print(format_advice(advice))
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
                metrics = response.read().decode()
            print("What pgwarden stopped (a 1s limit on reports, a block on DELETE without WHERE):")
            for line in stopped:
                print(f"  {line}")
            print()
            print("A few of its metrics:")
            for line in metrics.splitlines():
                if line.startswith(
                    (
                        "pgwarden_queries_total",
                        "pgwarden_advice_total",
                        "pgwarden_statement_timeouts_total",
                        "pgwarden_blocks_total",
                    )
                ):
                    print(f"  {line}")
            lines = [line for line in log_path.read_text().splitlines() if '"advice"' in line]
            if lines:
                print("\nAnd one advice as the JSON line developers find in pgwarden's log:")
                print(f"  {lines[0]}")
            print(f"\nThe optimization report, as `pgwarden report` writes it: {_report(base)}")
            if not keep:
                print(
                    "\nThe demo ends here, and PostgreSQL and pgwarden with it. To keep them "
                    "running and look\naround (psql, /metrics, /advice): pgwarden demo --keep "
                    "(in a checkout: .venv/bin/pgwarden)"
                )
                return 0 if advice else 1
            try:
                _keep_running(port, base, proc.pid, tmp)
                proc.wait()
            except KeyboardInterrupt:
                print(f"\nStopping pgwarden and PostgreSQL, removing {tmp} ...")
                return 0
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            print(f"\npgwarden exited on its own (code {proc.returncode}); its log ends:\n{tail}")
            return 1
        finally:
            _ignore_stop_signals()
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _enterable(path: str) -> Path:
    """`path`, which the PostgreSQL OS user may enter (when root, it runs the cluster)."""
    Path(path).chmod(0o711)
    return Path(path)


def _keep_running(port: int, admin: str, pid: int, tmp: str) -> None:
    """What stays up with --keep, and how to reach it."""
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    print(f"""
Everything keeps running until Ctrl-C (or SIGTERM to pid {os.getpid()}):
  the app's database, through pgwarden:  psql "{dsn}"
  the page:  {admin}/   (the advice, for people; or: pgwarden report --admin {admin})
  metrics:   {admin}/metrics
  advice:    {admin}/advice   or: pgwarden advice --admin {admin}
  pgwarden:  pid {pid}
  files:     {tmp} (removed when the demo stops)""")
    sys.stdout.flush()  # for a reader on a pipe, who would otherwise see nothing until the end


def _report(base: str) -> Path:
    """The Markdown report of the pgwarden at `base`, written where it outlives the demo."""
    from proxy.tools.report_document import markdown_report
    from proxy.web.view import build_view

    answers = {}
    for name in ("advice", "fingerprints"):
        with urllib.request.urlopen(f"{base}/{name}", timeout=5) as response:
            answers[name] = json.load(response)[name]
    path = Path(tempfile.gettempdir()) / "pgwarden-demo-report.md"
    path.write_text(markdown_report(build_view(answers["advice"], answers["fingerprints"])))
    return path

"""`pgwarden demo`: a throwaway PostgreSQL, pgwarden in front of it, and a leaky little app.

Everything runs for real: the cluster from the local PostgreSQL binaries, pgwarden as its
own process, and an app written the way real apps go wrong (a lazy-loading list page,
row-by-row imports). What the demo prints is what pgwarden itself reports. With `keep`,
all of it stays up until SIGINT or SIGTERM, so the addresses it prints can be opened.
"""

from __future__ import annotations

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

import yaml

from proxy.tools.pgcluster import LocalCluster, free_port
from proxy.tools.report import format_advice

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
    return stopped


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
  metrics:   {admin}/metrics
  advice:    {admin}/advice   or: pgwarden advice --admin {admin}
  pgwarden:  pid {pid}
  files:     {tmp} (removed when the demo stops)""")
    sys.stdout.flush()  # for a reader on a pipe, who would otherwise see nothing until the end

"""`pgwarden demo` (what `make demo` runs) works end to end and shows what it promises."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.proxy import REPO_ROOT
from tests.support.util import wait_until


def test_demo_catches_the_loops_and_stops_the_bad_statements() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "n_plus_one" in out and "values from: id of SELECT id, name FROM authors" in out
    assert "author_id = ANY($1)" in out
    assert "insert_loop" in out and "unnest(" in out
    assert (
        'SQLSTATE 57014: canceling statement due to statement timeout (pgwarden rule "reports"'
        in out
    )
    assert 'SQLSTATE 42501: pgwarden: statement blocked by rule "no-unqualified-delete"' in out
    assert '"event": "advice"' in out
    # the index advisor proves the orders page's index
    assert "CREATE INDEX CONCURRENTLY orders_customer_id_status_idx ON orders" in out
    # each pattern of the app is advised once, by its rule (insert_loop three times: a
    # loop, a pipelined batch, an upsert loop); the healthy = ANY and JOIN queries are not
    rows = [
        line for line in out.splitlines() if re.match(r"^\s*\d+\s+(info|warning|critical)\s", line)
    ]
    assert sorted(row.split()[2] for row in rows) == sorted(
        [
            "n_plus_one",
            "insert_loop",
            "insert_loop",
            "insert_loop",
            "missing_index",
            "write_loop",
            "repeated_read",
            "catalog_polling",
            "unwrapped_writes",
            "check_then_write",
            "select_star",
            "unbounded_result",
            "long_transaction",
            "connection_churn",
        ]
    ), rows
    assert not any("ANY(" in row or " JOIN " in row for row in rows)
    assert "UPDATE books SET title = v.title FROM unnest(" in out  # write_loop's batch
    assert "SELECT name FROM authors WHERE id = $1 FOR UPDATE" in out  # check_then_write's
    assert "ON CONFLICT (id) DO UPDATE SET name = excluded.name" in out  # the upsert kept
    # no address that is dead by the time it is read; the way to keep them instead
    assert "http://" not in out
    assert "pgwarden demo --keep" in out


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line mentions `path`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent(entry) == pid
    ]


def _parent(entry: Path) -> int | None:
    try:
        return int((entry / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_demo_keep_serves_until_sigint_then_removes_everything() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--keep"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        out = ""
        for line in demo.stdout:  # up to the last line of what it keeps running
            out += line
            if line.lstrip().startswith("files:"):
                break
        assert "Ctrl-C" in out, out
        metrics = re.search(r"metrics:\s+(http://\S+/metrics)", out)
        pgwarden = re.search(r"pgwarden:\s+pid (\d+)", out)
        files = re.search(r"files:\s+(\S+) \(removed", out)
        assert metrics and pgwarden and files, out
        tmp = Path(files[1])

        # what it printed can be opened while it runs
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(metrics[1], timeout=5) as response:
            assert response.status == 200
            assert "pgwarden_queries_total" in response.read().decode()
        (pid_file,) = tmp.glob("*/data/postmaster.pid")
        postmaster = int(pid_file.read_text().split()[0])
        started = [int(pgwarden[1]), postmaster, *children(postmaster)]
        assert len(started) > 3 and all(alive(pid) for pid in started)
        assert int(pgwarden[1]) in processes_naming(tmp)

        demo.send_signal(signal.SIGINT)
        rest, err = demo.communicate(timeout=60)
        assert demo.returncode == 0, out + rest + err
        assert "Traceback" not in err, err
        assert not tmp.exists()
        wait_until(lambda: not any(alive(pid) for pid in started), 10, message="no demo process")
        assert processes_naming(tmp) == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

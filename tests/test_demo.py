"""`pgwarden demo` (what `make demo` runs) works end to end and shows what it promises."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support.proxy import REPO_ROOT


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
    # exactly the three loops are advised; the healthy = ANY and JOIN queries are not
    rows = [
        line for line in out.splitlines() if re.match(r"^\s*\d+\s+(info|warning|critical)\s", line)
    ]
    assert len(rows) == 3, rows
    assert not any("ANY(" in row or " JOIN " in row for row in rows)

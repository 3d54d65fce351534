"""The printing commands end quietly when their reader does: `pgwarden advice --json | head`
is how people look at a long answer, and a traceback there would read as a failure.
pgwarden then exits 0: the reader took what it wanted."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import psycopg
import pytest

from tests.conftest import StartProxy
from tests.support.proxy import REPO_ROOT, ProxyProcess
from tests.support.util import wait_until

PIPE_SIZE = 4096  # the smallest a Linux pipe gets
TABLES = 60  # one insert_loop advice each


@pytest.fixture
def proxy_with_advice(proxy_factory: StartProxy) -> ProxyProcess:
    """pgwarden with an insert_loop advice for each of TABLES tables."""
    proxy = proxy_factory({"detectors": {"insert_loop": {"min_repeats": 2}}})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(TABLES):
            # names told apart by letters: fingerprints take piped_1 and piped_2 for one
            table = "piped_" + "".join(chr(ord("a") + int(digit)) for digit in str(i))
            conn.execute(f"CREATE TEMP TABLE {table} (x int)")
            with conn.transaction():
                for value in range(3):
                    conn.execute(f"INSERT INTO {table} (x) VALUES (%s)", [value])

    def advised() -> bool:
        return len(json.loads(proxy.http_get("/advice")[1])["advice"]) >= TABLES

    wait_until(advised, message=f"{TABLES} pieces of advice")
    return proxy


@pytest.mark.parametrize("flags", [["--json"], []], ids=["json", "table"])
def test_advice_into_a_reader_that_stops_after_one_line_ends_quietly(
    proxy_with_advice: ProxyProcess, flags: list[str]
) -> None:
    command = [
        sys.executable,
        "-m",
        "proxy",
        "advice",
        "--admin",
        proxy_with_advice.admin_url,
        *flags,
    ]
    whole = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=30, check=True)
    # more than the pipe holds twice over, so pgwarden is still writing when `head` leaves
    assert len(whole.stdout) > 4 * PIPE_SIZE

    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    advice = subprocess.Popen(command, cwd=REPO_ROOT, stdout=write, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-n", "1"], stdin=read, stdout=subprocess.PIPE)
    os.close(read)
    os.close(write)
    first, _ = head.communicate(timeout=30)
    _, stderr = advice.communicate(timeout=30)

    assert first == whole.stdout.splitlines(keepends=True)[0]
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()
    assert stderr == b""
    assert advice.returncode == 0

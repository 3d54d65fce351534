"""The relay's cost per transaction without the network: pgbench's messages through a Session.

    .venv/bin/python bench/relay.py [--mode prepared|simple] [--analysis on|off]
    .venv/bin/python bench/relay.py --instructions      # counted by valgrind's callgrind

A real Session is driven through startup to READY against transports that only count
what is written, then fed pgbench -S's messages (one client chunk, one server chunk per
transaction, as pgbench and PostgreSQL send them). Timing this on a busy 2-core machine
varies by tens of percent; `--instructions` runs the loop twice under callgrind, with two
transaction counts, and reports the difference per transaction: the same figure whatever
else the machine does, for comparing two versions of the relay (`--checkout DIR` runs
another checkout's pgwarden, interpreted, as `PGWARDEN_PURE=1` runs this one).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


class _Transport:
    """Counts what is written; enough of asyncio.Transport for a session."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


class _Host:
    """A listener whose sessions analyse (all detectors on) or only relay."""

    def __init__(self, analysis: bool) -> None:
        from proxy.advice import AdviceSink
        from proxy.analysis.analyzer import Analyzer
        from proxy.config import settings_from_dict
        from proxy.inspector import Analysis
        from proxy.metrics import Metrics

        self.settings = settings_from_dict({"limits": {"startup_timeout": 0}})
        self.metrics = Metrics()
        self.server_tls = None
        self.draining = False
        self.timeouts = None
        self.rules = None
        self.analysis = None
        if analysis:
            sink = AdviceSink(600, on_report=self.metrics.record_advice)
            detectors = self.settings.detectors.enabled()
            self.analysis = Analysis(Analyzer(10_000), sink, self.metrics, detectors)

    def session_ready(self, session: object) -> None: ...

    def session_closed(self, session: object) -> None: ...

    def forward_cancel(self, request: object, done: object = None) -> None: ...

    def cancel_backend(self, session: object, done: object) -> None: ...


KEYS = 60_000  # distinct keys, made whatever the count: --instructions differences two runs


def _messages(mode: str) -> tuple[bytes, bytes, list[bytes], bytes]:
    """(first client chunk, its reply, transactions' client chunks, their reply). Each
    transaction looks up another key, as pgbench's random ones do (a key read again and
    again would be a cache candidate, which repeated_read reports), all of one width; past
    KEYS transactions they come round again."""
    from proxy.protocol import messages as m

    row = m.DataRow((b"0",)).encode() + m.CommandComplete("SELECT 1").encode()
    ready = m.ReadyForQuery(b"I").encode()
    keys = [str(1_000_000 + i) for i in range(KEYS)]
    if mode == "simple":
        queries = [m.Query(SELECT.replace("$1", key)).encode() for key in keys]
        description = m.RowDescription((m.Column("abalance", 0, 0, 23, 4, -1, 0),)).encode()
        return queries[0], description + row + ready, queries, description + row + ready
    parse = m.Parse("P0_1", SELECT, (23,)).encode() + m.Sync().encode()
    tail = m.Execute("", 0).encode() + m.Sync().encode()
    executes = [m.Bind("", "P0_1", (0,), (key.encode(),), (0,)).encode() + tail for key in keys]
    reply = m.BindComplete().encode() + row + ready
    return parse, m.ParseComplete().encode() + ready, executes, reply


async def _run(transactions: int, mode: str, analysis: bool) -> float:
    """Seconds per transaction, after a warm-up."""
    from proxy.protocol import messages as m
    from proxy.session import Phase, Session

    session = Session(_Host(analysis))  # type: ignore[arg-type]
    session.connection_made(_Transport())  # type: ignore[arg-type]
    session.server = _Transport()  # type: ignore[assignment]
    if hasattr(session, "_enter"):
        session._enter(Phase.AUTH)
    else:  # a checkout from before the session package
        session.phase = Phase.AUTH
    auth = m.AuthenticationRequest(m.AUTH_OK).encode() + m.BackendKeyData(1, b"\0\0\0\1").encode()
    session.server_data(auth + m.ReadyForQuery(b"I").encode())
    assert session.phase is Phase.READY, session.phase
    first, first_reply, requests, reply = _messages(mode)
    session.data_received(first)
    session.server_data(first_reply)
    for request in requests[-2000:]:  # warm caches, the analyzer's included
        session.data_received(request)
        session.server_data(reply)
    turns = itertools.islice(itertools.cycle(requests), transactions)
    began = time.perf_counter()
    for request in turns:
        session.data_received(request)
        session.server_data(reply)
    return (time.perf_counter() - began) / transactions


def _instructions(args: argparse.Namespace) -> int:
    """Instructions per transaction: callgrind totals of two runs, differenced."""
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    env = {**os.environ, "PGWARDEN_PURE": "1"} if args.checkout or args.pure else dict(os.environ)
    tree = Path(args.checkout).resolve() if args.checkout else ROOT
    env["PYTHONPATH"] = str(tree)
    totals = []
    for count in (1000, 5000):
        command = [sys.executable, __file__, "--transactions", str(count), "--mode", args.mode]
        command += ["--analysis", args.analysis]
        valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        done = subprocess.run(
            valgrind + command, env=env, cwd=tree, capture_output=True, text=True, check=True
        )
        line = next(x for x in done.stderr.splitlines() if "Collected" in x)
        totals.append(int(line.split()[-1].replace(",", "")))
    return (totals[1] - totals[0]) // 4000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("prepared", "simple"), default="prepared")
    parser.add_argument("--analysis", choices=("on", "off"), default="on")
    parser.add_argument("-t", "--transactions", type=int, default=50_000)
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--pure", action="store_true", help="with --instructions: interpreted")
    parser.add_argument("--checkout", help="with --instructions: another checkout's pgwarden")
    args = parser.parse_args(argv)
    if args.instructions:
        per = _instructions(args)
        print(f"{args.mode}, analysis {args.analysis}: {per} instructions per transaction")
        return
    from proxy import native
    from proxy.logs import configure_logging

    configure_logging("json", "warning")
    seconds = asyncio.run(_run(args.transactions, args.mode, args.analysis == "on"))
    code = native.MODE.split(" ")[0]
    print(f"{args.mode}, analysis {args.analysis}: {seconds * 1e6:.2f} µs per transaction ({code})")


if __name__ == "__main__":
    main()

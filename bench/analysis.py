"""Analysis CPU per transaction, without sockets: pgbench -S traffic fed to Inspectors.

The same messages pgbench sends and PostgreSQL answers, for 16 sessions in turn, go through
the tracker, metrics and detectors as the backlog would hand them over. What one
transaction costs here is the floor of what analysis adds to the proxy under load (cache
misses there make it dearer). `PGWARDEN_PURE=1` measures the interpreted modules.

    .venv/bin/python bench/analysis.py [--mode prepared|simple] [--transactions N]
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import native
from proxy.advice import AdviceSink
from proxy.analysis.analyzer import Analyzer
from proxy.analysis.matching import SessionIdentity
from proxy.config import Settings
from proxy.inspector import Analysis, Inspector
from proxy.metrics import Metrics
from proxy.protocol import messages as m
from proxy.tracking.round_trips import RoundTrips

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
SESSIONS = 16
ROW_DESCRIPTION = m.frame(b"T", b"\0\1abalance\0" + bytes(18))
REPLY = m.frame(b"D", b"\0\1\0\0\0\x041234") + m.frame(b"C", b"SELECT 1\0") + m.frame(b"Z", b"I")


def client_chunks(mode: str, count: int) -> list[bytes]:
    """What pgbench sends per transaction, one random account each."""
    chunks = []
    for _ in range(count):
        aid = str(random.randint(1, 1_000_000)).encode()
        if mode == "prepared":
            bind = b"\0P0_1\0\0\0\0\1" + struct.pack("!i", len(aid)) + aid + b"\0\0"
            chunks.append(m.frame(b"B", bind) + m.frame(b"E", bytes(5)) + m.frame(b"S"))
        else:
            chunks.append(m.frame(b"Q", SQL.replace("$1", aid.decode()).encode() + b"\0"))
    return chunks


def sessions(mode: str) -> list[Inspector]:
    """Inspectors set up as the proxy sets them up, with pgbench's statement prepared."""
    settings = Settings()
    metrics = Metrics()
    sink = AdviceSink(600, on_report=metrics.record_advice)
    analysis = Analysis(Analyzer(10_000), sink, metrics, settings.detectors.enabled())
    inspectors = []
    for _ in range(SESSIONS):
        inspector = Inspector(analysis, SessionIdentity("bench", "postgres", "pgbench"))
        inspector.keep_books(RoundTrips(metrics.record_transaction))
        if mode == "prepared":
            parse = m.frame(b"P", b"P0_1\0" + SQL.encode() + b"\0\0\0")
            describe = m.frame(b"D", b"SP0_1\0")
            inspector.client(parse + describe + m.frame(b"S"), 0.0)
            described = m.frame(b"t", b"\0\1\0\0\0\x17") + ROW_DESCRIPTION
            inspector.server(m.frame(b"1") + described + m.frame(b"Z", b"I"), 0.0)
        inspectors.append(inspector)
    return inspectors


def measure(mode: str, count: int) -> float:
    """Microseconds of analysis per transaction."""
    inspectors = sessions(mode)
    chunks = client_chunks(mode, count)
    reply = (m.frame(b"2") if mode == "prepared" else ROW_DESCRIPTION) + REPLY
    now = 0.0
    start = time.perf_counter()
    for index, chunk in enumerate(chunks):
        inspector = inspectors[index % SESSIONS]
        now += 0.0001
        inspector.client(chunk, now)
        inspector.server(reply, now + 0.00005)
    elapsed = time.perf_counter() - start
    # Every transaction must have been attributed, or the figure measures a broken path.
    counted = sum(f["calls"] for f in inspectors[0].metrics.fingerprints.snapshot())
    if counted != count:
        raise SystemExit(f"analysis counted {counted} statements of {count}")
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=("prepared", "simple"), default="prepared")
    parser.add_argument("--transactions", type=int, default=100_000)
    args = parser.parse_args()
    cost = measure(args.mode, args.transactions)
    print(f"{args.mode}: {cost:.2f} µs of analysis per transaction ({native.MODE})")


if __name__ == "__main__":
    main()

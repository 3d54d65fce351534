"""Compiles the analysis modules with mypyc, when it can; pgwarden runs the same without.

Analysis runs on every statement in the proxy's one thread, so its per-statement cost is
taken from the application's throughput. mypyc compiles these type-annotated modules
unchanged into C extensions that do the same work in about half the time (measured on
pgbench traffic, see README "Speed"). The relay's hot path is compiled too: the framing of
each chunk, the round trips and the READY path (`session/relay.py`, 26% fewer instructions
per relayed transaction by `bench/relay.py --instructions`); the asyncio Protocol classes
(session.py) stay interpreted and thin, and catch what compiled code raises, so a bug there
ends one session, never the process.

Set PGWARDEN_COMPILE=0 to skip compiling. A machine without a C compiler gets a warning
and the pure-Python package (the extensions are optional).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent

# The analysis path, one compilation group: calls between these modules stay native.
# Every module under proxy/detectors/ is in it, so a new rule is compiled unlisted.
COMPILED = sorted(
    [
        "proxy/advice.py",
        "proxy/analysis/analyzer.py",
        "proxy/backlog.py",
        "proxy/fingerprints.py",
        "proxy/inspector.py",
        "proxy/metrics.py",
        "proxy/protocol/codes.py",
        "proxy/protocol/framing.py",
        "proxy/session/relay.py",
        "proxy/tracking/round_trips.py",
        "proxy/tracking/events.py",
        "proxy/tracking/statements.py",
    ]
    + [path.relative_to(ROOT).as_posix() for path in (ROOT / "proxy/detectors").glob("*.py")]
)


def record_sources() -> None:
    """proxy/native.json: the sources this build compiles, by digest. proxy/native.py loads
    the compiled modules only while every source still matches (file times cannot tell:
    a wheel's install gives them all the same)."""
    digests = {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in COMPILED}
    Path("proxy/native.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def extensions() -> list[Extension]:
    if os.environ.get("PGWARDEN_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("pgwarden: mypyc not found, installing pure Python", file=sys.stderr)
        return []
    record_sources()
    modules = mypycify(COMPILED, opt_level="3", debug_level="0", group_name="pgwarden_native")
    for module in modules:
        module.optional = True  # no compiler: the pure-Python modules are used instead
    return modules


if __name__ == "__main__":  # as pip and setuptools run it; a test imports COMPILED alone
    setup(ext_modules=extensions())

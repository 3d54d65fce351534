"""repeated_read: the same SELECT with the same values, read again and again by one application.

Proof, not suspicion: an application (its sessions together) runs the identical SELECT
(one fingerprint, the same Bind values or literals) `min_repeats` times within `window`,
gets the same answer each time (row count, bytes and first row), and writes none of the
tables it reads in between (a write seen from the application starts the count again).
That read could have been served from memory: a cache in the application.

Left silent, as it could be wrong: reads without a table (`SELECT 1`, `SELECT now()`:
health checks), catalog reads (catalog_polling's), locking reads (FOR UPDATE...), failed
ones, and empty results (a worker polling for work it has not got yet: the rows it waits
for come from someone else). Values are compared as a digest in memory, never kept as text.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

from proxy.advice import Advice
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.durations import Duration
from proxy.tracking.events import StatementEvent

__all__ = [
    "RepeatedRead",
    "RepeatedReadOptions",
    "Repeats",
    "connection_number",
    "span_text",
    "values_digest",
]

_MAX_KEYS: Final = 4096  # (statement, values) pairs followed per application
_MAX_TABLES: Final = 4096  # tables whose latest write an application's state remembers
_MAX_CONNECTIONS: Final = 1024  # distinct connections counted in one run
_WARN_REPEATS: Final = 100
# what changes a table's rows (COPY both ways: a COPY TO only makes the rule quieter)
_WRITES: Final = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY"})

_NEVER: Final = float("-inf")

_connections = itertools.count(1)


def connection_number() -> int:
    """A number for a new session, distinct from every other session's."""
    return next(_connections)


def values_digest(event: StatementEvent) -> int | None:
    """A digest of the statement's values (its Bind's format codes and values, and the
    literals lifted from its text), to compare two runs in memory; None when they cannot
    be told. The Bind is hashed raw, from past its portal and statement names (which differ
    between connections), rather than decoded: this runs for most SELECTs."""
    parsed = event.parsed
    if parsed.info.param_count == 0:
        return 0
    literals = parsed.literals
    if literals is None:
        return None
    bind = event.bind
    if bind is None:
        return hash(literals)
    names_end = bind.find(b"\0", bind.find(b"\0") + 1)
    if names_end < 0:
        return None  # not a Bind it can read
    return hash((bind[names_end + 1 :], literals))


def span_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1.0 else f"{seconds:.1f} s"


class Repeats:
    """Occurrences of one thing: the last `min_repeats` times (do they fit in the window?)
    and the run since the last report or reset (what the advice tells)."""

    __slots__ = ("connection", "connections", "count", "first", "reported", "spent", "times")

    def __init__(self, now: float, spent: float, connection: int) -> None:
        """Its first occurrence."""
        self.times = [now]
        self.count = 1
        self.first = now
        self.spent = spent  # time the run's occurrences took
        self.connection = connection  # the run's connection, until a second one shows
        self.connections: set[int] | None = None
        self.reported = _NEVER

    def add(
        self, now: float, spent: float, connection: int, min_repeats: int, window: float
    ) -> bool:
        """Counts one occurrence; True when the last `min_repeats` fit in `window` and the
        last report is at least a window old."""
        times = self.times
        if times and now - times[-1] > window:
            self.reset()  # the earlier ones are no longer within a window of this one
        if self.count == 0:
            self.first = now
            self.connection = connection
        elif connection != self.connection:
            seen = self.connections
            if seen is None:
                seen = self.connections = {self.connection}
            if len(seen) < _MAX_CONNECTIONS:
                seen.add(connection)
        self.count += 1
        self.spent += spent
        times.append(now)
        if len(times) > min_repeats:
            del times[: len(times) - min_repeats]
        return (
            len(times) == min_repeats and now - times[0] <= window and now - self.reported >= window
        )

    def connection_count(self) -> int:
        return 1 if self.connections is None else len(self.connections)

    def report(self, now: float) -> None:
        """Reported: the next report counts from here, a window later at the earliest."""
        self.reported = now
        self.count = 0
        self.spent = 0.0
        self.connections = None

    def reset(self) -> None:
        self.times.clear()
        self.count = 0
        self.spent = 0.0
        self.connections = None


class _Read(Repeats):
    __slots__ = ("result", "seen")

    def __init__(self, now: float, spent: float, connection: int, result: int, seen: int) -> None:
        super().__init__(now, spent, connection)
        self.result = result  # digest of its answer
        self.seen = seen  # the application's write number at its last run


def _bare(table: str) -> str:
    """A table without its schema: `public.t` read and `t` written are taken as one, which
    at worst resets a count (silence), never joins what differs."""
    return table.rpartition(".")[2]


class _Reads:
    """One application's reads and writes, shared by its sessions."""

    def __init__(self) -> None:
        self.keys: OrderedDict[tuple[str, int], _Read] = OrderedDict()
        self.written: OrderedDict[str, int] = OrderedDict()  # table -> its latest write
        self.writes = 0  # writes seen, numbering them
        self.forgotten = 0  # the latest write of any table dropped from `written`

    def wrote(self, tables: Iterable[str]) -> None:
        self.writes += 1
        written = self.written
        for table in tables:
            name = _bare(table)
            written[name] = self.writes
            written.move_to_end(name)
        while len(written) > _MAX_TABLES:
            self.forgotten = max(self.forgotten, written.popitem(last=False)[1])

    def written_since(self, tables: tuple[str, ...], seen: int) -> bool:
        """Whether any of `tables` may have been written after write number `seen` (a table
        forgotten counts as written when the last forgotten write was)."""
        if self.writes <= seen:
            return False  # no write at all since: the common case, kept cheap
        written = self.written
        forgotten = self.forgotten
        return any(written.get(_bare(table), forgotten) > seen for table in tables)

    def first_read(self, key: tuple[str, int], read: _Read, window: float) -> None:
        keys = self.keys
        if keys:  # the least recently read goes once its last read is over a window old
            oldest = next(iter(keys))
            if read.first - keys[oldest].times[-1] > window:
                del keys[oldest]
        keys[key] = read
        if len(keys) > _MAX_KEYS:
            keys.popitem(last=False)


@dataclass(frozen=True)
class RepeatedReadOptions(DetectorOptions):
    min_repeats: int = field(default=10, metadata={"minimum": 2})
    window: Duration = field(default=Duration(60.0), metadata={"minimum": 0.001})


class RepeatedRead(Detector):
    rule: ClassVar[str] = "repeated_read"
    options_type: ClassVar[type[DetectorOptions]] = RepeatedReadOptions

    def __init__(
        self,
        options: RepeatedReadOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.min_repeats = options.min_repeats
        self.window = float(options.window)
        self._connection = connection_number()
        self._reads = self.shared(_Reads)

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.parsed.info
        command = info.command
        if command != "SELECT" or info.modifies:
            if command in _WRITES or info.modifies:  # a SELECT too, when its WITH writes
                tables = info.tables
                target = info.target
                self._reads.wrote(tables if target is None else (*tables, target))
            return NO_ADVICE
        tables = info.tables
        if (
            not tables
            or info.catalog_only
            or info.for_update
            or event.sqlstate is not None
            or event.portal_suspended  # a cursor's chunk: its last one stands for the read
        ):
            return NO_ADVICE
        returned = event.bytes_returned
        if not returned:  # no row
            return NO_ADVICE
        digest = values_digest(event)
        if digest is None:
            return NO_ADVICE
        sampled = event.sampled  # its answer, told by its tag (row count), size and first row
        result = hash((event.tag, returned, sampled[0] if sampled else None))
        reads = self._reads
        key = (info.fingerprint, digest)
        read = reads.keys.get(key)
        now = event.started
        spent = event.duration
        if read is None:  # most reads of most applications: kept as cheap as can be
            read = _Read(now, spent, self._connection, result, reads.writes)
            reads.first_read(key, read, self.window)
            return NO_ADVICE
        reads.keys.move_to_end(key)
        if read.result != result or reads.written_since(tables, read.seen):
            read.reset()  # the data changed in between: a cache would have been stale
            read.result = result
        read.seen = reads.writes
        if not read.add(now, spent, self._connection, self.min_repeats, self.window):
            return NO_ADVICE
        advice = self._advice(event, read, now)
        read.report(now)
        return [advice]

    def _advice(self, event: StatementEvent, read: _Read, now: float) -> Advice:
        n = read.count
        connections = read.connection_count()
        span = now - read.first
        tables = ", ".join(event.info.tables)
        over = "one connection" if connections == 1 else f"{connections} connections"
        return self.advice(
            event,
            severity="warning" if n >= _WARN_REPEATS else "info",
            count=n,
            suggestion=(
                f"The same read of {tables} with the same values ran {n} times in "
                f"{span_text(span)} over {over} of this application, with the same result "
                "and no write to its tables in between. Cache the result in the application "
                "(dropped when it writes to those tables, or after a time-to-live), or pass it "
                "along instead of reading it again. If it waits for a change made by another "
                "application, LISTEN/NOTIFY spares the polling."
            ),
            suggested_sql=None,
            time_spent_s=read.spent,
            evidence={
                "repeats": n,
                "window_s": self.window,
                "span_s": round(span, 3),
                "connections": connections,
                "time_ms": round(read.spent * 1000, 3),
            },
        )

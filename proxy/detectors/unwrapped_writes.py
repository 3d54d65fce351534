"""unwrapped_writes: writes to several tables in a row, each committed on its own.

A sequence of INSERT/UPDATE/DELETE on one connection, each in autocommit (no transaction
block), the next starting within `window` of the previous one, that writes at least two
different tables in at least two round trips: if one of them fails, or the process dies
between them, the others stay committed and the data is left half-written. Statements
sent in one round trip (a multi-statement Query, or a pipeline before one Sync) run in
one implicit transaction, so they count as one atomic step. Several writes to one table
are a loop (insert_loop's business), not this rule's.

The run is judged when it is over (a gap longer than `window`, a statement inside a
transaction block, the clock, the end of the session), so the advice lists the whole
sequence in order (its first `_MAX_LISTED` steps) and suggests it as one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

__all__ = ["UnwrappedWrites", "UnwrappedWritesOptions"]

_MAX_LISTED: Final = 20  # steps listed in the advice (consecutive repeats are one step)
_MAX_TABLES: Final = 20  # tables named
_MAX_WRITES: Final = 1000  # a run this long is judged at once, and a new one begins


_VERBS: Final = {"INSERT": "INSERT INTO", "UPDATE": "UPDATE", "DELETE": "DELETE FROM"}


class _Step:
    """One listed statement, with how many times it ran in a row."""

    __slots__ = ("label", "statement", "times")

    def __init__(self, event: StatementEvent, table: str) -> None:
        info = event.info
        self.statement = info.normalized
        self.label = f"{_VERBS.get(info.command, info.command)} {table}"
        self.times = 1


class _Run:
    """Autocommit writes one after another, each within `window` of the one before."""

    __slots__ = (
        "first",
        "last",
        "listed",
        "more",
        "round_trip",
        "round_trips",
        "tables",
        "template",
        "time_spent",
        "writes",
    )

    def __init__(self, event: StatementEvent) -> None:
        self.template = event  # its first write: the advice's statement
        self.first = event.started
        self.last = event.finished
        self.writes = 0
        self.round_trip = event.round_trip  # of its latest write
        self.round_trips = 1
        self.tables: dict[str, None] = {}  # in the order first written
        self.listed: list[_Step] = []
        self.more = 0  # writes past the listed steps
        self.time_spent = 0.0

    def add(self, event: StatementEvent, table: str) -> None:
        self.writes += 1
        self.last = event.finished
        self.time_spent += event.duration
        if event.round_trip != self.round_trip:
            self.round_trip = event.round_trip
            self.round_trips += 1
        if table not in self.tables and len(self.tables) < _MAX_TABLES:
            self.tables[table] = None
        listed = self.listed
        if listed and listed[-1].statement == event.info.normalized:
            listed[-1].times += 1
        elif len(listed) < _MAX_LISTED:
            listed.append(_Step(event, table))
        else:
            self.more += 1


@dataclass(frozen=True)
class UnwrappedWritesOptions(DetectorOptions):
    window: Duration = Duration(1.0)


class UnwrappedWrites(Detector):
    rule: ClassVar[str] = "unwrapped_writes"
    options_type: ClassVar[type[DetectorOptions]] = UnwrappedWritesOptions

    def __init__(
        self,
        options: UnwrappedWritesOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.window = float(options.window)
        self._run: _Run | None = None

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        run = self._run
        table = event.info.target
        if table is None or event.transaction is not None or event.sqlstate is not None:
            # not an autocommit write; one in a transaction block ends the run
            if run is not None and (
                event.transaction is not None or event.started - run.last > self.window
            ):
                return self._end()
            return NO_ADVICE
        found: Sequence[Advice] = NO_ADVICE
        if run is not None and (
            event.started - run.last > self.window or run.writes >= _MAX_WRITES
        ):
            found = self._end()
            run = None
        if run is None:
            run = self._run = _Run(event)
        run.add(event, table)
        return found

    def tick(self, now: float) -> Sequence[Advice]:
        run = self._run
        if run is None or now - run.last <= self.window:
            return NO_ADVICE
        return self._end()

    def session_end(self) -> Sequence[Advice]:
        return self._end() if self._run is not None else NO_ADVICE

    def _end(self) -> Sequence[Advice]:
        run, self._run = self._run, None
        if run is None or len(run.tables) < 2 or run.round_trips < 2:
            return NO_ADVICE  # one table, or one atomic round trip: nothing half-written
        steps = [f"{s.label}{f' ({s.times} times)' if s.times > 1 else ''}" for s in run.listed]
        if run.more:
            steps.append(f"and {run.more} more")
        tables = tuple(run.tables)
        span = run.last - run.first
        suggestion = (
            f"{run.writes} writes to {len(tables)} tables ({', '.join(tables)}) in "
            f"{run.round_trips} round trips within {span:.2f}s, each committed on its own: "
            "if one fails or the process dies between them, the others stay and the data is "
            f"left half-written. Run them in one transaction (suggested_sql), in this order: "
            f"{'; '.join(steps)}."
        )
        body = " ".join(f"{s.statement};" for s in run.listed)
        advice = self.advice(
            run.template,
            severity="warning",
            count=run.writes,
            suggestion=suggestion,
            suggested_sql=f"BEGIN; {body} COMMIT;",
            time_spent_s=run.time_spent,
            evidence={
                "writes": run.writes,
                "tables": len(tables),
                "round_trips": run.round_trips,
                "window_s": self.window,
                "span_ms": round(span * 1000, 3),
            },
        )
        advice.tables = tables
        return (advice,)

"""insert_loop: the same one-row INSERT run again and again in one transaction or burst.

An upsert (`INSERT ... ON CONFLICT ...`) loop is one too: its batched form keeps the ON
CONFLICT clause, which then applies row by row as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from proxy.advice import Advice
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.detectors.bursts import Burst, Bursts
from proxy.rewriters.batching import multirow_insert_sql
from proxy.tracking.events import StatementEvent

__all__ = ["InsertLoop", "InsertLoopOptions"]


@dataclass(frozen=True)
class InsertLoopOptions(DetectorOptions):
    min_repeats: int = field(default=10, metadata={"minimum": 2})


class InsertLoop(Detector):
    rule: ClassVar[str] = "insert_loop"
    options_type: ClassVar[type[DetectorOptions]] = InsertLoopOptions

    def __init__(
        self,
        options: InsertLoopOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.min_repeats = options.min_repeats
        self._bursts: Bursts[Burst] = Bursts(Burst)

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.parsed.info
        if info.values_rows == 1 and info.command == "INSERT" and event.sqlstate is None:
            _, ended = self._bursts.add(event)
        elif event.transaction != self._bursts.transaction:
            ended = self._bursts.transaction_seen(event)
        else:
            return NO_ADVICE
        return self._judge(ended) if ended else NO_ADVICE

    def tick(self, now: float) -> Sequence[Advice]:
        ended = self._bursts.quiet(now)
        return self._judge(ended) if ended else NO_ADVICE

    def session_end(self) -> Sequence[Advice]:
        return self._judge(self._bursts.close_all())

    def _judge(self, bursts: list[Burst]) -> list[Advice]:
        out = []
        for burst in bursts:
            if burst.count < self.min_repeats:
                continue
            event = burst.template
            per_round_trip = burst.count / max(1, len(burst.round_trips))
            pipelined = per_round_trip >= 2
            table = event.info.tables[0] if event.info.tables else "the table"
            types = {i + 1: oid for i, oid in enumerate(event.param_types)}
            if pipelined:
                suggestion = (
                    f"{burst.count} single-row INSERTs into {table} were sent as a pipelined "
                    "batch: the round trips are saved, but each row is still a statement. "
                    "Insert all rows with one statement (suggested_sql, one array per column), "
                    "or use COPY for bulk loads."
                )
            else:
                suggestion = (
                    f"{burst.count} single-row INSERTs into {table}, one round trip each. "
                    "Insert all rows with one statement (suggested_sql, one array per column), "
                    "or use COPY for bulk loads."
                )
            if burst.transaction is None:
                suggestion += " Running them in one transaction also saves a commit per row."
            if event.info.on_conflict:
                suggestion += (
                    " The ON CONFLICT clause is kept; with DO UPDATE, one statement may not "
                    "update a row twice, so send each key once."
                )
            out.append(
                self.advice(
                    event,
                    severity="info" if pipelined else "warning",
                    count=burst.count,
                    suggestion=suggestion,
                    suggested_sql=multirow_insert_sql(event.info.normalized, types),
                    time_spent_s=burst.time_spent,
                    evidence={
                        "statements": burst.count,
                        "round_trips": len(burst.round_trips),
                        "window_s": round(burst.last - burst.first, 3),
                        "time_ms": round(burst.time_spent * 1000, 3),
                        "in_transaction": burst.transaction is not None,
                    },
                )
            )
        return out

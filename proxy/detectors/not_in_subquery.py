"""not_in_subquery: `x NOT IN (SELECT ...)`, which the planner cannot run as an anti-join
and which returns no row at all once the subquery yields a NULL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from proxy.advice import Advice
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.rewriters.predicates import not_exists_sql
from proxy.tracking.events import StatementEvent

__all__ = ["NotInSubquery", "NotInSubqueryOptions"]


@dataclass(frozen=True)
class NotInSubqueryOptions(DetectorOptions):
    pass


class NotInSubquery(Detector):
    rule: ClassVar[str] = "not_in_subquery"
    options_type: ClassVar[type[DetectorOptions]] = NotInSubqueryOptions

    def __init__(
        self,
        options: NotInSubqueryOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.info
        if not info.not_in_subquery or event.sqlstate is not None:
            return NO_ADVICE
        # the sink keeps one advice per statement shape; reporting each run only counts it
        return [
            self.advice(
                event,
                severity="warning",
                count=1,
                suggestion=(
                    "NOT IN (SELECT ...) returns no rows at all as soon as the subquery "
                    "yields a NULL, and the planner cannot turn it into an anti-join (it "
                    "scans the subquery for every row, or hashes it all in memory). Write it "
                    "as NOT EXISTS (SELECT 1 FROM ... WHERE inner = outer), as suggested_sql "
                    "does."
                ),
                suggested_sql=not_exists_sql(info.normalized),
                time_spent_s=event.duration,
                evidence={"duration_ms": round(event.duration * 1000, 3)},
            )
        ]

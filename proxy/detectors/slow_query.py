"""slow_query: a statement that ran longer than `threshold` and was not cancelled."""

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
from proxy.durations import Duration
from proxy.tracking.events import StatementEvent

__all__ = ["SlowQuery", "SlowQueryOptions"]


@dataclass(frozen=True)
class SlowQueryOptions(DetectorOptions):
    threshold: Duration = Duration(1.0)


class SlowQuery(Detector):
    rule: ClassVar[str] = "slow_query"
    options_type: ClassVar[type[DetectorOptions]] = SlowQueryOptions

    def __init__(
        self,
        options: SlowQueryOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.threshold = float(options.threshold)  # a plain float: compared on every statement

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        # A cancelled statement (57014) is the timeout's business, not slow-query advice.
        if event.duration < self.threshold or event.sqlstate == "57014" or event.reply_batched:
            return NO_ADVICE
        info = event.info
        if info.command in ("COPY", "VACUUM", "CREATE", "ALTER", "CALL", "DO"):
            return NO_ADVICE  # maintenance and bulk work are slow by nature
        tables = ", ".join(info.tables) or "no table"
        return [
            self.advice(
                event,
                severity="critical" if event.duration >= 10 * self.threshold else "warning",
                count=1,
                suggestion=(
                    f"This {info.command} ({tables}) took {event.duration:.2f}s. Look at its "
                    "plan with EXPLAIN (ANALYZE, BUFFERS) using real values: a missing index "
                    "or a scan of a growing table is the usual cause."
                ),
                suggested_sql=None,
                time_spent_s=event.duration,
                evidence={
                    "duration_ms": round(event.duration * 1000, 3),
                    "threshold_ms": round(self.threshold * 1000, 3),
                },
            )
        ]

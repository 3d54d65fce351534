"""long_transaction: a transaction block open longer than `threshold`, reported while open.

A long transaction holds its row locks and its snapshot the whole time: other writers
wait, and VACUUM cannot remove the rows that died meanwhile. It is found on the clock
(`tick`), not at its COMMIT, so the advice comes while the transaction is still open
(and an operator can still act on it), naming its first statement past BEGIN and SETs,
how long it has been open, how many statements ran and how long it has sat idle.

One advice per transaction: when the clock first finds it past `threshold`, or at its
end when the clock could not see it (the clock stops at the start of a running
statement, so a transaction whose time went into one long statement is judged when it
ends; slow_query names that statement). Not again at its end with the final duration:
the advice's `occurrences` then counts long transactions, one each.
"""

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
from proxy.detectors.transactions import Transaction, TransactionTracker
from proxy.durations import Duration
from proxy.tracking.events import StatementEvent

__all__ = ["LongTransaction", "LongTransactionOptions"]


@dataclass(frozen=True)
class LongTransactionOptions(DetectorOptions):
    threshold: Duration = Duration(10.0)


class LongTransaction(Detector):
    rule: ClassVar[str] = "long_transaction"
    options_type: ClassVar[type[DetectorOptions]] = LongTransactionOptions

    def __init__(
        self,
        options: LongTransactionOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.threshold = float(options.threshold)
        self._transactions = TransactionTracker()
        self._reported: Transaction | None = None  # the one already reported

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        if event.transaction is None and self._transactions.current is None:
            return NO_ADVICE  # autocommit: no block open, none ending
        ended = self._transactions.see(event)
        if ended is None or ended is self._reported:
            return NO_ADVICE
        if ended.last - ended.started <= self.threshold:
            return NO_ADVICE
        return [self._advice(ended, ended.last, still_open=False)]

    def tick(self, now: float) -> Sequence[Advice]:
        current = self._transactions.current
        if current is None or current is self._reported or now - current.started <= self.threshold:
            return NO_ADVICE
        return [self._advice(current, now, still_open=True)]

    def session_end(self) -> Sequence[Advice]:
        current = self._transactions.current
        self._transactions.current = None
        if current is None or current is self._reported:
            return NO_ADVICE
        if current.last - current.started <= self.threshold:
            return NO_ADVICE
        return [self._advice(current, current.last, still_open=False)]

    def _advice(self, transaction: Transaction, now: float, *, still_open: bool) -> Advice:
        self._reported = transaction
        open_s = now - transaction.started
        idle_s = max(0.0, now - transaction.last)
        n = transaction.statements
        first = transaction.first
        if still_open:
            said = (
                f"A transaction has been open for {open_s:.1f}s (threshold "
                f"{self.threshold:g}s) and still is: {n} statement(s) so far, idle for the "
                f"last {idle_s:.1f}s."
            )
        else:
            said = (
                f"A transaction stayed open for {open_s:.1f}s (threshold {self.threshold:g}s), "
                f"{n} statement(s)."
            )
        return self.advice(
            first,
            severity="critical" if open_s >= 10 * self.threshold else "warning",
            count=n,
            suggestion=(
                f"{said} Its first statement is shown. All that time it holds its locks and "
                "its snapshot: other writers wait and VACUUM cannot remove dead rows. Commit "
                "sooner: do slow work (network calls, user input, file I/O) before or after "
                "the transaction, and split long batches into smaller transactions."
            ),
            suggested_sql=None,
            time_spent_s=transaction.time_spent,
            evidence={
                "open_s": round(open_s, 3),
                "idle_s": round(idle_s, 3),
                "statements": n,
                "threshold_s": self.threshold,
                "still_open": int(still_open),
            },
        )

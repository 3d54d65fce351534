"""The transaction block a session is in, followed from its statements, for the rules
that judge transactions (check_then_write, long_transaction).

The tracker numbers each transaction block (`event.transaction`); what it cannot tell is
when a block ends before the next statement comes, nor at what isolation level it runs.
`TransactionTracker` follows both: a block ends with its COMMIT or ROLLBACK (the analyzer's
`ends_transaction`) or with a statement of another block, and its level is the one its
BEGIN or SET TRANSACTION asked for, else the session's default (SET SESSION
CHARACTERISTICS, SET default_transaction_isolation), READ COMMITTED until one is set.
"""

from __future__ import annotations

from typing import Final

from proxy.detectors.values import canonical, literal_text
from proxy.tracking.events import StatementEvent

__all__ = ["READ_COMMITTED", "Transaction", "TransactionTracker", "param_value"]

READ_COMMITTED: Final = "read committed"
UNKNOWN: Final = "?"  # a level the statement text does not hold
# what opens a block without doing its work: not what a transaction is named by
_PREAMBLE: Final = ("BEGIN", "SET", "SAVEPOINT")


class Transaction:
    """One transaction block: when it began, what ran in it, at what isolation level."""

    __slots__ = ("first", "id", "isolation", "last", "started", "statements", "time_spent")

    def __init__(self, event: StatementEvent, isolation: str) -> None:
        self.id = event.transaction
        self.first = event  # its first statement past BEGIN and SETs, once one came
        self.started = event.started
        self.last = event.finished  # when its latest statement finished
        self.statements = 0  # statements so far, BEGIN and COMMIT included
        self.time_spent = 0.0  # what its statements took together
        self.isolation = isolation

    def add(self, event: StatementEvent) -> None:
        self.statements += 1
        self.last = event.finished
        self.time_spent += event.duration
        if self.first.info.command in _PREAMBLE and event.info.command not in _PREAMBLE:
            self.first = event


class TransactionTracker:
    def __init__(self) -> None:
        self.current: Transaction | None = None  # the block open after the last statement
        self.default_isolation = READ_COMMITTED  # the session's, for the next blocks
        self._last_id: int | None = None  # the block of the last statement, ended or not

    def see(self, event: StatementEvent) -> Transaction | None:
        """Follows `event` (a finished statement, in order); returns the block that ended
        with it or before it, if one did."""
        tid = event.transaction
        info = event.info
        current = self.current
        ended = None
        if current is not None and tid != current.id:
            ended, current = current, None  # the COMMIT was not seen: another block began
        if tid is not None:
            # a statement with the id of a block that ended ran after it in the same round
            # trip ("COMMIT; SELECT 1"): autocommit, unless it opens a block itself
            if (
                current is None
                and not info.ends_transaction
                and (tid != self._last_id or info.command == "BEGIN")
            ):
                current = Transaction(event, self.default_isolation)
            self._last_id = tid
        if info.isolation and event.sqlstate is None:
            self._isolation(event, current)
        if current is not None:
            current.add(event)
            if info.ends_transaction:
                ended, current = current, None
        self.current = current
        return ended

    def _isolation(self, event: StatementEvent, current: Transaction | None) -> None:
        info = event.info
        level = info.isolation
        if level == UNKNOWN:  # `SET default_transaction_isolation = 'serializable'`
            literals = event.parsed.literals
            text = literal_text(literals[0]) if literals and len(literals) == 1 else None
            level = text.lower() if text else UNKNOWN
        if level == "read uncommitted":  # PostgreSQL runs it as READ COMMITTED
            level = READ_COMMITTED
        if info.isolation_scope == "session":
            self.default_isolation = level
        elif current is not None and (level != READ_COMMITTED or current.statements == 0):
            # set by its BEGIN, or by SET TRANSACTION: a level other than READ COMMITTED
            # set later is taken too (a doubt means silence), READ COMMITTED only by BEGIN
            current.isolation = level


def param_value(event: StatementEvent, number: int) -> str | None:
    """The value of `$number` of `event` in comparable text form, in memory only: its Bind
    parameter, or on the simple protocol the literal normalize lifted out; None when it
    cannot be told (a binary value of another type, or literals mixed with parameters)."""
    index = number - 1
    params = event.params()
    if params:
        if index >= len(params):
            return None
        raw, fmt = params[index]
        types = event.param_types
        return canonical(raw, fmt, types[index] if index < len(types) else 0)
    literals = event.parsed.literals
    if not literals or index >= len(literals) or len(literals) != event.info.param_count:
        return None  # literals are lifted in the order they are written: all or nothing
    return literal_text(literals[index])

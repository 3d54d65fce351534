"""check_then_write: a row read by key, then written by the same key in one READ COMMITTED
transaction, with nothing stopping a concurrent transaction in between.

Two races, each proven from one transaction's statements and their values (compared in
memory, never shown):
- lost update: a SELECT of one row by key without FOR UPDATE/FOR SHARE, then an UPDATE of
  that table by the same key values that sets a value from a parameter (computed by the
  application, from what it read) rather than from the column (`n = n + 1` is atomic).
  Two transactions both read the old row and the second UPDATE overwrites the first.
  Fix: the SELECT with FOR UPDATE.
- duplicate row: a SELECT by key that found no row, then an INSERT of those key values
  without ON CONFLICT: two transactions both find nothing and both insert. Fix: a unique
  constraint on the key and `INSERT … ON CONFLICT (key) DO NOTHING`.

Silent where it could be wrong: REPEATABLE READ and SERIALIZABLE (PostgreSQL refuses the
second writer), an unknown level, autocommit statements (no transaction ties the two), a
transaction that takes locks itself (FOR UPDATE/SHARE of any row, as when a parent row
serializes its children, LOCK TABLE, an advisory lock), a row already written earlier in
the transaction (an UPDATE or DELETE of it, an INSERT into its table), an UPDATE whose
WHERE checks more than the key (a version or state check: compare-and-set), SET values
that are expressions only, and values it cannot read.

Cheap on the common path: statements are kept as they come (a bounded list each of reads
and writes per transaction) and values are decoded only when a write meets a read of its
table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Final

from proxy.advice import Advice
from proxy.analysis.analyzer import StatementInfo
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.detectors.transactions import (
    READ_COMMITTED,
    Transaction,
    TransactionTracker,
    param_value,
)
from proxy.rewriters.locking import for_update_sql, on_conflict_sql, unique_constraint_sql
from proxy.tracking.events import StatementEvent

__all__ = ["CheckThenWrite"]

_MAX_READS: Final = 16  # reads by key kept per transaction, the latest
_MAX_WRITES: Final = 64  # writes by key kept per transaction; past that, silence


def _key_values(event: StatementEvent, table: str) -> dict[str, str] | None:
    """Column -> value of `event`'s `col = $n` lookups on `table`, in memory only; None when
    a value cannot be read (or one column is given two values)."""
    keys: dict[str, str] = {}
    for lookup in event.info.lookups:
        if lookup.table != table:
            continue
        value = param_value(event, lookup.param)
        if value is None or keys.get(lookup.column, value) != value:
            return None
        keys[lookup.column] = value
    return keys


class _Read:
    """A SELECT of `table` by key that found its one row, or none."""

    __slots__ = ("_decoded", "_keys", "event", "found", "index", "table")

    def __init__(self, event: StatementEvent, table: str, index: int, found: bool) -> None:
        self.event = event
        self.table = table
        self.index = index  # its place in the transaction
        self.found = found
        self._keys: dict[str, str] | None = None
        self._decoded = False

    def keys(self) -> dict[str, str] | None:
        """Its key values, decoded on first use; None when one cannot be read."""
        if not self._decoded:
            self._decoded = True
            self._keys = _key_values(self.event, self.table) or None
        return self._keys


class CheckThenWrite(Detector):
    rule: ClassVar[str] = "check_then_write"

    def __init__(
        self,
        options: DetectorOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self._transactions = TransactionTracker()
        self._transaction: Transaction | None = None  # whose reads and writes are kept
        self._reads: list[_Read] = []
        self._writes: list[StatementEvent] = []  # UPDATE and DELETE by key: rows locked
        self._written: set[str] = set()  # tables whose written rows are not known by key
        self._silent = False  # this transaction is not judged (it takes locks itself...)
        self._reported: set[tuple[str, str]] = set()  # (read, write) fingerprints reported
        # an advisory lock taken outside a transaction block (one held by the session):
        # what it protects is not known, so the session's transactions are not judged
        self._advisory = False

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.info
        if event.transaction is None and not info.isolation and self._transaction is None:
            if info.advisory_lock:
                self._advisory = True
            return NO_ADVICE  # autocommit: not this rule's (cheapest facts first)
        self._transactions.see(event)
        current = self._transactions.current
        if current is not self._transaction:
            self._transaction = current
            self._forget()
        if (
            current is None
            or current.isolation != READ_COMMITTED  # stricter, or not known: no verdict
            or event.sqlstate is not None
            or self._silent
        ):
            return NO_ADVICE
        command = info.command
        if info.for_update or info.advisory_lock or self._advisory or command == "LOCK":
            self._silent = True  # it locks for itself: for the rest of this transaction
            return NO_ADVICE
        if command == "SELECT":
            if info.lookups:
                self._read(event, current.statements)
            return NO_ADVICE
        table = info.target
        if table is None:
            return NO_ADVICE
        found = None
        if command == "UPDATE":
            found = self._lost_update(event, table, current.statements)
        elif command == "INSERT":
            found = self._duplicate_insert(event, table, current.statements)
        if command == "INSERT" or not info.lookups:
            self._written.add(table)
        elif len(self._writes) < _MAX_WRITES:
            self._writes.append(event)
        else:
            self._silent = True  # which rows it holds is no longer known
        return (found,) if found is not None else NO_ADVICE

    def session_end(self) -> Sequence[Advice]:
        self._forget()
        return NO_ADVICE

    # ------------------------------------------------------------------ state

    def _forget(self) -> None:
        self._reads.clear()
        self._writes.clear()
        self._written.clear()
        self._silent = False
        self._reported.clear()

    def _read(self, event: StatementEvent, index: int) -> None:
        info = event.info
        rows = event.rows
        if rows is None and event.portal_suspended:  # asyncpg's fetchrow: Execute for 1 row
            rows = len(event.sampled or ())
        if info.aggregate_only or rows is None or rows > 1:
            return
        for lookup in info.lookups:
            table = lookup.table
            if table is None or any(r.event is event and r.table == table for r in self._reads):
                continue
            if len(self._reads) >= _MAX_READS:
                del self._reads[0]
            self._reads.append(_Read(event, table, index, rows == 1))

    def _holds(self, table: str, keys: dict[str, str]) -> bool:
        """Could a row with `keys` be one this transaction wrote already (and so holds
        locked, or created)? Only a write by the same column with another value says no."""
        if table in self._written:
            return True
        for write in self._writes:
            if write.info.target != table:
                continue
            written = _key_values(write, table)
            if not written or all(keys.get(c, v) == v for c, v in written.items()):
                return True
        return False

    # ------------------------------------------------------------------ verdicts

    def _lost_update(self, event: StatementEvent, table: str, index: int) -> Advice | None:
        info = event.info
        if not any(r.found and r.table == table for r in self._reads):
            return None
        if info.set_reads_columns or info.guarded or not any(info.set_params):
            return None  # atomic, a compare-and-set, or a value not from the application
        keys = _key_values(event, table)
        if not keys or any(column in keys for column in info.set_columns):
            return None
        for read in self._reads:
            if not read.found or read.table != table:
                continue
            # the UPDATE by the read's key (or part of it): a WHERE on another column may
            # be a state check (`status = $3`), as a version column is
            read_keys = read.keys()
            if read_keys is None or not keys.keys() <= read_keys.keys():
                continue
            if any(read_keys[column] != value for column, value in keys.items()):
                continue
            key = (read.event.info.fingerprint, info.fingerprint)
            if key in self._reported or self._holds(table, read_keys):
                return None
            suggested = for_update_sql(read.event.info.normalized, table)
            if suggested is None:
                return None
            self._reported.add(key)
            columns = ", ".join(keys)
            return self.advice(
                read.event,
                severity="warning",
                count=1,
                suggestion=(
                    f"Lost update: this SELECT reads a row of {table} by {columns} and the same "
                    f"transaction then updates that row ({_short(info)}) with values the "
                    "application computed, at READ COMMITTED, without locking it: two "
                    "concurrent transactions both read the old row and the second UPDATE "
                    "silently overwrites the first. Lock the row as you read it "
                    "(suggested_sql; in an ORM, with_for_update() / select_for_update / FOR "
                    "UPDATE), or compute the new value in the UPDATE itself (SET n = n + $1)."
                ),
                suggested_sql=suggested,
                time_spent_s=read.event.duration + event.duration,
                evidence=_evidence("lost_update", index - read.index),
            )
        return None

    def _duplicate_insert(self, event: StatementEvent, table: str, index: int) -> Advice | None:
        info = event.info
        if info.on_conflict or info.values_rows != 1:
            return None
        if not any(not r.found and r.table == table for r in self._reads):
            return None
        inserted: dict[str, int] = {}
        for column, param in zip(info.insert_columns, info.insert_params, strict=False):
            if param:
                inserted[column] = param
        for read in self._reads:
            if read.found or read.table != table:
                continue
            read_keys = read.keys()
            if read_keys is None or not read_keys.keys() <= inserted.keys():
                continue
            if any(param_value(event, inserted[c]) != v for c, v in read_keys.items()):
                continue
            key = (read.event.info.fingerprint, info.fingerprint)
            if key in self._reported:
                return None
            columns = tuple(read_keys)
            upsert = on_conflict_sql(info.normalized, columns)
            if upsert is None:
                return None
            self._reported.add(key)
            constraint = unique_constraint_sql(table, columns)
            return self.advice(
                event,
                severity="warning",
                count=1,
                suggestion=(
                    f"Duplicate-row race: the same transaction looked up {table} by "
                    f"{', '.join(columns)} ({_short(read.event.info)}), found no row, then "
                    "inserted one with those values. Two concurrent transactions both find "
                    "nothing and both insert: without a unique constraint on "
                    f"({', '.join(columns)}) the table gets duplicate rows, with one the "
                    "second fails. Add the constraint if the table has none, then insert "
                    "with ON CONFLICT (suggested_sql: the constraint, then the INSERT) and "
                    "drop the SELECT."
                ),
                suggested_sql=f"{constraint}; {upsert}",
                time_spent_s=read.event.duration + event.duration,
                evidence=_evidence("duplicate_insert", index - read.index),
            )
        return None


def _short(info: StatementInfo) -> str:
    return f"{info.command} {info.target or ', '.join(info.tables)}".strip()


def _evidence(race: str, apart: int) -> dict[str, int | float | str]:
    return {
        "race": race,
        "statements_apart": apart,
        "in_transaction": 1,
        "isolation": READ_COMMITTED,
    }

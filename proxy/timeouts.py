"""Statement and transaction timeouts: which limit applies, and the timers that enforce it.

The policy is pure (first matching rule wins, cached per statement shape and identity).
The guard owns one statement timer and the transaction timers of a session; it is told
which statement the server is executing now and fires only if that very statement is
still running, so a timer that outlives its statement can never cancel the next one.
The error editor rewrites PostgreSQL's cancel message into one that names the rule,
passing every other byte through untouched and unbuffered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.analysis.analyzer import StatementInfo
from proxy.analysis.matching import SessionIdentity, statement_matches
from proxy.config import TimeoutSettings
from proxy.protocol.messages import ErrorResponse
from proxy.tracking.events import Running, StatementEvent

__all__ = ["Limit", "Scheduler", "TimeoutGuard", "TimeoutPolicy", "TimerHandle", "rewrite_cancel"]

_CACHE_SIZE = 4096
_TX_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "PREPARE TRANSACTION")


@dataclass(frozen=True, slots=True)
class Limit:
    rule: str  # the rule's name, or "default"
    seconds: float

    def describe(self) -> str:
        return f"{self.seconds:g}s" if self.seconds >= 1 else f"{self.seconds * 1000:g}ms"


class TimeoutPolicy:
    def __init__(self, settings: TimeoutSettings) -> None:
        self.settings = settings
        self._cache: dict[tuple[str, SessionIdentity], tuple[Limit | None, Limit | None]] = {}

    @property
    def enforces_anything(self) -> bool:
        s = self.settings
        return bool(s.statement or s.transaction or s.idle_in_transaction or s.rules)

    def limits(
        self, info: StatementInfo, identity: SessionIdentity
    ) -> tuple[Limit | None, Limit | None]:
        """(statement limit, transaction limit) for a statement run by `identity`."""
        key = (info.fingerprint or info.normalized or info.command, identity)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        statement = transaction = None
        for rule in self.settings.rules:
            if statement_matches(rule.match, info, identity):
                if rule.statement:
                    statement = Limit(rule.name, rule.statement)
                if rule.transaction:
                    transaction = Limit(rule.name, rule.transaction)
                break
        if statement is None and self.settings.statement:
            statement = Limit("default", self.settings.statement)
        if transaction is None and self.settings.transaction:
            transaction = Limit("default", self.settings.transaction)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = (statement, transaction)
        return statement, transaction


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[..., TimerHandle]


class TimeoutGuard:
    """One session's timers. The session reports progress; callbacks report expiry."""

    def __init__(
        self,
        policy: TimeoutPolicy,
        identity: SessionIdentity,
        call_later: Scheduler,
        clock: Callable[[], float],
        on_statement: Callable[[StatementInfo, float, Limit], None],
        on_transaction: Callable[[str, Limit], None],
    ) -> None:
        self.policy = policy
        self.identity = identity
        self.call_later = call_later
        self.clock = clock
        self.on_statement = on_statement
        self.on_transaction = on_transaction
        self._running: StatementEvent | None = None
        self._statement_timer: TimerHandle | None = None
        self._tx_timer: TimerHandle | None = None
        self._tx_deadline: float | None = None
        self._tx_limit: Limit | None = None
        self._tx_started: float | None = None
        self._idle_timer: TimerHandle | None = None

    # ------------------------------------------------------------ statements

    def running(self, current: Running | None) -> None:
        """What the server executes now, as the tracker sees it (None when idle)."""
        event = current.event if current is not None else None
        if event is self._running:
            return
        if self._statement_timer is not None:
            self._statement_timer.cancel()
            self._statement_timer = None
        self._running = event
        if current is None or event is None:
            return
        statement, transaction = self.policy.limits(event.info, self.identity)
        if self._tx_started is None:
            # A transaction opening in this round trip and staying open: the ReadyForQuery
            # that would start its clock comes only once it all ends (`BEGIN; ...; long`).
            ends = [i.command for i in (event.info, *current.later) if i.command in _TX_CONTROL]
            if ends and ends[-1] == "BEGIN":
                self._tx_started = current.started
                if self.policy.settings.transaction:
                    limit = Limit("default", self.policy.settings.transaction)
                    self._tighten_transaction(limit)
        if transaction is not None and self._tx_started is not None:
            self._tighten_transaction(transaction)
        # PostgreSQL sends the replies of a multi-statement Query only when it ends, so the
        # statements after this one may be running unseen. Each gets a deadline counted
        # from now plus the limits of the statements before it: a statement with no limit
        # of its own is assumed quick (the limitation the README states).
        best: tuple[float, StatementInfo, float, Limit] | None = None
        budget = current.started
        for index, info in enumerate((event.info, *current.later)):
            own = statement if index == 0 else self.policy.limits(info, self.identity)[0]
            if own is None:
                continue
            deadline = budget + own.seconds
            if best is None or deadline < best[0]:
                best = (deadline, info, budget, own)
            budget = deadline
        if best is not None:
            deadline, info, started, limit = best
            delay = max(0.0, deadline - self.clock())
            self._statement_timer = self.call_later(
                delay, self._statement_expired, event, info, started, limit
            )

    def _statement_expired(
        self, event: StatementEvent, info: StatementInfo, started: float, limit: Limit
    ) -> None:
        self._statement_timer = None
        if event is self._running and not event.finished:
            self.on_statement(info, started, limit)

    # ---------------------------------------------------------- transactions

    def ready(self, status: bytes, idle: bool) -> None:
        """A ReadyForQuery passed: `status` is its transaction status, `idle` that nothing
        more is owed by the server (the client is the one to act next)."""
        if status == b"I":
            self._end_transaction()
            return
        now = self.clock()
        if self._tx_started is None:
            self._tx_started = now
            if self.policy.settings.transaction:
                self._tighten_transaction(Limit("default", self.policy.settings.transaction))
        if idle and self.policy.settings.idle_in_transaction:
            self._cancel_idle()
            limit = Limit("default", self.policy.settings.idle_in_transaction)
            self._idle_timer = self.call_later(limit.seconds, self._idle_expired, limit)

    def client_active(self) -> None:
        self._cancel_idle()

    def _tighten_transaction(self, limit: Limit) -> None:
        assert self._tx_started is not None
        deadline = self._tx_started + limit.seconds
        if self._tx_deadline is not None and deadline >= self._tx_deadline:
            return
        if self._tx_timer is not None:
            self._tx_timer.cancel()
        self._tx_deadline, self._tx_limit = deadline, limit
        self._tx_timer = self.call_later(
            max(0.0, deadline - self.clock()), self._transaction_expired, limit
        )

    def _transaction_expired(self, limit: Limit) -> None:
        self._tx_timer = None
        if self._tx_started is not None:
            self.on_transaction("transaction", limit)

    def _idle_expired(self, limit: Limit) -> None:
        self._idle_timer = None
        if self._tx_started is not None:
            self.on_transaction("idle_in_transaction", limit)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _end_transaction(self) -> None:
        self._cancel_idle()
        if self._tx_timer is not None:
            self._tx_timer.cancel()
        self._tx_timer = self._tx_deadline = self._tx_limit = self._tx_started = None

    def close(self) -> None:
        self.running(None)
        self._end_transaction()
        # The callbacks are the hook's, which holds this guard: dropped, no cycle keeps a
        # closed session in memory until the seldom full collection (cli.py).
        self.on_statement = _no_statement
        self.on_transaction = _no_transaction


def _no_statement(info: StatementInfo, started: float, limit: Limit) -> None:
    """What a closed guard reports a statement over its limit to: nobody."""


def _no_transaction(kind: str, limit: Limit) -> None:
    """What a closed guard reports a transaction over its limit to: nobody."""


def rewrite_cancel(raw: bytes, limit: Limit) -> bytes | None:
    """PostgreSQL's 57014 cancel error with a message naming pgwarden's rule; else None."""
    try:
        error = ErrorResponse.decode(memoryview(raw)[5:])
    except ValueError:
        return None
    if error.sqlstate != "57014":
        return None
    fields = dict(error.fields)
    fields["M"] = (
        f'canceling statement due to statement timeout (pgwarden rule "{limit.rule}", '
        f"{limit.describe()})"
    )
    return ErrorResponse(fields).encode()

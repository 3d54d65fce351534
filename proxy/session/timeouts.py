"""Statement and transaction timeouts on a session's relay path.

The guard (proxy/timeouts.py) owns the timers; this hook tells it what the server runs as
each chunk passes, and acts when a timer fires: a statement over its limit is cancelled
(nothing new reaches the server until the cancel is delivered, so it cannot hit the next
statement) and its 57014 error is rewritten to name the rule; a transaction over its
limit ends the session. A server that then stays silent (hung, or the network to it) ends
the session too: its client must not wait forever for an answer that will not come.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.analysis.analyzer import StatementInfo
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.protocol.editor import FlushInserter
from proxy.session.hooks import SessionControl, SessionHook
from proxy.timeouts import (
    Limit,
    Scheduler,
    TimeoutGuard,
    TimeoutPolicy,
    TimerHandle,
    rewrite_cancel,
)

__all__ = ["CANCEL_ANSWER_TIMEOUT", "TimeoutHook"]

log = get_logger("pgwarden.session")

# Once a statement over its limit is cancelled, the server has this long to send anything
# (the 57014, the rest of the result) before the session is ended; every byte it sends
# restarts the wait. PostgreSQL answers a cancel within milliseconds.
CANCEL_ANSWER_TIMEOUT = 5.0


class TimeoutHook(SessionHook):
    """`at` says where the client stream stands when the hook starts, as
    `FrameDecoder.remaining()` tells it."""

    realtime = True  # the guard must know which statement runs now

    def __init__(
        self,
        session: SessionControl,
        policy: TimeoutPolicy,
        metrics: Metrics,
        call_later: Scheduler,
        at: tuple[bytes, int] = (b"", 0),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.session = session
        self.metrics = metrics
        self.guard = TimeoutGuard(
            policy,
            session.identity,
            call_later,
            clock,
            self._statement_timed_out,
            self._transaction_timed_out,
        )
        self._clock = clock
        self._call_later = call_later
        self._unanswered: TimerHandle | None = None  # see CANCEL_ANSWER_TIMEOUT
        self._heard = 0.0  # when the server last sent anything while a cancel waits
        # PostgreSQL holds pipelined replies until a Sync or Flush: a Flush after each
        # Execute shows when each statement ends, so each is timed on its own
        self._flushes = FlushInserter(header_sent=at[0], passing=at[1])
        self._timed_out: Limit | None = None  # the limit of a statement being cancelled

    def edit_client(self, data: bytes) -> bytes:
        return self._flushes.feed(data)

    def client_sent(self) -> None:
        self.guard.client_active()
        self.guard.running(self.session.running())

    def round_trip_end(self, status: bytes, idle: bool) -> None:
        self._timed_out = None  # the round trip ended: its error went through
        self._stop_waiting()
        self.guard.ready(status, idle)

    def server_sent(self) -> None:  # every chunk: a reply may start the next statement
        if self._unanswered is not None:
            if self._timed_out is None:
                self._stop_waiting()  # the cancel's error went through
            else:
                self._heard = self._clock()
        self.guard.running(self.session.running())

    @property
    def edits_errors(self) -> bool:
        return self._timed_out is not None

    def server_error(self, raw: bytes) -> bytes | None:
        limit = self._timed_out
        if limit is None:
            return None
        rewritten = rewrite_cancel(raw, limit)
        if rewritten is not None:
            self._timed_out = None
        return rewritten

    def close(self) -> None:
        self._stop_waiting()
        self.guard.close()

    def _statement_timed_out(self, info: StatementInfo, started: float, limit: Limit) -> None:
        session = self.session
        self.metrics.statement_timeouts.labels(limit.rule).inc()
        log.warning(
            "statement_timeout",
            rule=limit.rule,
            limit_s=round(limit.seconds, 3),
            statement=info.normalized,
            command=info.command,
            running_s=round(self._clock() - started, 3),
            **session.log_fields(),
        )
        self._timed_out = limit
        session.edit_errors()
        # Nothing new reaches the server until the cancel has been delivered, so a cancel
        # that arrives after the statement ended cannot hit the next one.
        session.pause_client("cancel")
        session.cancel_backend(lambda: session.resume_client("cancel"))
        self._heard = self._clock()
        if self._unanswered is None:
            self._unanswered = self._call_later(CANCEL_ANSWER_TIMEOUT, self._cancel_unanswered)

    def _cancel_unanswered(self) -> None:
        """The server sent nothing since the cancel (or since its last bytes) for
        CANCEL_ANSWER_TIMEOUT: unless the statement's error went through meanwhile, the
        session ends."""
        self._unanswered = None
        limit = self._timed_out
        if limit is None:
            return
        quiet = self._clock() - self._heard
        if quiet < CANCEL_ANSWER_TIMEOUT:
            self._unanswered = self._call_later(
                CANCEL_ANSWER_TIMEOUT - quiet, self._cancel_unanswered
            )
            return
        log.warning(
            "cancel_unanswered",
            rule=limit.rule,
            limit_s=round(limit.seconds, 3),
            waited_s=round(quiet, 3),
            **self.session.log_fields(),
        )
        self.session.fail(
            "57014",
            "terminating connection: the server answered neither a statement over its "
            f'timeout nor its cancel (pgwarden rule "{limit.rule}", {limit.describe()})',
            "cancel_unanswered",
        )

    def _stop_waiting(self) -> None:
        if self._unanswered is not None:
            self._unanswered.cancel()
            self._unanswered = None

    def _transaction_timed_out(self, kind: str, limit: Limit) -> None:
        self.metrics.transaction_timeouts[kind].inc()
        log.warning(
            "transaction_timeout",
            kind=kind,
            rule=limit.rule,
            limit_s=round(limit.seconds, 3),
            **self.session.log_fields(),
        )
        if kind == "idle_in_transaction":
            self.session.fail(
                "25P03",
                "terminating connection due to idle-in-transaction timeout "
                f"(pgwarden, {limit.describe()})",
                "idle_in_transaction_timeout",
            )
        else:
            self.session.fail(
                "57014",
                "terminating connection due to transaction timeout "
                f'(pgwarden rule "{limit.rule}", {limit.describe()})',
                "transaction_timeout",
            )

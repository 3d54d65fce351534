"""connection_churn: one application opening connection after connection, each closed
within moments: a connection per request, no pool. Every one costs a TCP (often TLS)
handshake, authentication and a fresh backend process, more than most queries it runs.

Proof from the traffic: a detector is built when its session is ready (the connection is
open) and told when it closes, so each session knows its lifetime. The application's
sessions (database, user, application_name) share a record of their short-lived
connections; when at least `min_connections` of them, each living under `max_lifetime`,
opened within `window`, the session closing reports it, at most once per window. A pool
keeps its connections open, so they never count, however many there are.

The advice is about the application, not a statement: its fingerprint is
`connection:<application_name>` (the sink keeps one per database, user and application),
its statement the first one a short connection ran on a table (which request opens them).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from proxy.advice import Advice
from proxy.analysis.analyzer import StatementInfo
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.durations import Duration
from proxy.tracking.events import StatementEvent

__all__ = ["ConnectionChurn", "ConnectionChurnOptions"]


@dataclass(frozen=True)
class ConnectionChurnOptions(DetectorOptions):
    min_connections: int = field(default=20, metadata={"minimum": 2, "maximum": 10000})
    window: Duration = Duration(10.0)
    max_lifetime: Duration = Duration(1.0)


class _Churn:
    """One application's short-lived connections opened within the last window: (opened,
    lifetime) each, oldest first, at most `min_connections` (all a verdict needs)."""

    def __init__(self, min_connections: int) -> None:
        self.short: deque[tuple[float, float]] = deque(maxlen=min_connections)
        self.reported = float("-inf")  # when the last advice was given


class ConnectionChurn(Detector):
    rule: ClassVar[str] = "connection_churn"
    options_type: ClassVar[type[DetectorOptions]] = ConnectionChurnOptions

    def __init__(
        self,
        options: ConnectionChurnOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.opened = time.perf_counter()
        self.min_connections = options.min_connections
        self.window = float(options.window)
        self.max_lifetime = float(options.max_lifetime)
        self.churn = self.shared(lambda: _Churn(options.min_connections))
        self.first: StatementInfo | None = None  # its first statement on a table

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        if self.first is None:
            info = event.info
            if info.tables and not info.catalog_only:
                self.first = info
        return NO_ADVICE

    def session_end(self) -> Sequence[Advice]:
        now = time.perf_counter()
        lifetime = now - self.opened
        if lifetime >= self.max_lifetime:
            return NO_ADVICE
        churn = self.churn
        short = churn.short
        if short.maxlen != self.min_connections:  # the options changed (a reload)
            short = churn.short = deque(short, maxlen=self.min_connections)
        short.append((self.opened, lifetime))
        while short and short[0][0] < now - self.window:
            short.popleft()
        if len(short) < self.min_connections or now - churn.reported < self.window:
            return NO_ADVICE
        churn.reported = now
        return [self._advice(short, now)]

    def _advice(self, short: deque[tuple[float, float]], now: float) -> Advice:
        count = len(short)
        span = max(now - short[0][0], 1e-3)
        lifetimes = [lifetime * 1000 for _, lifetime in short]
        rate = count / span
        app = self.identity.application_name
        who = f"Application {app!r}" if app else "This application (no application_name)"
        first = self.first
        return Advice(
            rule=self.rule,
            severity="warning",
            fingerprint=f"connection:{app}",
            statement=first.normalized if first is not None else "",
            tables=first.tables if first is not None else (),
            count=count,
            suggestion=(
                f"{who} opened {count} connections in {span:.1f}s ({rate:.1f} a second), "
                f"each closed within {self.max_lifetime:g}s: a connection per request. Each "
                "costs a handshake, authentication and a new server process, often more than "
                "its queries. Open a pool once and borrow from it (SQLAlchemy's default "
                "QueuePool rather than NullPool, psycopg_pool, asyncpg.create_pool, "
                "node-postgres Pool, HikariCP), or put PgBouncer in front."
            ),
            suggested_sql=None,
            database=self.identity.database,
            user=self.identity.user,
            application_name=app,
            evidence={
                "connections": count,
                "window_s": round(span, 3),
                "median_lifetime_ms": round(statistics.median(lifetimes), 3),
                "max_lifetime_ms": round(max(lifetimes), 3),
                "rate_per_s": round(rate, 1),
            },
        )

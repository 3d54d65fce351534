"""catalog_polling: the same information_schema / pg_catalog query asked again and again.

An application that checks whether a table exists before every write, or reads a table's
columns before every insert, asks the database what cannot have changed since it last
asked. Drivers ask such questions too, once, when a connection starts or first meets a
type (asyncpg's type introspection, SQLAlchemy's version and settings checks, psql's `\\d`):
those must never count, however many connections an application opens.

So an occurrence counts only when this same connection already ran that query with the
same values (compared as a digest in memory): a first run on a connection is taken for
start-up or first use, and a driver introspecting another type, or SQLAlchemy checking
each of its tables once, runs the query with other values. The rule reports one
application's counted occurrences of one query (fingerprint), across its connections,
`min_repeats` times within `window`. An application that opens a connection per request
and checks once on each is not found (prefer silence; connection_churn sees it).

Views of the server's running state (pg_stat_*, pg_locks, pg_settings...) are left out:
they change all the time, and a monitoring agent polls them by design.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

from proxy.advice import Advice
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.detectors.repeated_read import Repeats, connection_number, span_text, values_digest
from proxy.durations import Duration
from proxy.tracking.events import StatementEvent

__all__ = ["CatalogPolling", "CatalogPollingOptions"]

_MAX_QUERIES: Final = 1024  # catalog fingerprints followed per application
_MAX_RAN: Final = 128  # (fingerprint, values) a connection remembers having run
# catalog relations that show running state rather than the schema (pg_stat* by prefix)
_RUNTIME: Final = frozenset(
    {
        "pg_locks",
        "pg_settings",
        "pg_file_settings",
        "pg_prepared_xacts",
        "pg_prepared_statements",
        "pg_cursors",
        "pg_replication_slots",
        "pg_replication_origin_status",
        "pg_backend_memory_contexts",
        "pg_shmem_allocations",
        "pg_sequences",
        "pg_wait_events",
    }
)


def _runtime(tables: tuple[str, ...]) -> bool:
    for table in tables:
        name = table.rpartition(".")[2]
        if name.startswith("pg_stat") or name in _RUNTIME:
            return True
    return False


class _Polls:
    """One application's repeated catalog queries, shared by its sessions."""

    def __init__(self) -> None:
        self.queries: OrderedDict[str, Repeats] = OrderedDict()

    def first(self, fingerprint: str, repeats: Repeats) -> None:
        queries = self.queries
        queries[fingerprint] = repeats
        if len(queries) > _MAX_QUERIES:
            queries.popitem(last=False)


@dataclass(frozen=True)
class CatalogPollingOptions(DetectorOptions):
    min_repeats: int = field(default=5, metadata={"minimum": 2})
    window: Duration = field(default=Duration(60.0), metadata={"minimum": 0.001})


class CatalogPolling(Detector):
    rule: ClassVar[str] = "catalog_polling"
    options_type: ClassVar[type[DetectorOptions]] = CatalogPollingOptions

    def __init__(
        self,
        options: CatalogPollingOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.min_repeats = options.min_repeats
        self.window = float(options.window)
        self._connection = connection_number()
        self._polls = self.shared(_Polls)
        # what this connection has run: a first run is start-up or first use, never counted
        self._ran: OrderedDict[tuple[str, int], None] = OrderedDict()

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.parsed.info
        if not info.catalog_only or event.sqlstate is not None or _runtime(info.tables):
            return NO_ADVICE
        digest = values_digest(event)
        if digest is None:
            return NO_ADVICE
        key = (info.fingerprint, digest)
        ran = self._ran
        if key not in ran:
            ran[key] = None
            if len(ran) > _MAX_RAN:
                ran.popitem(last=False)
            return NO_ADVICE
        ran.move_to_end(key)
        queries = self._polls.queries
        repeats = queries.get(info.fingerprint)
        now = event.started
        if repeats is None:
            self._polls.first(info.fingerprint, Repeats(now, event.duration, self._connection))
            return NO_ADVICE
        queries.move_to_end(info.fingerprint)
        if not repeats.add(now, event.duration, self._connection, self.min_repeats, self.window):
            return NO_ADVICE
        advice = self._advice(event, repeats, now)
        repeats.report(now)
        return [advice]

    def _advice(self, event: StatementEvent, repeats: Repeats, now: float) -> Advice:
        n = repeats.count
        connections = repeats.connection_count()
        span = now - repeats.first
        over = "on one connection" if connections == 1 else f"over {connections} connections"
        return self.advice(
            event,
            severity="warning",
            count=n,
            suggestion=(
                f"This query of the system catalogs ({', '.join(event.info.tables)}) was "
                f"asked again {n} times in {span_text(span)} ({over}), each time on a "
                "connection that had already asked it with the same values: the schema does "
                "not change between requests. Check it once at start-up, or leave it to "
                "migrations, and keep the answer; a table missing after all fails the "
                "statement that uses it, which the application can handle."
            ),
            suggested_sql=None,
            time_spent_s=repeats.spent,
            evidence={
                "repeats": n,
                "window_s": self.window,
                "span_s": round(span, 3),
                "connections": connections,
                "time_ms": round(repeats.spent * 1000, 3),
            },
        )

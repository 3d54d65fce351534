"""Prometheus metrics in a registry of pgwarden's own.

Children of labelled metrics are bound once and kept, so the relay path records with a
plain method call and no label lookup.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from proxy import __version__, native
from proxy.fingerprints import Client, FingerprintStats
from proxy.logs import dropped_lines

if TYPE_CHECKING:
    from proxy.advice import Advice
    from proxy.analysis.analyzer import Analyzer
    from proxy.tracking.events import StatementEvent

__all__ = ["Metrics"]

CONNECTION_ERROR_KINDS = (
    "protocol_violation",
    "startup_timeout",
    "too_many_connections",
    "upstream_connect",
    "upstream_lost",
    "tls",
    # startups PostgreSQL refused (its ErrorResponse before the first ReadyForQuery):
    # SQLSTATE class 28, 3D000, anything else
    "auth_failed",
    "unknown_database",
    "startup_failed",
    # a client that wanted TLS (SSLRequest), was told pgwarden has none, and left
    "tls_refused",
    # a bug on the relay path: the one session ends (logged as relay_failed)
    "internal_error",
)
# Commands get their own series; anything else (including text pglast could not parse,
# whose first word is arbitrary) counts as OTHER, so the label set stays bounded.
COMMANDS: Final = frozenset(
    [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "COPY",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "SHOW",
        "EXPLAIN",
        "CALL",
        "DO",
        "LISTEN",
        "NOTIFY",
        "UNLISTEN",
        "TRUNCATE",
        "DROP",
        "CREATE",
        "ALTER",
        "VACUUM",
        "LOCK",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "DECLARE",
        "FETCH",
        "CLOSE",
        "EMPTY",
    ]
)
_MAX_SQLSTATES: Final = 100
DURATION_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("pgwarden_build", "pgwarden build information", registry=r).info(
            {"version": __version__, "analysis_code": native.MODE.split(" ", 1)[0]}
        )
        # process_*: memory, CPU, file descriptors and start time, the names every
        # dashboard knows (read from /proc at scrape time; none where there is no /proc)
        ProcessCollector(registry=r)
        self.client_connections = Gauge(
            "pgwarden_client_connections", "Client connections currently open", registry=r
        )
        self.client_connections_limit = Gauge(
            "pgwarden_client_connections_limit",
            "Configured limit on open client connections (limits.max_client_connections)",
            registry=r,
        )
        self.client_connections_opened = Counter(
            "pgwarden_client_connections_opened",
            "Client connections accepted since start",
            registry=r,
        )
        self.server_connections_opened = Counter(
            "pgwarden_server_connections_opened",
            "Connections opened to the upstream PostgreSQL since start",
            registry=r,
        )
        self.transactions = Counter(
            "pgwarden_transactions", "Transactions ended (committed or rolled back)", registry=r
        )
        self.transaction_duration = Histogram(
            "pgwarden_transaction_duration_seconds",
            "Transaction duration, from the first statement to the end",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.fingerprints = FingerprintStats()
        r.register(self.fingerprints)
        self.server_connections = Gauge(
            "pgwarden_server_connections",
            "Connections to the upstream PostgreSQL currently open",
            registry=r,
        )
        errors = Counter(
            "pgwarden_connection_errors",
            "Client connections ended by an error, by kind",
            ["kind"],
            registry=r,
        )
        self.connection_errors = {kind: errors.labels(kind) for kind in CONNECTION_ERROR_KINDS}
        # Bytes are counted per session as plain integers (the relay path takes no lock)
        # and summed at scrape time with the totals of sessions already closed.
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        self._open_traffic: Callable[[], tuple[int, int]] = _no_traffic
        r.register(_BytesCollector(self))
        r.register(_LogSinkCollector())
        self.connection_duration = Histogram(
            "pgwarden_client_connection_duration_seconds",
            "How long client connections stayed open",
            buckets=(0.01, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 14400, 86400),
            registry=r,
        )
        self.upstream_connect_duration = Histogram(
            "pgwarden_upstream_connect_duration_seconds",
            "Time to open a connection to the upstream, TLS included",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.cancel_requests = Counter(
            "pgwarden_cancel_requests",
            "Cancel requests sent upstream, by origin",
            ["origin"],
            registry=r,
        )
        self.draining = Gauge(
            "pgwarden_draining", "1 while pgwarden drains before shutdown", registry=r
        )
        # Recorded for every statement: plain integers summed at scrape, no lock taken.
        self._statements: dict[str, _CommandStats] = {}
        r.register(_StatementCollector(self._statements))
        self._errors = Counter(
            "pgwarden_errors",
            "Statements that ended in an error, by SQLSTATE",
            ["sqlstate"],
            registry=r,
        )
        self._advice = Counter(
            "pgwarden_advice",
            "Advice reported, by rule and severity",
            ["rule", "severity"],
            registry=r,
        )
        self.statement_timeouts = Counter(
            "pgwarden_statement_timeouts",
            "Statements pgwarden cancelled for running past their limit, by rule",
            ["rule"],
            registry=r,
        )
        transaction_timeouts = Counter(
            "pgwarden_transaction_timeouts",
            "Sessions pgwarden ended for a transaction past its limit, by kind",
            ["kind"],
            registry=r,
        )
        self.transaction_timeouts = {
            kind: transaction_timeouts.labels(kind)
            for kind in ("transaction", "idle_in_transaction")
        }
        self.rewrites = Counter(
            "pgwarden_rewrites",
            "Statements a rewrite rule replaced (mode=enforce) or would have (mode=log)",
            ["rule", "mode"],
            registry=r,
        )
        self.blocks = Counter(
            "pgwarden_blocks",
            "Statements a block rule refused (mode=enforce) or would have (mode=log)",
            ["rule", "mode"],
            registry=r,
        )
        # the index advisor (proxy.advisor): its EXPLAINs by result (ok, denied: a
        # missing privilege, timeout, error, unavailable: no connection) and its rounds
        self.advisor_explains = Counter(
            "pgwarden_advisor_explains",
            "Statements the index advisor sent to plan, by result",
            ["result"],
            registry=r,
        )
        for result in ("ok", "denied", "timeout", "error", "unavailable"):
            self.advisor_explains.labels(result)  # each series there from the start
        self.advisor_duration = Histogram(
            "pgwarden_advisor_duration_seconds",
            "Time one round of the index advisor took",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120),
            registry=r,
        )
        self._by_sqlstate: dict[str, object] = {}

    def record_statement(self, event: StatementEvent, client: Client) -> None:
        """One finished statement of `client` (database, user, application_name)."""
        info = event.parsed.info
        command = info.command
        stats = self._statements.get(command)
        if stats is None:
            label = command if command in COMMANDS else "OTHER"
            stats = self._statements.get(label)
            if stats is None:
                stats = _CommandStats()
                self._statements[label] = stats
            self._statements[command] = stats
        duration = event.duration
        stats.count += 1
        stats.total += duration
        stats.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        if info.fingerprint:
            self.fingerprints.record(
                info.fingerprint,
                info.normalized,
                command,
                duration,
                client,
                not event.sqlstate,
                event.rows or 0,
            )
        if event.sqlstate and event.sqlstate != "skipped":
            self.record_error(event.sqlstate)

    def record_transaction(self, seconds: float) -> None:
        self.transactions.inc()
        self.transaction_duration.observe(seconds)

    def record_error(self, sqlstate: str) -> None:
        child = self._by_sqlstate.get(sqlstate)
        if child is None:
            label = sqlstate if len(self._by_sqlstate) < _MAX_SQLSTATES else "other"
            child = self._by_sqlstate[sqlstate] = self._errors.labels(label)
        child.inc()  # type: ignore[attr-defined]

    def record_advice(self, advice: Advice) -> None:
        self._advice.labels(advice.rule, advice.severity).inc()

    def watch_traffic(self, open_traffic: Callable[[], tuple[int, int]]) -> None:
        """`open_traffic` gives the bytes (in, out) open connections relayed so far, as
        plain numbers: what holds the connections stays out of this module."""
        self._open_traffic = open_traffic

    def bytes_relayed(self) -> tuple[int, int]:
        into, out = self._open_traffic()
        return self.closed_bytes_in + into, self.closed_bytes_out + out

    def watch_analyzer(self, analyzer: Analyzer) -> None:
        """Exposes the statement cache's counters, read at scrape time."""
        self.registry.register(_AnalyzerCollector(analyzer))


def _no_traffic() -> tuple[int, int]:
    return 0, 0


class _CommandStats:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf


class _StatementCollector:
    """pgwarden_queries_total and pgwarden_query_duration_seconds, by command."""

    def __init__(self, stats: dict[str, _CommandStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "pgwarden_queries", "Statements completed, by command", labels=["command"]
        )
        durations = HistogramMetricFamily(
            "pgwarden_query_duration_seconds",
            "Statement duration as seen by pgwarden, by command",
            labels=["command"],
        )
        seen: set[int] = set()
        for command, stats in list(self.stats.items()):
            if id(stats) in seen or (command not in COMMANDS and command != "OTHER"):
                continue  # an unlisted command shares the OTHER entry
            seen.add(id(stats))
            queries.add_metric([command], stats.count)
            cumulative, buckets = 0, []
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            durations.add_metric([command], buckets, stats.total)
        yield queries
        yield durations

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _BytesCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        into, out = self.metrics.bytes_relayed()
        family = CounterMetricFamily(
            "pgwarden_bytes", "Bytes relayed, by direction", labels=["direction"]
        )
        family.add_metric(["client_to_server"], into)
        family.add_metric(["server_to_client"], out)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _LogSinkCollector:
    """pgwarden_log_lines_dropped_total{reason}, read from the log sink at scrape time."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "pgwarden_log_lines_dropped",
            "Log lines lost because standard output failed or stalled, by reason",
            labels=["reason"],
        )
        for reason, count in dropped_lines().items():
            family.add_metric([reason], count)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _AnalyzerCollector:
    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer

    def collect(self) -> Iterator[Metric]:
        a = self.analyzer
        yield CounterMetricFamily(
            "pgwarden_analyzer_cache_hits", "Statement analyses served from the cache", a.hits
        )
        yield CounterMetricFamily(
            "pgwarden_analyzer_cache_misses", "Statements analysed with pglast", a.misses
        )
        yield CounterMetricFamily(
            "pgwarden_statements_unparsed",
            "Statements relayed that pglast could not parse (or too long to analyse)",
            a.unparsed,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())

"""The advisor's task: every `advisor.interval`, the statements that took the most time
are examined (proxy.advisor.proof) on one connection per database, and each index proven
is reported once as missing_index advice naming every statement it serves.

It runs as its own asyncio task beside the relay and shares only in-memory statistics
with it. Whatever fails (a dead upstream, a missing privilege, a statement the planner
refuses) is one log line and a metric, and the next round tries again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from psycopg.conninfo import conninfo_to_dict

from proxy.advice import Advice, AdviceSink
from proxy.advisor.catalog import Catalog
from proxy.advisor.planner import APPLICATION_NAME, Budget, OverBudget, PlanError, Planner, connect
from proxy.advisor.proof import Finding, examine
from proxy.advisor.sql import IndexSpec
from proxy.config import Settings
from proxy.detectors.missing_index import MissingIndexOptions
from proxy.fingerprints import Client, FingerprintStats, ParamSamples
from proxy.logs import get_logger
from proxy.metrics import Metrics

__all__ = ["Advisor"]

log = get_logger("pgwarden.advisor")

RECHECK: Final = 1800.0  # seconds before an unchanged statement is examined again
_RULE: Final = "missing_index"


@dataclass
class _Usage:
    """One fingerprint in one database: totals since start and the client that ran it
    most (whose user and application_name the advice names)."""

    calls: int = 0
    time: float = 0.0
    client: Client = ("", "", "")
    client_time: float = -1.0


@dataclass
class _Helped:
    """A statement an index serves, with what the proof found for it."""

    fingerprint: str
    statement: str
    finding: Finding


@dataclass
class _Database:
    conn: Any = None
    failing: bool = False  # a failure was logged; the next success is logged too
    signature: str = ""
    hypopg_logged: bool = False
    examined: dict[str, tuple[str, float]] = field(default_factory=dict)  # fp -> (sig, when)
    found: dict[IndexSpec, dict[str, _Helped]] = field(default_factory=dict)


class Advisor:
    """Started and stopped by the server; reads `settings()` afresh each round, so a
    reload changes its thresholds (its connections keep the dsn they were opened with)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        stats: FingerprintStats,
        samples: ParamSamples,
        sink: AdviceSink,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.samples = samples
        self.sink = sink
        self.metrics = metrics
        # what it connects with, read once: a new dsn, password or statement_timeout
        # needs a restart
        self.connection = settings().advisor
        self.budget = Budget(self.connection.max_explains_per_minute)
        self._databases: dict[str, _Database] = {}
        self._previous: dict[tuple[str, str], float] = {}  # (fp, database) -> time
        self._task: asyncio.Task[None] | None = None
        self._since = time.monotonic()  # the start of the window the last round measured

    @staticmethod
    def refuses(settings: Settings) -> str | None:
        """Why the advisor must not run with these settings, if so: its dsn pointing at
        pgwarden itself would make its own statements part of what it measures."""
        keywords = conninfo_to_dict(settings.advisor.dsn or "")
        host, port = str(keywords.get("host", "")), str(keywords.get("port", "5432"))
        if port == str(settings.listen.port) and host in (settings.listen.host, "localhost"):
            return "advisor.dsn names pgwarden's own listen address; give the upstream's"
        return None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for database in self._databases.values():
            if database.conn is not None:
                await database.conn.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(float(self.settings().advisor.interval))
            started = time.perf_counter()
            try:
                await self.round()
            except Exception:
                log.exception("advisor_failed", action="tries again next round")
            self.metrics.advisor_duration.observe(time.perf_counter() - started)

    async def round(self) -> None:
        """One look at the statements: the costliest since the last round first."""
        settings = self.settings()
        advisor = settings.advisor
        options = settings.detectors.rules[_RULE]
        self.budget.per_minute = advisor.max_explains_per_minute
        if not options.enabled or not isinstance(options, MissingIndexOptions):
            return
        usage = self._usage()
        recent = {key: entry.time - self._previous.get(key, 0.0) for key, entry in usage.items()}
        picks = sorted(
            (
                (recent[key], entry.time, key)
                for key, entry in usage.items()
                if entry.calls >= advisor.min_calls and entry.time >= advisor.min_total_time
            ),
            reverse=True,
        )
        self._previous = {key: entry.time for key, entry in usage.items()}
        now = time.monotonic()
        # the time at stake per second of this window (at least a minute: a short interval
        # would make a few slow statements look like a saturated database)
        window = max(now - self._since, 60.0)
        self._since = now
        by_database: dict[str, list[str]] = {}
        for _, _, (fingerprint, name) in picks:
            by_database.setdefault(name, []).append(fingerprint)
        await self._forget(by_database)
        touched: set[tuple[str, IndexSpec]] = set()
        try:
            for name, fingerprints in by_database.items():  # the costliest statement's first
                database = await self._database(name)
                for fingerprint in fingerprints:
                    if database is None or database.conn is None:
                        break  # unreachable, or lost during this round: the next one retries
                    found = await self._look(database, name, fingerprint, options)
                    touched.update((name, spec) for spec in found)
        except OverBudget:
            log.debug(
                "advisor_over_budget", max_explains_per_minute=advisor.max_explains_per_minute
            )
        for name, spec in touched:
            self._report(name, spec, window, usage, recent)

    async def _forget(self, picked: dict[str, list[str]]) -> None:
        """Drops what concerns statements no longer tracked, and closes the connection
        of a database none of whose statements is: the state stays bounded by pgwarden's
        per-fingerprint statistics."""
        for name in list(self._databases):
            database = self._databases[name]
            statements = set(picked.get(name, ()))
            if not statements:
                del self._databases[name]
                if database.conn is not None:
                    await database.conn.close()
                continue
            for fingerprint in set(database.examined) - statements:
                del database.examined[fingerprint]
            for spec, helped in list(database.found.items()):
                for fingerprint in set(helped) - statements:
                    del helped[fingerprint]
                if not helped:
                    del database.found[spec]

    def _usage(self) -> dict[tuple[str, str], _Usage]:
        found: dict[tuple[str, str], _Usage] = {}
        for fingerprint, client, calls, seconds in self.stats.usage():
            if client[2] == APPLICATION_NAME:
                continue  # the advisor's own, had its dsn led through a pgwarden
            entry = found.setdefault((fingerprint, client[0]), _Usage())
            entry.calls += calls
            entry.time += seconds
            if seconds > entry.client_time:
                entry.client, entry.client_time = client, seconds
        return found

    async def _database(self, name: str) -> _Database | None:
        """The database's state with an open connection and a fresh signature, or None
        (logged once while it stays unreachable)."""
        database = self._databases.setdefault(name, _Database())
        try:
            if database.conn is None or database.conn.closed:
                database.conn = await connect(self.connection, name)
            planner = Planner(database.conn, self.budget, self._count)
            catalog = Catalog(planner)
            database.signature = await catalog.signature()
        except Exception as exc:
            if not database.failing:
                log.warning("advisor_unavailable", database=name, error=_error(exc))
            database.failing = True
            self._count("unavailable")
            if database.conn is not None:
                await database.conn.close()
                database.conn = None
            return None
        if database.failing:
            log.info("advisor_available", database=name)
            database.failing = False
        return database

    async def _look(
        self,
        database: _Database,
        name: str,
        fingerprint: str,
        options: MissingIndexOptions,
    ) -> list[IndexSpec]:
        """Examines one statement when it is due: new, the schema changed, or RECHECK
        passed. The indexes it was found to need are returned."""
        now = time.monotonic()
        seen = database.examined.get(fingerprint)
        if seen is not None and seen[0] == database.signature and now - seen[1] < RECHECK:
            return []
        held = self.samples.get(fingerprint)
        if held is None:
            return []
        info, samples = held
        planner = Planner(database.conn, self.budget, self._count)
        catalog = Catalog(planner)
        try:
            extensions = await catalog.extensions()
            if "hypopg" not in extensions and not database.hypopg_logged:
                database.hypopg_logged = True
                log.info(
                    "advisor_without_hypopg",
                    database=name,
                    action="only selective sequential scans on large tables, unverified",
                )
            types = tuple(oid for _, _, oid in samples[-1]) if samples else ()
            findings = await examine(planner, catalog, info, samples, types, options, extensions)
        except PlanError as exc:
            if exc.result != "unavailable":  # else examined again once it is back
                database.examined[fingerprint] = (database.signature, now)
            log.info(
                "advisor_explain_failed",
                database=name,
                fingerprint=fingerprint,
                result=exc.result,
                sqlstate=exc.sqlstate,
            )
            if exc.result == "unavailable" and database.conn is not None:
                await database.conn.close()
                database.conn = None
            return []
        except OverBudget:
            raise
        except Exception:  # a statement the advisor misreads must not stop the others
            database.examined[fingerprint] = (database.signature, now)
            log.exception("advisor_failed", database=name, fingerprint=fingerprint)
            return []
        database.examined[fingerprint] = (database.signature, now)
        for helped in database.found.values():
            helped.pop(fingerprint, None)
        specs = []
        for finding in findings:
            # an index already suggested that leads with these columns serves it too
            spec = finding.spec
            if spec not in database.found:
                spec = next((s for s in database.found if s.covers(spec)), spec)
            database.found.setdefault(spec, {})[fingerprint] = _Helped(
                fingerprint, info.normalized, finding
            )
            specs.append(spec)
        return specs

    def _count(self, result: str) -> None:
        self.metrics.advisor_explains.labels(result).inc()

    def _report(
        self,
        name: str,
        spec: IndexSpec,
        window: float,
        usage: dict[tuple[str, str], _Usage],
        recent: dict[tuple[str, str], float],
    ) -> None:
        # the statement the index was first found for leads, so the advice keeps its key
        # (rule, fingerprint, ...) as more statements join it
        helped = list(self._databases[name].found.get(spec, {}).values())
        if not helped:
            return
        now = [usage.get((h.fingerprint, name), _Usage()) for h in helped]
        spent = sum(recent.get((h.fingerprint, name), 0.0) for h in helped)
        self.sink.report(_advice(name, spec, helped, now, spent, window))


def _advice(
    name: str,
    spec: IndexSpec,
    helped: list[_Helped],
    usage: list[_Usage],
    recent: float,
    window: float,
) -> Advice:
    """The advice for `spec`, from its statements (`helped`, the first leading), their
    totals (`usage`, in the same order) and their time in this window (`recent`)."""
    first = helped[0]
    finding = first.finding
    total = sum(u.time for u in usage)
    busy = recent / window  # backends these statements kept busy, on average
    severity = "critical" if busy >= 0.5 else "warning" if busy >= 0.05 else "info"
    if not finding.verified and severity == "critical":
        severity = "warning"
    evidence: dict[str, int | float | str] = {
        "table_rows": int(finding.table_rows),
        "plan_node": finding.plan_node,
        "cost_before": round(finding.cost_before, 2),
    }
    if finding.cost_after is not None:
        evidence["cost_after"] = round(finding.cost_after, 2)
    if finding.generic_before is not None and finding.generic_after is not None:
        evidence["generic_cost_before"] = round(finding.generic_before, 2)
        evidence["generic_cost_after"] = round(finding.generic_after, 2)
    evidence["verified"] = finding.verified
    evidence["statements_helped"] = len(helped)
    evidence["statements_time_ms"] = round(total * 1000, 3)
    evidence["fingerprints"] = ",".join(h.fingerprint for h in helped)
    what = "that check" if finding.reason == "foreign key" else "this statement"
    if finding.verified and finding.cost_after is not None:
        proof = (
            f"With it as a hypothetical index (HypoPG) the planner's cost of {what} falls "
            f"from {finding.cost_before:.0f} to {finding.cost_after:.0f}."
        )
    else:
        unverified = (
            "HypoPG is not installed in this database"
            if spec.method == "btree"
            else f"HypoPG cannot build {spec.method.upper()} indexes"
        )
        proof = (
            f"Unverified ({unverified}): the plan of {what} reads all of about "
            f"{int(finding.table_rows)} rows to keep few of them."
        )
    why = {
        "foreign key": "the foreign key check run for every deleted row reads the whole table",
        "pattern": "the LIKE pattern starts with a wildcard (as the leading_wildcard rule says)",
        "containment": "jsonb containment is tested on every row",
        "sort": "rows are sorted to return only the first few",
        "join": "the join looks rows up by these columns",
        "filter": "the statement filters on these columns",
    }[first.finding.reason]
    others = f" It serves {len(helped) - 1} more statement(s) too." if len(helped) > 1 else ""
    client = usage[0].client
    return Advice(
        rule=_RULE,
        severity=severity,
        fingerprint=first.fingerprint,
        statement=first.statement,
        tables=(spec.relation,),
        count=sum(u.calls for u in usage),
        suggestion=f"Index {spec.describe()}: {why}. {proof}{others}",
        suggested_sql=spec.create_sql(),
        database=name,
        user=client[1],
        application_name=client[2],
        time_spent_s=recent,
        evidence=evidence,
    )


def _error(exc: Exception) -> str:
    """A connection failure as libpq words it (host, user, database; never a password)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

"""Advice: what a detector found, deduplicated, counted, logged and kept for /advice.

One JSON line per advice (structlog event "advice") the first time a (rule, fingerprint,
database, user, application_name) is seen and again once `advice.repeat_interval` has
passed, so a loop running all day stays visible without flooding the log. The application
is part of the key: the same loop in two services is two things to fix, for two teams.
Advice carries normalized SQL only: detectors never put a parameter value or literal
into it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.logs import get_logger

__all__ = ["FILTERS", "SEVERITIES", "Advice", "AdviceSink"]

SEVERITIES = ("info", "warning", "critical")
# the fields /advice and `pgwarden advice` filter on, each by equality
FILTERS = ("application_name", "database", "user", "rule", "severity")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}

log = get_logger("pgwarden.advice")


@dataclass(slots=True)
class Advice:
    rule: str
    severity: str
    fingerprint: str
    statement: str
    tables: tuple[str, ...]
    count: int
    suggestion: str
    suggested_sql: str | None
    database: str
    user: str
    application_name: str
    source: dict[str, str] | None = None
    time_spent_s: float = 0.0  # time the offending statements took in this burst
    # the figures that triggered it (counts, window, rows, bytes, durations), never a value
    evidence: dict[str, int | float | str] | None = None

    def fields(self) -> dict[str, Any]:
        data = asdict(self)
        data["tables"] = list(self.tables)
        data["evidence"] = dict(self.evidence) if self.evidence else {}
        data["time_spent_ms"] = round(data.pop("time_spent_s") * 1000, 3)
        return data


@dataclass(slots=True)
class _Entry:
    advice: Advice
    occurrences: int = 1
    total_time_s: float = 0.0
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    last_logged: float = 0.0

    def cost(self) -> tuple[int, float, int]:
        return (_RANK[self.advice.severity], self.total_time_s, self.occurrences)


class AdviceSink:
    """Shared by every session of the proxy; bounded to `max_entries` distinct advices."""

    def __init__(
        self,
        repeat_interval: float = 600.0,
        *,
        max_entries: int = 1000,
        on_report: Callable[[Advice], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repeat_interval = repeat_interval
        self.max_entries = max_entries
        self.on_report = on_report
        self.clock = clock
        self._entries: dict[tuple[str, str, str, str, str], _Entry] = {}

    def report(self, advice: Advice) -> None:
        key = (
            advice.rule,
            advice.fingerprint or advice.statement,
            advice.database,
            advice.user,
            advice.application_name,
        )
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_entries:
                cheapest = min(self._entries, key=lambda k: self._entries[k].cost())
                del self._entries[cheapest]
            entry = self._entries[key] = _Entry(advice)
        else:
            entry.occurrences += 1
            entry.last_seen = time.time()
            if _RANK[advice.severity] >= _RANK[entry.advice.severity]:
                entry.advice = advice
        entry.total_time_s += advice.time_spent_s
        if self.on_report is not None:
            self.on_report(advice)
        if entry.last_logged == 0.0 or now - entry.last_logged >= self.repeat_interval:
            entry.last_logged = now
            log.warning("advice", occurrences=entry.occurrences, **advice.fields())

    def snapshot(self, where: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Aggregated advice, most costly first (severity, then time spent, then count);
        only the advice whose fields equal all of `where`'s (names from FILTERS)."""
        ranked = sorted(self._entries.values(), key=_Entry.cost, reverse=True)
        out = []
        for entry in ranked:
            data = entry.advice.fields()
            if where and any(data[name] != value for name, value in where.items()):
                continue
            data["event"] = "advice"
            data["occurrences"] = entry.occurrences
            data["total_time_ms"] = round(entry.total_time_s * 1000, 3)
            data["first_seen"] = _iso(entry.first_seen)
            data["last_seen"] = _iso(entry.last_seen)
            out.append(data)
        return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

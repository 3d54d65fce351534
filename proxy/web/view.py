"""The advice and statements as people read them: ranked by time at stake, grouped by
application, each with its priority, where, evidence, fix and impact.

One view for the page, the HTML report and the Markdown report, so they never disagree.
It holds text as pgwarden got it (statements are client-controlled): each renderer
escapes for its own format. Bounded: at most `max_advice` advice and `max_statements`
statements, the rest counted, never listed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_ADVICE",
    "MAX_STATEMENTS",
    "PRIORITIES",
    "Group",
    "Item",
    "Statement",
    "View",
    "build_view",
    "duration",
    "number",
]

MAX_ADVICE = 200
MAX_STATEMENTS = 100
# severity -> the priority a report gives it
PRIORITIES = {"critical": "HIGH", "warning": "MEDIUM", "info": "LOW"}
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
# rules whose fix turns `count` round trips into one
BATCHING_RULES = frozenset({"n_plus_one", "insert_loop", "write_loop"})
NO_APPLICATION = "(no application_name)"


def duration(ms: float) -> str:
    """A duration for people: 0.42 ms, 340 ms, 1.2 s, 3.5 min, 2.1 h."""
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


def number(value: float) -> str:
    """A count with thousands separated, a fraction with at most 3 decimals."""
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def _figure(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return number(value)
    if isinstance(value, list | tuple):
        return ", ".join(_figure(part) for part in value)
    return str(value)


@dataclass(frozen=True)
class Item:
    """One advice, ranked."""

    rank: int
    anchor: str  # a stable, markup-safe id: the same advice keeps it across refreshes
    rule: str
    severity: str
    priority: str
    application: str
    database: str
    user: str
    tables: tuple[str, ...]
    fingerprint: str
    statement: str
    count: int
    occurrences: int
    time_at_stake_ms: float
    first_seen: str
    last_seen: str
    suggestion: str
    suggested_sql: str | None
    source: Mapping[str, str] | None
    evidence: tuple[tuple[str, str], ...]

    @property
    def round_trips_saved(self) -> int | None:
        """Round trips the fix saves each time the pattern runs (a batching fix only)."""
        if self.rule not in BATCHING_RULES:
            return None
        return max(self.count - 1, 0)

    @property
    def impact(self) -> str:
        text = (
            f"{duration(self.time_at_stake_ms)} spent in these statements so far, "
            f"{number(self.occurrences)} time{'s' if self.occurrences != 1 else ''}"
        )
        saved = self.round_trips_saved
        if saved:
            text += (
                f"; the fix saves {number(saved)} round trips each time "
                f"({number(saved * self.occurrences)} so far)"
            )
        return text


@dataclass(frozen=True)
class Group:
    """The advice of one application, costliest first."""

    application: str
    items: tuple[Item, ...]

    @property
    def label(self) -> str:
        return self.application or NO_APPLICATION

    @property
    def time_at_stake_ms(self) -> float:
        return sum(item.time_at_stake_ms for item in self.items)


@dataclass(frozen=True)
class Statement:
    """One tracked statement shape as one client ran it (/fingerprints)."""

    fingerprint: str
    statement: str
    command: str
    application: str
    database: str
    user: str
    calls: int
    total_ms: float
    rows: int
    errors: int

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class View:
    """Everything a page or report shows, and what it filters on."""

    items: tuple[Item, ...]
    groups: tuple[Group, ...]
    statements: tuple[Statement, ...]
    applications: tuple[str, ...]
    rules: tuple[str, ...]
    severities: tuple[str, ...]
    omitted_advice: int
    omitted_statements: int
    generated_at: str
    period: tuple[str, str] | None  # first and last time an advice was seen
    statements_seen: int  # calls, all tracked statements
    shapes_seen: int  # distinct fingerprints

    def by_priority(self) -> list[tuple[str, tuple[Item, ...]]]:
        """HIGH, MEDIUM, LOW, each with its items in rank order (empty ones left out)."""
        out = []
        for severity in ("critical", "warning", "info"):
            chosen = tuple(item for item in self.items if item.severity == severity)
            if chosen:
                out.append((PRIORITIES[severity], chosen))
        return out


def _anchor(advice: Mapping[str, Any]) -> str:
    key = "\0".join(
        str(advice.get(name, ""))
        for name in ("rule", "fingerprint", "database", "user", "application_name")
    )
    return "a-" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]


def _time_at_stake(advice: Mapping[str, Any]) -> tuple[float, int, int]:
    return (
        float(advice.get("total_time_ms") or 0.0),
        _SEVERITY_RANK.get(advice.get("severity", ""), 0),
        int(advice.get("occurrences") or 1),
    )


def _item(rank: int, a: Mapping[str, Any]) -> Item:
    evidence = a.get("evidence") or {}
    source = a.get("source")
    return Item(
        rank=rank,
        anchor=_anchor(a),
        rule=str(a["rule"]),
        severity=str(a["severity"]),
        priority=PRIORITIES.get(a["severity"], "LOW"),
        application=str(a.get("application_name") or ""),
        database=str(a.get("database") or ""),
        user=str(a.get("user") or ""),
        tables=tuple(str(t) for t in a.get("tables") or ()),
        fingerprint=str(a.get("fingerprint") or ""),
        statement=str(a.get("statement") or ""),
        count=int(a.get("count") or 0),
        occurrences=int(a.get("occurrences") or 1),
        time_at_stake_ms=float(a.get("total_time_ms") or 0.0),
        first_seen=str(a.get("first_seen") or ""),
        last_seen=str(a.get("last_seen") or ""),
        suggestion=str(a.get("suggestion") or ""),
        suggested_sql=a.get("suggested_sql") or None,
        source=dict(source) if isinstance(source, Mapping) else None,
        evidence=tuple((str(k).replace("_", " "), _figure(v)) for k, v in evidence.items()),
    )


def _statement(row: Mapping[str, Any]) -> Statement:
    return Statement(
        fingerprint=str(row.get("fingerprint") or ""),
        statement=str(row.get("statement") or ""),
        command=str(row.get("command") or ""),
        application=str(row.get("application_name") or ""),
        database=str(row.get("database") or ""),
        user=str(row.get("user") or ""),
        calls=int(row.get("calls") or 0),
        total_ms=float(row.get("total_time_ms") or 0.0),
        rows=int(row.get("rows") or 0),
        errors=int(row.get("errors") or 0),
    )


def _sorted_set(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(values)))


def build_view(
    advice: list[dict[str, Any]],
    fingerprints: list[dict[str, Any]],
    *,
    max_advice: int = MAX_ADVICE,
    max_statements: int = MAX_STATEMENTS,
    now: float | None = None,
) -> View:
    """The view of /advice and /fingerprints answers (their JSON entries)."""
    ranked = sorted(advice, key=_time_at_stake, reverse=True)
    items = tuple(_item(rank, a) for rank, a in enumerate(ranked[:max_advice], 1))
    by_app: dict[str, list[Item]] = {}
    for item in items:
        by_app.setdefault(item.application, []).append(item)
    groups = sorted(
        (Group(app, tuple(chosen)) for app, chosen in by_app.items()),
        key=lambda group: (group.time_at_stake_ms, len(group.items)),
        reverse=True,
    )
    rows = sorted(fingerprints, key=lambda row: float(row.get("total_time_ms") or 0), reverse=True)
    statements = tuple(_statement(row) for row in rows[:max_statements])
    seen = [(a["first_seen"], a["last_seen"]) for a in advice if a.get("first_seen")]
    return View(
        items=items,
        groups=tuple(groups),
        statements=statements,
        applications=_sorted_set(
            [i.application for i in items] + [s.application for s in statements]
        ),
        rules=_sorted_set(i.rule for i in items),
        severities=tuple(
            s for s in ("critical", "warning", "info") if s in {i.severity for i in items}
        ),
        omitted_advice=max(len(ranked) - max_advice, 0),
        omitted_statements=max(len(rows) - max_statements, 0),
        generated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        period=(min(s[0] for s in seen), max(s[1] for s in seen)) if seen else None,
        statements_seen=sum(int(row.get("calls") or 0) for row in fingerprints),
        shapes_seen=len({row.get("fingerprint") for row in fingerprints}),
    )

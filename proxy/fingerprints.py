"""Per-fingerprint statement counts and time, with a bounded set of Prometheus series.

Every statement costs one dict lookup and two additions here; series are built at scrape.
A fingerprint gets its own series when first seen while fewer than `max_series` exist
(most applications have fewer statement shapes than that); once they are taken, the
rest go to `fingerprint="other"`, and if the limit is raised the costliest of those (by
total time) are promoted at the next scrape. Series are never taken away, so every one
stays monotonic, as a counter must: counts made before a promotion stay in "other".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, Metric

__all__ = ["FingerprintStats"]

OTHER: Final = "other"


class _Entry:
    __slots__ = ("calls", "command", "labelled_calls", "labelled_time", "statement", "time")

    def __init__(self, statement: str, command: str) -> None:
        self.statement = statement
        self.command = command
        self.calls = 0
        self.time = 0.0
        self.labelled_calls = -1  # -1: folded into "other"; else counts since promotion
        self.labelled_time = 0.0


class FingerprintStats:
    """A Prometheus collector by duck typing (`collect` and `describe` are all a registry
    calls), as are those in proxy.metrics: mypyc cannot compile a subclass of
    prometheus_client's Collector, which it only knows as an opaque library class."""

    def __init__(self, max_series: int = 200, *, max_tracked: int | None = None) -> None:
        self.max_series = max_series
        self.max_tracked = max_tracked or max(1000, 10 * max_series)
        self._entries: dict[str, _Entry] = {}
        self._labelled = 0
        self._other_calls = 0
        self._other_time = 0.0

    def record(self, fingerprint: str, statement: str, command: str, seconds: float) -> None:
        entry = self._entries.get(fingerprint)
        if entry is None:
            if len(self._entries) >= self.max_tracked:
                self._forget_cheapest()
            entry = self._entries[fingerprint] = _Entry(statement, command)
            if self._labelled < self.max_series:  # a free series: exact from the start
                entry.labelled_calls = 0
                self._labelled += 1
        entry.calls += 1
        entry.time += seconds
        if entry.labelled_calls >= 0:
            entry.labelled_calls += 1
            entry.labelled_time += seconds
        else:
            self._other_calls += 1
            self._other_time += seconds

    def _forget_cheapest(self) -> None:
        """Drops the cheapest unlabelled tenth of the table (their counts stay in other)."""
        unlabelled = [(e.time, k) for k, e in self._entries.items() if e.labelled_calls < 0]
        unlabelled.sort()
        for _, key in unlabelled[: max(1, len(unlabelled) // 10)]:
            del self._entries[key]

    def _promote(self) -> None:
        free = self.max_series - self._labelled
        if free <= 0:
            return
        candidates = sorted(
            (e for e in self._entries.values() if e.labelled_calls < 0),
            key=lambda e: e.time,
            reverse=True,
        )
        for entry in candidates[:free]:
            entry.labelled_calls = 0
            entry.labelled_time = 0.0
            self._labelled += 1

    def collect(self) -> Iterator[Metric]:
        self._promote()
        calls = CounterMetricFamily(
            "pgwarden_fingerprint_queries",
            "Statements completed, by fingerprint (the costliest have their own series; "
            "see /fingerprints for their SQL)",
            labels=["fingerprint"],
        )
        seconds = CounterMetricFamily(
            "pgwarden_fingerprint_duration_seconds",
            "Time spent in statements, by fingerprint",
            labels=["fingerprint"],
        )
        for key, entry in self._entries.items():
            if entry.labelled_calls >= 0:
                calls.add_metric([key], entry.labelled_calls)
                seconds.add_metric([key], entry.labelled_time)
        calls.add_metric([OTHER], self._other_calls)
        seconds.add_metric([OTHER], self._other_time)
        yield calls
        yield seconds

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def snapshot(self) -> list[dict[str, Any]]:
        """Every tracked fingerprint with its SQL, costliest first (for /fingerprints)."""
        ranked = sorted(self._entries.items(), key=lambda kv: kv[1].time, reverse=True)
        return [
            {
                "fingerprint": key,
                "statement": e.statement,
                "command": e.command,
                "calls": e.calls,
                "total_time_ms": round(e.time * 1000, 3),
                "series": e.labelled_calls >= 0,
            }
            for key, e in ranked
        ]

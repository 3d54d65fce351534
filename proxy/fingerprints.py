"""Per-fingerprint statement counts and time, with a bounded set of Prometheus series.

Every statement costs two dict lookups and a few additions here; series are built at scrape.
Prometheus sees each fingerprint summed over every client, so its series stay one per
fingerprint; /fingerprints also splits them by client (database, user, application_name),
at most `max_tracked` rows, so a team can find its own statements.
A fingerprint gets its own series when first seen while fewer than `max_series` exist
(most applications have fewer statement shapes than that); once they are taken, the
rest go to `fingerprint="other"`, and if the limit is raised the costliest of those (by
total time) are promoted at the next scrape. Series are never taken away, so every one
stays monotonic, as a counter must: counts made before a promotion stay in "other".
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, InfoMetricFamily, Metric

from proxy.analysis.analyzer import StatementInfo
from proxy.tracking.events import StatementEvent

__all__ = ["FILTERS", "Client", "FingerprintStats", "ParamSamples", "Sample"]

OTHER: Final = "other"
STATEMENT_LABEL: Final = 200  # characters of SQL in pgwarden_fingerprint_info
# who ran a statement, from the session's startup packet
Client = tuple[str, str, str]  # (database, user, application_name)
FILTERS: Final = ("database", "user", "application_name")  # what /fingerprints filters on


class _Row:
    """One fingerprint as one client ran it."""

    __slots__ = ("calls", "errors", "rows", "time")

    def __init__(self) -> None:
        self.calls = 0
        self.time = 0.0
        self.rows = 0  # rows returned or changed, as the CommandComplete tags count them
        self.errors = 0


class _Entry:
    __slots__ = (
        "calls",
        "clients",
        "command",
        "labelled_calls",
        "labelled_time",
        "ran",
        "statement",
        "time",
    )

    def __init__(self, statement: str, command: str) -> None:
        self.statement = statement
        self.command = command
        self.calls = 0
        self.time = 0.0
        self.labelled_calls = -1  # -1: folded into "other"; else counts since promotion
        self.labelled_time = 0.0
        self.clients: dict[Client, _Row] = {}
        # ran without an error at least once: only then is its SQL in the metrics, where
        # SQL that only ever failed (a typo, a probe naming made-up columns) has no place
        self.ran = False


class FingerprintStats:
    """A Prometheus collector by duck typing (`collect` and `describe` are all a registry
    calls), as are those in proxy.metrics: mypyc cannot compile a subclass of
    prometheus_client's Collector, which it only knows as an opaque library class."""

    def __init__(self, max_series: int = 200, *, max_tracked: int | None = None) -> None:
        self.max_series = max_series
        self.max_tracked = max_tracked or max(1000, 10 * max_series)
        self._entries: dict[str, _Entry] = {}
        self._rows = 0  # (fingerprint, client) rows across the entries: at most max_tracked
        self._labelled = 0
        self._other_calls = 0
        self._other_time = 0.0

    def record(
        self,
        fingerprint: str,
        statement: str,
        command: str,
        seconds: float,
        client: Client,
        ok: bool = True,
        rows: int = 0,
    ) -> None:
        """One statement that took `seconds`, run by `client`; `ok`: without an error;
        `rows`: returned or changed."""
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
        if ok:
            entry.ran = True
        row = entry.clients.get(client)
        if row is None:
            if self._rows >= self.max_tracked:
                self._forget_cheapest_rows()
            row = entry.clients[client] = _Row()
            self._rows += 1
        row.calls += 1
        row.time += seconds
        row.rows += rows
        if not ok:
            row.errors += 1
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
            self._rows -= len(self._entries.pop(key).clients)

    def _forget_cheapest_rows(self) -> None:
        """Drops a tenth of the client rows, the cheapest, those of fingerprints with a
        series of their own last (the fingerprints' sums stay)."""
        rows = [
            (entry.labelled_calls >= 0, row.time, fingerprint, client)
            for fingerprint, entry in self._entries.items()
            for client, row in entry.clients.items()
        ]
        rows.sort()
        for _, _, fingerprint, client in rows[: max(1, len(rows) // 10)]:
            del self._entries[fingerprint].clients[client]
            self._rows -= 1

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
        info = InfoMetricFamily(
            "pgwarden_fingerprint",
            "The normalized SQL of each fingerprint that has its own series and ran "
            f"without an error (its first {STATEMENT_LABEL} characters)",
            labels=["fingerprint"],
        )
        for key, entry in self._entries.items():
            if entry.labelled_calls >= 0:
                calls.add_metric([key], entry.labelled_calls)
                seconds.add_metric([key], entry.labelled_time)
                if entry.ran:
                    info.add_metric([key], {"statement": _label(entry.statement)})
        calls.add_metric([OTHER], self._other_calls)
        seconds.add_metric([OTHER], self._other_time)
        yield calls
        yield seconds
        yield info

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def usage(self) -> Iterator[tuple[str, Client, int, float]]:
        """(fingerprint, client, calls, seconds) of every tracked row: what the index
        advisor ranks statements by."""
        for key, entry in self._entries.items():
            for client, row in entry.clients.items():
                yield key, client, row.calls, row.time

    def snapshot(self, where: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Every tracked fingerprint with its SQL, once per client that ran it, costliest
        first (for /fingerprints); only the rows whose client fields equal all of `where`'s
        (names from FILTERS)."""
        ranked: list[tuple[float, dict[str, Any]]] = []
        for key, e in self._entries.items():
            for (database, user, application_name), row in e.clients.items():
                client = {"database": database, "user": user, "application_name": application_name}
                if where and any(client[name] != value for name, value in where.items()):
                    continue
                data: dict[str, Any] = {
                    "fingerprint": key,
                    "statement": e.statement,
                    "command": e.command,
                    **client,
                    "calls": row.calls,
                    "total_time_ms": round(row.time * 1000, 3),
                    "rows": row.rows,
                    "errors": row.errors,
                    "series": e.labelled_calls >= 0,
                }
                ranked.append((row.time, data))
        ranked.sort(key=lambda item: item[0], reverse=True)
        return [data for _, data in ranked]


def _label(statement: str) -> str:
    """`statement` cut for a label value, as UTF-8 can carry it (text the client sent that
    was not UTF-8 keeps its undecodable bytes as surrogates, which no exposition encodes)."""
    return statement[:STATEMENT_LABEL].encode("utf-8", "replace").decode("utf-8")


# One parameter as a statement ran with it: (value, format code, type OID; 0 when the
# client left the type to the server). A Sample holds one per `$n` of the normalized text.
Value = tuple[bytes | None, int, int]
Sample = tuple[Value, ...]
_PLACEHOLDER: Final = re.compile(r"\$(\d+)")
_ADVISED: Final = frozenset({"SELECT", "UPDATE", "DELETE", "INSERT"})
_KEEP: Final = 3  # samples per fingerprint
_RESAMPLE: Final = 64  # once it has them, one more every this many runs (values change)


class _Samples:
    __slots__ = ("info", "runs", "values")

    def __init__(self, info: StatementInfo) -> None:
        self.info = info
        self.runs = 0
        self.values: list[Sample] = []


class ParamSamples:
    """The parameter values a few recent runs of each statement shape had, for the index
    advisor to plan with real values. Fed only while the advisor is on; held in memory
    only (never logged, shown or exported), at most `_KEEP` per fingerprint and
    `max_fingerprints` fingerprints, the least recently sampled leaving first."""

    def __init__(self, max_fingerprints: int = 2000) -> None:
        self.max_fingerprints = max_fingerprints
        self._entries: dict[str, _Samples] = {}

    def offer(self, event: StatementEvent) -> None:
        """One finished statement; sampled now and then, cheap otherwise."""
        info = event.info
        if info.command not in _ADVISED or event.sqlstate is not None or not info.fingerprint:
            return
        if info.command == "INSERT" and info.values_rows:
            return  # INSERT ... VALUES: no plan an index could change
        entry = self._entries.get(info.fingerprint)
        if entry is None:
            if len(self._entries) >= self.max_fingerprints:
                del self._entries[next(iter(self._entries))]
            entry = self._entries[info.fingerprint] = _Samples(info)
        entry.runs += 1
        if len(entry.values) >= _KEEP and entry.runs % _RESAMPLE:
            return
        sample = _sample(event)
        if sample is None:
            return
        if len(entry.values) >= _KEEP:
            entry.values.pop(0)
        entry.values.append(sample)
        del self._entries[info.fingerprint]  # the most recently sampled go last
        self._entries[info.fingerprint] = entry

    def get(self, fingerprint: str) -> tuple[StatementInfo, list[Sample]] | None:
        """The statement and its samples, newest last."""
        entry = self._entries.get(fingerprint)
        return None if entry is None else (entry.info, list(entry.values))


def _sample(event: StatementEvent) -> Sample | None:
    """The value of each `$n` of the normalized statement: Bind values, and the literals
    normalize() lifted out of the text as text values; None when one cannot be told."""
    info = event.info
    params = event.params() or ()
    types = event.param_types
    literals = event.parsed.literals
    if not literals:
        if len(params) != info.param_count:
            return None
        return tuple(
            (value, fmt, types[i] if i < len(types) else 0) for i, (value, fmt) in enumerate(params)
        )
    numbers = [int(n) for n in _PLACEHOLDER.findall(info.normalized)]
    if len(numbers) != len(literals):
        return None
    values: list[Value | None] = [None] * info.param_count
    for number, token in zip(numbers, literals, strict=True):
        if number > info.param_count:
            return None
        if token[:1] == "$" and token[1:].isdigit():
            index = int(token[1:]) - 1
            if index >= len(params):
                return None
            value, fmt = params[index]
            values[number - 1] = (value, fmt, types[index] if index < len(types) else 0)
        else:
            read = _literal(token)
            if read is None:
                return None
            values[number - 1] = (read[0], 0, 0)
    if any(v is None for v in values):
        return None
    return tuple(v for v in values if v is not None)


def _literal(token: str) -> tuple[bytes | None] | None:
    """A literal token's value as text (None for NULL), or None when it is a form not
    read here (E'' escapes, bit strings, dollar quoting, strings over several lines)."""
    token = token.strip()
    lower = token.lower()
    if lower == "null":
        return (None,)
    if lower in ("true", "false"):
        return (lower.encode(),)
    if len(token) >= 2 and token[0] == "'" and token[-1] == "'" and "\n" not in token:
        return (token[1:-1].replace("''", "'").encode("utf-8", "surrogateescape"),)
    number = token.replace(" ", "").replace("_", "")
    if number.lstrip("-").replace(".", "", 1).isdigit():
        return (number.encode(),)
    return None

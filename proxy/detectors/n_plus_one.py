"""n_plus_one: one-row lookups repeated with the keys of an earlier result, or in one transaction.

Proof, not suspicion: a burst of the same equality-lookup SELECT with different values,
each in its own round trip, is reported when its values are found in one column of an
earlier result on the same connection (the classic ORM lazy-load loop, reported with that
source), or when it ran inside one transaction. Independent autocommit lookups of random
keys, the shape of a pooled web connection, stay silent: nothing ties them together.
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
from proxy.detectors.bursts import Burst, Bursts
from proxy.detectors.values import canonical, literal_text
from proxy.rewriters.batching import batched_lookup_sql
from proxy.tracking.events import ResultSample, StatementEvent

__all__ = ["NPlusOne", "NPlusOneOptions"]

_MAX_SOURCES: Final = 16  # latest multi-row result of this many fingerprints kept as sources
# What the sources of one session may hold together, rows counted with what each costs
# beyond its bytes (its bytes object and list slot): an idle session keeps its sources, so
# this is most of what it costs (at 256 KiB a sample, 300 idle connections took 90 MB).
_SOURCE_BYTES: Final = 32 * 1024
_ROW_OVERHEAD: Final = 48
_MAX_DISTINCT: Final = 10_000


class _Source:
    """An earlier result whose column values may be the keys of a loop."""

    __slots__ = ("_sets", "fingerprint", "sample", "size", "statement")

    def __init__(self, event: StatementEvent, sample: ResultSample, size: int) -> None:
        self.fingerprint = event.info.fingerprint
        self.statement = event.info.normalized
        self.sample = sample
        self.size = size  # what its rows cost, as _SOURCE_BYTES counts
        self._sets: list[set[str]] | None = None

    def columns(self) -> list[set[str]]:
        """Each column's values in comparable form, decoded on first use only."""
        if self._sets is None:
            sets: list[set[str]] = [set() for _ in self.sample.columns]
            for index, column in enumerate(self.sample.columns):
                for raw in self.sample.column_values(index):
                    value = canonical(raw, column.format, column.type_oid)
                    if value is not None:
                        sets[index].add(value)
            self._sets = sets
        return self._sets


class _LookupBurst(Burst):
    __slots__ = ("distinct", "matches")

    def __init__(self, event: StatementEvent) -> None:
        super().__init__(event)
        self.distinct: list[set[str]] = [set() for _ in event.info.lookups]
        # (source fingerprint, source statement, column name, lookup index) -> matches
        self.matches: dict[tuple[str, str, str, int], int] = {}


@dataclass(frozen=True)
class NPlusOneOptions(DetectorOptions):
    min_repeats: int = field(default=5, metadata={"minimum": 2})


class NPlusOne(Detector):
    rule: ClassVar[str] = "n_plus_one"
    options_type: ClassVar[type[DetectorOptions]] = NPlusOneOptions

    def __init__(
        self,
        options: NPlusOneOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.min_repeats = options.min_repeats
        self._bursts: Bursts[_LookupBurst] = Bursts(_LookupBurst)
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._source_bytes = 0  # what the sources' rows cost together

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.parsed.info
        # An autocommit lookup with no earlier multi-row result to trace its value to can
        # prove nothing, so it costs nothing (the shape of most OLTP traffic).
        if (
            info.lookups
            and (event.transaction is not None or self._sources)
            and info.command == "SELECT"
            and not info.batched_lookup
            and event.sqlstate is None
        ):
            burst, ended = self._bursts.add(event)
            self._record(burst, event)
        elif event.transaction != self._bursts.transaction:
            ended = self._bursts.transaction_seen(event)
        else:
            ended = None
        sampled = event.sampled
        if sampled is not None and len(sampled) >= self.min_repeats:
            self._keep_source(event)
        return self._judge(ended) if ended else NO_ADVICE

    def tick(self, now: float) -> Sequence[Advice]:
        ended = self._bursts.quiet(now)
        return self._judge(ended) if ended else NO_ADVICE

    def session_end(self) -> Sequence[Advice]:
        return self._judge(self._bursts.close_all())

    # ------------------------------------------------------------------ state

    def _keep_source(self, event: StatementEvent) -> None:
        sample = event.result
        if sample is None or not sample.columns:
            return
        rows, size = _first_rows(sample.rows, _SOURCE_BYTES)
        if len(rows) < len(sample.rows):  # loops over its first rows can still be traced
            sample = ResultSample(sample.description, sample.bind, rows)
        key = event.info.fingerprint
        sources = self._sources
        replaced = sources.pop(key, None)
        if replaced is not None:
            self._source_bytes -= replaced.size
        sources[key] = _Source(event, sample, size)
        self._source_bytes += size
        # the oldest go first; the newest alone fits
        while len(sources) > _MAX_SOURCES or self._source_bytes > _SOURCE_BYTES:
            self._source_bytes -= sources.popitem(last=False)[1].size

    def _values(self, event: StatementEvent) -> list[str | None]:
        return [_param_text(event, lookup.param) for lookup in event.info.lookups]

    def _record(self, burst: _LookupBurst, event: StatementEvent) -> None:
        fingerprint = event.info.fingerprint
        for index, value in enumerate(self._values(event)):
            if value is None:
                continue
            if len(burst.distinct[index]) < _MAX_DISTINCT:
                burst.distinct[index].add(value)
            for source in self._sources.values():
                if source.fingerprint == fingerprint:
                    continue
                for col, values in enumerate(source.columns()):
                    if value in values:
                        name = source.sample.columns[col].name
                        key = (source.fingerprint, source.statement, name, index)
                        burst.matches[key] = burst.matches.get(key, 0) + 1

    # ------------------------------------------------------------------ verdict

    def _judge(self, bursts: list[_LookupBurst]) -> list[Advice]:
        out = []
        for burst in bursts:
            advice = self._verdict(burst)
            if advice is not None:
                out.append(advice)
        return out

    def _verdict(self, burst: _LookupBurst) -> Advice | None:
        n = burst.count
        if n < self.min_repeats or len(burst.round_trips) < self.min_repeats:
            return None
        event = burst.template
        lookups = event.info.lookups
        varying = max(range(len(lookups)), key=lambda i: len(burst.distinct[i]))
        if len(burst.distinct[varying]) < self.min_repeats:
            return None
        source = None
        if burst.matches:
            key, hits = max(burst.matches.items(), key=lambda kv: kv[1])
            if hits >= self.min_repeats and hits >= 0.8 * n:
                source = key
                varying = key[3]
        if source is None and burst.transaction is None:
            return None  # independent autocommit lookups: nothing proves a loop
        lookup = lookups[varying]
        table = lookup.table or (event.info.tables[0] if event.info.tables else "the table")
        if source is not None:
            suggestion = (
                f"{n} lookups of {table} by {lookup.column}, one round trip each, using the "
                f"{source[2]} values of an earlier query. Fetch them in one query: pass those "
                f"values as one array to suggested_sql, or JOIN {table} into the query that "
                "produced them (in an ORM, eager loading such as selectinload or joinedload)."
            )
        else:
            suggestion = (
                f"{n} lookups of {table} by {lookup.column} in one transaction, one round trip "
                "each. Collect the keys and fetch all rows in one query: suggested_sql takes "
                "them as one array."
            )
        info = event.info
        # An ORM's "find one" (`LIMIT 1` per key, TypeORM's findOne): the batch drops it
        one_row = info.limit_param > 0 and _param_text(event, info.limit_param) == "1"
        suggested = batched_lookup_sql(info.normalized, lookup.param, drop_limit=one_row)
        if one_row and suggested is not None:
            suggestion += " Each lookup asked for one row (LIMIT 1): the batch has no LIMIT."
        severity = "critical" if n >= 20 * self.min_repeats else "warning"
        return self.advice(
            event,
            severity=severity,
            count=n,
            suggestion=suggestion,
            suggested_sql=suggested,
            source=(
                {"fingerprint": source[0], "statement": source[1], "column": source[2]}
                if source
                else None
            ),
            time_spent_s=burst.time_spent,
            evidence={
                "statements": n,
                "round_trips": len(burst.round_trips),
                "window_s": round(burst.last - burst.first, 3),
                "time_ms": round(burst.time_spent * 1000, 3),
                "in_transaction": burst.transaction is not None,
                "distinct_keys": len(burst.distinct[varying]),
            },
        )


def _param_text(event: StatementEvent, number: int) -> str | None:
    """`$number`'s value in comparable text form: a Bind value, or a literal that
    normalize() lifted (numbered after the statement's own parameters); in memory only."""
    params = event.params()
    if params is not None and number <= len(params):
        raw, fmt = params[number - 1]
        types = event.param_types
        return canonical(raw, fmt, types[number - 1] if number <= len(types) else 0)
    literals = event.parsed.literals
    if not literals:
        return None
    offset = max((int(t[1:]) for t in literals if t[:1] == "$" and t[1:].isdigit()), default=0)
    constants = [t for t in literals if not (t[:1] == "$" and t[1:].isdigit())]
    index = number - offset - 1
    return literal_text(constants[index]) if 0 <= index < len(constants) else None


def _first_rows(rows: list[bytes], budget: int) -> tuple[list[bytes], int]:
    """The first of `rows` that cost at most `budget` together, and what they cost."""
    cost = 0
    for index, row in enumerate(rows):
        more = len(row) + _ROW_OVERHEAD
        if cost + more > budget:
            return rows[:index], cost
        cost += more
    return rows, cost

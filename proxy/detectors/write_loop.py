"""write_loop: the same UPDATE or DELETE by key run again and again, one key at a time.

Proof, not suspicion: a burst (one transaction, or statements on one connection with no
pause over a second) of one statement shape whose WHERE is an equality on a key (`col =
$n`, or `col IN ($n)` as TypeORM writes it), run `min_repeats` times with at least that
many different keys. The same key written over and over is not a loop to batch and stays
silent. Key values are compared in memory as hashes, never kept or shown. The advice
carries one statement that does the whole loop: `col = ANY($n)` when only the key
differed between the rows, else a join with the unnested arrays of every parameter.
"""

from __future__ import annotations

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
from proxy.rewriters.batching import any_key_write_sql, unnest_write_sql
from proxy.tracking.events import StatementEvent

__all__ = ["WriteLoop", "WriteLoopOptions"]

_MAX_DISTINCT: Final = 10_000
# type OIDs a literal lifted out of a simple-protocol statement is taken to be, by its form
_BIGINT, _NUMERIC, _BOOLEAN = 20, 1700, 16


def _is_placeholder(token: str) -> bool:
    return token[:1] == "$" and token[1:].isdigit()


def _param_values(event: StatementEvent) -> list[bytes | str | None]:
    """Every `$n`'s value, raw (Bind bytes or literal token), in parameter order: the
    statement's own parameters, then the literals normalize() numbered after them."""
    params = event.params()
    values: list[bytes | str | None] = [raw for raw, _ in params] if params else []
    literals = event.parsed.literals
    if literals:
        values.extend(token for token in literals if not _is_placeholder(token))
    return values


def _literal_types(event: StatementEvent) -> dict[int, int]:
    """Type OIDs for the lifted literals whose form tells their type (numbers, booleans)."""
    literals = event.parsed.literals
    if not literals:
        return {}
    offset = max((int(t[1:]) for t in literals if _is_placeholder(t)), default=0)
    types: dict[int, int] = {}
    constants = [t.strip() for t in literals if not _is_placeholder(t)]
    for index, token in enumerate(constants):
        digits = token.lstrip("-")
        if digits.isdigit():
            types[offset + index + 1] = _BIGINT
        elif digits.replace(".", "", 1).isdigit():
            types[offset + index + 1] = _NUMERIC
        elif token.lower() in ("true", "false"):
            types[offset + index + 1] = _BOOLEAN
    return types


class _WriteBurst(Burst):
    __slots__ = ("first_key", "keys", "others", "others_vary", "varying")

    def __init__(self, event: StatementEvent) -> None:
        super().__init__(event)
        self.keys: set[int] = set()  # hashes of each execution's key values
        self.first_key: tuple[int, ...] | None = None  # hash of each key value, first run
        self.varying = [False] * len(event.info.lookups)  # per lookup: did its value change
        self.others: int | None = None  # hash of the first execution's other values
        self.others_vary = False


@dataclass(frozen=True)
class WriteLoopOptions(DetectorOptions):
    min_repeats: int = field(default=10, metadata={"minimum": 2})


class WriteLoop(Detector):
    rule: ClassVar[str] = "write_loop"
    options_type: ClassVar[type[DetectorOptions]] = WriteLoopOptions

    def __init__(
        self,
        options: WriteLoopOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.min_repeats = options.min_repeats
        self._bursts: Bursts[_WriteBurst] = Bursts(_WriteBurst)

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.parsed.info
        if (
            info.lookups
            and (info.command == "UPDATE" or info.command == "DELETE")
            and event.sqlstate is None
        ):
            burst, ended = self._bursts.add(event)
            self._record(burst, event)
        elif event.transaction != self._bursts.transaction:
            ended = self._bursts.transaction_seen(event)
        else:
            return NO_ADVICE
        return self._judge(ended) if ended else NO_ADVICE

    def tick(self, now: float) -> Sequence[Advice]:
        ended = self._bursts.quiet(now)
        return self._judge(ended) if ended else NO_ADVICE

    def session_end(self) -> Sequence[Advice]:
        return self._judge(self._bursts.close_all())

    def _record(self, burst: _WriteBurst, event: StatementEvent) -> None:
        values = _param_values(event)
        lookups = event.info.lookups
        key_params = [lookup.param for lookup in lookups]
        key = tuple(hash(values[p - 1]) if p <= len(values) else 0 for p in key_params)
        if len(burst.keys) < _MAX_DISTINCT:
            burst.keys.add(hash(key))
        others = hash(tuple(v for i, v in enumerate(values) if i + 1 not in key_params))
        first = burst.first_key
        if first is None:
            burst.first_key, burst.others = key, others
            return
        burst.others_vary = burst.others_vary or others != burst.others
        for index, value in enumerate(key):
            if value != first[index]:
                burst.varying[index] = True

    def _judge(self, bursts: list[_WriteBurst]) -> list[Advice]:
        out = []
        for burst in bursts:
            if burst.count >= self.min_repeats and len(burst.keys) >= self.min_repeats:
                out.append(self._verdict(burst))
        return out

    def _verdict(self, burst: _WriteBurst) -> Advice:
        event = burst.template
        info = event.info
        n = burst.count
        round_trips = len(burst.round_trips)
        pipelined = n / max(1, round_trips) >= 2
        table = info.target or (info.tables[0] if info.tables else "the table")
        varying = [lk for lk, changed in zip(info.lookups, burst.varying, strict=True) if changed]
        keys = ", ".join(lookup.column for lookup in (varying or info.lookups))
        suggested: str | None = None
        how = ""
        if len(varying) == 1 and not burst.others_vary:
            suggested = any_key_write_sql(info.normalized, varying[0].param)
            how = f"${varying[0].param} takes all the keys as one array"
        if suggested is None:
            types = {i + 1: oid for i, oid in enumerate(event.param_types) if oid}
            types.update(_literal_types(event))
            suggested = unnest_write_sql(info.normalized, types)
            how = "each parameter an array of the loop's values, one element per row, each key once"
            untyped = [n for n in range(1, info.param_count + 1) if n not in types]
            if suggested is not None and any(f"CAST(${n} AS text[])" in suggested for n in untyped):
                how += "; text[] where the client left a parameter's type to the server: use "
                how += "the column's type"
        verb = info.command
        if pipelined:
            what = (
                f"{n} {verb}s of {table} by {keys} were sent as a pipelined batch: the round "
                "trips are saved, but each row is still a statement."
            )
        else:
            where = (
                "in one transaction"
                if burst.transaction is not None
                else "one after another, each its own transaction"
            )
            what = f"{n} {verb}s of {table} by {keys} {where}, one round trip each."
        fix = (
            f" Do them in one statement: suggested_sql does the whole loop ({how})."
            if suggested is not None
            else f" Do them in one statement taking the {keys} values as arrays."
        )
        return self.advice(
            event,
            severity="info" if pipelined else "warning",
            count=n,
            suggestion=what + fix,
            suggested_sql=suggested,
            time_spent_s=burst.time_spent,
            evidence={
                "statements": n,
                "round_trips": round_trips,
                "window_s": round(burst.last - burst.first, 3),
                "time_ms": round(burst.time_spent * 1000, 3),
                "in_transaction": burst.transaction is not None,
                "distinct_keys": len(burst.keys),
            },
        )

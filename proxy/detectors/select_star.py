"""select_star: `SELECT *` (or `t.*`) whose rows are wide, the ORM's "load the whole entity"
when a few columns are used: a large JSONB or text column travels with every row.

Proof from the traffic: the statement's target list has a star (parse tree), and its rows
averaged at least `min_row_bytes` on the wire (bytes returned / row count). The columns
that make the rows wide are measured from the sampled DataRows: the length of each value,
never the value. Judged at most once a minute per statement shape and session, and only
once a result crossed the threshold: a narrow `SELECT *` costs one comparison.
"""

from __future__ import annotations

import struct
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
from proxy.rewriters.projection import explicit_columns_sql
from proxy.tracking.events import StatementEvent

__all__ = ["SelectStar", "SelectStarOptions"]


@dataclass(frozen=True)
class SelectStarOptions(DetectorOptions):
    min_row_bytes: int = field(default=2048, metadata={"minimum": 1})


_REJUDGE: Final = 60.0  # seconds before the same statement shape is judged again
_MAX_JUDGED: Final = 64  # statement shapes remembered per session
_MAX_WIDE: Final = 3  # columns named as the widest
_WIDE_SHARE: Final = 4  # a column is wide when it carries at least 1/4 of a row...
_WIDE_BYTES: Final = 64  # ...and at least this many bytes
_INT16: Final = struct.Struct("!h")
_INT32: Final = struct.Struct("!i")


def _value_lengths(raw: bytes) -> list[int]:
    """The byte length of each value of a DataRow body (NULL: 0), without copying them."""
    (count,) = _INT16.unpack_from(raw, 0)
    lengths = []
    pos = 2
    for _ in range(count):
        (length,) = _INT32.unpack_from(raw, pos)
        pos += 4
        if length > 0:
            pos += length
            lengths.append(length)
        else:
            lengths.append(0)
    return lengths


def _column_sizes(event: StatementEvent) -> list[tuple[str, float]]:
    """(name, average bytes) of each result column over the sampled rows, widest first."""
    result = event.result
    if result is None or not result.rows:
        return []
    names = [c.name for c in result.columns]
    totals = [0] * len(names)
    try:
        for raw in result.rows:
            for i, length in enumerate(_value_lengths(raw)[: len(names)]):
                totals[i] += length
    except struct.error:
        return []
    sampled = len(result.rows)
    sizes = [(name, total / sampled) for name, total in zip(names, totals, strict=True)]
    sizes.sort(key=lambda size: size[1], reverse=True)
    return sizes


def _bytes(size: float) -> str:
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size:.0f} B"


class SelectStar(Detector):
    rule: ClassVar[str] = "select_star"
    options_type: ClassVar[type[DetectorOptions]] = SelectStarOptions

    def __init__(
        self,
        options: SelectStarOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.min_row_bytes = options.min_row_bytes
        self._judged: dict[str, float] = {}  # fingerprint -> when last judged

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.info
        if not info.select_star or event.bytes_returned < self.min_row_bytes:
            return NO_ADVICE  # not even one wide row: no need to read the tag
        if event.sqlstate is not None:
            return NO_ADVICE
        rows = event.rows
        if not rows or event.bytes_returned < rows * self.min_row_bytes:
            return NO_ADVICE
        judged = self._judged
        last = judged.get(info.fingerprint)
        if last is not None and event.finished - last < _REJUDGE:
            return NO_ADVICE
        judged.pop(info.fingerprint, None)
        if len(judged) >= _MAX_JUDGED:
            del judged[next(iter(judged))]
        judged[info.fingerprint] = event.finished
        return [self._judge(event, rows)]

    def _judge(self, event: StatementEvent, rows: int) -> Advice:
        average = event.bytes_returned / rows
        sizes = _column_sizes(event)
        row = sum(size for _, size in sizes)
        wide = [
            (name, size)
            for name, size in sizes[:_MAX_WIDE]
            if size >= _WIDE_BYTES and size * _WIDE_SHARE >= row
        ]
        evidence: dict[str, int | float | str] = {
            "avg_row_bytes": round(average),
            "rows": rows,
            "bytes": event.bytes_returned,
        }
        suggested: str | None = None
        if wide:
            names = ", ".join(f"{n} ({_bytes(s)} a row)" for n, s in wide)
            evidence["widest_columns"] = ", ".join(f"{n} {round(s)} B" for n, s in wide)
            columns = tuple(c.name for c in event.result.columns) if event.result else ()
            suggested = explicit_columns_sql(
                event.info.normalized, columns, frozenset(name for name, _ in wide)
            )
            listed = (
                "suggested_sql lists them without the widest"
                if suggested is not None
                else "the star cannot be expanded unambiguously here: name them yourself"
            )
            fix = (
                f"Most of that is {names}: select only the columns the code uses ({listed}), "
                "and load the wide ones where they are needed (in an ORM, deferred or "
                "lazy-loaded columns)."
            )
        elif sizes:
            largest = ", ".join(f"{n} ({_bytes(s)})" for n, s in sizes[:_MAX_WIDE])
            evidence["widest_columns"] = ", ".join(
                f"{n} {round(s)} B" for n, s in sizes[:_MAX_WIDE]
            )
            fix = f"No one column dominates (largest: {largest}): list the columns the code uses."
        else:
            fix = "Its rows were too large to sample: list the columns the code uses."
        evidence["sampled_rows"] = len(event.sampled or ())
        return self.advice(
            event,
            severity="warning",
            count=1,
            suggestion=(
                f"SELECT * returned {rows} rows averaging {_bytes(average)} each, every "
                f"column of every row sent whether the code reads it or not. {fix}"
            ),
            suggested_sql=suggested,
            time_spent_s=event.duration,
            evidence=evidence,
        )

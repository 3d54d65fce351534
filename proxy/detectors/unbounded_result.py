"""unbounded_result: a SELECT without LIMIT/FETCH FIRST that returned `min_rows` rows or
more: a list endpoint that reads, sends and holds the whole table, growing with it.

Proof from the traffic: the parse tree has no top-level LIMIT, and the CommandComplete
counted the rows sent to the client (a RowDescription came: `SELECT ... INTO` sends none).
Left alone: catalog reads, cursors (FETCH is not a SELECT) and results a driver fetches in
chunks through a suspended portal (it is paginating already), including the last chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

from proxy.advice import Advice
from proxy.analysis.analyzer import Parsed
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.rewriters.projection import paginated_sql
from proxy.tracking.events import StatementEvent

__all__ = ["UnboundedResult", "UnboundedResultOptions"]


@dataclass(frozen=True)
class UnboundedResultOptions(DetectorOptions):
    min_rows: int = field(default=1000, metadata={"minimum": 1})


_ROW_BYTES: Final = 7  # the smallest DataRow on the wire: type, length, column count


def _size(size: int) -> str:
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size} B"


class UnboundedResult(Detector):
    rule: ClassVar[str] = "unbounded_result"
    options_type: ClassVar[type[DetectorOptions]] = UnboundedResultOptions

    def __init__(
        self,
        options: UnboundedResultOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.min_rows = options.min_rows
        self.min_bytes = options.min_rows * _ROW_BYTES
        # the statement and Bind of the last portal suspended (fetched in chunks): the
        # Execute that completes it is its last chunk, not a result of its own
        self._chunked: tuple[Parsed, bytes | None] | None = None

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        info = event.info
        if info.command != "SELECT" or info.has_limit:
            return NO_ADVICE
        if event.portal_suspended:
            self._chunked = (event.parsed, event.bind)
            return NO_ADVICE
        chunked = self._chunked
        if chunked is not None and chunked[0] is event.parsed and chunked[1] is event.bind:
            self._chunked = None
            return NO_ADVICE
        if event.bytes_returned < self.min_bytes:
            return NO_ADVICE  # too few bytes for min_rows rows: no need to read the tag
        rows = event.rows
        if (
            rows is None
            or rows < self.min_rows
            or event.sqlstate is not None
            or event.description is None
            or info.catalog_only
        ):
            return NO_ADVICE
        built = paginated_sql(info.normalized, info.param_count)
        suggested, keyset = built if built is not None else (None, ())
        limit = f"${info.param_count + len(keyset) + 1}"
        if keyset:
            first = info.param_count + 1
            params = ", ".join(f"${first + i}" for i in range(len(keyset)))
            fix = (
                f"Paginate by key: suggested_sql reads one page of {limit} rows after the "
                f"last row seen, whose {', '.join(keyset)} you pass as {params} (end the "
                "ORDER BY with a unique column so no row is skipped)."
            )
        else:
            fix = (
                "Paginate by key: ORDER BY a unique column, read pages of LIMIT "
                f"{limit} rows (suggested_sql) and ask for the next with `WHERE key > "
                "last key seen`; or, when every row is needed, stream them through a "
                "server-side cursor."
            )
        return [
            self.advice(
                event,
                severity="warning",
                count=1,
                suggestion=(
                    f"This SELECT has no LIMIT and returned {rows} rows "
                    f"({_size(event.bytes_returned)}): all read, sent and held in memory at "
                    f"once, more as the table grows. {fix}"
                ),
                suggested_sql=suggested,
                time_spent_s=event.duration,
                evidence={
                    "rows": rows,
                    "bytes": event.bytes_returned,
                    "duration_ms": round(event.duration * 1000, 3),
                },
            )
        ]

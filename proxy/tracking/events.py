"""What the tracker reports: one StatementEvent per finished statement, and what runs now.

Events are built on the analysis path, one per statement, so they carry raw bytes (the
RowDescription, sampled DataRows, the Bind) and decode them only when a detector asks.
Parameter values live in memory only and are never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.analysis.analyzer import Parsed, StatementInfo
from proxy.protocol import messages as m

__all__ = ["ResultSample", "Running", "StatementEvent"]


class ResultSample:
    """The first rows of a result, kept raw and decoded only if a detector asks."""

    __slots__ = ("_columns", "bind", "description", "rows")

    def __init__(
        self, description: bytes, bind: bytes | None = None, rows: list[bytes] | None = None
    ) -> None:
        self.description = description  # the RowDescription body
        self.rows: list[bytes] = rows if rows is not None else []  # raw DataRow bodies
        self._columns: tuple[m.Column, ...] | None = None
        # the Bind whose result formats apply, when the description came from Describe S
        self.bind = bind

    @property
    def columns(self) -> tuple[m.Column, ...]:
        if self._columns is None:
            try:
                columns = m.RowDescription.decode(self.description).columns
                if self.bind is not None:
                    columns = _with_formats(columns, m.Bind.decode(self.bind).result_formats)
                self._columns = columns
            except ValueError:
                self._columns = ()
        return self._columns

    def column_values(self, index: int) -> list[bytes | None]:
        values = []
        for raw in self.rows:
            row = m.DataRow.decode(raw).values
            if index < len(row):
                values.append(row[index])
        return values


class StatementEvent:
    """One finished statement.

    One is built per statement on the relay path, so its constructor sets only what every
    statement has; the rest are class-level defaults until a reply sets them.
    """

    finished = 0.0
    # its RowDescription, once known, and the Bind whose formats apply (Describe S)
    description: bytes | None = None
    formats_bind: bytes | None = None
    sampled: list[bytes] | None = None  # the first DataRows, kept raw
    sample_size = 0
    tag: bytes | None = None  # the CommandComplete tag, NUL included
    bytes_returned = 0
    sqlstate: str | None = None
    round_trip_statements = 1
    transaction: int | None = None
    portal_suspended = False
    # its reply came in one piece with a later statement's, so its own duration is unknown
    # (PostgreSQL holds pipelined replies until Sync or Flush)
    reply_batched = False
    _result: ResultSample | None = None
    _params: tuple[tuple[bytes | None, int], ...] | None = None

    def __init__(
        self,
        parsed: Parsed,
        sent: float,
        started: float,
        bind: bytes | None = None,  # raw Bind body, decoded on demand
        param_types: tuple[int, ...] = (),
        round_trip: int = 0,
    ) -> None:
        self.parsed = parsed
        self.sent = sent
        self.started = started
        self.bind = bind
        self.param_types = param_types
        self.round_trip = round_trip

    def __repr__(self) -> str:
        return f"StatementEvent({self.parsed!r}, rows={self.rows}, sqlstate={self.sqlstate})"

    @property
    def info(self) -> StatementInfo:
        return self.parsed.info

    @property
    def duration(self) -> float:
        return max(0.0, self.finished - self.started)

    @property
    def result(self) -> ResultSample | None:
        """The first rows of its result and their columns, when the columns are known."""
        if self._result is None and self.description is not None:
            self._result = ResultSample(self.description, self.formats_bind, self.sampled)
        return self._result

    @property
    def rows(self) -> int | None:
        """The row count of the CommandComplete tag ("SELECT 5"), if it has one ("BEGIN")."""
        if self.tag is None:
            return None
        _, space, count = self.tag[:-1].rpartition(b" ")
        return int(count) if space and count.isdigit() else None

    def params(self) -> tuple[tuple[bytes | None, int], ...] | None:
        """(value, format) of each Bind parameter, or None when not known."""
        if self._params is None and self.bind is not None:
            self._params = _bind_params(self.bind)
        return self._params


@dataclass(frozen=True, slots=True)
class Running:
    """What the server is executing, as far as the replies seen so far tell."""

    event: StatementEvent
    started: float
    later: tuple[StatementInfo, ...] = ()  # the rest of a multi-statement Query


def _with_formats(columns: tuple[m.Column, ...], formats: tuple[int, ...]) -> tuple[m.Column, ...]:
    """Columns as a Bind's result format codes deliver them (none: text, one: all)."""
    if len(formats) > 1 and len(formats) != len(columns):
        raise ValueError("result format codes do not match the columns")
    return tuple(
        replace(c, format=formats[i] if len(formats) > 1 else formats[0] if formats else 0)
        for i, c in enumerate(columns)
    )


def _bind_params(raw: bytes) -> tuple[tuple[bytes | None, int], ...] | None:
    """(value, format code) of each parameter of a Bind body, or None if it is malformed."""
    try:
        bind = m.Bind.decode(raw)
    except ValueError:
        return None
    return tuple((v, bind.param_format(i)) for i, v in enumerate(bind.params))

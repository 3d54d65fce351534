"""StatementTracker: attributes every server reply to the statement that caused it.

Follows the protocol exactly, with a queue of the replies the server owes, in the order the
client asked for them: simple Query (several statements, an error ends the rest), the
extended protocol with pipelining (Parse/Bind/Describe/Execute/Close/Sync, named
statements and portals, everything after an error discarded until Sync), COPY both ways,
and the transaction status of each ReadyForQuery. Statements are reported when their round
trip ends, so each event knows how many statements shared the round trip and whether it
ran inside a transaction.

Sans-I/O: it sees decoded frames and a clock reading, nothing else. Parameter values are
held in memory only, for the detectors, and never logged.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from proxy.analysis.analyzer import Analyzer, Parsed, StatementInfo
from proxy.protocol import messages as m
from proxy.protocol.framing import interest_table

__all__ = [
    "CLIENT_INTEREST",
    "SERVER_INTEREST",
    "ResultSample",
    "Running",
    "StatementEvent",
    "StatementTracker",
]

CLIENT_INTEREST = interest_table(type_only=b"XHdcf", body=b"QPBEDCSF")
SERVER_INTEREST = interest_table(type_only=b"123nsIGHWcV", body=b"ZECTDt")

_MAX_PREPARED = 2000  # named statements remembered per session
_MAX_PORTALS = 200
_MAX_QUEUE = 10000  # replies owed before the tracker gives up on a runaway pipeline
_MAX_PENDING_EVENTS = 1000
_SAMPLE_ROWS = 1000
_SAMPLE_BYTES = 256 * 1024
_MAX_PARAM_BYTES = 8192  # larger Bind messages keep no parameter values
_I16 = struct.Struct("!h")


@dataclass(slots=True)
class ResultSample:
    """The first rows of a result, kept raw and decoded only if a detector asks."""

    description: bytes = b""  # the RowDescription body
    rows: list[bytes] = field(default_factory=list)
    size: int = 0
    _columns: tuple[m.Column, ...] | None = None
    # the Bind whose result formats apply, when the description came from Describe S
    bind: bytes | None = field(default=None, repr=False)

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


@dataclass(slots=True)
class StatementEvent:
    """One finished statement."""

    parsed: Parsed
    sent: float
    started: float
    finished: float = 0.0
    bind: bytes | None = field(default=None, repr=False)  # raw Bind body, decoded on demand
    param_types: tuple[int, ...] = ()
    rows: int | None = None
    bytes_returned: int = 0
    sqlstate: str | None = None
    round_trip: int = 0
    round_trip_statements: int = 1
    transaction: int | None = None
    result: ResultSample | None = None
    portal_suspended: bool = False
    # its reply came in one piece with a later statement's, so its own duration is unknown
    # (PostgreSQL holds pipelined replies until Sync or Flush)
    reply_batched: bool = False
    _params: tuple[tuple[bytes | None, int], ...] | None = field(default=None, repr=False)

    @property
    def info(self) -> StatementInfo:
        return self.parsed.info

    @property
    def duration(self) -> float:
        return max(0.0, self.finished - self.started)

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


@dataclass(slots=True)
class _Prepared:
    parsed: Parsed
    param_types: tuple[int, ...]
    description: bytes | None = None  # RowDescription of Describe S: formats not bound yet


@dataclass(slots=True)
class _Portal:
    prepared: _Prepared
    bind: bytes | None
    description: bytes | None = None  # RowDescription of Describe P: formats final
    awaiting: StatementEvent | None = None  # an Execute sent before the Describe P reply

    def sample(self) -> ResultSample | None:
        """An empty sample for an Execute of this portal, when its columns are known."""
        if self.description is not None:
            return ResultSample(self.description)
        if self.prepared.description is not None and self.bind is not None:
            return ResultSample(self.prepared.description, bind=self.bind)
        return None


@dataclass(slots=True)
class _QueryRun:
    statements: tuple[Parsed, ...]
    sent: float
    round_trip: int
    index: int = 0
    current: StatementEvent | None = None


class StatementTracker:
    """Feed it client and server frames in stream order; it calls `emit` per statement."""

    def __init__(
        self,
        analyzer: Analyzer,
        emit: Callable[[list[StatementEvent]], None],
        clock: Callable[[], float],
    ) -> None:
        self.analyzer = analyzer
        self.emit = emit
        self.clock = clock
        self.status = b"I"
        self._queue: deque[tuple[str, object]] = deque()
        self._prepared: dict[str, _Prepared] = {}
        self._portals: dict[str, _Portal] = {}
        self._round_trip = 1
        self._transaction = 0
        self._done: list[StatementEvent] = []
        self._last_finish = 0.0
        self.desynchronized = 0  # times a reply did not match what was owed

    # ------------------------------------------------------------------ client

    def client(self, frames: list[tuple[int, memoryview | None]]) -> None:
        now = self.clock()
        queue = self._queue
        for mtype, body in frames:
            if len(queue) >= _MAX_QUEUE:
                self._reset()
            if mtype == 0x42:  # Bind
                self._bind(body)
            elif mtype == 0x45:  # Execute
                self._execute(body, now)
            elif mtype == 0x53:  # Sync
                queue.append(("sync", self._round_trip))
                self._round_trip += 1
            elif mtype == 0x50:  # Parse
                self._parse(body)
            elif mtype == 0x51 and body is not None:  # Query
                sql = m.Query.decode(body).sql
                run = _QueryRun(self.analyzer.analyze(sql), now, self._round_trip)
                queue.append(("query", run))
                self._round_trip += 1
            elif mtype == 0x44 and body is not None:  # Describe
                if body == b"P\0":  # the unnamed portal, as libpq describes every query
                    queue.append(("describe", self._portals.get("")))
                    continue
                describe = m.Describe.decode(body)
                names = self._prepared if describe.kind == b"S" else self._portals
                queue.append(("describe", names.get(describe.name)))  # what it describes
            elif mtype == 0x43 and body is not None:  # Close
                close = m.Close.decode(body)
                queue.append(("close", close))
                if close.kind == b"S":
                    self._prepared.pop(close.name, None)
                else:
                    self._portals.pop(close.name, None)
            elif mtype == 0x46:  # FunctionCall
                queue.append(("function", self._round_trip))
                self._round_trip += 1

    def _parse(self, body: memoryview | None) -> None:
        if body is None:
            self._queue.append(("parse", None))
            return
        parse = m.Parse.decode(body)
        statements = self.analyzer.analyze(parse.sql)
        prepared = _Prepared(statements[0], parse.param_types)
        if parse.name and len(self._prepared) >= _MAX_PREPARED:
            self._prepared.pop(next(iter(self._prepared)))
        self._prepared[parse.name] = prepared
        self._queue.append(("parse", prepared))

    def _bind(self, body: memoryview | None) -> None:
        self._queue.append(("bind", None))
        if body is None:
            return
        # portal and statement names lead the body: two NUL-terminated strings
        raw = bytes(body) if len(body) <= _MAX_PARAM_BYTES else None
        head = raw if raw is not None else bytes(body[:1024])
        end_portal = head.find(b"\0")
        end_statement = head.find(b"\0", end_portal + 1)
        if end_portal < 0 or end_statement < 0:
            return
        portal = head[:end_portal].decode("utf-8", "surrogateescape")
        name = head[end_portal + 1 : end_statement].decode("utf-8", "surrogateescape")
        prepared = self._prepared.get(name)
        if prepared is None:
            return
        current = self._portals.get(portal)
        if current is not None and current.prepared is prepared:
            current.bind, current.description, current.awaiting = raw, None, None
            return  # the same statement bound again: reuse the portal
        if portal and len(self._portals) >= _MAX_PORTALS:
            self._portals.pop(next(iter(self._portals)))
        self._portals[portal] = _Portal(prepared, raw)

    def _execute(self, body: memoryview | None, now: float) -> None:
        # the unnamed portal, by far the most common, needs no decoding
        unnamed = body is None or body[0] == 0
        portal_name = "" if unnamed else m.Execute.decode(body).portal  # type: ignore[arg-type]
        portal = self._portals.get(portal_name)
        if portal is None:
            self._queue.append(("execute", None))
            return
        event = StatementEvent(
            portal.prepared.parsed,
            sent=now,
            started=now,
            bind=portal.bind,
            param_types=portal.prepared.param_types,
            round_trip=self._round_trip,
            result=portal.sample(),
        )
        if event.result is None:
            portal.awaiting = event  # libpq: Bind, Describe P, Execute in one go
        self._queue.append(("execute", event))

    # ------------------------------------------------------------------ server

    def server(self, frames: list[tuple[int, memoryview | None]]) -> None:
        now = self.clock()
        queue = self._queue
        for mtype, body in frames:
            if mtype == 0x44:  # DataRow
                event = self._running()
                if event is not None and body is not None:
                    event.bytes_returned += len(body) + 5
                    sample = event.result
                    if (
                        sample is not None
                        and len(sample.rows) < _SAMPLE_ROWS
                        and sample.size < _SAMPLE_BYTES
                    ):
                        sample.rows.append(bytes(body))
                        sample.size += len(body)
                continue
            if not queue:
                continue
            kind, item = queue[0]
            if mtype == 0x43 or mtype == 0x49 or mtype == 0x73:  # Complete, Empty, Suspended
                self._complete(now, body if mtype == 0x43 else None, suspended=mtype == 0x73)
            elif mtype == 0x54:  # RowDescription
                if kind == "describe":
                    queue.popleft()
                    if isinstance(item, _Prepared | _Portal) and body is not None:
                        item.description = bytes(body)
                    if isinstance(item, _Portal) and item.awaiting is not None:
                        item.awaiting.result = item.sample()
                        item.awaiting = None
                else:
                    event = self._running()
                    if event is not None and body is not None:
                        event.result = ResultSample(bytes(body))
            elif mtype == 0x32 or mtype == 0x31 or mtype == 0x33 or mtype == 0x6E:
                # BindComplete, ParseComplete, CloseComplete, NoData: the head is answered
                if kind in ("bind", "parse", "close", "describe"):
                    queue.popleft()
                else:
                    self.desynchronized += 1
            elif mtype == 0x74:  # ParameterDescription
                if kind == "describe" and body is not None and isinstance(item, _Prepared):
                    item.param_types = m.ParameterDescription.decode(body).type_oids
            elif mtype == 0x45:  # ErrorResponse
                self._error(now, body)
            elif mtype == 0x5A:  # ReadyForQuery
                self._ready(body)
            elif mtype == 0x47 or mtype == 0x48 or mtype == 0x57:  # COPY begins
                self._running()
            elif mtype == 0x56:  # FunctionCallResponse
                pass

    def current(self) -> Running | None:
        """The statement the server is executing now, since when, and (for a Query) the
        statements of the same Query still to come; None when the server is idle."""
        for kind, item in self._queue:
            if kind == "execute":
                if not isinstance(item, StatementEvent):
                    return None
                return Running(item, max(item.sent, self._last_finish))
            if kind == "query":
                if item is not self._queue[0][1]:
                    return None
                event = self._running()
                if event is None:
                    return None
                run = item
                assert isinstance(run, _QueryRun)
                later = tuple(p.info for p in run.statements[run.index + 1 :])
                return Running(event, event.started, later)
            if kind in ("sync", "function"):
                return None
        return None

    def _running(self) -> StatementEvent | None:
        """The statement whose rows are arriving now, started lazily for simple queries."""
        if not self._queue:
            return None
        kind, item = self._queue[0]
        if kind == "execute":
            return item  # type: ignore[return-value]
        if kind == "query":
            run = item
            assert isinstance(run, _QueryRun)
            if run.current is None and run.index < len(run.statements):
                start = max(run.sent, self._last_finish)
                run.current = StatementEvent(
                    run.statements[run.index],
                    sent=run.sent,
                    started=start,
                    round_trip=run.round_trip,
                )
            return run.current
        return None

    def _complete(self, now: float, body: memoryview | None, *, suspended: bool = False) -> None:
        kind, item = self._queue[0]
        if kind == "execute":
            self._queue.popleft()
            event = item
        elif kind == "query":
            event = self._running()
            run = item
            assert isinstance(run, _QueryRun)
            run.current = None
            run.index += 1
        else:
            self.desynchronized += 1
            return
        if not isinstance(event, StatementEvent):
            return
        self._finish(event, now)
        event.portal_suspended = suspended
        if body is not None:
            # the tag's last word is the row count, when it has one ("SELECT 5", "BEGIN")
            _, space, count = bytes(body[:-1]).rpartition(b" ")
            event.rows = int(count) if space and count.isdigit() else None

    def _finish(self, event: StatementEvent, now: float) -> None:
        # Replies come in order, so a pipelined statement starts when the one before ends.
        event.started = max(event.started, self._last_finish)
        if self._done and self._last_finish == now:
            self._done[-1].reply_batched = True
        event.finished = now
        self._last_finish = now
        self._done.append(event)
        if len(self._done) >= _MAX_PENDING_EVENTS:
            self._flush(self.status, self.status)

    def _error(self, now: float, body: memoryview | None) -> None:
        sqlstate = m.ErrorResponse.decode(body).sqlstate if body is not None else ""
        kind, item = self._queue[0]
        if kind == "query":
            event = self._running()
            if event is not None:
                event.sqlstate = sqlstate
                self._finish(event, now)
            run = item
            assert isinstance(run, _QueryRun)
            run.index = len(run.statements)  # the rest of the Query does not run
            run.current = None
            return
        # Extended protocol: the failing message and everything up to Sync is discarded.
        while self._queue and self._queue[0][0] not in ("sync", "query", "function"):
            kind, item = self._queue.popleft()
            if kind == "execute" and isinstance(item, StatementEvent):
                item.sqlstate = sqlstate
                self._finish(item, now)
                sqlstate = "skipped"

    def _ready(self, body: memoryview | None) -> None:
        status = bytes(body[:1]) if body is not None else b"I"
        while self._queue:
            kind, _ = self._queue.popleft()
            if kind in ("sync", "function", "query"):
                break
        # Replies come in order, so the status the previous ReadyForQuery reported is the one
        # this round trip started in, even when the client pipelined it before that reply.
        self._flush(self.status, status)
        self.status = status

    def _flush(self, before: bytes, after: bytes) -> None:
        done = self._done
        if not done:
            return
        self._done = []
        in_tx = before != b"I" or after != b"I"
        if before == b"I" and after != b"I":
            self._transaction += 1
        elif before == b"I" and any(e.info.command == "BEGIN" for e in done):
            self._transaction += 1
            in_tx = True
        transaction = self._transaction if in_tx else None
        if len(done) == 1:  # the common case: one statement, one round trip
            done[0].transaction = transaction
            self.emit(done)
            return
        counts: dict[int, int] = {}
        for event in done:
            counts[event.round_trip] = counts.get(event.round_trip, 0) + 1
        for event in done:
            event.round_trip_statements = counts[event.round_trip]
            event.transaction = transaction
        self.emit(done)

    def _reset(self) -> None:
        """Forget what is owed; attribution resumes cleanly at the next round trip."""
        self.desynchronized += 1
        self._queue.clear()
        self._done.clear()


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

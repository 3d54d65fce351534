"""StatementTracker: attributes every server reply to the statement that caused it.

Follows the protocol exactly, with a queue of the replies the server owes, in the order the
client asked for them: simple Query (several statements, an error ends the rest), the
extended protocol with pipelining (Parse/Bind/Describe/Execute/Close/Sync, named
statements and portals, everything after an error discarded until Sync), COPY both ways,
and the transaction status of each ReadyForQuery. Statements are reported when their round
trip ends, so each event knows how many statements shared the round trip and whether it
ran inside a transaction.

Sans-I/O: it sees decoded frames and when they arrived, nothing else. Parameter values are
held in memory only, for the detectors, and never logged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final, cast

from proxy.analysis.analyzer import Analyzer, Parsed, StatementInfo
from proxy.logs import get_logger
from proxy.protocol import codes as c
from proxy.protocol import messages as m
from proxy.protocol.framing import (
    FrameDecoder,
    ProtocolViolation,
    interest_table,
)
from proxy.tracking.events import Running, StatementEvent
from proxy.tracking.round_trips import RoundTrips

__all__ = ["CLIENT_INTEREST", "SERVER_INTEREST", "StatementTracker"]

# What the tracker's FrameDecoders put back together when a chunk ends inside a message:
# every message it reads, so that only a message too large to inspect comes without a body.
CLIENT_INTEREST = interest_table(
    body=(c.QUERY, c.PARSE, c.BIND, c.EXECUTE, c.DESCRIBE, c.CLOSE, c.SYNC, c.FUNCTION_CALL)
)
SERVER_INTEREST = interest_table(
    body=(
        c.PARSE_COMPLETE,
        c.BIND_COMPLETE,
        c.CLOSE_COMPLETE,
        c.NO_DATA,
        c.PORTAL_SUSPENDED,
        c.EMPTY_QUERY_RESPONSE,
        c.COPY_IN_RESPONSE,
        c.COPY_OUT_RESPONSE,
        c.COPY_BOTH_RESPONSE,
        c.READY_FOR_QUERY,
        c.ERROR_RESPONSE,
        c.COMMAND_COMPLETE,
        c.ROW_DESCRIPTION,
        c.DATA_ROW,
        c.PARAMETER_DESCRIPTION,
    )
)
_SERVER_LIMIT: Final = 1 << 16  # larger replies (a huge row or error) are not inspected

_MAX_PREPARED: Final = 2000  # named statements remembered per session
_MAX_PORTALS: Final = 200
_MAX_QUEUE: Final = 10000  # replies owed before the tracker gives up on a runaway pipeline
_MAX_PENDING_EVENTS: Final = 1000
_SAMPLE_ROWS: Final = 1000
_SAMPLE_BYTES: Final = 32 * 1024  # what n_plus_one may keep of a result (its _SOURCE_BYTES)
_MAX_PARAM_BYTES: Final = 8192  # larger Bind messages keep no parameter values
_PORTAL: Final = ord("P")  # Describe and Close name a portal (P) or a statement (S)
_STATUS: Final = {ord("I"): b"I", ord("T"): b"T", ord("E"): b"E"}  # ReadyForQuery

log = get_logger("pgwarden.statements")

# What the server owes, in order: (kind, item) pairs in the queue.
_BIND: Final = "bind"
_PARSE: Final = "parse"
_DESCRIBE: Final = "describe"
_CLOSE: Final = "close"
_EXECUTE: Final = "execute"
_SYNC: Final = "sync"
_QUERY: Final = "query"
_FUNCTION: Final = "function"
_ANSWERED_BY_ACK: Final = frozenset((_BIND, _PARSE, _CLOSE, _DESCRIBE))  # 1, 2, 3, n replies
_ENDS_ROUND_TRIP: Final = frozenset((_SYNC, _QUERY, _FUNCTION))
_OWED_BIND: Final = (_BIND, None)
_OWED_CLOSE: Final = (_CLOSE, None)
# a Query too large to read: counted, timed, never analysed
_TOO_LARGE: Final = Parsed(StatementInfo("", "", "OTHER", error="statement too large to inspect"))


class _Prepared:
    __slots__ = ("description", "param_types", "parsed")

    def __init__(self, parsed: Parsed, param_types: tuple[int, ...]) -> None:
        self.parsed = parsed
        self.param_types = param_types
        self.description: bytes | None = None  # RowDescription of Describe S: formats unbound


class _Portal:
    __slots__ = ("awaiting", "bind", "description", "prepared")

    def __init__(self, prepared: _Prepared, bind: bytes | None) -> None:
        self.prepared = prepared
        self.bind = bind
        self.description: bytes | None = None  # RowDescription of Describe P: formats final
        self.awaiting: StatementEvent | None = None  # Executed before the Describe P reply

    def describe(self, event: StatementEvent) -> bool:
        """Gives `event` this portal's result columns; False when they are not known yet."""
        if self.description is not None:
            event.description = self.description
            return True
        if self.prepared.description is not None and self.bind is not None:
            event.description = self.prepared.description
            event.formats_bind = self.bind
            return True
        return False


_DESCRIBED = (_Prepared, _Portal)


class _QueryRun:
    __slots__ = ("current", "index", "round_trip", "sent", "statements")

    def __init__(self, statements: tuple[Parsed, ...], sent: float, round_trip: int) -> None:
        self.statements = statements
        self.sent = sent
        self.round_trip = round_trip
        self.index = 0
        self.current: StatementEvent | None = None


class StatementTracker:
    """Feed it every byte of both streams, in the order relayed; it calls `emit` once per
    round trip with the statements that round trip finished.

    Written for the relay path: each chunk is walked in place, message by message, with
    the common messages handled inline and nothing built for the rest; only a message
    split across chunks goes through a FrameDecoder to be put back together.
    `client_at`/`server_at` say where each stream stands when tracking starts (the
    `FrameDecoder.remaining()` of whoever read it so far).
    """

    def __init__(
        self,
        analyzer: Analyzer,
        emit: Callable[[list[StatementEvent]], None],
        *,
        client_at: tuple[bytes, int] = (b"", 0),
        server_at: tuple[bytes, int] = (b"", 0),
    ) -> None:
        self.analyzer = analyzer
        self.emit = emit
        self.status = b"I"
        self._queue: deque[tuple[str, object]] = deque()
        self._prepared: dict[bytes, _Prepared] = {}
        self._portals: dict[bytes, _Portal] = {}
        self._round_trip = 1
        self._transaction = 0
        self._done: list[StatementEvent] = []
        self._last_finish = 0.0
        self.desynchronized = 0  # times a reply did not match what was owed
        self.failures = 0  # messages that raised while being tracked
        # The server side of the session's round trips, when nobody else reads that stream
        self.books: RoundTrips | None = None
        # UTF-8 takes up to 4 bytes a character
        self._client_limit = analyzer.max_statement_length * 4
        self._client = FrameDecoder(CLIENT_INTEREST, inspect_limit=self._client_limit)
        self._client.resume(*client_at)
        self._server = FrameDecoder(SERVER_INTEREST, inspect_limit=_SERVER_LIMIT)
        self._server.resume(*server_at)
        # whether a decoder holds part of a message (else chunks are walked directly)
        self._client_split = not self._client.at_boundary
        self._server_split = not self._server.at_boundary

    # ------------------------------------------------------------------ client

    def client(self, data: bytes, now: float) -> None:
        """Bytes the client sent, received at `now` (perf_counter seconds)."""
        pos = 0
        decoder = self._client
        if self._client_split:  # first the end of a message an earlier chunk began
            frames, pos = decoder.finish(data)
            for mtype, body in frames:
                self._client_walk(_whole(mtype, body), 0, now)
            self._client_split = not decoder.at_boundary
        if pos < len(data):
            pos = self._client_walk(data, pos, now)
            if pos < len(data):  # a message continues in the next chunk
                for mtype, _ in decoder.feed(memoryview(data)[pos:]):
                    self._client_uninspected(mtype, now)
                self._client_split = not decoder.at_boundary
        if len(self._queue) >= _MAX_QUEUE:
            self._reset()

    def _client_walk(self, data: bytes, pos: int, now: float) -> int:
        """Tracks each whole message from `pos`; returns where an incomplete one starts."""
        queue = self._queue
        size = len(data)
        while True:
            end = _message_end(data, pos, size)
            if end < 0:
                break
            mtype = data[pos]
            start = pos + 5
            pos = end
            try:
                if mtype == c.BIND:
                    queue.append(_OWED_BIND)
                    self._bind(data, start, end)
                elif mtype == c.EXECUTE:
                    self._execute(data, start, end, now)
                elif mtype == c.SYNC:
                    queue.append((_SYNC, self._round_trip))
                    self._round_trip += 1
                elif mtype == c.QUERY:
                    if end - start > self._client_limit:
                        self._client_uninspected(mtype, now)
                        continue
                    sql = data[start : end - 1].decode("utf-8", "surrogateescape")
                    queue.append(
                        (_QUERY, _QueryRun(self.analyzer.analyze(sql), now, self._round_trip))
                    )
                    self._round_trip += 1
                elif mtype == c.PARSE:
                    if end - start > self._client_limit:
                        self._client_uninspected(mtype, now)
                    else:
                        self._parse(data[start:end])
                elif mtype == c.DESCRIBE:  # what it describes
                    names = self._portals if data[start] == _PORTAL else self._prepared
                    queue.append((_DESCRIBE, names.get(data[start + 1 : end - 1])))
                elif mtype == c.CLOSE:
                    names = self._portals if data[start] == _PORTAL else self._prepared
                    names.pop(data[start + 1 : end - 1], None)  # type: ignore[arg-type]
                    queue.append(_OWED_CLOSE)
                elif mtype == c.FUNCTION_CALL:
                    queue.append((_FUNCTION, self._round_trip))
                    self._round_trip += 1
            except Exception:  # what one message says must not stop the reading
                self._failed(mtype)
        return pos

    def _client_uninspected(self, mtype: int, now: float) -> None:
        """A message too large to inspect: what it is owed is known, what it says is not."""
        queue = self._queue
        if mtype == c.BIND:  # its portal is unknown, so the unnamed one is stale
            queue.append(_OWED_BIND)
            self._portals.pop(b"", None)
        elif mtype == c.QUERY:
            run = _QueryRun((_TOO_LARGE,), now, self._round_trip)
            queue.append((_QUERY, run))
            self._round_trip += 1
        elif mtype == c.PARSE:
            queue.append((_PARSE, None))
        elif mtype == c.DESCRIBE:
            queue.append((_DESCRIBE, None))
        elif mtype == c.CLOSE:
            queue.append(_OWED_CLOSE)

    def _parse(self, raw: bytes) -> None:
        parse = m.Parse.decode(raw)
        name = raw[: raw.index(0)]
        prepared = _Prepared(self.analyzer.analyze(parse.sql)[0], parse.param_types)
        if name and len(self._prepared) >= _MAX_PREPARED:
            self._prepared.pop(next(iter(self._prepared)))
        self._prepared[name] = prepared
        self._queue.append((_PARSE, prepared))

    def _bind(self, data: bytes, start: int, end: int) -> None:
        # portal and statement names lead the body: two NUL-terminated strings
        end_portal = data.find(0, start, end)
        end_statement = data.find(0, end_portal + 1, end)
        if end_portal < 0 or end_statement < 0:
            return
        prepared = self._prepared.get(data[end_portal + 1 : end_statement])
        if prepared is None:
            return
        raw = data[start:end] if end - start <= _MAX_PARAM_BYTES else None
        portal = data[start:end_portal]
        current = self._portals.get(portal)
        if current is not None and current.prepared is prepared:
            current.bind = raw  # the same statement bound again: reuse the portal
            current.description = current.awaiting = None
            return
        if portal and len(self._portals) >= _MAX_PORTALS:
            self._portals.pop(next(iter(self._portals)))
        self._portals[portal] = _Portal(prepared, raw)

    def _execute(self, data: bytes, start: int, end: int, now: float) -> None:
        # the unnamed portal, by far the most common, needs no decoding
        portal = self._portals.get(b"" if data[start] == 0 else data[start : end - 5])
        if portal is None:
            self._queue.append((_EXECUTE, None))
            return
        prepared = portal.prepared
        event = StatementEvent(
            prepared.parsed, now, now, portal.bind, prepared.param_types, self._round_trip
        )
        if not portal.describe(event):
            portal.awaiting = event  # libpq: Bind, Describe P, Execute in one go
        self._queue.append((_EXECUTE, event))

    # ------------------------------------------------------------------ server

    def server(self, data: bytes, now: float) -> None:
        """Bytes sent to the client (as edited), received from the server at `now`."""
        pos = 0
        decoder = self._server
        if self._server_split:
            frames, pos = decoder.finish(data)
            for mtype, body in frames:
                self._server_walk(_whole(mtype, body), 0, now)
            self._server_split = not decoder.at_boundary
        size = len(data)
        if pos < size:
            pos = self._server_walk(data, pos, now)
            if pos < size:  # a message continues in the next chunk
                if size - pos >= 5 and data[pos] == c.DATA_ROW:  # its size is known now
                    length = c.message_length(data, pos)
                    event = self._running() if length - 4 > _SERVER_LIMIT else None
                    if event is not None:  # too large to be put back together: count it here
                        event.bytes_returned += length + 1
                for mtype, _ in decoder.feed(memoryview(data)[pos:]):
                    self._server_uninspected(mtype, now)
                self._server_split = not decoder.at_boundary

    def _server_walk(self, data: bytes, pos: int, now: float) -> int:
        """Tracks each whole message from `pos`; returns where an incomplete one starts."""
        queue = self._queue
        size = len(data)
        receiving: StatementEvent | None = None  # the statement this run of DataRows is for
        while True:
            end = _message_end(data, pos, size)
            if end < 0:
                break
            mtype = data[pos]
            start = pos + 5
            pos = end
            if mtype == c.DATA_ROW:
                event = receiving if receiving is not None else self._running()
                if event is None:
                    continue
                receiving = event
                event.bytes_returned += end - start + 5
                if event.description is not None and end - start <= _SERVER_LIMIT:
                    sampled = event.sampled
                    if sampled is None:
                        event.sampled = [data[start:end]]
                        event.sample_size = end - start
                    elif len(sampled) < _SAMPLE_ROWS and event.sample_size < _SAMPLE_BYTES:
                        sampled.append(data[start:end])
                        event.sample_size += end - start
                continue
            receiving = None
            try:
                if mtype == c.READY_FOR_QUERY:  # the round trip's end, tracked or not
                    status = _STATUS.get(data[start]) or data[start:end] if end > start else b"I"
                    if self.books is not None:
                        self.books.ready(status, now)
                    self._ready(status)
                    continue
                if mtype == c.ERROR_RESPONSE:
                    error = m.ErrorResponse.decode(data[start:end])
                    if self.books is not None and error.severity in ("FATAL", "PANIC"):
                        self.books.fatal_seen = True
                    if queue:
                        self._error(now, error.sqlstate)
                    continue
                if not queue:
                    continue
                if mtype == c.COMMAND_COMPLETE:
                    kind, item = queue[0]
                    if kind is _EXECUTE:  # the extended protocol's common case, inline
                        queue.popleft()
                        if item is not None:
                            done = cast(StatementEvent, item)
                            self._finish(done, now)
                            done.tag = data[start:end]
                    else:
                        self._complete(now, data[start:end])
                elif (
                    mtype == c.BIND_COMPLETE
                    or mtype == c.PARSE_COMPLETE
                    or mtype == c.CLOSE_COMPLETE
                    or mtype == c.NO_DATA
                ):  # the head of the queue is answered
                    if queue[0][0] in _ANSWERED_BY_ACK:
                        queue.popleft()
                    else:
                        self.desynchronized += 1
                elif mtype == c.ROW_DESCRIPTION:
                    self._row_description(data[start:end] if end - start <= _SERVER_LIMIT else None)
                elif mtype == c.EMPTY_QUERY_RESPONSE or mtype == c.PORTAL_SUSPENDED:
                    self._complete(now, None, suspended=mtype == c.PORTAL_SUSPENDED)
                elif mtype == c.PARAMETER_DESCRIPTION:
                    kind, item = queue[0]
                    if kind is _DESCRIBE and isinstance(item, _Prepared):
                        item.param_types = m.ParameterDescription.decode(data[start:end]).type_oids
                elif (
                    mtype == c.COPY_IN_RESPONSE
                    or mtype == c.COPY_OUT_RESPONSE
                    or mtype == c.COPY_BOTH_RESPONSE
                ):
                    self._running()
            except Exception:  # what one message says must not stop the reading
                self._failed(mtype)
        return pos

    def _server_uninspected(self, mtype: int, now: float) -> None:
        """A reply too large to inspect (a DataRow was counted when its header came)."""
        if not self._queue:
            return
        if mtype == c.ERROR_RESPONSE:
            self._error(now, "")
        elif mtype == c.COMMAND_COMPLETE:
            self._complete(now, None)
        elif mtype == c.ROW_DESCRIPTION:
            self._row_description(None)

    def _row_description(self, body: bytes | None) -> None:
        kind, item = self._queue[0]
        if kind is _DESCRIBE:
            self._queue.popleft()
            if isinstance(item, _DESCRIBED) and body is not None:
                item.description = body
            if isinstance(item, _Portal) and item.awaiting is not None:
                item.describe(item.awaiting)  # the Execute sent with this Describe
                item.awaiting = None
        else:
            event = self._running()
            if event is not None and body is not None:
                event.description = body

    def server_position(self) -> tuple[bytes, int]:
        """Where the server stream stands after what was fed, as `remaining()` tells it."""
        return self._server.remaining()

    def current(self) -> Running | None:
        """The statement the server is executing now, since when, and (for a Query) the
        statements of the same Query still to come; None when the server is idle."""
        for kind, item in self._queue:
            if kind is _EXECUTE:
                if not isinstance(item, StatementEvent):
                    return None
                return Running(item, max(item.sent, self._last_finish))
            if kind is _QUERY:
                if item is not self._queue[0][1]:
                    return None
                event = self._running()
                if event is None:
                    return None
                run = item
                assert isinstance(run, _QueryRun)
                later = tuple(p.info for p in run.statements[run.index + 1 :])
                return Running(event, event.started, later)
            if kind is _SYNC or kind is _FUNCTION:
                return None
        return None

    def _running(self) -> StatementEvent | None:
        """The statement whose rows are arriving now, started lazily for simple queries."""
        if not self._queue:
            return None
        kind, item = self._queue[0]
        if kind is _EXECUTE:
            return item  # type: ignore[return-value]
        if kind is _QUERY:
            run: _QueryRun = item  # type: ignore[assignment]
            if run.current is None and run.index < len(run.statements):
                run.current = StatementEvent(
                    run.statements[run.index],
                    run.sent,
                    max(run.sent, self._last_finish),
                    None,
                    (),
                    run.round_trip,
                )
            return run.current
        return None

    def _complete(self, now: float, tag: bytes | None, *, suspended: bool = False) -> None:
        queue = self._queue
        kind, item = queue[0]
        event: StatementEvent | None
        if kind is _EXECUTE:
            queue.popleft()
            event = cast("StatementEvent | None", item)
        elif kind is _QUERY:
            event = self._running()
            run: _QueryRun = item  # type: ignore[assignment]
            run.current = None
            run.index += 1
        else:
            self.desynchronized += 1
            return
        if event is None:
            return
        self._finish(event, now)
        event.tag = tag
        if suspended:
            event.portal_suspended = True

    def _finish(self, event: StatementEvent, now: float) -> None:
        # Replies come in order, so a pipelined statement starts when the one before ends.
        last = self._last_finish
        if last > event.started:
            event.started = last
        done = self._done
        if last == now and done:
            done[-1].reply_batched = True
        event.finished = now
        self._last_finish = now
        done.append(event)
        if len(done) >= _MAX_PENDING_EVENTS:
            self._flush(self.status, self.status)

    def _error(self, now: float, sqlstate: str) -> None:
        kind, item = self._queue[0]
        if kind is _QUERY:
            event = self._running()
            if event is not None:
                event.sqlstate = sqlstate
                self._finish(event, now)
            run: _QueryRun = item  # type: ignore[assignment]
            run.index = len(run.statements)  # the rest of the Query does not run
            run.current = None
            return
        # Extended protocol: the failing message and everything up to Sync is discarded.
        while self._queue and self._queue[0][0] not in _ENDS_ROUND_TRIP:
            kind, item = self._queue.popleft()
            if kind is _EXECUTE and isinstance(item, StatementEvent):
                item.sqlstate = sqlstate
                self._finish(item, now)
                sqlstate = "skipped"

    def _ready(self, status: bytes) -> None:
        queue = self._queue
        while queue:
            if queue.popleft()[0] in _ENDS_ROUND_TRIP:
                break
        # Replies come in order, so the status the previous ReadyForQuery reported is the one
        # this round trip started in, even when the client pipelined it before that reply.
        if self._done:
            self._flush(self.status, status)
        self.status = status

    def _flush(self, before: bytes, after: bytes) -> None:
        done = self._done
        if not done:
            return
        self._done = []
        if before != b"I":
            transaction: int | None = self._transaction
        elif (
            after != b"I"
            or done[0].parsed.info.command == "BEGIN"
            or (len(done) > 1 and any(e.parsed.info.command == "BEGIN" for e in done))
        ):
            self._transaction += 1
            transaction = self._transaction
        else:
            transaction = None
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

    def _failed(self, mtype: int) -> None:
        """A message could not be handled (a bug, or bytes no server sends): attribution
        starts afresh at the next round trip; the reading goes on."""
        if not self.failures:
            log.exception("tracker_failed", message_type=chr(mtype), action="attribution reset")
        self.failures += 1
        self._reset()

    def _reset(self) -> None:
        """Forget what is owed; attribution resumes cleanly at the next round trip."""
        self.desynchronized += 1
        self._queue.clear()
        self._done.clear()


def _message_end(data: bytes, pos: int, size: int) -> int:
    """Where the message whose header starts at `pos` ends, or -1 when it does not end
    within `size`: what both walks ask of every message."""
    if size - pos < 5:
        return -1
    length = c.message_length(data, pos)
    if length < 4:  # larger than allowed: the decoder it is handed to says so
        raise ProtocolViolation(f"invalid length {length} for message type {data[pos]:#04x}")
    end = pos + 1 + length
    return end if end <= size else -1


def _whole(mtype: int, body: memoryview | None) -> bytes:
    """A message put back together by a FrameDecoder, as it was on the wire."""
    return m.frame(bytes((mtype,)), bytes(body) if body is not None else b"")

"""One client connection and its upstream connection.

The session is the client's asyncio Protocol; `_Upstream` is the server side's. Bytes from
the server are written to the client first and inspected after; bytes from the client are
framed (which validates them) and then written as received. Either side's transport
filling up pauses reading on the other side, so a slow reader gets backpressure instead
of a growing buffer.

Phases: STARTUP (untyped packets, TLS), CONNECTING (upstream being opened), AUTH
(authentication relayed message by message, so the SASL mechanism list can be edited),
READY (bytes relayed in whole chunks), CLOSED.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from proxy import upstream
from proxy.detectors import SessionIdentity
from proxy.inspector import Analysis, Inspector
from proxy.logs import get_logger
from proxy.protocol import messages as m
from proxy.protocol.editor import ErrorEditor, MessageEditor, flush_after_executes
from proxy.protocol.framing import FrameDecoder, ProtocolViolation
from proxy.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    read_startup_packet,
)
from proxy.rewriters.rules import BLOCK_MARKER, Decision, RuleEngine, rewrite_statements
from proxy.timeouts import Limit, TimeoutGuard, TimeoutPolicy, rewrite_cancel
from proxy.tracking.round_trips import CLIENT_INTEREST, SERVER_INTEREST, RoundTrips

if TYPE_CHECKING:
    from proxy.analysis.analyzer import StatementInfo
    from proxy.config import Settings
    from proxy.metrics import Metrics

__all__ = ["Phase", "Session", "SessionHost"]

log = get_logger("pgwarden.session")

_AUTH_INTEREST = bytes([2]) * 256  # every message whole while authenticating
_PENDING_LIMIT = 1 << 16  # client bytes held while the upstream connection opens
_SCRAM_PLUS = "SCRAM-SHA-256-PLUS"


class SessionHost(Protocol):
    """What a session needs from the listener that accepted it."""

    settings: Settings
    metrics: Metrics
    server_tls: ssl.SSLContext | None
    draining: bool
    analysis: Analysis | None
    timeouts: TimeoutPolicy | None
    rules: RuleEngine | None

    def session_ready(self, session: Session) -> None: ...
    def session_closed(self, session: Session) -> None: ...
    def forward_cancel(
        self, request: CancelRequest, done: Callable[[], None] | None = None
    ) -> None: ...
    def cancel_backend(self, session: Session, done: Callable[[], None]) -> None: ...


class Phase(enum.Enum):
    STARTUP = "startup"
    CONNECTING = "connecting"
    AUTH = "auth"
    READY = "ready"
    CLOSED = "closed"


class Session(asyncio.Protocol):
    def __init__(self, host: SessionHost, *, rejected: bool = False) -> None:
        self.host = host
        self.settings = host.settings
        self.metrics = host.metrics
        self.rejected = rejected
        self.phase = Phase.STARTUP
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.peer = "?"
        self.tls = False
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_reason = ""
        self.draining = False
        self.round_trips = RoundTrips(self.metrics.record_transaction)
        self.inspector: Inspector | None = None
        self.guard: TimeoutGuard | None = None
        self._editor: ErrorEditor | None = None  # rewrites the error of a timed-out statement
        self._timed_out: Limit | None = None  # the limit of a statement being cancelled
        self._paused: set[str] = set()  # why reading from the client is paused
        # The server stream is read only by analysis, later: the round trips' server side
        # is then kept by the tracker (see _keep_books_later).
        self._deferred = False
        self._statements: MessageEditor | None = None  # applies rewrite and block rules
        self._blocked: deque[tuple[str, str]] = deque()  # (marker, rule) of blocks sent
        self._blocks_sent = 0
        limits = self.settings.limits
        self._startup_buf = bytearray()
        self._startup_raw = b""
        self._client_frames = FrameDecoder(
            CLIENT_INTEREST, inspect_limit=0, max_length=limits.max_message_size
        )
        self._server_frames = FrameDecoder(
            _AUTH_INTEREST, max_length=limits.max_message_size, inspect_limit=1 << 20
        )
        self._timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- identity

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database") or self.user

    @property
    def application_name(self) -> str:
        return self.parameters.get("application_name", "")

    def _identity(self) -> dict[str, object]:
        return {
            "client": self.peer,
            "user": self.user or None,
            "database": self.database or None,
            "application_name": self.application_name or None,
        }

    # ------------------------------------------------------------ client protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = self.client.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        self.metrics.client_connections.inc()
        self.metrics.client_connections_opened.inc()
        timeout = self.settings.limits.startup_timeout
        if timeout:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._startup_expired)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.READY or self.phase is Phase.AUTH:
            # Analysis sees the statements as the application sent them; the server gets
            # them after the rules (which hold a Query or Parse back until complete).
            if self._statements is None and self.host.rules is not None:
                self._start_rules()  # rules added by a reload apply to open sessions too
            statements = self._statements
            flush_from = -1  # where the first whole message starts in what goes out
            if self.guard is not None:
                if statements is None:
                    header, rest = self._client_frames.remaining()
                    flush_from = -1 if header else rest
                elif statements.at_boundary:
                    flush_from = 0
            try:
                frames = self._client_frames.feed(data)
            except ProtocolViolation as exc:
                self._protocol_violation("client", exc)
                return
            assert self.server is not None
            self.bytes_in += len(data)
            out = data if statements is None else statements.feed(data)
            if flush_from >= 0:
                # see when each pipelined statement ends
                out = flush_after_executes(out, flush_from)
            if out:
                self.server.write(out)
            if frames:
                self.round_trips.client(frames)
            inspector = self.inspector
            if inspector is not None:
                if self.guard is None:
                    inspector.backlog.add(inspector, True, data, time.perf_counter())
                else:  # the guard times what runs now, so the tracker must know now
                    inspector.client(data, time.perf_counter())
                    if frames:
                        self.guard.client_active()
                        self._track_running()
        elif self.phase is Phase.STARTUP:
            self._startup_buf += data
            self._read_startup()
        elif self.phase is Phase.CONNECTING:
            self._startup_buf += data
            if len(self._startup_buf) > _PENDING_LIMIT:
                self._protocol_violation(
                    "client", ProtocolViolation("too much data before authentication")
                )

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost does the cleanup

    def connection_lost(self, exc: Exception | None) -> None:
        self.client = None
        if self.phase is not Phase.CLOSED:
            self._close(self.close_reason or ("client_error" if exc else "client_closed"))

    def pause_writing(self) -> None:
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.resume_reading()

    def pause_client(self, reason: str) -> None:
        if not self._paused and self.client is not None:
            self.client.pause_reading()
        self._paused.add(reason)

    def resume_client(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.client is not None and self.phase is not Phase.CLOSED:
            self.client.resume_reading()

    # ------------------------------------------------------------------ startup

    def _read_startup(self) -> None:
        while self.phase is Phase.STARTUP and self._startup_buf:
            try:
                packet, used = read_startup_packet(self._startup_buf)
            except ProtocolViolation as exc:
                self._protocol_violation("client", exc)
                return
            if packet is None:
                return
            raw = bytes(self._startup_buf[:used])
            del self._startup_buf[:used]
            if isinstance(packet, SSLRequest | GSSENCRequest):
                if self._startup_buf:
                    # Bytes sent before our answer would be taken as if encrypted (CVE-2021-23214).
                    self._protocol_violation(
                        "client", ProtocolViolation("received unencrypted data after SSL request")
                    )
                    return
                if isinstance(packet, SSLRequest) and self.host.server_tls and not self.tls:
                    self._write_client(b"S")
                    self._connect_task = asyncio.ensure_future(self._start_client_tls())
                    return
                self._write_client(b"N")
            elif isinstance(packet, CancelRequest):
                # Closed once the cancel was delivered, as PostgreSQL closes it once read:
                # a client such as libpq waits for that before it sends anything more.
                self.pause_client("cancel")
                self.host.forward_cancel(packet, lambda: self._close("cancel_request"))
                return
            else:
                assert isinstance(packet, StartupMessage)
                self._startup(packet, raw)

    async def _start_client_tls(self) -> None:
        assert self.client is not None and self.host.server_tls is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.client, self, self.host.server_tls, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self.metrics.connection_errors["tls"].inc()
            log.warning("client_tls_failed", error=str(exc), **self._identity())
            self._close("tls_failed")
            return
        if transport is None or self.phase is Phase.CLOSED:
            return
        self.client = transport
        self.tls = True

    def _startup(self, packet: StartupMessage, raw: bytes) -> None:
        self.parameters = packet.parameters
        if self.rejected:
            self.metrics.connection_errors["too_many_connections"].inc()
            self._fail("53300", "sorry, too many clients already", "too_many_connections")
            return
        if self.host.draining:
            self._fail("57P03", "the database system is shutting down", "draining")
            return
        timeouts = self.settings.timeouts
        if timeouts.server_side and timeouts.statement:
            # PostgreSQL enforces the default itself too, should pgwarden's timer not run.
            options = packet.parameters.get("options", "")
            setting = f"-c statement_timeout={int(timeouts.statement * 1000)}"
            params = {**packet.parameters, "options": f"{options} {setting}".strip()}
            raw = StartupMessage(packet.protocol, params).encode()
        self._startup_raw = raw
        self.phase = Phase.CONNECTING
        self._connect_task = asyncio.ensure_future(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        began = time.perf_counter()
        try:
            transport, _ = await upstream.connect(self.settings.upstream, lambda: _Upstream(self))
        except upstream.UpstreamError as exc:
            self.metrics.connection_errors["upstream_connect"].inc()
            log.warning("upstream_connect_failed", error=str(exc), **self._identity())
            self._fail("08001", f"pgwarden: {exc}", "upstream_connect_failed")
            return
        if self.phase is not Phase.CONNECTING:  # the client left meanwhile
            transport.close()
            return
        self.metrics.upstream_connect_duration.observe(time.perf_counter() - began)
        self.server = transport  # type: ignore[assignment]
        self.metrics.server_connections.inc()
        self.metrics.server_connections_opened.inc()
        self.phase = Phase.AUTH
        transport.write(self._startup_raw)
        if self._startup_buf:
            pending = bytes(self._startup_buf)
            self._startup_buf.clear()
            self.data_received(pending)

    # ------------------------------------------------------------ server side

    def server_data(self, data: bytes) -> None:
        if self.phase is Phase.READY:
            client = self.client
            self.bytes_out += len(data)
            if self._editor is not None:  # analysis sees the errors as the client does
                data = self._editor.feed(data)
            if client is not None:
                client.write(data)
            inspector = self.inspector
            if self._deferred and inspector is not None:
                inspector.backlog.add(inspector, False, data, time.perf_counter())
                if self.draining:
                    self._drain_if_idle()
                return
            try:
                frames = self._server_frames.feed(data)
            except ProtocolViolation as exc:
                self._protocol_violation("server", exc)
                return
            if inspector is not None:
                if self.guard is None:
                    inspector.backlog.add(inspector, False, data, time.perf_counter())
                else:
                    inspector.server(data, time.perf_counter())
            ready = self.round_trips.server(frames) if frames else False
            if self.guard is not None:  # every chunk: a reply may start the next statement
                if ready:
                    self._timed_out = None  # the round trip ended: its error went through
                self._track_running()
                if ready:
                    rt = self.round_trips
                    self.guard.ready(rt.status, not rt.awaiting and not rt.unsynced)
            if ready and self.draining:
                self._drain_if_idle()
            if ready and self._blocked and not self.round_trips.busy:
                self._blocked.clear()  # nothing is owed: the blocks left were skipped
            editor = self._editor
            if (
                editor is not None
                and self._timed_out is None
                and not self._blocked
                and editor.at_boundary
            ):
                self._editor = None
        elif self.phase is Phase.AUTH:
            self._server_auth_data(data)

    def _server_auth_data(self, data: bytes) -> None:
        """Relays authentication message by message, editing only the SASL mechanism list."""
        try:
            frames = self._server_frames.feed(data)
        except ProtocolViolation as exc:
            self._protocol_violation("server", exc)
            return
        out: list[bytes] = []
        for index, (mtype, body) in enumerate(frames):
            if body is None:
                self._protocol_violation(
                    "server", ProtocolViolation("oversized message during authentication")
                )
                return
            raw = m.frame(bytes((mtype,)), body)
            if mtype == 0x52:  # Authentication*
                raw = _strip_channel_binding(body) or raw
            elif mtype == 0x4B:  # BackendKeyData
                try:
                    key = m.BackendKeyData.decode(body)
                except ValueError as exc:
                    self._protocol_violation("server", ProtocolViolation(str(exc)))
                    return
                self.backend_key = (key.process_id, key.secret_key)
            elif mtype == 0x45:  # ErrorResponse: authentication failed; the server will close
                self.round_trips.fatal_seen = True
            elif mtype == 0x5A:  # ReadyForQuery: authenticated, switch to relaying chunks
                out.append(raw)
                self.round_trips.server(frames[index:])
                for later_type, later_body in frames[index + 1 :]:
                    out.append(m.frame(bytes((later_type,)), later_body or b""))
                self._write_client(b"".join(out))
                self.bytes_out += len(data)
                self._become_ready()
                return
            out.append(raw)
        if out:
            self._write_client(b"".join(out))
        self.bytes_out += len(data)

    def _become_ready(self) -> None:
        self.phase = Phase.READY
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A message split across the chunk boundary stays held for inspection; its first
        # part has not reached the client yet, so it goes now and the rest flows raw.
        held = self._server_frames.held
        if held:
            self._write_client(held)
        self._server_frames.inspect_limit = 1 << 16
        self._server_frames.interest = SERVER_INTEREST
        analysis = self.host.analysis
        if analysis is not None:
            identity = SessionIdentity(self.user, self.database, self.application_name)
            self.inspector = Inspector(
                analysis,
                identity,
                client_at=self._client_frames.remaining(),
                server_at=self._server_frames.remaining(),
            )
            rules = self.host.rules
            if rules is not None and rules.active:
                self._statements = MessageEditor(b"QP", self._apply_rules)
            if self.host.timeouts is not None:
                loop = asyncio.get_running_loop()
                self.guard = TimeoutGuard(
                    self.host.timeouts,
                    identity,
                    loop.call_later,
                    time.perf_counter,
                    self._statement_timed_out,
                    self._transaction_timed_out,
                )
            if self.guard is None and self._statements is None:
                self._keep_books_later()
        self.host.session_ready(self)
        log.info("connection_opened", tls=self.tls, **self._identity())

    # ------------------------------------------------------- deferred books

    def _keep_books_later(self) -> None:
        """Nothing needs the server stream read as it is relayed (no timeouts, no rules),
        so it is read once, by analysis, later: the tracker keeps the server side of the
        round trips, and whoever needs them current catches up first."""
        assert self.inspector is not None
        self.inspector.keep_books(self.round_trips, self._books_lost)
        self._deferred = True

    def _keep_books_now(self) -> None:
        """Back to reading the server stream as it is relayed, from where analysis stands."""
        if self._deferred and self.inspector is not None:
            self.inspector.backlog.flush()
            self._server_frames.resume(*self.inspector.server_position())
            self.inspector.keep_books(None)
        self._deferred = False

    def _catch_up(self) -> None:
        """Analyses whatever is queued, so the round trips' server side is current."""
        if self._deferred and self.inspector is not None:
            self.inspector.backlog.flush()

    def _server_at_boundary(self) -> bool:
        """Whether what the client was sent so far ends with a whole message."""
        if self._deferred and self.inspector is not None:
            self._catch_up()
            return self.inspector.server_position() == (b"", 0)
        return self._server_frames.at_boundary

    def _books_lost(self, exc: Exception) -> None:
        """The tracker kept this session's server side and cannot any more; where the
        stream stands is unknown, so no error can be placed in it: the session ends."""
        self._deferred = False
        if isinstance(exc, ProtocolViolation):
            self.metrics.connection_errors["protocol_violation"].inc()
            log.warning("protocol_violation", side="server", error=str(exc), **self._identity())
            self._close("protocol_violation")
        else:
            self._close("internal_error")

    # ---------------------------------------------------------------- timeouts

    def _track_running(self) -> None:
        """Tells the guard what the server runs now."""
        assert self.guard is not None
        tracker = self.inspector.tracker if self.inspector is not None else None
        self.guard.running(tracker.current() if tracker is not None else None)

    def _edit_errors(self) -> None:
        """Starts rewriting errors on their way to the client, from where the stream is."""
        if self._editor is None:
            header, passing = self._server_frames.remaining()
            self._editor = ErrorEditor(self._edit_error, header_sent=header, passing=passing)

    def _statement_timed_out(self, info: StatementInfo, started: float, limit: Limit) -> None:
        if self.phase is not Phase.READY or self.server is None:
            return
        self.metrics.statement_timeouts.labels(limit.rule).inc()
        log.warning(
            "statement_timeout",
            rule=limit.rule,
            limit_s=round(limit.seconds, 3),
            statement=info.normalized,
            command=info.command,
            running_s=round(time.perf_counter() - started, 3),
            **self._identity(),
        )
        self._timed_out = limit
        self._edit_errors()
        # Nothing new reaches the server until the cancel has been delivered, so a cancel
        # that arrives after the statement ended cannot hit the next one.
        self.pause_client("cancel")
        self.host.cancel_backend(self, lambda: self.resume_client("cancel"))

    def _edit_error(self, raw: bytes) -> bytes:
        if self._blocked:
            rewritten = self._block_error(raw)
            if rewritten is not None:
                return rewritten
        timed_out = self._timed_out
        if timed_out is None:
            return raw
        rewritten = rewrite_cancel(raw, timed_out)
        if rewritten is None:
            return raw
        self._timed_out = None
        return rewritten

    def _transaction_timed_out(self, kind: str, limit: Limit) -> None:
        if self.phase is not Phase.READY:
            return
        self.metrics.transaction_timeouts[kind].inc()
        log.warning(
            "transaction_timeout",
            kind=kind,
            rule=limit.rule,
            limit_s=round(limit.seconds, 3),
            **self._identity(),
        )
        if kind == "idle_in_transaction":
            self._fail(
                "25P03",
                "terminating connection due to idle-in-transaction timeout "
                f"(pgwarden, {limit.describe()})",
                "idle_in_transaction_timeout",
            )
        else:
            self._fail(
                "57014",
                "terminating connection due to transaction timeout "
                f'(pgwarden rule "{limit.rule}", {limit.describe()})',
                "transaction_timeout",
            )

    # ------------------------------------------------------------------ rules

    def _start_rules(self) -> None:
        """Applies rules from wherever the client's stream stands."""
        if self.phase is Phase.READY:
            self._keep_books_now()  # blocks rewrite errors on their way back
            header, passing = self._client_frames.remaining()
            self._statements = MessageEditor(
                b"QP", self._apply_rules, header_sent=header, passing=passing
            )

    def _apply_rules(self, raw: bytes) -> bytes:
        """A Query or Parse as it should reach the server: rewritten, blocked or as sent."""
        rules = self.host.rules
        analysis = self.host.analysis
        if rules is None or analysis is None:
            return raw
        try:
            message = m.decode(m.FRONTEND, raw[0], memoryview(raw)[5:])
        except ValueError:
            return raw  # malformed: the server will say so
        assert isinstance(message, m.Query | m.Parse)
        sql = message.sql
        identity = SessionIdentity(self.user, self.database, self.application_name)
        decisions = []
        for index, statement in enumerate(analysis.analyzer.analyze(sql)):
            decision = rules.decide(statement.info, identity)
            if decision is not None:
                self._rule_used(statement.info, decision)
                if decision.enforce:
                    decisions.append((index, decision))
        if not decisions:
            return raw
        block = next((d for _, d in decisions if d.kind == "block"), None)
        if block is not None:
            self._blocks_sent += 1
            new_sql = f"{BLOCK_MARKER}_{self._blocks_sent}"
            self._blocked.append((new_sql, block.rule))
            self._edit_errors()
        else:
            rewritten = rewrite_statements(sql, [(i, d.replace) for i, d in decisions])
            if rewritten is None:
                log.warning("rewrite_skipped", reason="literals could not be carried over")
                return raw
            new_sql = rewritten
        if isinstance(message, m.Query):
            return m.Query(new_sql).encode()
        return m.Parse(message.name, new_sql, message.param_types).encode()

    def _rule_used(self, info: StatementInfo, decision: Decision) -> None:
        mode = "enforce" if decision.enforce else "log"
        counter = self.metrics.rewrites if decision.kind == "rewrite" else self.metrics.blocks
        counter.labels(decision.rule, mode).inc()
        rules = self.host.rules
        if rules is not None and rules.first_use(decision.rule, info.fingerprint):
            log.info(
                "rule_applied" if decision.enforce else "rule_would_apply",
                kind=decision.kind,
                rule=decision.rule,
                statement=info.normalized,
                fingerprint=info.fingerprint,
                **self._identity(),
            )

    def _block_error(self, raw: bytes) -> bytes | None:
        try:
            error = m.ErrorResponse.decode(memoryview(raw)[5:])
        except ValueError:
            return None
        if BLOCK_MARKER not in error.message:
            return None
        # Errors come back in order; a block with no error of its own was skipped by the
        # server after an earlier error of its pipeline.
        while self._blocked:
            marker, rule = self._blocked.popleft()
            if f'"{marker}"' in error.message:
                return m.ErrorResponse.build(
                    "ERROR", "42501", f'pgwarden: statement blocked by rule "{rule}"'
                ).encode()
        return None

    def server_lost(self, exc: Exception | None) -> None:
        self.server = None
        self.metrics.server_connections.dec()
        if self.phase is Phase.CLOSED:
            return
        self._catch_up()
        if self.round_trips.fatal_seen or self.round_trips.terminated:
            self._close("server_closed")
            return
        self.metrics.connection_errors["upstream_lost"].inc()
        log.warning(
            "upstream_lost", error=str(exc) if exc else "connection closed", **self._identity()
        )
        self._fail(
            "08006",
            "pgwarden: lost the connection to the upstream PostgreSQL server",
            "upstream_lost",
        )

    # --------------------------------------------------------------- draining

    def begin_drain(self) -> None:
        """Close once no transaction is open; sessions not yet authenticated close now."""
        self.draining = True
        if self.phase is Phase.READY:
            self._drain_if_idle()
        elif self.phase is not Phase.CLOSED:
            self._fail("57P03", "the database system is shutting down", "draining")

    def _drain_if_idle(self) -> None:
        self._catch_up()
        if self.round_trips.idle and self.phase is Phase.READY:
            self._fail(
                "57P01",
                "terminating connection due to administrator command (pgwarden is shutting down)",
                "drained",
            )

    def terminate(self, reason: str) -> None:
        """Ends the session now, whatever it is doing."""
        self._fail("57P01", "terminating connection due to administrator command", reason)

    # -------------------------------------------------------------- ending

    def _startup_expired(self) -> None:
        self._timer = None
        if self.phase in (Phase.STARTUP, Phase.CONNECTING, Phase.AUTH):
            self.metrics.connection_errors["startup_timeout"].inc()
            log.warning("startup_timeout", phase=self.phase.value, **self._identity())
            self._fail("08P01", "pgwarden: startup did not complete in time", "startup_timeout")

    def _protocol_violation(self, side: str, exc: ProtocolViolation) -> None:
        self.metrics.connection_errors["protocol_violation"].inc()
        log.warning("protocol_violation", side=side, error=str(exc), **self._identity())
        if side == "client":
            self._fail("08P01", f"pgwarden: {exc}", "protocol_violation")
        else:
            self._fail(
                "08P01", "pgwarden: invalid data from the upstream server", "protocol_violation"
            )

    def _fail(self, sqlstate: str, message: str, reason: str) -> None:
        """Sends a FATAL error where the client can read one, then closes both sides."""
        if self.phase is Phase.CLOSED:
            return
        if self.client is not None and self._server_at_boundary() and not self._tls_pending:
            error = m.ErrorResponse.build("FATAL", sqlstate, message)
            self._write_client(error.encode())
        self._close(reason)

    @property
    def _tls_pending(self) -> bool:
        task = self._connect_task
        return (
            self.phase is Phase.STARTUP
            and task is not None
            and not task.done()
            and self.host.server_tls is not None
        )

    def _close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        was_ready = self.phase is Phase.READY
        self.phase = Phase.CLOSED
        self.close_reason = reason
        self._catch_up()  # the round trips below must be current
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        server = self.server
        if server is not None:
            if self.round_trips.busy and self.backend_key and not self.round_trips.terminated:
                # PostgreSQL only notices a vanished client when it next writes; cancel now.
                self.metrics.cancel_requests.labels("client_gone").inc()
                self.host.forward_cancel(CancelRequest(*self.backend_key))
            elif was_ready and self._client_frames.at_boundary and not self.round_trips.terminated:
                server.write(m.Terminate().encode())
            server.close()
        if self.client is not None:
            self.client.close()
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if self.inspector is not None:
            self.inspector.close()
            self.inspector = None
        self.metrics.client_connections.dec()
        self.metrics.closed_bytes_in += self.bytes_in
        self.metrics.closed_bytes_out += self.bytes_out
        duration = time.monotonic() - self.started
        self.metrics.connection_duration.observe(duration)
        self.host.session_closed(self)
        if self.parameters or reason not in ("client_closed", "cancel_request"):
            log.info(
                "connection_closed",
                reason=reason,
                duration_s=round(duration, 3),
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                **self._identity(),
            )

    def _write_client(self, data: bytes) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.write(data)


class _Upstream(asyncio.Protocol):
    """The server side's protocol: hands everything to the session."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.server_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.server_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_client("backpressure")

    def resume_writing(self) -> None:
        self.session.resume_client("backpressure")


def _strip_channel_binding(body: memoryview) -> bytes | None:
    """AuthenticationSASL without SCRAM-SHA-256-PLUS: channel binding cannot cross a proxy.

    Returns the re-encoded message, or None when nothing had to change.
    """
    request = m.AuthenticationRequest.decode(body)
    if request.code != m.AUTH_SASL or _SCRAM_PLUS not in request.mechanisms:
        return None
    kept = tuple(x for x in request.mechanisms if x != _SCRAM_PLUS)
    return m.AuthenticationRequest.sasl(kept).encode()

"""One client connection and its upstream connection: phases, I/O, and how it ends.

The session is the client's asyncio Protocol; `_Upstream` is the server side's. What the
bytes mean is asked of sans-I/O parts: the handshake (startup packets, authentication)
before READY, the relay (relay.py) in READY. Either side's transport filling up pauses
reading on the other side, so a slow reader gets backpressure instead of a growing buffer.

Phases, changed only in `_enter`:
STARTUP (untyped packets, TLS) → CONNECTING (upstream being opened) → AUTH
(authentication relayed message by message) → READY (the relay) → CLOSED.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from proxy import upstream
from proxy.analysis.matching import SessionIdentity
from proxy.inspector import Analysis, Inspector
from proxy.logs import get_logger
from proxy.protocol import messages as m
from proxy.protocol.framing import FrameDecoder, ProtocolViolation
from proxy.protocol.startup import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage
from proxy.rewriters.rules import RuleEngine
from proxy.session.handshake import AuthRelay, StartupReader
from proxy.session.relay import Relay
from proxy.session.rules import RulesHook
from proxy.session.timeouts import TimeoutHook
from proxy.timeouts import TimeoutPolicy
from proxy.tracking.events import Running
from proxy.tracking.round_trips import CLIENT_INTEREST, RoundTrips

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.metrics import Metrics

__all__ = ["Phase", "Session", "SessionHost"]

log = get_logger("pgwarden.session")

_PENDING_LIMIT = 1 << 16  # client bytes held while the upstream connection opens
# A drained session's 57P01 follows the ReadyForQuery that left it idle this much later,
# or comes as the answer to the client's next message, whichever is first. Sent at once,
# it lands in the client's read of that ReadyForQuery, and libpq takes an error there for
# a notice and reports its next statement as a bare lost connection.
_DRAIN_GRACE = 0.1
# SQLSTATE classes whose startup errors name at most the user, the database and the host
# (28P01 password authentication failed for user "app"): their message is logged. Others
# may quote a value the client sent (22023 invalid value for parameter "…": "…").
_TOLD_CLASSES = frozenset(("08", "28", "3D", "42", "53", "57"))
_session_ids = itertools.count(1)  # the ids GET /clients shows and terminate takes
_STATEMENT_SHOWN = 1024  # characters of the running statement describe() shows
_IDLE_STATES = {b"I": "idle", b"T": "idle in transaction", b"E": "idle in transaction (aborted)"}


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
        self.id = next(_session_ids)
        self.settings = host.settings
        self.metrics = host.metrics
        self.rejected = rejected
        self.phase = Phase.STARTUP
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.peer = "?"
        self.tls = False
        self.parameters: dict[str, str] = {}
        self.identity = SessionIdentity("", "", "")
        self.backend_key: tuple[int, bytes] | None = None
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_reason = ""
        self.draining = False
        self._drain_timer: asyncio.TimerHandle | None = None  # see _DRAIN_GRACE
        self._tls_refused = False  # answered N to the client's SSLRequest
        self.round_trips = RoundTrips(self.metrics.record_transaction)
        self.relay: Relay | None = None  # from READY to CLOSED
        self._rules: RulesHook | None = None
        self._paused: set[str] = set()  # why reading from the client is paused
        limits = self.settings.limits
        self._startup = StartupReader(_PENDING_LIMIT)
        self._startup_raw = b""  # the startup packet, as it goes to the server
        self._auth = AuthRelay(limits.max_message_size)
        self._client_frames = FrameDecoder(
            CLIENT_INTEREST, inspect_limit=0, max_length=limits.max_message_size
        )
        self._timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- identity

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def database(self) -> str:
        return self.identity.database

    @property
    def application_name(self) -> str:
        return self.identity.application_name

    def log_fields(self) -> dict[str, object]:
        return {
            "client": self.peer,
            "user": self.user or None,
            "database": self.database or None,
            "application_name": self.application_name or None,
        }

    def describe(self) -> dict[str, object]:
        """This session as GET /clients lists it, like PgBouncer's SHOW CLIENTS: who, in
        what state, running what (normalized: never a value) and for how long."""
        running = self.running()  # catches up first, so the round trips below are current
        books = self.round_trips
        now = time.perf_counter()  # the clock of the tracker and of the round trips
        age = time.monotonic() - self.started
        if self.phase is not Phase.READY:
            state = self.phase.value
        elif running is not None or books.busy:
            state = "active"
        else:
            state = _IDLE_STATES.get(books.status, "idle")
        statement = running.event.info.normalized if running is not None else ""
        if len(statement) > _STATEMENT_SHOWN:
            statement = statement[: _STATEMENT_SHOWN - 1] + "…"
        in_transaction = books.status != b"I" and books.transaction_started > 0
        return {
            "id": self.id,
            "pid": self.backend_key[0] if self.backend_key is not None else None,
            "client": self.peer,
            "tls": self.tls,
            "user": self.user or None,
            "database": self.database or None,
            "application_name": self.application_name or None,
            "state": state,
            "connected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age)),
            "age_s": round(age, 3),
            "transaction_age_s": (
                round(now - books.transaction_started, 3) if in_transaction else None
            ),
            "statement": statement or None,
            "statement_age_s": round(now - running.started, 3) if running is not None else None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    # ------------------------------------------------------------------ phases

    def _enter(self, phase: Phase) -> None:
        """Every phase change, and what comes with it."""
        self.phase = phase
        ends_startup = phase is Phase.READY or phase is Phase.CLOSED
        if ends_startup and self._timer is not None:  # the startup deadline
            self._timer.cancel()
            self._timer = None
        if phase is Phase.CLOSED and self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    # ------------------------------------------------------------ client side

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
        relay = self.relay
        if relay is not None:
            if self._drain_timer is not None:  # drained: 57P01 is this message's answer
                self._drained()
                return
            if self._rules is None and self.host.rules is not None:
                self._start_rules()  # rules added by a reload apply to open sessions too
            try:
                relay.client_data(data)
            except Exception:
                self._relay_failed("client")
        elif self.phase is Phase.STARTUP:
            self._startup.feed(data)
            self._read_startup()
        elif self.phase is Phase.CONNECTING:
            try:
                self._startup.hold(data)
            except ProtocolViolation as exc:
                self.protocol_violation("client", exc)
        elif self.phase is Phase.AUTH:
            self._auth_client_data(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost does the cleanup

    def connection_lost(self, exc: Exception | None) -> None:
        self.client = None
        if self.relay is not None:
            self.relay.client = None
        if self.phase is Phase.STARTUP and self._tls_refused:  # libpq's sslmode=require
            self._startup_failed(
                "tls_refused", None, "the client asked for TLS, which pgwarden does not offer"
            )
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
        while self.phase is Phase.STARTUP:
            try:
                found = self._startup.next_packet()
            except ProtocolViolation as exc:
                self.protocol_violation("client", exc)
                return
            if found is None:
                return
            packet, raw = found
            if isinstance(packet, SSLRequest | GSSENCRequest):
                if self._startup.buf:
                    # Bytes sent before our answer would be taken as if encrypted (CVE-2021-23214).
                    self.protocol_violation(
                        "client", ProtocolViolation("received unencrypted data after SSL request")
                    )
                    return
                if isinstance(packet, SSLRequest) and self.host.server_tls and not self.tls:
                    self._write_client(b"S")
                    self._connect_task = asyncio.ensure_future(self._start_client_tls())
                    return
                self._write_client(b"N")
                if isinstance(packet, SSLRequest):
                    self._tls_refused = True
            elif isinstance(packet, CancelRequest):
                # Closed once the cancel was delivered, as PostgreSQL closes it once read:
                # a client such as libpq waits for that before it sends anything more.
                self.pause_client("cancel")
                self.host.forward_cancel(packet, lambda: self._close("cancel_request"))
                return
            else:
                assert isinstance(packet, StartupMessage)
                self._start(packet, raw)

    async def _start_client_tls(self) -> None:
        assert self.client is not None and self.host.server_tls is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.client, self, self.host.server_tls, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self.metrics.connection_errors["tls"].inc()
            log.warning("client_tls_failed", error=str(exc), **self.log_fields())
            self._close("tls_failed")
            return
        if transport is None or self.phase is Phase.CLOSED:
            return
        self.client = transport
        self.tls = True

    def _start(self, packet: StartupMessage, raw: bytes) -> None:
        parameters = packet.parameters
        self.parameters = parameters
        user = parameters.get("user", "")
        self.identity = SessionIdentity(
            user, parameters.get("database") or user, parameters.get("application_name", "")
        )
        if self.rejected:
            self.metrics.connection_errors["too_many_connections"].inc()
            self.fail("53300", "sorry, too many clients already", "too_many_connections")
            return
        if self.host.draining:
            self.fail("57P03", "the database system is shutting down", "draining")
            return
        timeouts = self.settings.timeouts
        if timeouts.server_side and timeouts.statement:
            # PostgreSQL enforces the default itself too, should pgwarden's timer not run.
            options = parameters.get("options", "")
            setting = f"-c statement_timeout={int(timeouts.statement * 1000)}"
            params = {**parameters, "options": f"{options} {setting}".strip()}
            raw = StartupMessage(packet.protocol, params).encode()
        self._startup_raw = raw
        self._enter(Phase.CONNECTING)
        self._connect_task = asyncio.ensure_future(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        began = time.perf_counter()
        try:
            transport, _ = await upstream.connect(self.settings.upstream, lambda: _Upstream(self))
        except upstream.UpstreamError as exc:
            self.metrics.connection_errors["upstream_connect"].inc()
            log.warning("upstream_connect_failed", error=str(exc), **self.log_fields())
            self.fail("08001", f"pgwarden: {exc}", "upstream_connect_failed")
            return
        if self.phase is not Phase.CONNECTING:  # the client left meanwhile
            transport.close()
            return
        self.metrics.upstream_connect_duration.observe(time.perf_counter() - began)
        self.server = transport  # type: ignore[assignment]
        self.metrics.server_connections.inc()
        self.metrics.server_connections_opened.inc()
        self._enter(Phase.AUTH)
        transport.write(self._startup_raw)
        pending = self._startup.take()
        if pending:
            self.data_received(pending)

    # --------------------------------------------------------- authentication

    def _auth_client_data(self, data: bytes) -> None:
        """The client's answers (passwords, SASL) go as they are."""
        try:
            frames = self._client_frames.feed(data)
        except ProtocolViolation as exc:
            self.protocol_violation("client", exc)
            return
        assert self.server is not None
        self.bytes_in += len(data)
        self.server.write(data)
        if frames:
            self.round_trips.client(frames)

    def server_data(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            try:
                relay.server_data(data)
            except Exception:
                self._relay_failed("server")
        elif self.phase is Phase.AUTH:
            self._auth_server_data(data)

    def _auth_server_data(self, data: bytes) -> None:
        auth = self._auth
        try:
            out, tail = auth.feed(data)
        except ProtocolViolation as exc:
            self.protocol_violation("server", exc)
            return
        self.backend_key = auth.backend_key
        error = auth.error
        if error is not None and not self.round_trips.fatal_seen:  # the server will close
            self.round_trips.fatal_seen = True
            self._startup_failed(_refusal_kind(error.sqlstate), error.sqlstate, _told(error))
        if out:
            self._write_client(out)
        self.bytes_out += len(data)
        if tail is not None and auth.status is not None:
            self.round_trips.authenticated(auth.status)
            self._become_ready(tail)

    def _become_ready(self, tail: bytes) -> None:
        """Authenticated: the relay takes over. `tail` is what followed the first
        ReadyForQuery in its chunk, already sent to the client: the relay's reader of the
        server stream starts with it, at a message boundary."""
        assert self.client is not None and self.server is not None
        analysis = self.host.analysis
        inspector = None
        if analysis is not None:
            inspector = Inspector(
                analysis, self.identity, client_at=self._client_frames.remaining()
            )
        relay = Relay(
            self,
            self.client,
            self.server,
            self.round_trips,
            self._client_frames,
            inspector,
            self.settings.limits.max_message_size,
        )
        self.relay = relay
        if analysis is not None:
            rules = self.host.rules
            if rules is not None and rules.active:
                self._start_rules()
            if self.host.timeouts is not None:
                loop = asyncio.get_running_loop()
                at = self._client_frames.remaining()
                relay.add_hook(
                    TimeoutHook(self, self.host.timeouts, self.metrics, loop.call_later, at)
                )
        if tail and not relay.track_server(tail):
            return  # the server's bytes made no sense: the session has ended
        self._enter(Phase.READY)
        self.host.session_ready(self)
        log.info("connection_opened", tls=self.tls, **self.log_fields())

    def _start_rules(self) -> None:
        """Rules start from wherever the client's stream stands (a reload can add them to
        open sessions); they always apply the engine of the config in force."""
        host = self.host
        if self.relay is None or host.analysis is None:
            return
        self._rules = RulesHook(
            self,
            lambda: host.rules,
            host.analysis.analyzer,
            self.metrics,
            self._client_frames.remaining(),
        )
        self.relay.add_hook(self._rules)

    # ------------------------------------------------- what hooks may ask

    def running(self) -> Running | None:
        return self.relay.running() if self.relay is not None else None

    def edit_errors(self) -> None:
        if self.relay is not None:
            self.relay.edit_errors()

    def cancel_backend(self, done: Callable[[], None]) -> None:
        if self.phase is not Phase.READY or self.server is None:
            done()
            return
        self.host.cancel_backend(self, done)

    # ---------------------------------------------------------------- draining

    def begin_drain(self) -> None:
        """Close once no transaction is open; sessions not yet authenticated close now."""
        self.draining = True
        if self.phase is Phase.READY:
            if self.relay is not None:
                self.relay.catch_up()
            if self.round_trips.idle:  # its client reads the error with its next statement
                self._drained()
        elif self.phase is not Phase.CLOSED:
            self.fail("57P03", "the database system is shutting down", "draining")

    def drain_if_idle(self) -> None:
        """Server bytes reached the client of a draining session: once they leave it idle,
        it ends after `_DRAIN_GRACE` or at the client's next message."""
        if self.relay is not None:
            self.relay.catch_up()
        if self.round_trips.idle and self.phase is Phase.READY and self._drain_timer is None:
            self._drain_timer = asyncio.get_running_loop().call_later(_DRAIN_GRACE, self._drained)

    def _drained(self) -> None:
        self.fail(
            "57P01",
            "terminating connection due to administrator command (pgwarden is shutting down)",
            "drained",
        )

    def terminate(self, reason: str) -> None:
        """Ends the session now, whatever it is doing."""
        self.fail("57P01", "terminating connection due to administrator command", reason)

    # ------------------------------------------------------------------ ending

    def server_lost(self, exc: Exception | None) -> None:
        self.server = None
        self.metrics.server_connections.dec()
        if self.phase is Phase.CLOSED:
            return
        if self.relay is not None:
            self.relay.catch_up()
        if self.round_trips.fatal_seen or self.round_trips.terminated:
            self._close(self.close_reason or "server_closed")
            return
        self.metrics.connection_errors["upstream_lost"].inc()
        log.warning(
            "upstream_lost", error=str(exc) if exc else "connection closed", **self.log_fields()
        )
        self.fail(
            "08006",
            "pgwarden: lost the connection to the upstream PostgreSQL server",
            "upstream_lost",
        )

    def _relay_failed(self, side: str) -> None:
        """A bug on the relay path (compiled code raises TypeError where Python would have
        gone on) ends this session, never the process nor another session: logged, the
        client told where the stream allows, both sides closed."""
        self.metrics.connection_errors["internal_error"].inc()
        log.exception("relay_failed", side=side, action="session closed", **self.log_fields())
        message = "pgwarden: internal error, the session is closed"
        try:
            if self.client is not None and self._server_at_boundary():
                self._write_client(m.ErrorResponse.build("FATAL", "XX000", message).encode())
        except Exception:
            log.exception("relay_failed", side=side, action="client not told")
        try:
            self._close("internal_error")
        except Exception:  # the state is unknown: drop both sides as they are
            log.exception("relay_failed", side=side, action="connections aborted")
            for transport in (self.client, self.server):
                if transport is not None:
                    transport.abort()

    def books_lost(self, exc: Exception) -> None:
        """The tracker kept this session's server side and cannot any more; where the
        stream stands is unknown, so no error can be placed in it: the session ends."""
        if isinstance(exc, ProtocolViolation):
            self.metrics.connection_errors["protocol_violation"].inc()
            log.warning("protocol_violation", side="server", error=str(exc), **self.log_fields())
            self._close("protocol_violation")
        else:
            self._close("internal_error")

    def _startup_failed(self, kind: str, sqlstate: str | None, error: str | None) -> None:
        """A startup refused, by PostgreSQL (its SQLSTATE) or by pgwarden's lack of TLS:
        counted, logged (the server's message only where `_told` allows) and the reason
        the connection closes."""
        self.metrics.connection_errors[kind].inc()
        self.close_reason = kind
        log.warning(
            "startup_failed", kind=kind, sqlstate=sqlstate, error=error, **self.log_fields()
        )

    def _startup_expired(self) -> None:
        self._timer = None
        if self.phase in (Phase.STARTUP, Phase.CONNECTING, Phase.AUTH):
            self.metrics.connection_errors["startup_timeout"].inc()
            log.warning("startup_timeout", phase=self.phase.value, **self.log_fields())
            self.fail("08P01", "pgwarden: startup did not complete in time", "startup_timeout")

    def protocol_violation(self, side: str, exc: ProtocolViolation) -> None:
        self.metrics.connection_errors["protocol_violation"].inc()
        log.warning("protocol_violation", side=side, error=str(exc), **self.log_fields())
        if side == "client":
            self.fail("08P01", f"pgwarden: {exc}", "protocol_violation")
        else:
            self.fail(
                "08P01", "pgwarden: invalid data from the upstream server", "protocol_violation"
            )

    def fail(self, sqlstate: str, message: str, reason: str) -> None:
        """Sends a FATAL error where the client can read one, then closes both sides."""
        if self.phase is Phase.CLOSED:
            return
        if self.client is not None and self._server_at_boundary() and not self._tls_pending:
            error = m.ErrorResponse.build("FATAL", sqlstate, message)
            self._write_client(error.encode())
        self._close(reason)

    def _server_at_boundary(self) -> bool:
        """Whether what the client was sent so far ends with a whole message."""
        if self.relay is not None:
            return self.relay.server_position() == (b"", 0)
        return self._auth.frames.at_boundary

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
        self._enter(Phase.CLOSED)
        self.close_reason = reason
        relay = self.relay
        if relay is not None:
            relay.catch_up()  # the round trips below must be current
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        server = self.server
        books = self.round_trips
        if server is not None:
            if books.busy and self.backend_key and not books.terminated:
                # PostgreSQL only notices a vanished client when it next writes; cancel now.
                self.metrics.cancel_requests.labels("client_gone").inc()
                self.host.forward_cancel(CancelRequest(*self.backend_key))
            elif relay is not None and self._client_frames.at_boundary and not books.terminated:
                server.write(m.Terminate().encode())
            if server.get_write_buffer_size():
                # A server that does not read what it was sent would hold a closing
                # connection (and its buffer) open until it read it all: maybe never.
                server.abort()
            else:
                server.close()
        if self.client is not None:
            self.client.close()
        if relay is not None:
            self.relay = None  # whatever still arrives is dropped
            self._rules = None  # it refers back to us: reference counting frees us now
            relay.close()
            if relay.inspector is not None:
                relay.inspector.close()
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
                **self.log_fields(),
            )

    def _write_client(self, data: bytes) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.write(data)


def _refusal_kind(sqlstate: str) -> str:
    """The pgwarden_connection_errors_total kind of a startup PostgreSQL refused."""
    if sqlstate.startswith("28"):  # invalid_authorization_specification, invalid_password
        return "auth_failed"
    if sqlstate == "3D000":  # invalid_catalog_name
        return "unknown_database"
    return "startup_failed"


def _told(error: m.ErrorResponse) -> str | None:
    """The server's message, where its SQLSTATE class cannot quote a client's value."""
    return error.message if error.sqlstate[:2] in _TOLD_CLASSES else None


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

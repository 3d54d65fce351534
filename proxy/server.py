"""The listener: accepts clients, routes cancel requests, drains on SIGTERM, reloads on SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from collections.abc import Callable

from proxy import native, upstream
from proxy.admin import (
    OPEN_PATHS,
    AdminServer,
    Request,
    healthz,
    json_response,
    metrics_endpoint,
    readiness_endpoint,
)
from proxy.advice import FILTERS as ADVICE_FILTERS
from proxy.advice import AdviceSink
from proxy.advisor import Advisor
from proxy.analysis.analyzer import Analyzer
from proxy.backlog import Backlog
from proxy.config import Address, ConfigError, Settings
from proxy.fingerprints import FILTERS as FINGERPRINT_FILTERS
from proxy.fingerprints import ParamSamples
from proxy.inspector import Analysis
from proxy.logs import configure_logging, get_logger
from proxy.metrics import Metrics
from proxy.protocol.startup import CancelRequest
from proxy.rewriters.rules import RuleEngine
from proxy.session import Session
from proxy.timeouts import TimeoutPolicy
from proxy.web.page import advice_page

__all__ = ["ListenError", "ProxyServer", "server_ssl_context"]

log = get_logger("pgwarden.server")

_CANCEL_LIMIT = 64  # cancel requests in flight at once; more are dropped (and logged)
_PROBE_TIMEOUT = 1.0  # seconds /readyz waits for the upstream (a kubelet's default wait)
_LISTENERS = {"clients": "clients (listen)", "admin": "the admin HTTP server (admin.listen)"}


class ListenError(Exception):
    """A listener could not open its socket: an address in use or not of this host."""

    def __init__(self, listener: str, address: Address, error: OSError) -> None:
        # asyncio words a bind error at length; the errno's own text says it
        code = error.errno or 0
        why = os.strerror(code) if code > 0 else (error.strerror or str(error))
        super().__init__(f"cannot listen for {_LISTENERS[listener]} on {address}: {why}")


def _filters(query: dict[str, str], allowed: tuple[str, ...], path: str) -> dict[str, str] | str:
    """The query's filters, or why they are refused: a misspelt name must not pass for a
    filter that matched nothing."""
    for name in query:
        if name not in allowed:
            what = "does not apply to" if name in ADVICE_FILTERS else "is not a filter of"
            return f"{name!r} {what} {path}; filter by {', '.join(allowed)}"
    return query


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for client connections, when tls.cert and tls.key are set."""
    if not settings.tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls.cert, settings.tls.key)  # type: ignore[arg-type]
    return ctx


class ProxyServer:
    """Owns the listening socket, the admin HTTP server and every live session."""

    def __init__(self, settings: Settings, *, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.server_tls = server_ssl_context(settings)
        self.draining = False
        self.sessions: set[Session] = set()
        self._by_key: dict[tuple[int, bytes], Session] = {}
        self._reload = reload
        self._listener: asyncio.Server | None = None
        self.sink = AdviceSink(
            settings.advice.repeat_interval, on_report=self.metrics.record_advice
        )
        self.analyzer = Analyzer(settings.analysis.cache_size)
        self.backlog = Backlog()  # every session's chunks waiting for analysis
        self.metrics.watch_analyzer(self.analyzer)
        self.metrics.watch_traffic(self._open_traffic)
        self.analysis: Analysis | None = None
        self.timeouts: TimeoutPolicy | None = None
        self.rules: RuleEngine | None = None
        # the index advisor's parameter samples, kept only while it runs (advisor.dsn)
        self.samples = ParamSamples() if settings.advisor.dsn else None
        self._advisor: Advisor | None = None
        self._configure_analysis(settings)
        self._admin = AdminServer(
            {
                "/metrics": metrics_endpoint(self.metrics.registry, before_read=self.backlog.flush),
                "/healthz": healthz,
                "/readyz": readiness_endpoint(self._unready),
                "/advice": self._advice,
                "/fingerprints": self._fingerprints,
                "/clients": self._clients,
                "/": advice_page(
                    self.sink.snapshot, self.metrics.fingerprints.snapshot, self.backlog.flush
                ),
            },
            actions={"/clients/{id}/terminate": self._terminate},
            token=settings.admin.token,  # read once: admin settings need a restart
            open_paths=OPEN_PATHS | ({"/metrics"} if settings.admin.metrics_public else set()),
        )
        self._cancels: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Future[None] | None = None
        self._ready_requires_upstream = settings.admin.ready_requires_upstream  # restart
        self._upstream_check: asyncio.Future[None] | None = None  # kept: a task needs a holder

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Opens both listeners (ListenError names the one that cannot listen), then checks
        the upstream in the background: pgwarden may start before its database."""
        loop = asyncio.get_running_loop()
        addr = self.settings.listen
        try:
            self._listener = await loop.create_server(
                self._accept, addr.host, addr.port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            raise ListenError("clients", addr, exc) from None
        try:
            await self._admin.start(self.settings.admin.listen)
        except OSError as exc:
            self._listener.close()
            raise ListenError("admin", self.settings.admin.listen, exc) from None
        self._upstream_check = asyncio.ensure_future(self._check_upstream())
        log.info(
            "listening",
            listen=str(addr),
            upstream=str(self.settings.upstream.address),
            admin=str(self.settings.admin.listen),
            tls=self.server_tls is not None,
            config=self.settings.source,
            analysis_code=native.MODE,
        )
        self._start_advisor()

    def _start_advisor(self) -> None:
        """The index advisor, when advisor.dsn names its connection; else it is off, said
        once. Its own task: it never runs on the relay's path."""
        samples = self.samples
        if samples is None:
            why: str | None = "advisor.dsn is not set"
        elif not self.settings.analysis.enabled:
            why = "analysis.enabled is false"
        else:
            why = Advisor.refuses(self.settings)
        if samples is None or why is not None:
            log.info("advisor_off", reason=why)
            return
        self._advisor = Advisor(
            lambda: self.settings, self.metrics.fingerprints, samples, self.sink, self.metrics
        )
        self._advisor.start()
        log.info("advisor_started", interval_s=float(self.settings.advisor.interval))

    async def _check_upstream(self) -> None:
        """One warning at start when the upstream does not answer, as every client would
        fail until it does (each failure then logs upstream_connect_failed)."""
        settings = self.settings.upstream
        problem = await upstream.probe(settings, settings.connect_timeout or None)
        if problem is not None:
            log.warning("upstream_unreachable", upstream=str(settings.address), error=problem)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown)
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()

    def request_shutdown(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Stop accepting, let open transactions finish up to drain_timeout, then close."""
        self.draining = True
        self.metrics.draining.set(1)
        timeout = self.settings.shutdown.drain_timeout
        log.info("draining", sessions=len(self.sessions), drain_timeout_s=float(timeout))
        if self._listener is not None:
            self._listener.close()
        for session in list(self.sessions):
            session.begin_drain()
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.sessions)
        for session in list(self.sessions):
            session.terminate("drain_timeout")
        if self._cancels:
            await asyncio.wait(self._cancels, timeout=2.0)
        if self._advisor is not None:
            await self._advisor.stop()
        await self._admin.stop()
        log.info("stopped", closed_at_deadline=left)
        self._stopped.set()

    def reload(self) -> None:
        """Swaps in a freshly loaded config; a bad file keeps the running one."""
        if self._reload is None:
            return
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        for key in ("listen", "admin"):
            if getattr(new, key) != getattr(self.settings, key):
                log.warning("reload_needs_restart", key=key)
        for key in ("dsn", "password", "statement_timeout"):  # the advisor's connections
            if getattr(new.advisor, key) != getattr(self.settings.advisor, key):
                log.warning("reload_needs_restart", key=f"advisor.{key}")
        try:
            self.server_tls = server_ssl_context(new)
        except (OSError, ssl.SSLError) as exc:
            log.error("reload_failed", error=f"tls: {exc}")
            return
        self.settings = new
        self._configure_analysis(new)
        log.info("reloaded", config=new.source)
        # after the event above, so a raised level does not hide the reload itself
        configure_logging(new.logging.format, new.logging.level)

    def _configure_analysis(self, settings: Settings) -> None:
        """New sessions pick up analysis and detector settings; running ones keep theirs."""
        self.sink.repeat_interval = settings.advice.repeat_interval
        self.metrics.fingerprints.max_series = settings.metrics.max_fingerprints
        self.metrics.client_connections_limit.set(settings.limits.max_client_connections)
        policy = TimeoutPolicy(settings.timeouts)
        self.timeouts = policy if policy.enforces_anything else None
        rules = RuleEngine(settings.rewrites, settings.blocks)
        self.rules = rules if rules.active else None
        if not settings.analysis.enabled and self.timeouts is None and self.rules is None:
            self.analysis = None
            return
        # Timeouts and rules need statements tracked and analysed (tables, fingerprints)
        # even when analysis is off; the detectors then stay off.
        detectors = settings.detectors.enabled() if settings.analysis.enabled else {}
        self.analyzer.resize(settings.analysis.cache_size)
        self.analysis = Analysis(
            self.analyzer,
            self.sink,
            self.metrics,
            detectors,
            backlog=self.backlog,
            samples=self.samples if settings.analysis.enabled else None,
        )

    # --------------------------------------------------------------- admin

    async def _advice(self, request: Request) -> tuple[int, str, bytes]:
        """/advice[?application_name=&database=&user=&rule=&severity=]: each given field
        must equal the advice's."""
        where = _filters(request.query, ADVICE_FILTERS, "/advice")
        if isinstance(where, str):
            return json_response(400, {"error": where})
        self.backlog.flush()
        return json_response(200, {"advice": self.sink.snapshot(where)})

    async def _fingerprints(self, request: Request) -> tuple[int, str, bytes]:
        """/fingerprints[?application_name=&database=&user=]: statements have no rule or
        severity, so asking for one is a mistake worth a 400, not an empty answer."""
        where = _filters(request.query, FINGERPRINT_FILTERS, "/fingerprints")
        if isinstance(where, str):
            return json_response(400, {"error": where})
        self.backlog.flush()
        return json_response(200, {"fingerprints": self.metrics.fingerprints.snapshot(where)})

    async def _clients(self, request: Request) -> tuple[int, str, bytes]:
        """Every open session, oldest first: at most max_client_connections of them, and
        the ones over the limit on their way out."""
        sessions = sorted(self.sessions, key=lambda session: session.id)
        return json_response(200, {"clients": [session.describe() for session in sessions]})

    async def _terminate(self, ref: str) -> tuple[int, str, bytes]:
        """Ends the one session `ref` names, with 57P01: `id:N`, `pid:N` (its backend's
        pid), or `N` for either when only one session fits."""
        kind, _, number = ref.rpartition(":")
        if kind not in ("", "id", "pid") or not (number.isascii() and number.isdigit()):
            return json_response(400, {"error": "name the client as ID, id:ID or pid:PID"})
        n = int(number)
        found = [
            session
            for session in self.sessions
            if (kind != "pid" and session.id == n)
            or (kind != "id" and session.backend_key is not None and session.backend_key[0] == n)
        ]
        if not found:
            what = {"": "id or backend pid", "id": "id", "pid": "backend pid"}[kind]
            return json_response(404, {"error": f"no open client with {what} {n}"})
        if len(found) > 1:
            ids = ", ".join(str(session.id) for session in sorted(found, key=lambda s: s.id))
            return json_response(
                409, {"error": f"{n} fits more than one client (ids {ids}): say id:ID"}
            )
        session = found[0]
        entry = session.describe()
        log.info(
            "client_terminated",
            client_id=session.id,
            backend_pid=entry["pid"],
            **session.log_fields(),
        )
        session.terminate("admin_terminate")
        return json_response(200, {"terminated": entry})

    async def _unready(self) -> str | None:
        """Why /readyz turns traffic away, if it does: draining, or (only when
        admin.ready_requires_upstream says so) an upstream that does not answer. Off by
        default: a database blip would pull every replica out of the Service at once."""
        if self.draining:
            return "draining"
        if self._ready_requires_upstream:
            problem = await upstream.probe(self.settings.upstream, _PROBE_TIMEOUT)
            if problem is not None:
                return f"upstream unreachable: {problem}"
        return None

    def _open_traffic(self) -> tuple[int, int]:
        """Bytes (in, out) the open sessions relayed, for pgwarden_bytes at scrape time."""
        return sum(s.bytes_in for s in self.sessions), sum(s.bytes_out for s in self.sessions)

    # --------------------------------------------------------------- sessions

    def _accept(self) -> Session:
        over = len(self.sessions) >= self.settings.limits.max_client_connections
        session = Session(self, rejected=over)
        self.sessions.add(session)
        return session

    def session_ready(self, session: Session) -> None:
        if session.backend_key is not None:
            self._by_key[session.backend_key] = session

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        if session.backend_key is not None and self._by_key.get(session.backend_key) is session:
            del self._by_key[session.backend_key]

    def forward_cancel(
        self, request: CancelRequest, done: Callable[[], None] | None = None
    ) -> None:
        """Sends a cancel for a backend one of our sessions owns; others are ignored.
        `done` runs once the upstream has read it (or at once, when it is not sent)."""
        session = self._by_key.get((request.process_id, request.secret_key))
        if session is None:
            # Unknown keys are dropped, as PostgreSQL does, so the port cannot be used to
            # probe for or cancel backends of other clients.
            log.info("cancel_ignored", reason="unknown backend key")
            if done is not None:
                done()
            return
        self._cancel(request, session, done)

    def cancel_backend(self, session: Session, done: Callable[[], None]) -> None:
        """Cancels what `session`'s backend runs; `done` runs once the request was read."""
        if session.backend_key is None:
            done()
            return
        self._cancel(CancelRequest(*session.backend_key), session, done)

    def _cancel(
        self, request: CancelRequest, session: Session, done: Callable[[], None] | None
    ) -> None:
        if len(self._cancels) >= _CANCEL_LIMIT:
            log.warning("cancel_dropped", reason="too many cancel requests in flight")
            if done is not None:
                done()
            return
        task = asyncio.ensure_future(self._send_cancel(request, session.settings))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
        if done is not None:
            task.add_done_callback(lambda _: done())

    async def _send_cancel(self, request: CancelRequest, settings: Settings) -> None:
        try:
            await upstream.send_cancel(settings.upstream, request.process_id, request.secret_key)
        except (OSError, ssl.SSLError) as exc:
            log.warning("cancel_failed", error=str(exc))

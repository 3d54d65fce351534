"""Per-session analysis: bytes -> StatementTracker -> metrics and detectors -> AdviceSink.

It reads the session's byte streams after they are on their way, framing them itself, so
it can run later, from the Backlog, on chunks the relay forwarded long ago.
Whatever goes wrong in here is logged and switches that part off for this session; it
never reaches the relay, except where the session relies on the tracker for the server
side of its round trips (`keep_books`): then the session is told, and ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.advice import Advice, AdviceSink
from proxy.analysis.analyzer import Analyzer
from proxy.backlog import Backlog
from proxy.detectors import (
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
    build_detectors,
)
from proxy.fingerprints import Client, ParamSamples
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.protocol.framing import ProtocolViolation
from proxy.tracking.events import StatementEvent
from proxy.tracking.round_trips import RoundTrips
from proxy.tracking.statements import StatementTracker

__all__ = ["Analysis", "Inspector"]

log = get_logger("pgwarden.inspector")


@dataclass
class Analysis:
    """What all sessions share: the statement cache, the advice sink, detector options,
    and the state rules keep per application."""

    analyzer: Analyzer
    sink: AdviceSink
    metrics: Metrics
    detectors: Mapping[str, DetectorOptions] = field(default_factory=dict)
    backlog: Backlog = field(default_factory=Backlog)
    applications: Applications = field(default_factory=Applications)
    samples: ParamSamples | None = None  # the index advisor's, fed only while it runs


class Inspector:
    """One session's analysis. `client_at` says where the client stream stands when
    analysis starts, as `FrameDecoder.remaining()` of the relay's decoder tells it; the
    server stream is taken at a message boundary."""

    def __init__(
        self,
        analysis: Analysis,
        identity: SessionIdentity,
        client_at: tuple[bytes, int] = (b"", 0),
    ) -> None:
        self.analysis = analysis
        self.metrics = analysis.metrics
        self.backlog = analysis.backlog  # where the session queues chunks for later
        self.tracker: StatementTracker | None = StatementTracker(
            analysis.analyzer, self._statements, client_at=client_at
        )
        self._books_lost: Callable[[Exception], None] | None = None
        self.client_key: Client = (identity.database, identity.user, identity.application_name)
        self.detectors: list[Detector] = build_detectors(
            analysis.detectors, identity, analysis.applications
        )
        if self.detectors:
            self.backlog.watch(self)  # ticked until close()

    def keep_books(
        self, books: RoundTrips | None, lost: Callable[[Exception], None] | None = None
    ) -> None:
        """Has the tracker keep the server side of `books` (None: stop), and call `lost` if
        it ever cannot: the session relies on it and must not go on without."""
        if self.tracker is not None:
            self.tracker.books = books
        self._books_lost = lost if books is not None else None

    def server_position(self) -> tuple[bytes, int]:
        """Where the server stream stands, as `FrameDecoder.remaining()` tells it."""
        return self.tracker.server_position() if self.tracker is not None else (b"", 0)

    def client(self, data: bytes, now: float) -> None:
        """What the client sent (every byte, in order), received at `now`."""
        tracker = self.tracker
        if tracker is not None:
            try:
                tracker.client(data, now)
            except Exception as exc:
                self._tracker_failed(exc)

    def server(self, data: bytes, now: float) -> None:
        """What the client was sent (every byte, in order, as edited), at `now`."""
        tracker = self.tracker
        if tracker is not None:
            try:
                tracker.server(data, now)
            except Exception as exc:
                self._tracker_failed(exc)

    def catch_up(self) -> None:
        """Analyses this session's chunks still queued, and only those."""
        self.backlog.catch_up(self)

    def tick(self, now: float) -> None:
        """The time, from the Backlog's clock, with this session analysed up to `now`: each
        detector judges what has gone quiet. A statement running now started before `now`
        and is not observed yet, so the detectors are told the time it started instead."""
        tracker = self.tracker
        if tracker is None:
            return
        running = tracker.current()
        if running is not None and running.started < now:
            now = running.started
        for detector in list(self.detectors):
            try:
                found = detector.tick(now)
                if found:
                    self._report(found)
            except Exception:
                self._detector_failed(detector)

    def close(self) -> None:
        self.backlog.unwatch(self)
        self.catch_up()  # this session's chunks may still be waiting
        self.tracker = None  # whatever else is queued for it comes too late
        self._books_lost = None
        for detector in list(self.detectors):
            try:
                self._report(detector.session_end())
            except Exception:
                self._detector_failed(detector)
        for detector in self.detectors:
            detector.release()

    def _tracker_failed(self, exc: Exception) -> None:
        if not isinstance(exc, ProtocolViolation):
            log.exception("tracker_failed", action="analysis off for this session")
        self.tracker = None
        lost, self._books_lost = self._books_lost, None
        if lost is not None:
            lost(exc)

    def _statements(self, events: list[StatementEvent]) -> None:
        """The statements of one round trip: metrics first, then each detector in turn.
        Methods are called on their objects, not taken as bound methods first: compiled,
        that is a direct call, where a bound method goes through Python's calling
        convention (measured: ~500 instructions a detector a statement)."""
        metrics = self.metrics
        client = self.client_key
        samples = self.analysis.samples
        for event in events:
            metrics.record_statement(event, client)
            if samples is not None:
                samples.offer(event)
        for detector in self.detectors:
            try:
                for event in events:
                    found = detector.observe(event)
                    if found:
                        self._report(found)
            except Exception:
                self._detector_failed(detector)

    def _report(self, found: Sequence[Advice]) -> None:
        for advice in found:
            self.analysis.sink.report(advice)

    def _detector_failed(self, detector: Detector) -> None:
        log.exception("detector_failed", rule=detector.rule, action="disabled for session")
        self.detectors.remove(detector)
        detector.release()

"""Per-session analysis: StatementTracker -> metrics and detectors -> AdviceSink.

The session calls it after the bytes are already on their way. Whatever goes wrong in
here is logged and switches that part off for this session; it never reaches the relay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.advice import AdviceSink
from proxy.analysis.analyzer import Analyzer
from proxy.detectors import DETECTORS, Detector, SessionIdentity
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.statements import StatementEvent, StatementTracker

__all__ = ["Analysis", "Inspector"]

log = get_logger("pgwarden.inspector")


@dataclass
class Analysis:
    """What all sessions share: the statement cache, the advice sink, detector options."""

    analyzer: Analyzer
    sink: AdviceSink
    metrics: Metrics
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)


class Inspector:
    def __init__(self, analysis: Analysis, identity: SessionIdentity) -> None:
        self.analysis = analysis
        self.metrics = analysis.metrics
        self.tracker: StatementTracker | None = StatementTracker(
            analysis.analyzer, self._statements, time.perf_counter
        )
        self.detectors: list[Detector] = [
            DETECTORS[rule](options, identity) for rule, options in analysis.detectors.items()
        ]

    def client(self, frames: list[tuple[int, memoryview | None]]) -> None:
        if self.tracker is not None:
            try:
                self.tracker.client(frames)
            except Exception:
                self._tracker_failed()

    def server(self, frames: list[tuple[int, memoryview | None]]) -> None:
        if self.tracker is not None:
            try:
                self.tracker.server(frames)
            except Exception:
                self._tracker_failed()

    def close(self) -> None:
        for detector in list(self.detectors):
            self._run(detector, None)

    def _tracker_failed(self) -> None:
        log.exception("tracker_failed", action="analysis off for this session")
        self.tracker = None

    def _statements(self, events: list[StatementEvent]) -> None:
        record = self.metrics.record_statement
        for event in events:
            record(event)
            for detector in self.detectors:
                self._run(detector, event)

    def _run(self, detector: Detector, event: StatementEvent | None) -> None:
        try:
            found = detector.observe(event) if event is not None else detector.session_end()
        except Exception:
            log.exception("detector_failed", rule=detector.rule, action="disabled for session")
            self.detectors.remove(detector)
            return
        for advice in found:
            self.analysis.sink.report(advice)

"""The narrow interface every detector implements, and what it is told about its session.

A detector instance belongs to one client session: it sees that session's finished
statements in order and may return advice, is told the time now and then (`tick`) so it
can judge what has gone quiet on a connection that stays open, and is told when the
session ends so it can report a burst still open. It keeps only bounded state and never
touches I/O.

Its options are a frozen dataclass of its own (`options_type`): the config's
`detectors.RULE` block is validated against that dataclass's fields, defaults and
metadata, so a rule declares its options once, here, and config needs nothing added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

from proxy.advice import Advice
from proxy.analysis.matching import SessionIdentity
from proxy.detectors.applications import Applications
from proxy.tracking.events import StatementEvent

__all__ = ["NO_ADVICE", "Applications", "Detector", "DetectorOptions", "SessionIdentity"]

T = TypeVar("T")

NO_ADVICE: Final[tuple[Advice, ...]] = ()  # what nearly every observe() returns: nothing to build


@dataclass(frozen=True)
class DetectorOptions:
    """What every rule's options have; a rule's own options subclass it, each field with
    its default and, as `field(metadata=...)`, the `minimum`/`maximum`/`choices` config
    enforces (a `Duration` field is written as 500ms, 5s...)."""

    enabled: bool = True


class Detector:
    rule: ClassVar[str]
    options_type: ClassVar[type[DetectorOptions]] = DetectorOptions
    # False: a rule judged outside the sessions (the index advisor's missing_index), which
    # is registered for its options only and never built for a session
    per_session: ClassVar[bool] = True

    def __init__(
        self,
        options: DetectorOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        """`options` is an `options_type`; a subclass takes it typed as its own. Built when
        the session is ready (the connection is open); `session_end` when it closes.
        `applications` holds the state a rule shares between one application's sessions."""
        self.identity = identity
        self.applications = applications if applications is not None else Applications()
        self._shared: object | None = None

    def shared(self, factory: Callable[[], T]) -> T:
        """This rule's state for the session's application, shared by all its sessions;
        held until the session ends (`release`)."""
        state = self.applications.attach(self.rule, self.identity, factory)
        self._shared = state
        return state

    def release(self) -> None:
        """The session is over: its hold on the application's state ends."""
        if self._shared is not None:
            self.applications.release(self.rule, self.identity, self._shared)
            self._shared = None

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        """Called for every statement of the session: return fast when it is not of interest."""
        return NO_ADVICE

    def tick(self, now: float) -> Sequence[Advice]:
        """Called every quarter second (the Backlog's clock), with the session analysed up
        to date: `now` (perf_counter seconds) is the earliest time a statement not yet
        observed could have started. Judges what has been quiet long enough; cheap."""
        return NO_ADVICE

    def session_end(self) -> Sequence[Advice]:
        """The connection closed: judge what is still open."""
        return NO_ADVICE

    def advice(self, event: StatementEvent, **fields: Any) -> Advice:
        """Advice about `event`'s statement, identity filled in; values never included."""
        info = event.info
        return Advice(
            rule=self.rule,
            fingerprint=info.fingerprint,
            statement=info.normalized,
            tables=info.tables,
            database=self.identity.database,
            user=self.identity.user,
            application_name=self.identity.application_name,
            **fields,
        )

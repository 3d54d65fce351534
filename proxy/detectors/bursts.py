"""Runs of one fingerprint on one session, ended by a transaction change, a gap or the end.

Both loop detectors judge a burst only when it is over, so the advice reports how many
times the loop really ran, not the moment it crossed a threshold. A burst is over once
a statement of another transaction comes, or once it has been quiet for `gap` seconds:
told by the next execution of its statement, or by the clock (`quiet`), so a loop on a
connection that stays open is judged about `gap` after it stopped, whatever comes next.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from proxy.tracking.events import StatementEvent

__all__ = ["Burst", "Bursts"]


class Burst:
    """Per-burst state; detectors subclass it to keep what they need per execution."""

    __slots__ = ("count", "first", "last", "round_trips", "template", "time_spent", "transaction")

    def __init__(self, event: StatementEvent) -> None:
        self.template = event  # the first execution: its statement, types, identity
        self.transaction = event.transaction
        self.first = event.started
        self.last = event.finished
        self.count = 0
        self.round_trips: set[int] = set()
        self.time_spent = 0.0

    def add(self, event: StatementEvent) -> None:
        self.count += 1
        self.last = event.finished
        self.time_spent += event.duration
        if len(self.round_trips) < 100_000:
            self.round_trips.add(event.round_trip)


B = TypeVar("B", bound=Burst)


class Bursts(Generic[B]):
    def __init__(
        self, factory: Callable[[StatementEvent], B], *, gap: float = 1.0, max_open: int = 64
    ) -> None:
        self.factory = factory
        self.gap = gap
        self.max_open = max_open
        self._open: OrderedDict[str, B] = OrderedDict()
        self.transaction: int | None = None  # of the statement seen last

    def add(self, event: StatementEvent) -> tuple[B, list[B]]:
        """Adds `event` to its fingerprint's burst; returns it and the bursts that ended."""
        ended = self.transaction_seen(event)
        key = event.parsed.info.fingerprint
        burst = self._open.get(key)
        if burst is not None and (
            burst.transaction != event.transaction or event.started - burst.last > self.gap
        ):
            ended.append(self._open.pop(key))
            burst = None
        if burst is None:
            burst = self._open[key] = self.factory(event)
            if len(self._open) > self.max_open:
                ended.append(self._open.popitem(last=False)[1])
        else:
            self._open.move_to_end(key)
        burst.add(event)
        return burst, ended

    def quiet(self, now: float) -> list[B]:
        """Ends the bursts quiet for over `gap` at `now` (no statement after them could
        have started before `now`): the next execution would start a new burst anyway.
        Bursts are kept in the order they last grew, the quietest first."""
        ended: list[B] = []
        bursts = self._open
        while bursts:
            key, burst = next(iter(bursts.items()))
            if now - burst.last <= self.gap:
                break
            del bursts[key]
            ended.append(burst)
        return ended

    def transaction_seen(self, event: StatementEvent) -> list[B]:
        """Any statement of a new transaction ends the bursts of the previous one."""
        if event.transaction == self.transaction:
            return []
        self.transaction = event.transaction
        ended = [b for b in self._open.values() if b.transaction != event.transaction]
        for burst in ended:
            del self._open[burst.template.info.fingerprint]
        return ended

    def close_all(self) -> list[B]:
        ended = list(self._open.values())
        self._open.clear()
        return ended

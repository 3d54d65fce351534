"""State one rule keeps per application, shared by that application's sessions.

Some patterns only show across connections: the same read repeated by every worker of a
pool, a connection opened per request. A detector asks for its rule's state for its
session's application (database, user, application_name) and gets the one object every
other session of that application holds. All sessions run on one event loop, so the
state needs no lock.

Bounded: at most `max_applications` states per rule; a state no session holds any more is
dropped once idle for `idle` seconds, or sooner when room is needed. When every state is
held and room is short, a session gets a state of its own that is not shared: a rule then
sees less, never more memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.analysis.matching import SessionIdentity

__all__ = ["Applications"]

T = TypeVar("T")

_Key = tuple[str, str, str, str]  # rule, database, user, application_name


class _Held:
    __slots__ = ("released", "sessions", "state")

    def __init__(self, state: Any) -> None:
        self.state = state
        self.sessions = 0
        self.released = 0.0  # when the last session let go


class Applications:
    def __init__(
        self,
        max_applications: int = 256,
        idle: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_applications = max_applications
        self.idle = idle
        self.clock = clock
        self._held: OrderedDict[_Key, _Held] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def attach(self, rule: str, identity: SessionIdentity, factory: Callable[[], T]) -> T:
        """The rule's state for `identity`'s application, made by `factory` if it has none;
        the caller holds it until `release`."""
        key = (rule, identity.database, identity.user, identity.application_name)
        held = self._held.get(key)
        if held is not None and not held.sessions and self.clock() - held.released > self.idle:
            del self._held[key]  # idle past its time, not yet swept: as good as gone
            held = None
        if held is None:
            self._sweep(rule)
            if self._count(rule) >= self.max_applications:
                return factory()  # a state of its own, not shared and not registered
            held = self._held[key] = _Held(factory())
        else:
            self._held.move_to_end(key)
        held.sessions += 1
        state: T = held.state
        return state

    def release(self, rule: str, identity: SessionIdentity, state: object) -> None:
        key = (rule, identity.database, identity.user, identity.application_name)
        held = self._held.get(key)
        if held is None or held.state is not state:
            return  # an unshared state, or one already dropped
        held.sessions -= 1
        if held.sessions <= 0:
            held.released = self.clock()

    def _count(self, rule: str) -> int:
        return sum(1 for key in self._held if key[0] == rule)

    def _sweep(self, rule: str) -> None:
        """Drops the states no session holds: idle ones always, and the least recently
        attached of the rule's when it has no room left."""
        now = self.clock()
        full = self._count(rule) >= self.max_applications
        for key, held in list(self._held.items()):
            if held.sessions > 0:
                continue
            if now - held.released > self.idle:
                del self._held[key]
            elif full and key[0] == rule:
                del self._held[key]
                full = False

"""A fake `call_later` and clock for timer-driven code tested without an event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Timer:
    """A scheduled callback that runs only when the test fires it."""

    def __init__(self, delay: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.delay = delay
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        self.callback(*self.args)


class Timers:
    """Records every timer asked for; the clock stands still until the test moves `now`."""

    def __init__(self) -> None:
        self.now = 500.0
        self.all: list[Timer] = []

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(delay, callback, args)
        self.all.append(timer)
        return timer

    def clock(self) -> float:
        return self.now

    @property
    def live(self) -> list[Timer]:
        return [t for t in self.all if not t.cancelled]

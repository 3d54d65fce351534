"""Backlog: analysis runs later, in batches, in relay order, and whoever reads flushes."""

from __future__ import annotations

import asyncio
import time

from proxy.backlog import Backlog


class Recorder:
    """Stands in for an Inspector: records what it is asked to analyse, and when."""

    def __init__(self, log: list[tuple[str, bool, bytes, float]], name: str) -> None:
        self.log = log
        self.name = name

    def client(self, data: bytes, now: float) -> None:
        self.log.append((self.name, True, data, now))

    def server(self, data: bytes, now: float) -> None:
        self.log.append((self.name, False, data, now))


def test_batches_by_count_and_keeps_relay_order() -> None:
    async def main() -> None:
        log: list[tuple[str, bool, bytes, float]] = []
        a, b = Recorder(log, "a"), Recorder(log, "b")
        backlog = Backlog(max_chunks=4, delay=60)
        backlog.add(a, True, b"1", 1.0)
        backlog.add(b, True, b"2", 2.0)
        backlog.add(a, False, b"3", 3.0)
        assert log == [] and len(backlog) == 3
        backlog.add(b, False, b"4", 4.0)
        assert log == [
            ("a", True, b"1", 1.0),
            ("b", True, b"2", 2.0),
            ("a", False, b"3", 3.0),
            ("b", False, b"4", 4.0),
        ]
        assert len(backlog) == 0

    asyncio.run(main())


def test_batches_by_bytes() -> None:
    async def main() -> None:
        log: list[tuple[str, bool, bytes, float]] = []
        backlog = Backlog(max_chunks=100, max_bytes=10, delay=60)
        backlog.add(Recorder(log, "a"), True, b"x" * 6, 1.0)
        assert log == []
        backlog.add(Recorder(log, "a"), True, b"y" * 6, 2.0)
        assert [data for _, _, data, _ in log] == [b"x" * 6, b"y" * 6]

    asyncio.run(main())


def test_a_quiet_backlog_is_analysed_after_its_delay() -> None:
    async def main() -> None:
        log: list[tuple[str, bool, bytes, float]] = []
        backlog = Backlog(max_chunks=100, delay=0.05)
        backlog.add(Recorder(log, "a"), True, b"q", 1.0)
        await asyncio.sleep(0.01)
        assert log == []
        await asyncio.sleep(0.1)
        assert log == [("a", True, b"q", 1.0)]
        backlog.add(Recorder(log, "a"), False, b"r", 2.0)
        backlog.flush()  # a reader does not wait for the timer
        assert log[-1] == ("a", False, b"r", 2.0)
        await asyncio.sleep(0.1)
        assert len(log) == 2  # the timer was cancelled, nothing ran twice

    asyncio.run(main())


class Clocked(Recorder):
    """A Recorder that is also ticked, as an Inspector is while its session is open."""

    def tick(self, now: float) -> None:
        self.log.append((self.name, False, b"tick", now))


def test_the_clock_flushes_then_ticks_each_watched_session_while_any_is_watched() -> None:
    async def main() -> None:
        log: list[tuple[str, bool, bytes, float]] = []
        a, b = Clocked(log, "a"), Clocked(log, "b")
        backlog = Backlog(max_chunks=100, delay=60, tick_interval=0.02)
        backlog.watch(a)
        backlog.watch(b)
        backlog.add(a, True, b"q", time.perf_counter())
        await asyncio.sleep(0.03)
        # the queued chunk first, then both sessions, told a time after it
        assert [(name, data) for name, _, data, _ in log[:3]] == [
            ("a", b"q"),
            ("a", b"tick"),
            ("b", b"tick"),
        ]
        assert log[1][3] >= log[0][3] and log[1][3] == log[2][3]
        backlog.unwatch(a)
        await asyncio.sleep(0.05)
        assert {name for name, _, data, _ in log[3:]} == {"b"}  # b only, and still ticked
        backlog.unwatch(b)
        await asyncio.sleep(0.03)
        ticks = len(log)
        await asyncio.sleep(0.05)
        assert len(log) == ticks  # the clock stopped with the last session
        backlog.watch(a)  # and starts again with the next
        await asyncio.sleep(0.03)
        assert log[-1][:3] == ("a", False, b"tick")
        backlog.unwatch(a)

    asyncio.run(main())


def test_without_a_loop_there_is_no_clock() -> None:
    """Analysis run offline (a benchmark, a tool): watching changes nothing."""
    log: list[tuple[str, bool, bytes, float]] = []
    Backlog().watch(Clocked(log, "a"))
    assert log == []

"""Backlog: analysis runs later, in batches, in relay order, and whoever reads flushes."""

from __future__ import annotations

import asyncio

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
